"""Which documents an index holds, and the order they are encoded in (``evaluation.index.build_index``).

* ``subset_doc_ids``: the documents the first N query rows can retrieve in the distractor setting
  (their candidate paragraphs and gold positives) — what ``evaluation run --max-examples N`` needs,
  instead of every document of the dataset;
* ``encode_into``: the documents sorted by token count, then batched (each batch pads to about its
  own length), the vectors written back in ``docs/`` order.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from onegen.errors import ConfigError, ManifestMismatch


def subset_doc_ids(data: Any, rows: int) -> list[str]:
    """The doc ids the first ``rows`` query rows can retrieve in the distractor setting: the union of
    their ``candidates`` (their own paragraphs) and gold ``positives``. A row without candidates
    would search the whole index: refused (ConfigError)."""
    if rows < 1:
        raise ConfigError(f"rows must be >= 1, got {rows}")
    n = min(rows, len(data))
    wanted, bare = _rows_docs(data, range(n))
    if bare:
        raise ConfigError(f"{data.path}: {bare} of the first {n} rows have no candidate paragraphs (they are searched "
                          f"in the whole index, e.g. entity linking or an open-setting dataset): an index of the rows' "
                          f"own documents cannot serve them; build a full index (no --rows)")
    return wanted


def row_doc_ids(data: Any, rows: Sequence[int]) -> list[str] | None:
    """The doc ids the query rows at ``rows`` can retrieve in the distractor setting (as ``subset_doc_ids``);
    None when one of them has no candidates (it searches every document)."""
    wanted, bare = _rows_docs(data, rows)
    return None if bare else wanted


def _rows_docs(data: Any, rows: Sequence[int]) -> tuple[list[str], int]:
    """(sorted union of the rows' candidates and positives, how many rows have no candidates)."""
    cols = data.queries.select_columns(["candidates", "positives"]).select(list(rows))[:]
    wanted: set[str] = set()
    for cands, pos in zip(cols["candidates"], cols["positives"]):
        wanted.update(cands)
        wanted.update(pos)
    return sorted(wanted), sum(1 for c in cols["candidates"] if not c)


def doc_positions(data: Any, doc_ids: Sequence[str] | None) -> list[int]:
    """``docs/`` row numbers to encode, ascending (the index keeps ``docs/`` order): all, or ``doc_ids``."""
    if doc_ids is None:
        return list(range(len(data.docs)))
    missing = [d for d in doc_ids if d not in data.doc_index]
    if missing:
        raise ManifestMismatch(f"{data.path}: queries refer to {len(missing)} documents that docs/ does not hold "
                               f"(e.g. {missing[0]!r}); prepare the dataset again")
    return sorted({data.doc_index[d] for d in doc_ids})


def doc_lengths(docs: Any, positions: Sequence[int]) -> np.ndarray:
    """Token count of the documents at ``positions`` (from the Arrow list offsets: no token is read)."""
    pos = np.asarray(positions, dtype=np.int64)
    if getattr(docs, "_indices", None) is None and hasattr(docs, "data"):
        # pyarrow.compute (~0.1 s) only for an unindexed Arrow table; the other path needs none
        import pyarrow.compute as pc

        lens = pc.list_value_length(docs.data.column("input_ids")).to_numpy(zero_copy_only=False)
        return np.asarray(lens, dtype=np.int64)[pos]
    return np.asarray([len(r) for r in docs.select(pos)["input_ids"]], dtype=np.int64)


def encode_into(emb: np.ndarray, runtime: Any, docs: Any, positions: Sequence[int], batch_size: int, bar) -> None:
    """Encode the documents at ``positions`` into ``emb`` (row i = ``positions[i]``), shortest first:
    all of them sorted by token count, then batched (little padding), read in chunks of 16 batches."""
    # heavy (torch): imported where documents are encoded
    import torch

    from onegen.hidden import encode_documents  # lazy: as above

    row_of = {p: i for i, p in enumerate(positions)}
    lengths = doc_lengths(docs, positions)
    order = [positions[i] for i in np.argsort(lengths, kind="stable")]
    cols = docs.select_columns(["input_ids"])
    chunk = batch_size * 16
    with torch.no_grad():
        for s in range(0, len(order), chunk):
            part = order[s:s + chunk]
            vecs = encode_documents(runtime.model, cols[part]["input_ids"], runtime.pad_id, batch_size)
            if vecs.shape[1] != emb.shape[1]:
                raise ManifestMismatch(f"encoded vectors have dimension {vecs.shape[1]}, the model config says "
                                       f"{emb.shape[1]}")
            emb[[row_of[p] for p in part]] = vecs
            bar.update(len(part))
