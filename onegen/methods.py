"""The RAG methods an evaluation can run: one registry, read by every stage that names them.

``evaluation run --method`` (its choices, the retriever it builds, whether the checkpoint's own
document index is needed), ``evaluation compare`` (its row order and colours), the quickstart (its
rows and their generators, the summary's retriever column) and the benchmark all derive from
``METHODS``: adding a method here is the one edit. Torch-free: ``python -m evaluation --help``
imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # --method, the MLflow tag onegen.method, the quickstart's and benchmark's labels
    retriever: str  # the evaluation.retrievers name (evaluation.retrievers.RETRIEVERS)
    own_index: bool  # retrieves with the checkpoint's own [RD] index (built by `evaluation index`)
    retrieves_with: str  # in a few words, for the summaries' retriever column
    help: str  # one line for `python -m evaluation --help`
    color: str  # its bars in `evaluation compare`'s figure


_ALL = [
    Method("onegen", "onegen", True, "its own [RQ] state (one pass)",
           "one pass: the model's own state at [RQ] is the query (no re-encoding)", "#3B6FB6"),
    Method("two-pass", "two_pass", True, "the same model, query re-encoded",
           "the same model re-encodes prompt + generation up to [RQ] in a second forward", "#8DB0DD"),
    Method("pipeline-bm25", "bm25", False, "BM25",
           "a separate BM25 retriever over question + generation so far, same generator", "#D9822B"),
    Method("pipeline-minilm", "dense", False, "all-MiniLM-L6-v2",
           "a separate dense retriever (all-MiniLM-L6-v2), same generator", "#B5462F"),
    Method("no-retrieval", "none", False, "none (empty paragraph)",
           "an empty paragraph is inserted at every [RQ]", "#8C8C8C"),
]
# name -> Method, in the order tables and figures show them (OneGen, its two-pass variant, the pipelines, none)
METHODS: dict[str, Method] = {m.name: m for m in _ALL}
METHOD_NAMES: list[str] = list(METHODS)


def help_lines(indent: str = "  ") -> str:
    """The methods as ``--help`` lists them: name, then its one-line description, aligned."""
    width = max(len(n) for n in METHODS) + 2
    return "\n".join(f"{indent}{m.name:<{width}}{m.help}" for m in METHODS.values())
