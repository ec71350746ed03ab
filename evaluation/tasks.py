"""The two kinds of eval run: RAG (answer, retrieving at each ``[RQ]``) and entity linking (each
``[LK]`` searched in the entity index). Each part generates, scores, and returns what the run writes:
prediction records, headline metrics (MLflow names), plot data and detailed summaries.

The modules that load torch (generation, retrievers, linking, teacher forcing) are imported inside the
functions that use them (``# lazy``), so importing this module stays light.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
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


def pipeline_teacher_forced(rt, retriever, rows: list[int], *, setting: str,
                            progress: bool = True) -> tuple[dict[int, int], dict[int, int]]:
    """Teacher-forced Recall@1 counts (hits, totals per hop) of a separate retriever over ``rows``: for
    each gold ``[RQ]`` of each gold row, the query is the question + the gold text *generated* before
    it (GEN tokens only: inserted paragraphs and special tokens left out — exactly what the pipeline
    sees in free generation); hop j is a hit iff the top-1 is the row's ``positives[j]``."""
    # lazy: see module docstring
    from evaluation.retrievers import DenseRetriever, RetrievalStep

    steps: list[tuple[RetrievalStep, str, int]] = []
    for s in range(0, len(rows), 256):
        for r in rt.data.query_rows(rows[s:s + 256]):
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
    return hits, total


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


def _el_records(results, gold_mentions: list[list[dict]]) -> list[dict]:
    """One record a text: its free-generation links and, per gold mention, OneGen's and name match's entity."""
    out = []
    for r, mentions in zip(results, gold_mentions):
        d = r.to_dict()
        d["gold_mentions"] = mentions
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


def json_default(o: Any) -> Any:
    """What ``json.dumps`` cannot write itself in a run's files: numpy scalars and arrays, paths."""
    if hasattr(o, "tolist"):  # numpy arrays and scalars (a numpy scalar's tolist() is the Python value)
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _add_counts(counts: list[dict[int, int]]) -> dict[int, int]:
    """Per-hop counts of disjoint rows added up (a hop missing from a part counts 0 there)."""
    return {j: sum(c.get(j, 0) for c in counts) for j in sorted(set().union(*counts))}


@dataclass
class Raw:
    """What decoding a set of rows produced, before any scoring: a shard of a run writes it
    (``to_json``), the merge concatenates the shards' and scores them as one run (``finish``)."""

    results: list  # QuestionResult (RAG) / LinkResult (EL), in row order
    tf_counts: tuple[dict[int, int], dict[int, int]] | None  # teacher-forced hits and totals per hop
    gen_s: float
    config: dict[str, Any]  # the GenerationConfig / LinkConfig
    tf_query: str = "full"  # what a pipeline's teacher-forced query was (RAG)
    replayed: list = field(default_factory=list)  # EL: the gold output replayed (gold-mention linking)
    replay_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results], "gen_s": self.gen_s, "config": self.config,
                "tf_counts": [list(c.items()) for c in self.tf_counts] if self.tf_counts is not None else None,
                "tf_query": self.tf_query, "replayed": [r.to_dict() for r in self.replayed], "replay_s": self.replay_s}

    @classmethod
    def from_json(cls, d: dict[str, Any], task: str) -> "Raw":
        # lazy: see module docstring
        from evaluation.generate import QuestionResult
        from evaluation.linking import LinkResult  # lazy: as above

        kind = QuestionResult if task == "rag" else LinkResult
        counts = tuple({int(j): int(v) for j, v in c} for c in d["tf_counts"]) if d["tf_counts"] is not None else None
        return cls([kind.from_dict(r) for r in d["results"]], counts, float(d["gen_s"]), d["config"],  # type: ignore[arg-type]
                   d["tf_query"], [LinkResult.from_dict(r) for r in d["replayed"]], float(d["replay_s"]))

    @classmethod
    def concat(cls, parts: list["Raw"]) -> "Raw":
        """The shards' raws, in shard order, as one run's: results concatenated, counts and seconds added."""
        first = parts[0]
        counts = None
        if first.tf_counts is not None:
            counts = tuple(_add_counts([p.tf_counts[k] for p in parts]) for k in (0, 1))  # type: ignore[index]
        return cls([r for p in parts for r in p.results], counts, sum(p.gen_s for p in parts), first.config,  # type: ignore[arg-type]
                   first.tf_query, [r for p in parts for r in p.replayed], sum(p.replay_s for p in parts))


def rag_part(req: Any, rt: Any, idx: Any, retriever_name: str, n: int) -> TaskPart:
    """Answer the first ``n`` questions with retriever ``retriever_name`` (``evaluation.retrievers``)."""
    return rag_finish(req, retriever_name, rag_generate(req, rt, idx, retriever_name, list(range(n))))


def rag_generate(req: Any, rt: Any, idx: Any, retriever_name: str, rows: list[int]) -> Raw:
    """Answer the questions of ``rows``, and the teacher-forced recall counts of the same rows."""
    # lazy: see module docstring
    from evaluation.generate import GenerationConfig, run_questions
    from evaluation.retrievers import build_retriever  # lazy: as above
    from evaluation.teacher_forced import teacher_forced_counts  # lazy: as above

    cfg = GenerationConfig(max_new_tokens=req.max_new_tokens or 64, max_hops=req.max_hops, k=req.k,
                           setting=req.setting, force_retrieval_every=req.force_retrieval_every,  # type: ignore[arg-type]
                           batch_size=req.gen_batch_size)
    # (pipelines index the docs here: not timed)
    retriever = build_retriever(retriever_name, rt, idx, docs=_dense_docs(rt, retriever_name, req.setting, rows),
                                query_form=getattr(req, "pipeline_query", "full"))
    t0 = time.perf_counter()
    results = run_questions(rt, retriever, cfg, rows, progress=req.progress)
    gen_s = time.perf_counter() - t0
    if retriever_name in INDEX_RETRIEVERS:
        tf = teacher_forced_counts(rt, idx, rows, setting=req.setting, batch_size=req.batch_size, progress=req.progress)
    elif retriever_name != "none":
        tf = pipeline_teacher_forced(rt, retriever, rows, setting=req.setting, progress=req.progress)
    else:
        tf = None
    query = getattr(retriever, "query_form", "full") if retriever_name not in INDEX_RETRIEVERS else "full"
    return Raw(results, tf, gen_s, asdict(cfg), tf_query=query)


def _dense_docs(rt: Any, retriever_name: str, setting: str, rows: list[int]) -> list | None:
    """The dense pipeline in the distractor setting ranks only each row's own paragraphs, so only those are
    encoded (the toy benchmark's 3 2Wiki questions: 9 s a stage instead of 63 s for MiniLM over all 3,301
    paragraphs, 2 CPU cores); None: every document. BM25 keeps the whole corpus: its IDF is computed over it."""
    from evaluation.doc_select import row_doc_ids  # lazy: see module docstring

    if retriever_name != "dense" or setting != "distractor" or rt.data is None or rt.docs is None:
        return None
    ids = row_doc_ids(rt.data, rows)
    return None if ids is None else [rt.docs.get(d) for d in ids]


def rag_finish(req: Any, retriever_name: str, raw: Raw) -> TaskPart:
    """Score a RAG run's raw results: summaries, headline metrics, records and plot data."""
    # lazy: see module docstring
    from evaluation.teacher_forced import recall_from_counts

    results = raw.results
    summary = summarize_rag(results, k=req.k, normalization=req.normalization)
    free_hops = _free_hop_recall(results)
    retrieving = retriever_name != "none"
    tf = None
    if raw.tf_counts is not None:
        extra = {"setting": req.setting} if retriever_name in INDEX_RETRIEVERS else {"setting": req.setting,
                                                                                       "query": raw.tf_query}
        tf = recall_from_counts(*raw.tf_counts, **extra)
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
    return TaskPart(head, _rag_records(results, req.k, req.normalization), hist, dict(free_hops) if retrieving else {},
                    tf_hops, {"summary": summary, "teacher_forced": tf, "generation": raw.config}, len(results),
                    raw.gen_s, sum(r.n_generated for r in results), {f"gen.{k}": v for k, v in raw.config.items()})


def el_part(req: Any, rt: Any, idx: Any, n: int) -> TaskPart:
    """Link the first ``n`` texts: the model's ``[LK]`` states searched in the entity index ``idx``;
    then, given the gold mentions, OneGen's linking accuracy vs a name-match baseline over the same KB."""
    return el_finish(req, el_generate(req, rt, idx, list(range(n))), rt.data, idx.doc_ids)


def el_generate(req: Any, rt: Any, idx: Any, rows: list[int]) -> Raw:
    """Link the texts of ``rows`` (free generation, then the gold output replayed), and the
    teacher-forced recall counts of the same rows."""
    # lazy: see module docstring
    from evaluation.linking import LinkConfig, run_linking
    from evaluation.teacher_forced import teacher_forced_counts  # lazy: as above

    lcfg = LinkConfig(max_new_tokens=req.max_new_tokens, k=req.k, batch_size=req.gen_batch_size)
    t0 = time.perf_counter()
    results = run_linking(rt, idx, lcfg, rows, progress=req.progress)
    gen_s = time.perf_counter() - t0
    tf = teacher_forced_counts(rt, idx, rows, setting="open", batch_size=req.batch_size, progress=req.progress)
    t0 = time.perf_counter()
    replayed = run_linking(rt, idx, lcfg, rows, gold_mentions=True, progress=req.progress)
    return Raw(results, tf, gen_s, asdict(lcfg), replayed=replayed, replay_s=time.perf_counter() - t0)


def el_finish(req: Any, raw: Raw, data: Any, kb_ids: list[str]) -> TaskPart:
    """Score an EL run's raw results against the KB ``kb_ids`` (the entity index's ids); ``data``: the
    prepared dataset (the name-match baseline reads its mentions)."""
    # lazy: see module docstring
    from evaluation.linking import (agreement, gold_link_accuracy, gold_mention_table, name_match_links,
                                    name_match_scores, summarize_linking)
    from evaluation.teacher_forced import recall_from_counts  # lazy: as above

    results = raw.results
    summary = summarize_linking(results)
    tf = recall_from_counts(*raw.tf_counts, setting="open")  # type: ignore[misc]
    name_rows, ambiguous = name_match_links(data, kb_ids, range(len(results)))
    table = gold_mention_table(raw.replayed, name_rows)
    gold = {"onegen": {**gold_link_accuracy(raw.replayed), "wall_s": raw.replay_s},
            "name_match": name_match_scores(name_rows, ambiguous, len(kb_ids)),
            "agreement": agreement(table),
            "rule": "name match: KB entity whose title equals the mention text after lower-casing and whitespace "
                    "collapsing; several -> first by doc id; none -> wrong"}
    head = {"el_precision": summary["precision"], "el_recall": summary["recall"], "el_f1": summary["f1"],
            "el_md_precision": summary["md_precision"], "el_md_recall": summary["md_recall"],
            "el_md_f1": summary["md_f1"], "recall_at_1_free": summary.get("link_recall_at_1"),
            "recall_at_1_tf": tf["recall@1"], "mean_links": summary.get("n_links"),
            "unaligned": summary.get("unaligned"), "el_link_acc_gold": gold["onegen"]["acc"],
            "el_name_match_acc_gold": gold["name_match"]["acc"],
            "el_name_match_ambiguous": gold["name_match"]["ambiguous"], "kb_size": len(kb_ids)}
    hist = _scores_for_hist((l.retrieved, r.gold_links[j] if j < len(r.gold_links) else None)
                            for r in results for j, l in enumerate(r.links))
    return TaskPart(head, _el_records(results, table), hist, {"link": summary.get("link_recall_at_1")}, {"link": tf["recall@1"]},
                    {"summary": summary, "teacher_forced": tf, "gold_mentions": gold, "linking": raw.config},
                    len(results), raw.gen_s, sum(r.n_generated for r in results),
                    {f"link.{k}": v for k, v in raw.config.items()})
