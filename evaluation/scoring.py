"""Scores of inference results, computed only with ``evaluation.metrics`` (design §6).

RAG, per question: ``em``/``f1`` (best over the gold aliases; answer normalisation ``default`` or
``official``, ``evaluation.metrics``), ``hop_recall_at_1`` (hop i's top-1
is hop i's gold doc: Recall@1 *as observed in free generation*), ``recall@1``/``recall@k`` (gold
doc ids found in the top-k of any hop), plus the costs. ``summarize_rag`` averages them with
``metrics.aggregate`` (a question without gold hops is left out of the recall means, not counted 0).
"""

from __future__ import annotations

from typing import Any, Sequence

from evaluation.metrics import aggregate, best_over_aliases, hop_recall_at_1, recall_at_k

COST_KEYS = ("wall_s", "n_generated", "n_hops", "decode_steps", "prefills", "retriever_forwards", "answer_found")


def question_scores(r: Any, k: int, normalization: str = "default") -> dict[str, Any]:
    """One :class:`evaluation.generate.QuestionResult` -> a flat record of its metrics and costs;
    EM/F1 with the answer ``normalization`` (``evaluation.metrics``: default / official)."""
    rec: dict[str, Any] = {"example_id": r.example_id, "round": r.round, "stop_reason": r.stop_reason}
    if r.gold_answers:
        rec.update(best_over_aliases(r.answer, r.gold_answers, normalization))
    if r.gold_hops:
        ranked = r.retrieved_ids()
        rec["hop_recall_at_1"] = hop_recall_at_1([h[:1] for h in ranked], r.gold_hops)
        rec["recall@1"] = recall_at_k(ranked, r.gold_hops, 1)
        if k > 1:
            rec[f"recall@{k}"] = recall_at_k(ranked, r.gold_hops, k)
    rec.update(wall_s=r.wall_s, n_generated=r.n_generated, n_hops=len(r.hops), decode_steps=r.decode_steps,
               prefills=r.prefills, retriever_forwards=r.retriever_forwards, answer_found=r.answer_found)
    return rec


def summarize_rag(results: Sequence[Any], k: int, normalization: str = "default") -> dict[str, Any]:
    """Means over questions: answer EM/F1 (with ``normalization``), retrieval recalls, and the mean costs."""
    records = [question_scores(r, k, normalization) for r in results]
    keys = ["em", "f1", "hop_recall_at_1", "recall@1"] + ([f"recall@{k}"] if k > 1 else []) + list(COST_KEYS)
    out = aggregate(records, keys)
    out["stop_reasons"] = _count(r.stop_reason for r in results)
    out["normalization"] = normalization
    return out


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out
