"""Teacher-forced retrieval accuracy on a prepared dev set (what the trainer reports as it goes).

Each RET state of a gold row (the gold paragraphs of earlier hops in its context) is ranked against
candidate documents: the question's own paragraphs for RAG (the distractor setting), the entity KB
for entity linking. Accuracy = fraction whose top-1 is the positive.

The KB can be large (the paper links against 1.25M entities: encoding it on every rank at every
``eval_every`` would take hours), so at most ``max_candidates`` entities are encoded: the positives
of the evaluated rows plus a seeded sample of the others. The result says how many were ranked and
whether they were sampled, and the trainer names its metric after that.
"""

from __future__ import annotations

import numpy as np
import torch

from onegen.hidden import encode_documents, query_vectors
from onegen.prepared import PreparedData


@torch.no_grad()
def retrieval_accuracy(model: torch.nn.Module, data: PreparedData, pad_id: int, max_rows: int = 200,
                       batch_size: int = 32, max_candidates: int = 2000, seed: int = 0) -> dict[str, float]:
    was_training = model.training
    model.eval()
    n = min(max_rows, len(data))
    rows = data.query_rows(list(range(n)))
    qvecs = query_vectors(model, [r["input_ids"] for r in rows], [r["roles"] for r in rows], pad_id, batch_size)
    sampled = False
    if data.task == "el" or not any(r["candidates"] for r in rows):
        cand_ids, sampled = kb_candidates(sorted(data.doc_index), [p for r in rows for p in r["positives"]],
                                          max_candidates, seed)
    else:
        cand_ids = sorted({c for r in rows for c in r["candidates"]} | {p for r in rows for p in r["positives"]})
    doc_rows = data.doc_rows(cand_ids)
    dvecs = encode_documents(model, [d["input_ids"] for d in doc_rows], pad_id, batch_size)
    where = {d: i for i, d in enumerate(cand_ids)}
    hits = total = 0
    mrr = 0.0
    for r, q in zip(rows, qvecs):
        cands = r["candidates"] if (data.task == "rag" and r["candidates"]) else cand_ids
        idx = np.asarray([where[c] for c in cands])
        scores = q @ dvecs[idx].T  # [n_ret, n_cand]
        for j, pos in enumerate(r["positives"]):
            if pos not in where or pos not in cands:
                continue
            s = scores[j]
            rank = int((s > s[cands.index(pos)]).sum())
            hits += rank == 0
            mrr += 1.0 / (rank + 1)
            total += 1
    if was_training:
        model.train()
    return {"retrieval_acc": hits / max(total, 1), "retrieval_mrr": mrr / max(total, 1), "n": total,
            "candidates": len(cand_ids), "sampled": sampled}


def kb_candidates(kb: list[str], positives: list[str], limit: int, seed: int) -> tuple[list[str], bool]:
    """The whole KB when it has at most ``limit`` entries, else the positives plus a seeded sample of
    the rest up to ``limit`` (sorted, so every rank encodes the same list in the same order)."""
    if len(kb) <= limit:
        return kb, False
    must = sorted(set(positives) & set(kb))
    rest = sorted(set(kb) - set(must))
    rng = np.random.default_rng(seed)
    take = rng.choice(len(rest), size=max(0, min(len(rest), limit - len(must))), replace=False)
    return sorted(must + [rest[i] for i in take]), True
