"""Document row lengths of the pool, and ``tagging.max_doc_length=auto`` resolved from them.

A fixed ``max_doc_length`` of 128 tokens silently cut 928 of the 3,301 paragraphs of the 2Wiki
sample. ``auto`` (the default) takes the ``max_doc_length_percentile`` (99) of the pool's document
row lengths, capped at ``max_doc_length_cap`` (512), so about 1% of the documents are cut, each one
listed in ``OUT/truncated.jsonl``.

A row's length is what ``Tagger.document_row`` builds before cutting: BOS (when the tokenizer adds
one) + the ``title: text`` template + the RET token. Percentiles are *nearest rank* (the smallest
length that at least p% of the documents do not exceed: an integer, no interpolation), computed over
the *whole* pool, so every job-array task (``--only-shards I/N``) and ``--finish-only`` resolve the
same number; the first computation is kept in ``OUT/doc_lengths.json`` and reused by reruns of the
same directory (``prep_config.json`` guarantees the same inputs, config and tokenizer).

The manifest's ``doc_lengths`` holds ``requested`` (``"auto"`` or the number given), ``chosen``,
``percentile``, ``cap``, ``docs``, ``p50``/``p90``/``p99``/``max`` and ``cut`` (documents longer than
``chosen``); the manifest's ``config.tagging.max_doc_length`` holds the resolved number, which
inference uses as its paragraph budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from onegen.manifest import atomic_write_json

CACHE = "doc_lengths.json"
RULE = "nearest rank over the document rows of the whole pool (BOS + template + RET, before cutting)"


def nearest_rank(sorted_lengths: list[int], percentile: float) -> int:
    """The smallest value that at least ``percentile``% of ``sorted_lengths`` (ascending) do not exceed."""
    if not sorted_lengths:
        return 0
    rank = max(1, math.ceil(percentile / 100 * len(sorted_lengths)))
    return sorted_lengths[min(rank, len(sorted_lengths)) - 1]


def distribution(lengths: list[int]) -> dict:
    s = sorted(lengths)
    return {"docs": len(s), "p50": nearest_rank(s, 50), "p90": nearest_rank(s, 90), "p99": nearest_rank(s, 99),
            "max": s[-1] if s else 0}


def resolve(tagging, lengths: list[int]) -> dict:
    """The ``doc_lengths`` entry: the distribution and the max_doc_length it decides."""
    dist = distribution(lengths)
    requested = tagging.max_doc_length
    if requested == "auto":
        at = nearest_rank(sorted(lengths), tagging.max_doc_length_percentile)
        chosen = max(2, min(tagging.max_doc_length_cap, at)) if lengths else tagging.max_doc_length_cap
    else:
        chosen = int(requested)
    return {"requested": requested, "chosen": chosen, "percentile": tagging.max_doc_length_percentile,
            "cap": tagging.max_doc_length_cap, **dist, "cut": sum(1 for n in lengths if n > chosen), "rule": RULE}


def pool_doc_lengths(out: str | Path, tagger, doc_list: list, entity: bool, tagging) -> dict:
    """``resolve`` over ``doc_list`` (the whole pool), computed once per output directory."""
    path = Path(out) / CACHE
    if path.is_file():
        return json.loads(path.read_text())
    entry = resolve(tagging, tagger.document_lengths(doc_list, entity=entity))
    atomic_write_json(path, entry)  # every task writes the same bytes: a race is harmless
    return entry


def describe(entry: dict) -> str:
    """The ``[prep]`` line (without the prefix)."""
    how = (f"auto = p{entry['percentile']:g} capped at {entry['cap']}" if entry["requested"] == "auto"
           else "tagging.max_doc_length")
    return (f"document rows: {entry['docs']} documents, tokens p50 {entry['p50']} / p90 {entry['p90']} / "
            f"p99 {entry['p99']} / max {entry['max']}; max_doc_length {entry['chosen']} ({how}): "
            f"{entry['cut']} document(s) cut" + (" (listed in truncated.jsonl)" if entry["cut"] else ""))
