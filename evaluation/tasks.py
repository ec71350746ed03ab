"""The two kinds of eval run: RAG (answer, retrieving at each ``[RQ]``) and entity linking (each
``[LK]`` searched in the entity index). Each part generates, scores, and returns what the run writes:
prediction records, headline metrics (MLflow names), plot data and detailed summaries.

The modules that load torch (generation, retrievers, linking, teacher forcing) are imported inside the
functions that use them (``# lazy``), so importing this module stays light.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from evaluation.metrics import el_scores
from evaluation.scoring import question_scores, summarize_rag
from onegen.roles import GEN

INDEX_RETRIEVERS = ("onegen", "two_pass")  # the retrievers that search the model's own index


@dataclass
class TaskPart:
    """What one task's pass produced (``run._run`` adds costs, writes files and logs)."""

    head: dict[str, Any]
    records: list[dict]
    hist: tuple[list[float], list[float]]
    free_plot: dict[str, Any]
    tf_plot: dict[str, Any]
    details: dict[str, Any]
    n_results: int
    gen_s: float
    tokens: int
    params: dict[str, Any] = field(default_factory=dict)


def pipeline_teacher_forced(rt, retriever, *, setting: str, max_rows: int | None = None,
                            progress: bool = True) -> dict[str, Any]:
    """Teacher-forced Recall@1 of a separate retriever: for each gold ``[RQ]`` of each gold row, the
    query is the question + the gold text *generated* before it (GEN tokens only: inserted
    paragraphs and special tokens left out — exactly what the pipeline sees in free generation);
    hop j is a hit iff the top-1 is the row's ``positives[j]``."""
    # lazy: see module docstring
    from evaluation.retrievers import DenseRetriever, RetrievalStep

    n = len(rt.data) if max_rows is None else min(max_rows, len(rt.data))
    steps: list[tuple[RetrievalStep, str, int]] = []
    for s in range(0, n, 256):
        for r in rt.data.query_rows(list(range(s, min(n, s + 256)))):
            ids, roles, p0 = list(r["input_ids"]), list(r["roles"]), int(r["prompt_len"])
            cands = list(r["candidates"]) if setting == "distractor" and r.get("candidates") else None
            start = p0
            for j, (pos, gold) in enumerate(zip(r["ret_positions"], r["positives"])):
                own = [ids[t] for t in range(p0, int(pos)) if roles[t] == GEN]
                latest = [ids[t] for t in range(start, int(pos)) if roles[t] == GEN]
                text = rt.tokenizer.decode(own, skip_special_tokens=True)
                steps.append((RetrievalStep(question=r["question"], generated_text=text, k=1, candidates=cands, hop=j,
                                            latest_text=rt.tokenizer.decode(latest, skip_special_tokens=True)),
                              str(gold), j))
                start = int(pos) + 1
    hits: dict[int, int] = {}
    total: dict[int, int] = {}
    if isinstance(retriever, DenseRetriever) and steps:  # one batched encoder pass instead of one per hop
        q = retriever.encoder.encode([st.pipeline_query(retriever.query_form) for st, _, _ in steps])
        restrict = [st.candidates for st, _, _ in steps]
        tops = retriever.index.search(q, 1, restrict if any(c is not None for c in restrict) else None)
    else:
        tops = [retriever.retrieve(st) for st, _, _ in tqdm(steps, desc="teacher-forced recall", unit="hop",
                                                             disable=not progress)]
    for (st, gold, j), top in zip(steps, tops):
        total[j] = total.get(j, 0) + 1
        hits[j] = hits.get(j, 0) + int(bool(top) and top[0][0] == gold)
    out: dict[str, Any] = {"recall@1": sum(hits.values()) / max(sum(total.values()), 1), "n": sum(total.values()),
                           "setting": setting, "query": getattr(retriever, "query_form", "full")}
    for j in sorted(total):
        out[f"recall@1/hop{j + 1}"] = hits[j] / total[j]
        out[f"n/hop{j + 1}"] = total[j]
    return out


def _free_hop_recall(results) -> dict[str, float]:
    """Hop-aligned Recall@1 of free generation, per hop index (1-based)."""
    hits: dict[int, int] = {}
    total: dict[int, int] = {}
    for r in results:
        for j, gold in enumerate(r.gold_hops):
            total[j] = total.get(j, 0) + 1
            top = r.hops[j].retrieved[:1] if j < len(r.hops) else []
            hits[j] = hits.get(j, 0) + int(bool(top) and top[0][0] == gold)
    return {f"hop{j + 1}": hits[j] / total[j] for j in sorted(total)}


def _rag_records(results, k: int, normalization: str = "default") -> list[dict]:
    out = []
    for r in results:
        d = r.to_dict()
        d["generated_text"] = d.pop("output_text")
        sc = question_scores(r, k, normalization)
        d["scores"] = {key: sc[key] for key in ("em", "f1", "hop_recall_at_1", "recall@1", f"recall@{k}") if key in sc}
        out.append(d)
    return out


def _el_records(results) -> list[dict]:
    out = []
    for r in results:
        d = r.to_dict()
        d["generated_text"] = d.pop("output_text")
        d["question"] = r.text
        s = el_scores([r.predictions], [r.gold])
        d["scores"] = {"el_f1": s["f1"], "el_md_f1": s["md_f1"]}
        out.append(d)
    return out


def _scores_for_hist(pairs) -> tuple[list[float], list[float]]:
    """``pairs`` of (ranked hits, gold id or None) -> top-1 scores of hits and of misses."""
    hit, miss = [], []
    for ranked, gold in pairs:
        if not ranked or gold is None:
            continue
        (hit if ranked[0][0] == gold else miss).append(float(ranked[0][1]))
    return hit, miss


def rag_part(req: Any, rt: Any, idx: Any, retriever_name: str, n: int) -> TaskPart:
    """Answer the first ``n`` questions with retriever ``retriever_name`` (``evaluation.retrievers``)."""
    # lazy: see module docstring
    from evaluation.generate import GenerationConfig, run_questions
    from evaluation.retrievers import build_retriever  # lazy: as above
    from evaluation.teacher_forced import teacher_forced_recall  # lazy: as above

    cfg = GenerationConfig(max_new_tokens=req.max_new_tokens or 64, max_hops=req.max_hops, k=req.k,
                           setting=req.setting, force_retrieval_every=req.force_retrieval_every,  # type: ignore[arg-type]
                           batch_size=req.gen_batch_size)
    # (pipelines index the docs here: not timed)
    retriever = build_retriever(retriever_name, rt, idx, query_form=getattr(req, "pipeline_query", "full"))
    t0 = time.perf_counter()
    results = run_questions(rt, retriever, cfg, list(range(n)), progress=req.progress)
    gen_s = time.perf_counter() - t0
    summary = summarize_rag(results, k=req.k, normalization=req.normalization)
    free_hops = _free_hop_recall(results)
    retrieving = retriever_name != "none"
    if retriever_name in INDEX_RETRIEVERS:
        tf = teacher_forced_recall(rt, idx, setting=req.setting, max_rows=n, batch_size=req.batch_size,
                                   progress=req.progress)
    else:
        tf = pipeline_teacher_forced(rt, retriever, setting=req.setting, max_rows=n,
                                     progress=req.progress) if retrieving else None
    head: dict[str, Any] = {
        "em": summary.get("em"), "f1": summary.get("f1"),
        "recall_at_1_free": summary.get("hop_recall_at_1") if retrieving else None,
        "recall_at_1_any": summary.get("recall@1") if retrieving else None,
        f"recall_at_{req.k}": summary.get(f"recall@{req.k}") if retrieving and req.k > 1 else None,
        "recall_at_1_tf": tf["recall@1"] if tf else None,
        "answer_found": summary.get("answer_found"), "mean_hops": summary.get("n_hops"),
    }
    if retrieving:
        head.update({f"recall_at_1_free_{h}": v for h, v in free_hops.items()})
    tf_hops = {k.split("/")[1]: v for k, v in tf.items() if k.startswith("recall@1/")} if tf else {}
    head.update({f"recall_at_1_tf_{h}": v for h, v in tf_hops.items()})
    hist = _scores_for_hist((h.retrieved, r.gold_hops[j] if j < len(r.gold_hops) else None)
                            for r in results for j, h in enumerate(r.hops))
    return TaskPart(head, _rag_records(results, req.k, req.normalization), hist, dict(free_hops) if retrieving else {}, tf_hops,
                    {"summary": summary, "teacher_forced": tf, "generation": asdict(cfg)}, len(results), gen_s,
                    sum(r.n_generated for r in results), {f"gen.{k}": v for k, v in asdict(cfg).items()})


def el_part(req: Any, rt: Any, idx: Any, n: int) -> TaskPart:
    """Link the first ``n`` texts: the model's ``[LK]`` states searched in the entity index ``idx``;
    then, given the gold mentions, OneGen's linking accuracy vs a name-match baseline over the same KB."""
    # lazy: see module docstring
    from evaluation.linking import LinkConfig, run_linking, summarize_linking
    from evaluation.teacher_forced import teacher_forced_recall  # lazy: as above

    lcfg = LinkConfig(max_new_tokens=req.max_new_tokens, k=req.k, batch_size=req.gen_batch_size)
    t0 = time.perf_counter()
    results = run_linking(rt, idx, lcfg, list(range(n)), progress=req.progress)
    gen_s = time.perf_counter() - t0
    summary = summarize_linking(results)
    tf = teacher_forced_recall(rt, idx, setting="open", max_rows=n, batch_size=req.batch_size, progress=req.progress)
    gold = _gold_mention_linking(req, rt, idx, lcfg, n)
    head = {"el_precision": summary["precision"], "el_recall": summary["recall"], "el_f1": summary["f1"],
            "el_md_precision": summary["md_precision"], "el_md_recall": summary["md_recall"],
            "el_md_f1": summary["md_f1"], "recall_at_1_free": summary.get("link_recall_at_1"),
            "recall_at_1_tf": tf["recall@1"], "mean_links": summary.get("n_links"),
            "unaligned": summary.get("unaligned"), "el_link_acc_gold": gold["onegen"]["acc"],
            "el_name_match_acc_gold": gold["name_match"]["acc"],
            "el_name_match_ambiguous": gold["name_match"]["ambiguous"], "kb_size": len(idx)}
    hist = _scores_for_hist((l.retrieved, r.gold_links[j] if j < len(r.gold_links) else None)
                            for r in results for j, l in enumerate(r.links))
    return TaskPart(head, _el_records(results), hist, {"link": summary.get("link_recall_at_1")}, {"link": tf["recall@1"]},
                    {"summary": summary, "teacher_forced": tf, "gold_mentions": gold, "linking": asdict(lcfg)},
                    len(results), gen_s, sum(r.n_generated for r in results),
                    {f"link.{k}": v for k, v in asdict(lcfg).items()})


def _gold_mention_linking(req: Any, rt: Any, idx: Any, lcfg: Any, n: int) -> dict[str, Any]:
    """Linking given the gold mentions of the first ``n`` texts: OneGen (the gold output replayed, each
    ``[LK]`` state searched in ``idx``: ``linking.gold_link_accuracy``) and the name-match baseline
    over the same KB (``linking.name_match_baseline``)."""
    # lazy: see module docstring
    from evaluation.linking import gold_link_accuracy, name_match_baseline, run_linking

    t0 = time.perf_counter()
    replayed = run_linking(rt, idx, lcfg, list(range(n)), gold_mentions=True, progress=req.progress)
    onegen = {**gold_link_accuracy(replayed), "wall_s": time.perf_counter() - t0}
    names = name_match_baseline(rt.data, idx.doc_ids, range(n))
    return {"onegen": onegen, "name_match": names,
            "rule": "name match: KB entity whose title equals the mention text after lower-casing and whitespace "
                    "collapsing; several -> first by doc id; none -> wrong"}
