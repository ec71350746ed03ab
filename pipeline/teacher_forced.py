"""Teacher-forced retrieval accuracy on a prepared dev set (what the trainer reports as it goes).

Each RET state of a gold row (the gold paragraphs of earlier hops in its context) is ranked against
candidate documents: the question's own paragraphs for RAG (the distractor setting), the whole
entity KB for entity linking. Accuracy = fraction whose top-1 is the positive.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data import PreparedData
from pipeline.encode import encode_documents, query_vectors


@torch.no_grad()
def retrieval_accuracy(model: torch.nn.Module, data: PreparedData, pad_id: int, max_rows: int = 200,
                       batch_size: int = 32) -> dict[str, float]:
    was_training = model.training
    model.eval()
    n = min(max_rows, len(data))
    rows = data.query_rows(list(range(n)))
    qvecs = query_vectors(model, [r["input_ids"] for r in rows], [r["roles"] for r in rows], pad_id, batch_size)
    if data.task == "el" or not any(r["candidates"] for r in rows):
        cand_ids = sorted(data.doc_index)
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
    return {"retrieval_acc": hits / max(total, 1), "retrieval_mrr": mrr / max(total, 1), "n": total}
