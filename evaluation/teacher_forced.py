"""Teacher-forced Recall@1 per hop, against the same document index inference uses.

Each gold query row (gold paragraphs of earlier hops in its context) is run once in full; the state
at each RET position (``onegen.hidden.query_vectors``, the trainer's own code) is searched in the
index — restricted to the row's candidates in the distractor setting, the whole index otherwise (and
always for entity linking, whose rows have no candidates). Hop j is a hit iff its top-1 is the
row's ``positives[j]``. Compare with ``hop_recall_at_1`` of free generation
(``evaluation.scoring``): the gap is what the model's own decoding loses.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from evaluation.index import DocIndex
from evaluation.runtime import Runtime
from onegen.errors import ConfigError
from onegen.hidden import query_vectors


def teacher_forced_recall(rt: Runtime, index: DocIndex, *, setting: Literal["distractor", "open"] = "distractor",
                          max_rows: int | None = None, batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
    """``{"recall@1": all hops, "recall@1/hop1": ..., "n": RET positions scored, "n/hop1": ...}``."""
    if rt.data is None:
        raise ConfigError("teacher_forced_recall needs a runtime loaded with a prepared dataset")
    n = len(rt.data) if max_rows is None else min(max_rows, len(rt.data))
    return recall_from_counts(*teacher_forced_counts(rt, index, list(range(n)), setting=setting, batch_size=batch_size,
                                                     progress=progress), setting=setting)


def teacher_forced_counts(rt: Runtime, index: DocIndex, rows: list[int], *,
                          setting: Literal["distractor", "open"] = "distractor", batch_size: int = 32,
                          progress: bool = True) -> tuple[dict[int, int], dict[int, int]]:
    """Hits and totals per hop index (0-based) over ``rows``: integers, so the counts of disjoint rows
    (the shards of a run) add up to those of all rows."""
    if rt.data is None:
        raise ConfigError("teacher_forced_counts needs a runtime loaded with a prepared dataset")
    hits: dict[int, int] = {}
    total: dict[int, int] = {}
    chunk = max(batch_size * 4, 1)
    bar = tqdm(total=len(rows), desc="teacher-forced recall", unit="row", disable=not progress)
    for s in range(0, len(rows), chunk):
        part = rt.data.query_rows(rows[s:s + chunk])
        vecs = query_vectors(rt.model, [r["input_ids"] for r in part], [r["roles"] for r in part], rt.pad_id, batch_size)
        for r, q in zip(part, vecs):
            if not len(r["positives"]):
                continue
            cands = list(r["candidates"]) if setting == "distractor" and r.get("candidates") else None
            found = index.search(np.asarray(q), 1, [cands] * len(q) if cands is not None else None)
            for j, (pos, top) in enumerate(zip(r["positives"], found)):
                total[j] = total.get(j, 0) + 1
                hits[j] = hits.get(j, 0) + int(bool(top) and top[0][0] == pos)
        bar.update(len(part))
    bar.close()
    return hits, total


def recall_from_counts(hits: dict[int, int], total: dict[int, int], **extra: Any) -> dict[str, Any]:
    """``{"recall@1", "n", "recall@1/hop<j>", "n/hop<j>"}`` of per-hop hit and total counts."""
    out: dict[str, Any] = {"recall@1": sum(hits.values()) / max(sum(total.values()), 1), "n": sum(total.values()),
                           **extra}
    for j in sorted(total):
        out[f"recall@1/hop{j + 1}"] = hits[j] / total[j]
        out[f"n/hop{j + 1}"] = total[j]
    return out
