"""The ``index`` and ``run`` commands: one checkpoint, one prepared dataset, one method -> a results dir.

``run`` writes into RESULTS_DIR::

    predictions.jsonl   one line per question/text: question, generated text, final answer, per hop
                        the ranked (doc id, score) list and the inserted doc, gold answers/docs, scores
    metrics.json        headline metrics (flat, MLflow names) + the detailed summaries
    plots/              recall_per_hop.png, top1_scores.png
    index/              the model's document index, when none was given and the method needs one
    manifest.json       stage "eval": what was evaluated (model / data / index fingerprints) and how
                        (dtype, attention kernel and why, device)

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from onegen.errors import ConfigError, ManifestMismatch
from onegen.runlock import DirLock

# CLI name -> evaluation.retrievers name
METHODS = {"onegen": "onegen", "two-pass": "two_pass", "pipeline-bm25": "bm25", "pipeline-minilm": "dense",
           "no-retrieval": "none"}
INDEX_METHODS = ("onegen", "two-pass")


# --------------------------------------------------------------------------------------------
# Index (resumable: a complete index of the same model + data + kind is reused)
# --------------------------------------------------------------------------------------------


def existing_index_ok(out_dir: Path, model_fp: str, data_fp: str, kind: str | None,
                      precision: dict | None = None) -> tuple[bool, str]:
    """Whether ``out_dir`` already holds a complete index of this model + data (+ kind, + the dtype and
    attention of ``precision``, a ``Precision.record()``); and why not."""
    from evaluation.precision import LEGACY
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
    for key in ("dtype", "attn"):  # bf16 vectors are not fp32's: the same model in another precision
        built = man.get(key, LEGACY[key])
        if precision is not None and built != precision[key]:
            return False, f"it was built with {key} {built}, this run uses {precision[key]}"
    from evaluation.index import DOC_IDS, EMBEDDINGS, FAISS_FILE

    missing = [f for f in (EMBEDDINGS, DOC_IDS, FAISS_FILE) if not (out_dir / f).is_file()]
    if missing:
        return False, f"it is incomplete (no {', '.join(missing)})"
    return True, "complete"


def ensure_index(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *, kind: str = "flat",
                 force: bool = False, runtime=None, device: str | None = None, batch_size: int = 64,
                 progress: bool = True, log: Callable[[str], None] = print, dtype: str = "auto", attn: str = "auto",
                 params=None) -> tuple[dict, bool]:
    """Build the index unless a complete one of the same model + data + kind + dtype + attention is
    there; ``(manifest, built)``. ``runtime``: a loaded runtime to encode with (its precision counts);
    ``params``: ``evaluation.index.IndexParams``."""
    from evaluation.checks import preflight
    from evaluation.precision import resolve_precision
    from onegen.manifest import read_manifest

    out_dir = Path(out_dir)
    # Manifests, shard sizes and tokenizer fingerprints, and the dtype/attention choice (torch, no model):
    # a cheap rerun is cheap, and a wrong input or an impossible choice is refused at once.
    mman, _, dman = preflight(model_dir, data_dir)
    prec = runtime.precision_record() if runtime is not None else resolve_precision(device, dtype, attn).record()
    if runtime is None:  # (a run with its runtime has said it already)
        log(f"precision: {prec['dtype']}, attention {prec['attn']} ({prec['attn_reason']}), on {prec['device']}")
    model_fp, data_fp = mman["fingerprint"], dman["fingerprint"]
    ok, why = existing_index_ok(out_dir, model_fp, data_fp, kind, prec)
    if ok and not force:
        log(f"index {out_dir}: complete for this checkpoint, data and precision, reused (--force rebuilds it)")
        man = read_manifest(out_dir, expect_stage="index")
        half = bool(man.get("faiss_gpu", {}).get("fp16", False))
        if params is not None and params.faiss_fp16 != half:  # not a build input: the saved index is exact fp32
            log(f"index {out_dir}: GPU fp16 storage is chosen when the index is searched (`run --faiss-fp16`); "
                f"the saved index is exact fp32 and its recorded default stays {'fp16' if half else 'fp32'}")
        return man, False
    if out_dir.exists() and not ok:
        log(f"index {out_dir}: rebuilding, {why}")
    from evaluation.index import build_index

    man = build_index(model_dir, data_dir, out_dir, kind=kind, runtime=runtime, device=device,  # type: ignore[arg-type]
                      batch_size=batch_size, progress=progress, dtype=dtype, attn=attn, params=params)
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
    dtype: str = "auto"  # auto / fp32 / bf16 / fp16 (auto: bf16 on a bf16-capable GPU, else fp32)
    attn: str = "auto"  # auto / sdpa / eager / flash_attention_2 (auto: flash-attn on CUDA when installed)
    faiss_fp16: bool = False  # GPU faiss: vectors held in fp16 on the GPUs (flat)
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


def _check_request(req: EvalRequest, task: str | None = None, data_dir: Path | None = None) -> None:
    """Refuse a request that cannot run: its values, then (given the dataset's task) the method."""
    if task is None:
        if req.method not in METHODS:
            raise ConfigError(f"--method {req.method!r}: choose one of {list(METHODS)}")
        if req.setting not in ("distractor", "open"):
            raise ConfigError(f"--setting {req.setting!r}: choose distractor or open")
        for flag, value in (("--max-examples", req.max_examples), ("--gen-batch-size", req.gen_batch_size)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        return
    if task == "el" and req.method != "onegen":
        raise ConfigError(
            f"{data_dir} is an entity-linking dataset: it is evaluated with the model's own [LK] states against its "
            f"[SE] entity index, i.e. --method onegen only ({req.method!r} is a RAG baseline and has no meaning here)")
    if task not in ("rag", "el"):
        raise ConfigError(f"{data_dir}: unknown task {task!r} in its manifest")


def _check_given_index(index_dir: Path, model_dir: Path, data_dir: Path, dman: dict, prec: dict, log) -> None:
    """Refuse an index of another checkpoint or dataset (or an incomplete one); say so when it was
    built in another precision than this run's (it is used: the user chose it)."""
    from evaluation.index import open_index
    from evaluation.precision import LEGACY
    from onegen.manifest import read_manifest

    open_index(index_dir, model_dir, use_gpu=False)
    iman = read_manifest(index_dir, expect_stage="index")
    if iman.get("prepared_fingerprint") != dman["fingerprint"]:
        raise ManifestMismatch(
            f"index {index_dir} was built from {iman.get('prepared_dir')} ({str(iman.get('prepared_fingerprint'))[:12]}), "
            f"not from {data_dir} ({dman['fingerprint'][:12]}): its doc ids are not this dataset's documents; "
            f"omit --index to build the right one, or run `python -m evaluation index --model {model_dir} "
            f"--data {data_dir} --out DIR`")
    built = {k: iman.get(k, LEGACY[k]) for k in ("dtype", "attn")}
    if built != {k: prec[k] for k in built}:
        log(f"warning: index {index_dir} was built with {built['dtype']} + {built['attn']}, this run uses "
            f"{prec['dtype']} + {prec['attn']}: documents and queries are encoded in different precisions "
            f"(omit --index, or rebuild it with --dtype {prec['dtype']} --attn {prec['attn']})")


def _tracker(req: EvalRequest, out: Path, task: str, model_dir: Path, mode: str, log):
    """The eval run's MLflow tracker (tags, link to the training run, this results dir's id); its store URI.

    With ``--no-mlflow`` the tracker only records: ``tracking.json`` names the store the run would have
    gone to, for ``python -m evaluation log``."""
    import uuid

    from evaluation.tracking import (EVAL_STAGE, TAG_DATASET, TAG_METHOD, TAG_MODE, TAG_MODEL, TAG_RESULTS_ID,
                                     TAG_STAGE, TAG_TASK, TAG_TRAIN_STORE, EvalTracker, resolve_tracking_uri,
                                     train_link)

    dataset, mlabel = Path(req.data).resolve().name, model_label(model_dir)
    train_run_id, train_store = train_link(model_dir)
    try:
        uri = resolve_tracking_uri(req.tracking_uri, out, model_dir)
    except ConfigError:
        if req.tracking:
            raise
        uri = None  # `--tracking-uri train` of a checkpoint without a link, and nothing is logged anyway
    tags = {TAG_STAGE: EVAL_STAGE, TAG_METHOD: req.method, TAG_DATASET: dataset, TAG_MODEL: mlabel, TAG_MODE: mode,
            TAG_TASK: task, "onegen.setting": req.setting, TAG_RESULTS_ID: uuid.uuid4().hex}
    if train_store:
        tags[TAG_TRAIN_STORE] = train_store
    run_name = req.run_name or f"{req.method}:{dataset}:{mlabel}"
    tracker = EvalTracker(req.tracking, uri or "", req.experiment, run_name, tags, train_run_id)
    if req.tracking and tracker.ok:
        log(f"MLflow: run {tracker.run_id} in experiment {req.experiment!r} at {uri}"
            + (f" (training run {train_run_id}, linked by the tag onegen.train_run_id)" if train_run_id else ""))
    return tracker, uri if req.tracking else None, train_run_id


def run_eval(req: EvalRequest, log: Callable[[str], None] = print) -> EvalOutcome:
    """Evaluate one checkpoint with one method on one prepared dataset (see the module docstring)."""
    from evaluation.checks import preflight
    from evaluation.precision import resolve_precision

    _check_request(req)
    model_dir, data_dir = Path(req.model), Path(req.data)
    # Everything that can be refused without loading the model is refused here, in about a second.
    mman, ocfg, dman = preflight(model_dir, data_dir)
    task = dman["task"]
    _check_request(req, task, data_dir)
    prec = resolve_precision(req.device, req.dtype, req.attn).record()  # flash + fp32 is refused here
    log(f"precision: {prec['dtype']}, attention {prec['attn']} ({prec['attn_reason']}), on {prec['device']}")
    needs_index = req.method in INDEX_METHODS or task == "el"
    if task == "el" and req.setting != "open":
        req.setting = "open"  # EL rows have no candidate lists: each [LK] searches the whole entity index
    index_dir = Path(req.index) if req.index is not None else None
    if index_dir is not None:
        _check_given_index(index_dir, model_dir, data_dir, dman, prec, log)
    out = Path(req.out) if req.out is not None else default_out(req)
    out.mkdir(parents=True, exist_ok=True)
    with DirLock(out):  # one writer per results dir (onegen/runlock.py): a second run on it refuses at once
        return _run_locked(req, out, task, dman, mman, ocfg, prec, index_dir, needs_index, log)


def _run_locked(req: EvalRequest, out: Path, task: str, dman: dict, mman: dict, ocfg: dict, prec: dict,
                index_dir: Path | None, needs_index: bool, log: Callable[[str], None]) -> EvalOutcome:
    """``run_eval`` once it holds the results dir: the tracked run."""
    model_dir, data_dir = Path(req.model), Path(req.data)
    mode = str(ocfg.get("mode") or mman.get("mode") or "?")
    tracker, uri, train_run_id = _tracker(req, out, task, model_dir, mode, log)
    tracker.log_params({
        "method": req.method, "task": task, "setting": req.setting, "model": str(model_dir.resolve()),
        "model_fingerprint": mman["fingerprint"], "checkpoint_mode": mode, "checkpoint_step": ocfg.get("step", mman.get("step")),
        "model_source": mman.get("model_source"), "data": str(data_dir.resolve()), "data_fingerprint": dman["fingerprint"],
        "dataset": data_dir.resolve().name, "max_examples": req.max_examples, "train_run_id": train_run_id,
        "tokenizer_fingerprint": mman.get("tokenizer_fingerprint"), "dtype": prec["dtype"], "attn": prec["attn"],
        "attn_reason": prec["attn_reason"], "faiss_fp16": req.faiss_fp16,
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
    record = tracker.save_record(out)  # the run as logged: `python -m evaluation log` replays it
    if req.tracking and not tracker.ok:
        log(f"MLflow: logging failed (see the message above); the results are on disk, and "
            f"`python -m evaluation log {out}` logs them once MLflow is back ({record.name})")
    return EvalOutcome(out, outcome["metrics"], outcome["files"], uri if tracker.ok else None, tracker.run_id,
                       tracker.nested)


def _load(req: EvalRequest, out: Path, task: str, ocfg: dict, index_dir: Path | None, needs_index: bool,
          log) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The runtime, the prepared data and (when the method needs one) the opened index; run params."""
    from evaluation.index import IndexParams, open_index
    from evaluation.precision import LEGACY
    from evaluation.runtime import load_runtime
    from pipeline.data import open_prepared

    data = open_prepared(req.data)
    rt = load_runtime(req.model, data, device=req.device, dtype=req.dtype, attn=req.attn)
    log(f"loaded {req.model} ({ocfg.get('mode')}, step {ocfg.get('step')}) on {rt.device} in "
        f"{rt.precision.describe()}; {len(data)} {task} rows in {req.data}")
    idx = None
    if needs_index:
        if index_dir is None:
            index_dir = out / "index"
            ensure_index(req.model, req.data, index_dir, kind=req.kind, runtime=rt, progress=req.progress, log=log,
                         params=IndexParams(faiss_fp16=req.faiss_fp16))
        idx = open_index(index_dir, req.model, fp16=req.faiss_fp16)
    man = idx.manifest if idx is not None else {}
    opened = idx is not None
    params: dict[str, Any] = {"index": str(index_dir) if index_dir else None, "index_fingerprint": man.get("fingerprint"),
                              "index_kind": man.get("kind"), "device": str(rt.device),
                              "faiss_gpu": idx.gpu if opened else None,
                              **{f"index_{k}": man.get(k, LEGACY[k]) if opened else None for k in ("dtype", "attn")}}
    return rt, data, idx, params


def _run(req: EvalRequest, out: Path, task: str, dman: dict, mman: dict, ocfg: dict, index_dir: Path | None,
         needs_index: bool, tracker, log) -> dict:
    from evaluation import plots
    from evaluation.tasks import el_part, rag_part
    from onegen.manifest import fingerprint_files, write_manifest

    t_start = time.perf_counter()
    rt, data, idx, params = _load(req, out, task, ocfg, index_dir, needs_index, log)
    n = len(data) if req.max_examples is None else min(req.max_examples, len(data))
    params["n_examples"] = n
    part = rag_part(req, rt, idx, METHODS[req.method], n) if task == "rag" else el_part(req, rt, idx, n)
    params.update(part.params)
    head = part.head
    head.update({"tokens_per_s": part.tokens / part.gen_s if part.gen_s > 0 else None,
                 "s_per_question": part.gen_s / max(part.n_results, 1), "n": part.n_results,
                 "generated_tokens": part.tokens})
    metrics = {"task": task, "method": req.method, "retriever": METHODS[req.method], "setting": req.setting,
               "dataset": Path(req.data).resolve().name, "model": str(Path(req.model).resolve()),
               "checkpoint_mode": ocfg.get("mode"), "headline": head, **part.details,
               "wall_s": {"generation": part.gen_s, "total": time.perf_counter() - t_start}}
    files = {"predictions": out / "predictions.jsonl", "metrics": out / "metrics.json"}
    _write_jsonl(files["predictions"], part.records)
    _write_json(files["metrics"], metrics)
    title = f"{req.method} on {Path(req.data).resolve().name} ({req.setting}, n={n})"
    p = plots.recall_per_hop(part.free_plot, part.tf_plot, out / "plots" / "recall_per_hop.png", f"Recall@1 — {title}")
    if p:
        files["plot_recall"] = p
    p = plots.score_histogram(*part.hist, out / "plots" / "top1_scores.png", f"top-1 scores — {title}")
    if p:
        files["plot_scores"] = p
    write_manifest(out, "eval", fingerprint=fingerprint_files(out, ["predictions.jsonl"]), task=task, method=req.method,
                   model_dir=str(Path(req.model).resolve()), model_fingerprint=mman["fingerprint"],
                   prepared_dir=str(Path(req.data).resolve()), prepared_fingerprint=dman["fingerprint"],
                   index_fingerprint=params["index_fingerprint"], setting=req.setting, n=part.n_results,
                   mlflow_run_id=tracker.run_id, **rt.precision_record())
    files["manifest"] = out / "manifest.json"
    return {"metrics": metrics, "files": files, "params": params}
