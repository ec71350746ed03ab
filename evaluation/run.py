"""The ``index`` and ``run`` commands: one checkpoint, one prepared dataset, one method -> a results dir.

``run`` writes into RESULTS_DIR::

    predictions.jsonl   one line per question/text: question, generated text, final answer, per hop
                        the ranked (doc id, score) list and the inserted doc, gold answers/docs, scores
    metrics.json        headline metrics (flat, MLflow names) + the detailed summaries
    plots/              recall_per_hop.png, top1_scores.png
    index/              the model's document index, when none was given and the method needs one
    manifest.json       stage "eval": what was evaluated (model / data / index fingerprints)

Headline metrics (design §6): ``em``, ``f1``; ``recall_at_1_free`` = hop-aligned Recall@1 observed
in free generation (hop i's top-1 is hop i's gold doc id; a hop never reached is a miss), per hop
``recall_at_1_free_hop<i>``; ``recall_at_1_any`` = fraction of gold docs that are the top-1 of some
hop; ``recall_at_1_tf`` = teacher-forced Recall@1 (gold rows, gold paragraphs of earlier hops in the
context): for ``onegen``/``two-pass`` the model's own state at each gold ``[RQ]``
(``evaluation.teacher_forced``), for the pipelines the separate retriever with query = question +
the gold text generated before that ``[RQ]``, none for ``no-retrieval``; entity linking ``el_f1``
(GERBIL strong match, micro) with ``el_precision``/``el_recall`` and mention detection
``el_md_f1``; costs ``tokens_per_s`` (generated tokens / generation wall time) and
``s_per_question``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from onegen.errors import ConfigError, ManifestMismatch

# CLI name -> evaluation.retrievers name
METHODS = {"onegen": "onegen", "two-pass": "two_pass", "pipeline-bm25": "bm25", "pipeline-minilm": "dense",
           "no-retrieval": "none"}
INDEX_METHODS = ("onegen", "two-pass")


# --------------------------------------------------------------------------------------------
# Index (resumable: a complete index of the same model + data + kind is reused)
# --------------------------------------------------------------------------------------------


def existing_index_ok(out_dir: Path, model_fp: str, data_fp: str, kind: str | None) -> tuple[bool, str]:
    """Whether ``out_dir`` already holds a complete index of this model + data (+ kind); and why not."""
    from onegen.manifest import read_manifest

    if not (out_dir / "manifest.json").is_file():
        return False, "no index there yet"
    try:
        man = read_manifest(out_dir, expect_stage="index")
    except ManifestMismatch as e:
        return False, str(e)
    if man.get("model_fingerprint") != model_fp:
        return False, f"it was built by another checkpoint ({str(man.get('model_fingerprint'))[:12]})"
    if man.get("prepared_fingerprint") != data_fp:
        return False, f"it was built from other data ({str(man.get('prepared_fingerprint'))[:12]})"
    if kind is not None and man.get("kind") != kind:
        return False, f"it is a {man.get('kind')!r} index, {kind!r} was asked for"
    from evaluation.index import DOC_IDS, EMBEDDINGS, FAISS_FILE

    missing = [f for f in (EMBEDDINGS, DOC_IDS, FAISS_FILE) if not (out_dir / f).is_file()]
    if missing:
        return False, f"it is incomplete (no {', '.join(missing)})"
    return True, "complete"


def ensure_index(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *, kind: str = "flat",
                 force: bool = False, runtime=None, device: str | None = None, batch_size: int = 64,
                 progress: bool = True, log: Callable[[str], None] = print) -> tuple[dict, bool]:
    """Build the index unless a complete one of the same model + data + kind is there; ``(manifest, built)``."""
    from evaluation.checks import preflight
    from onegen.manifest import read_manifest

    out_dir = Path(out_dir)
    # Manifests, shard sizes and tokenizer fingerprints: no torch import, so a cheap rerun is cheap and
    # a wrong input is refused at once.
    mman, _, dman = preflight(model_dir, data_dir)
    model_fp, data_fp = mman["fingerprint"], dman["fingerprint"]
    ok, why = existing_index_ok(out_dir, model_fp, data_fp, kind)
    if ok and not force:
        log(f"index {out_dir}: complete for this checkpoint and data, reused (--force rebuilds it)")
        return read_manifest(out_dir, expect_stage="index"), False
    if out_dir.exists() and not ok:
        log(f"index {out_dir}: rebuilding, {why}")
    from evaluation.index import build_index

    man = build_index(model_dir, data_dir, out_dir, kind=kind, runtime=runtime, device=device,  # type: ignore[arg-type]
                      batch_size=batch_size, progress=progress)
    log(f"index {out_dir}: {man['count']} vectors x {man['dim']} ({kind}) in {man['build_seconds']:.1f}s")
    return man, True


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


@dataclass
class EvalRequest:
    model: Path
    data: Path
    method: str = "onegen"
    index: Path | None = None
    out: Path | None = None
    setting: str = "distractor"
    max_examples: int | None = None
    kind: str = "flat"
    max_new_tokens: int | None = None
    max_hops: int = 4
    k: int = 5
    force_retrieval_every: int | None = None
    device: str | None = None
    batch_size: int = 32
    gen_batch_size: int = 1
    tracking: bool = True
    tracking_uri: str | None = None
    experiment: str = "onegen"
    run_name: str | None = None
    progress: bool = True
    extra_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalOutcome:
    out: Path
    metrics: dict[str, Any]
    files: dict[str, Path]
    tracking_uri: str | None
    run_id: str | None
    nested: bool


def model_label(model_dir: str | Path) -> str:
    """A short readable name of a checkpoint: ``tr4/model`` for ``.../tr4/model``, else the dir name."""
    p = Path(model_dir).resolve()
    return f"{p.parent.name}/{p.name}" if p.name in ("model", "export", "final") else p.name


def default_out(req: EvalRequest) -> Path:
    safe = model_label(req.model).replace("/", "-")
    return Path("runs") / "eval" / f"{Path(req.data).resolve().name}-{req.method}-{safe}"


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write_json(path: Path, obj: Any) -> None:
    from onegen.manifest import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def pipeline_teacher_forced(rt, retriever, *, setting: str, max_rows: int | None = None,
                            progress: bool = True) -> dict[str, Any]:
    """Teacher-forced Recall@1 of a separate retriever: for each gold ``[RQ]`` of each gold row, the
    query is the question + the gold text *generated* before it (GEN tokens only: inserted
    paragraphs and special tokens left out — exactly what the pipeline sees in free generation);
    hop j is a hit iff the top-1 is the row's ``positives[j]``."""
    from tqdm.auto import tqdm

    from evaluation.retrievers import DenseRetriever, RetrievalStep
    from onegen.roles import GEN

    n = len(rt.data) if max_rows is None else min(max_rows, len(rt.data))
    steps: list[tuple[RetrievalStep, str, int]] = []
    for s in range(0, n, 256):
        for r in rt.data.query_rows(list(range(s, min(n, s + 256)))):
            ids, roles, p0 = list(r["input_ids"]), list(r["roles"]), int(r["prompt_len"])
            cands = list(r["candidates"]) if setting == "distractor" and r.get("candidates") else None
            for j, (pos, gold) in enumerate(zip(r["ret_positions"], r["positives"])):
                own = [ids[t] for t in range(p0, int(pos)) if roles[t] == GEN]
                text = rt.tokenizer.decode(own, skip_special_tokens=True)
                steps.append((RetrievalStep(question=r["question"], generated_text=text, k=1, candidates=cands, hop=j),
                              str(gold), j))
    hits: dict[int, int] = {}
    total: dict[int, int] = {}
    if isinstance(retriever, DenseRetriever) and steps:  # one batched encoder pass instead of one per hop
        q = retriever.encoder.encode([st.pipeline_query() for st, _, _ in steps])
        restrict = [st.candidates for st, _, _ in steps]
        tops = retriever.index.search(q, 1, restrict if any(c is not None for c in restrict) else None)
    else:
        tops = [retriever.retrieve(st) for st, _, _ in tqdm(steps, desc="teacher-forced recall", unit="hop",
                                                             disable=not progress)]
    for (st, gold, j), top in zip(steps, tops):
        total[j] = total.get(j, 0) + 1
        hits[j] = hits.get(j, 0) + int(bool(top) and top[0][0] == gold)
    out: dict[str, Any] = {"recall@1": sum(hits.values()) / max(sum(total.values()), 1), "n": sum(total.values()),
                           "setting": setting, "query": "question + gold generated text before [RQ]"}
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


def _rag_records(results, k: int) -> list[dict]:
    from evaluation.scoring import question_scores

    out = []
    for r in results:
        d = r.to_dict()
        d["generated_text"] = d.pop("output_text")
        sc = question_scores(r, k)
        d["scores"] = {key: sc[key] for key in ("em", "f1", "hop_recall_at_1", "recall@1", f"recall@{k}") if key in sc}
        out.append(d)
    return out


def _el_records(results) -> list[dict]:
    from evaluation.metrics import el_scores

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


def run_eval(req: EvalRequest, log: Callable[[str], None] = print) -> EvalOutcome:
    """Evaluate one checkpoint with one method on one prepared dataset (see the module docstring)."""
    from evaluation.checks import preflight
    from evaluation.tracking import (EVAL_STAGE, TAG_DATASET, TAG_METHOD, TAG_MODE, TAG_MODEL, TAG_STAGE, TAG_TASK,
                                     TAG_TRAIN_STORE, EvalTracker, resolve_tracking_uri, train_link)
    from onegen.manifest import read_manifest

    if req.method not in METHODS:
        raise ConfigError(f"--method {req.method!r}: choose one of {list(METHODS)}")
    if req.setting not in ("distractor", "open"):
        raise ConfigError(f"--setting {req.setting!r}: choose distractor or open")
    for flag, value in (("--max-examples", req.max_examples), ("--gen-batch-size", req.gen_batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    model_dir, data_dir = Path(req.model), Path(req.data)
    # Everything that can be refused without loading the model is refused here, in about a second.
    mman, ocfg, dman = preflight(model_dir, data_dir)
    task = dman["task"]
    if task == "el" and req.method != "onegen":
        raise ConfigError(
            f"{data_dir} is an entity-linking dataset: it is evaluated with the model's own [LK] states against its "
            f"[SE] entity index, i.e. --method onegen only ({req.method!r} is a RAG baseline and has no meaning here)")
    if task not in ("rag", "el"):
        raise ConfigError(f"{data_dir}: unknown task {task!r} in its manifest")
    needs_index = req.method in INDEX_METHODS or task == "el"
    if task == "el" and req.setting != "open":
        req.setting = "open"  # EL rows have no candidate lists: each [LK] searches the whole entity index
    index_dir = Path(req.index) if req.index is not None else None
    if index_dir is not None:
        from evaluation.index import open_index

        open_index(index_dir, model_dir)  # refuses an index of another checkpoint, or an incomplete one
        iman = read_manifest(index_dir, expect_stage="index")
        if iman.get("prepared_fingerprint") != dman["fingerprint"]:
            raise ManifestMismatch(
                f"index {index_dir} was built from {iman.get('prepared_dir')} ({str(iman.get('prepared_fingerprint'))[:12]}), "
                f"not from {data_dir} ({dman['fingerprint'][:12]}): its doc ids are not this dataset's documents; "
                f"omit --index to build the right one, or run `python -m evaluation index --model {model_dir} "
                f"--data {data_dir} --out DIR`")
    out = Path(req.out) if req.out is not None else default_out(req)
    out.mkdir(parents=True, exist_ok=True)
    dataset = data_dir.resolve().name
    mlabel = model_label(model_dir)
    mode = ocfg.get("mode") or mman.get("mode") or "?"
    train_run_id, train_store = train_link(model_dir)
    uri = resolve_tracking_uri(req.tracking_uri, out, model_dir) if req.tracking else None
    tags = {TAG_STAGE: EVAL_STAGE, TAG_METHOD: req.method, TAG_DATASET: dataset, TAG_MODEL: mlabel, TAG_MODE: str(mode),
            TAG_TASK: task, "onegen.setting": req.setting}
    if train_store:
        tags[TAG_TRAIN_STORE] = train_store
    run_name = req.run_name or f"{req.method}:{dataset}:{mlabel}"
    tracker = EvalTracker(req.tracking, uri or "", req.experiment, run_name, tags, train_run_id)
    if req.tracking and tracker.ok:
        log(f"MLflow: run {tracker.run_id} in experiment {req.experiment!r} at {uri}"
            + (f" (nested under training run {train_run_id})" if tracker.nested else
               f" (training run {train_run_id} is in another store: linked by tag)" if train_run_id else ""))
    tracker.log_params({
        "method": req.method, "task": task, "setting": req.setting, "model": str(model_dir.resolve()),
        "model_fingerprint": mman["fingerprint"], "checkpoint_mode": mode, "checkpoint_step": ocfg.get("step", mman.get("step")),
        "model_source": mman.get("model_source"), "data": str(data_dir.resolve()), "data_fingerprint": dman["fingerprint"],
        "dataset": dataset, "max_examples": req.max_examples, "train_run_id": train_run_id,
        "tokenizer_fingerprint": mman.get("tokenizer_fingerprint"),
        **{f"extra.{k}": v for k, v in req.extra_params.items()},
    })
    try:
        outcome = _run(req, out, task, dman, mman, ocfg, index_dir, needs_index, tracker, log)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.log_params(outcome.pop("params"))  # what only the run knows: index, generation config, device
    tracker.log_metrics(outcome["metrics"]["headline"])
    for name, path in outcome["files"].items():
        tracker.log_artifact(path, "plots" if name.startswith("plot") else None)
    tracker.end("FINISHED")
    if req.tracking and not tracker.ok:
        log("MLflow: logging failed (see the message above); the results are on disk")
    return EvalOutcome(out, outcome["metrics"], outcome["files"], uri if tracker.ok else None, tracker.run_id,
                       tracker.nested)


def _run(req: EvalRequest, out: Path, task: str, dman: dict, mman: dict, ocfg: dict, index_dir: Path | None,
         needs_index: bool, tracker, log) -> dict:
    from evaluation import plots
    from evaluation.generate import GenerationConfig, run_questions
    from evaluation.index import open_index
    from evaluation.linking import LinkConfig, run_linking, summarize_linking
    from evaluation.retrievers import build_retriever
    from evaluation.runtime import load_runtime
    from evaluation.scoring import summarize_rag
    from evaluation.teacher_forced import teacher_forced_recall
    from onegen.manifest import fingerprint_files, write_manifest
    from pipeline.data import open_prepared

    t_start = time.perf_counter()
    data = open_prepared(req.data)
    rt = load_runtime(req.model, data, device=req.device)
    log(f"loaded {req.model} ({ocfg.get('mode')}, step {ocfg.get('step')}) on {rt.device}; "
        f"{len(data)} {task} rows in {req.data}")
    idx = None
    index_man = None
    if needs_index:
        if index_dir is None:
            index_dir = out / "index"
            ensure_index(req.model, req.data, index_dir, kind=req.kind, runtime=rt, progress=req.progress, log=log)
        idx = open_index(index_dir, req.model)
        index_man = idx.manifest
    n = len(data) if req.max_examples is None else min(req.max_examples, len(data))
    indices = list(range(n))
    params: dict[str, Any] = {"index": str(index_dir) if index_dir else None,
                              "index_fingerprint": index_man.get("fingerprint") if index_man else None,
                              "index_kind": index_man.get("kind") if index_man else None, "n_examples": n,
                              "device": str(rt.device)}
    files: dict[str, Path] = {}
    plot_dir = out / "plots"
    title = f"{req.method} on {Path(req.data).resolve().name} ({req.setting}, n={n})"
    if task == "rag":
        cfg = GenerationConfig(max_new_tokens=req.max_new_tokens or 64, max_hops=req.max_hops, k=req.k,
                               setting=req.setting, force_retrieval_every=req.force_retrieval_every,  # type: ignore[arg-type]
                               batch_size=req.gen_batch_size)
        params.update({f"gen.{k}": v for k, v in asdict(cfg).items()})
        retriever = build_retriever(METHODS[req.method], rt, idx)  # (pipelines index the docs here: not timed)
        t0 = time.perf_counter()
        results = run_questions(rt, retriever, cfg, indices, progress=req.progress)
        gen_s = time.perf_counter() - t0
        summary = summarize_rag(results, k=req.k)
        free_hops = _free_hop_recall(results)
        if req.method in INDEX_METHODS:
            tf = teacher_forced_recall(rt, idx, setting=req.setting, max_rows=n, batch_size=req.batch_size,  # type: ignore[arg-type]
                                       progress=req.progress)
        elif req.method == "no-retrieval":
            tf = None
        else:
            tf = pipeline_teacher_forced(rt, retriever, setting=req.setting, max_rows=n, progress=req.progress)
        retrieving = req.method != "no-retrieval"
        tokens = sum(r.n_generated for r in results)
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
        if tf:
            head.update({f"recall_at_1_tf_{k.split('/')[1]}": v for k, v in tf.items() if k.startswith("recall@1/")})
        records = _rag_records(results, req.k)
        hist = _scores_for_hist((h.retrieved, r.gold_hops[j] if j < len(r.gold_hops) else None)
                                for r in results for j, h in enumerate(r.hops))
        free_plot = {h: free_hops.get(h) for h in free_hops} if retrieving else {}
        tf_plot = {k.split("/")[1]: v for k, v in tf.items() if k.startswith("recall@1/")} if tf else {}
        details = {"summary": summary, "teacher_forced": tf, "generation": asdict(cfg)}
    else:
        lcfg = LinkConfig(max_new_tokens=req.max_new_tokens, k=req.k, batch_size=req.gen_batch_size)
        params.update({f"link.{k}": v for k, v in asdict(lcfg).items()})
        t0 = time.perf_counter()
        results = run_linking(rt, idx, lcfg, indices, progress=req.progress)  # type: ignore[arg-type]
        gen_s = time.perf_counter() - t0
        summary = summarize_linking(results)
        tf = teacher_forced_recall(rt, idx, setting="open", max_rows=n, batch_size=req.batch_size,  # type: ignore[arg-type]
                                   progress=req.progress)
        tokens = sum(r.n_generated for r in results)
        head = {"el_precision": summary["precision"], "el_recall": summary["recall"], "el_f1": summary["f1"],
                "el_md_precision": summary["md_precision"], "el_md_recall": summary["md_recall"],
                "el_md_f1": summary["md_f1"], "recall_at_1_free": summary.get("link_recall_at_1"),
                "recall_at_1_tf": tf["recall@1"], "mean_links": summary.get("n_links"),
                "unaligned": summary.get("unaligned")}
        records = _el_records(results)
        hist = _scores_for_hist((l.retrieved, r.gold_links[j] if j < len(r.gold_links) else None)
                                for r in results for j, l in enumerate(r.links))
        free_plot = {"link": summary.get("link_recall_at_1")}
        tf_plot = {"link": tf["recall@1"]}
        details = {"summary": summary, "teacher_forced": tf, "linking": asdict(lcfg)}
    head.update({"tokens_per_s": tokens / gen_s if gen_s > 0 else None, "s_per_question": gen_s / max(len(results), 1),
                 "n": len(results), "generated_tokens": tokens})
    metrics = {"task": task, "method": req.method, "retriever": METHODS[req.method], "setting": req.setting,
               "dataset": Path(req.data).resolve().name, "model": str(Path(req.model).resolve()),
               "checkpoint_mode": ocfg.get("mode"), "headline": head, **details,
               "wall_s": {"generation": gen_s, "total": time.perf_counter() - t_start}}
    files["predictions"] = out / "predictions.jsonl"
    _write_jsonl(files["predictions"], records)
    files["metrics"] = out / "metrics.json"
    _write_json(files["metrics"], metrics)
    p = plots.recall_per_hop(free_plot, tf_plot, plot_dir / "recall_per_hop.png", f"Recall@1 — {title}")
    if p:
        files["plot_recall"] = p
    p = plots.score_histogram(*hist, plot_dir / "top1_scores.png", f"top-1 scores — {title}")
    if p:
        files["plot_scores"] = p
    write_manifest(out, "eval", fingerprint=fingerprint_files(out, ["predictions.jsonl"]), task=task, method=req.method,
                   model_dir=str(Path(req.model).resolve()), model_fingerprint=mman["fingerprint"],
                   prepared_dir=str(Path(req.data).resolve()), prepared_fingerprint=dman["fingerprint"],
                   index_fingerprint=params["index_fingerprint"], setting=req.setting, n=len(results),
                   mlflow_run_id=tracker.run_id)
    files["manifest"] = out / "manifest.json"
    return {"metrics": metrics, "files": files, "params": params}
