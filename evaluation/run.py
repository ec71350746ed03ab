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
``el_md_f1``; given the gold mentions, ``el_link_acc_gold`` (OneGen: the gold output replayed, each
``[LK]`` state's top-1 in the entity index is the gold entity) against ``el_name_match_acc_gold``
(the KB entity whose title equals the mention text, lower-cased and whitespace-collapsed; ties ->
first doc id, counted in ``el_name_match_ambiguous``) over the same ``kb_size`` entities;
``answer_found`` = fraction of questions that ended with EOS after a non-empty final answer; costs
``tokens_per_s`` (generated tokens / generation wall time) and ``s_per_question``.

EM/F1 use the answer normalisation ``--normalization`` (``default``, or ``official``: the HotpotQA
script exactly; ``evaluation.metrics``), recorded in metrics.json, the manifest and as an MLflow
param. An index built here for ``--max-examples N`` in the distractor setting holds only the N
rows' candidates + gold (``evaluation.doc_select``; ``subset`` in its manifest, ``index_subset`` in
metrics.json).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evaluation import plots
from evaluation.checks import preflight
from evaluation.config import NORMALIZATIONS, PIPELINE_QUERIES, SETTINGS, RunConfig
from evaluation.index import open_index
from evaluation.index_reuse import check_given_index, ensure_index, rows_to_index
from evaluation.run_shards import FILES as SHARD_FILES, STAGE as SHARD_STAGE
from evaluation.run_shards import kept_shard, read_shards, remove_shards, request_key, shard_rows, write_shard
from evaluation.sharding import launcher_shard, parse_shard, set_up_rank, shard_dir, wait_for_shards
from evaluation.tasks import Raw, el_finish, el_generate, json_default, rag_finish, rag_generate
from evaluation.tracking import EvalTracker, resolve_tracking_uri, train_link
from onegen.errors import ConfigError
from onegen.manifest import atomic_write_bytes, fingerprint_files, read_manifest, write_manifest
from onegen.methods import METHODS
from onegen.prepared import open_prepared
from onegen.mlflow_tags import (EVAL_STAGE, TAG_DATASET, TAG_METHOD, TAG_MODE, TAG_MODEL, TAG_RESULTS_ID, TAG_SETTING,
                                TAG_STAGE, TAG_TASK, TAG_TRAIN_RUN, TAG_TRAIN_STORE)
from onegen.runlock import LOCK_NAME, DirLock

# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


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


def default_out(req: RunConfig) -> Path:
    safe = model_label(req.model).replace("/", "-")
    return Path("runs") / "eval" / f"{Path(req.data).resolve().name}-{req.method}-{safe}"


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=json_default) + "\n")
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=json_default) + "\n").encode())


def _check_request(req: RunConfig, task: str | None = None, data_dir: Path | None = None) -> None:
    """Refuse a request that cannot run: its values, then (given the dataset's task) the method."""
    if task is None:
        if req.method not in METHODS:
            raise ConfigError(f"--method {req.method!r}: choose one of {list(METHODS)}")
        if req.setting not in SETTINGS:
            raise ConfigError(f"--setting {req.setting!r}: choose one of {list(SETTINGS)}")
        if req.normalization not in NORMALIZATIONS:
            raise ConfigError(f"--normalization {req.normalization!r}: choose one of {list(NORMALIZATIONS)} (default: "
                              f"HotpotQA's rules + NFC + Unicode punctuation; official: the HotpotQA script exactly)")
        if req.pipeline_query not in PIPELINE_QUERIES:
            raise ConfigError(f"--pipeline-query {req.pipeline_query!r}: choose one of {list(PIPELINE_QUERIES)}")
        if req.shard is not None and req.merge is not None:
            raise ConfigError("--shard and --merge are separate steps: give one of them")
        for flag, value in (("--max-examples", req.max_examples), ("--gen-batch-size", req.gen_batch_size),
                            ("--merge", req.merge)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        return
    if task == "el" and req.method != "onegen":
        raise ConfigError(
            f"{data_dir} is an entity-linking dataset: it is evaluated with the model's own [LK] states against its "
            f"[SE] entity index, i.e. --method onegen only ({req.method!r} is a RAG baseline and has no meaning here)")
    if task not in ("rag", "el"):
        raise ConfigError(f"{data_dir}: unknown task {task!r} in its manifest")


def _tracker(req: RunConfig, out: Path, task: str, model_dir: Path, mode: str, log):
    """The eval run's MLflow tracker (tags, link to the training run, this results dir's id); its store URI.

    With ``--no-mlflow`` the tracker only records: ``tracking.json`` names the store the run would have
    gone to, for ``python -m evaluation log``."""
    dataset, mlabel = Path(req.data).resolve().name, model_label(model_dir)
    train_run_id, train_store = train_link(model_dir)
    try:
        uri = resolve_tracking_uri(req.tracking_uri, out, model_dir)
    except ConfigError:
        if req.tracking:
            raise
        uri = None  # `--tracking-uri train` of a checkpoint without a link, and nothing is logged anyway
    tags = {TAG_STAGE: EVAL_STAGE, TAG_METHOD: req.method, TAG_DATASET: dataset, TAG_MODEL: mlabel, TAG_MODE: mode,
            TAG_TASK: task, TAG_SETTING: req.setting, TAG_RESULTS_ID: uuid.uuid4().hex}
    if train_store:
        tags[TAG_TRAIN_STORE] = train_store
    run_name = req.run_name or f"{req.method}:{dataset}:{mlabel}"
    tracker = EvalTracker(req.tracking, uri or "", req.experiment, run_name, tags, train_run_id)
    if req.tracking and tracker.ok:
        log(f"MLflow: run {tracker.run_id} in experiment {req.experiment!r} at {uri}"
            + (f" (training run {train_run_id}, linked by the tag {TAG_TRAIN_RUN})" if train_run_id else ""))
    return tracker, uri if req.tracking else None, train_run_id


def run_eval(req: RunConfig, log: Callable[[str], None] = print) -> EvalOutcome | None:
    """Evaluate one checkpoint with one method on one prepared dataset (see the module docstring);
    None for a process that only wrote its shard (``--shard I/N``, or a rank other than 0)."""
    from evaluation.precision import resolve_precision  # torch: loaded when a run starts, not by --help


    _check_request(req)
    model_dir, data_dir = Path(req.model), Path(req.data)
    # Everything that can be refused without loading the model is refused here, in about a second.
    mman, ocfg, dman = preflight(model_dir, data_dir)
    task = dman["task"]
    _check_request(req, task, data_dir)
    prec = resolve_precision(req.device, req.dtype, req.attn).record()  # flash + fp32 is refused here
    log(f"precision: {prec['dtype']}, attention {prec['attn']} ({prec['attn_reason']}), on {prec['device']}")
    needs_index = METHODS[req.method].own_index or task == "el"
    if task == "el" and req.setting != "open":
        req.setting = "open"  # EL rows have no candidate lists: each [LK] searches the whole entity index
    index_dir = Path(req.index) if req.index is not None else None
    if index_dir is not None:  # a subset index must hold the documents of every evaluated row
        n_rows = int(dman.get("counts", {}).get("queries", 0)) or None
        need = None if req.setting == "open" or n_rows is None else min(req.max_examples or n_rows, n_rows)
        check_given_index(index_dir, model_dir, data_dir, dman, prec, log, rows=need)
    out = Path(req.out) if req.out is not None else default_out(req)
    out.mkdir(parents=True, exist_ok=True)
    merge = req.merge
    shard = parse_shard(req.shard) if req.shard else (launcher_shard() if merge is None else None)
    if (shard is not None or merge is not None) and needs_index and index_dir is None:
        raise ConfigError(f"a sharded run of --method {req.method} needs --index: build the index first (`python -m "
                          f"evaluation index`, sharded too), or every shard would build its own")
    if shard is not None:
        if req.shard is None and req.device is None:  # a launched rank: its own GPU, or its share of the cores
            req.device = set_up_rank()
        _run_shard(req, out, shard, task, dman, mman, ocfg, index_dir, needs_index, log)
        if req.shard is not None or shard[0] != 0:
            return None  # a shard of a job array, or a rank other than 0: rank 0 (or `--merge N`) merges
        wait_for_shards(out, shard[1], SHARD_STAGE, SHARD_FILES, log=log)
        merge = shard[1]
    with DirLock(out):  # one writer per results dir (onegen/runlock.py): a second run on it refuses at once
        return _run_locked(req, out, task, dman, mman, ocfg, prec, index_dir, needs_index, log, merge)


def _run_locked(req: RunConfig, out: Path, task: str, dman: dict, mman: dict, ocfg: dict, prec: dict,
                index_dir: Path | None, needs_index: bool, log: Callable[[str], None],
                merge: int | None = None) -> EvalOutcome:
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
        "attn_reason": prec["attn_reason"], "faiss_fp16": req.faiss.faiss_fp16, "normalization": req.normalization,
        "pipeline_query": req.pipeline_query,
        **{f"extra.{k}": v for k, v in req.extra_params.items()},
    })
    try:
        outcome = _run(req, out, task, dman, mman, ocfg, index_dir, needs_index, tracker, log, merge)
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


def _load(req: RunConfig, out: Path, task: str, ocfg: dict, index_dir: Path | None, needs_index: bool,
          log) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The runtime, the prepared data and (when the method needs one) the opened index; run params."""
    # torch: loaded when a run starts, not by --help
    from evaluation.precision import LEGACY
    from evaluation.runtime import load_runtime

    data = open_prepared(req.data)
    rt = load_runtime(req.model, data, device=req.device, dtype=req.dtype, attn=req.attn)
    log(f"loaded {req.model} ({ocfg.get('mode')}, step {ocfg.get('step')}) on {rt.device} in "
        f"{rt.precision.describe()}; {len(data)} {task} rows in {req.data}")
    idx = None
    if needs_index:
        if index_dir is None:  # the documents of the evaluated rows only, when that is all they can retrieve
            index_dir = out / "index"
            n = len(data) if req.max_examples is None else min(req.max_examples, len(data))
            ensure_index(req.model, req.data, index_dir, kind=req.kind, runtime=rt, progress=req.progress, log=log,
                         params=req.faiss, rows=rows_to_index(data, req.setting, n))
        idx = open_index(index_dir, req.model, fp16=req.faiss.faiss_fp16, nprobe=req.faiss.nprobe,
                         ef_search=req.faiss.ef_search)
    man = idx.manifest if idx is not None else {}
    opened = idx is not None
    params: dict[str, Any] = {"index": str(index_dir) if index_dir else None, "index_fingerprint": man.get("fingerprint"),
                              "index_kind": man.get("kind"), "device": str(rt.device),
                              "index_count": man.get("count"), "index_subset_rows": (man.get("subset") or {}).get("rows"),
                              "faiss_gpu": idx.gpu if opened else None,
                              **{f"index_{k}": man.get(k, LEGACY[k]) if opened else None for k in ("dtype", "attn")}}
    return rt, data, idx, params


def _run(req: RunConfig, out: Path, task: str, dman: dict, mman: dict, ocfg: dict, index_dir: Path | None,
         needs_index: bool, tracker, log, merge: int | None = None) -> dict:
    """Decode (or, with ``merge``, read the shards' raw output), score, write the results dir."""
    t_start = time.perf_counter()
    if merge is None:
        rt, data, idx, params = _load(req, out, task, ocfg, index_dir, needs_index, log)
        n = _n_rows(req, data)
        raw = _generate(req, task, rt, idx, list(range(n)))
        prec, sharded = rt.precision_record(), None
    else:
        data = open_prepared(req.data)
        n = _n_rows(req, data)
        idx = open_index(index_dir, req.model, use_gpu=False) if index_dir is not None else None
        raw, info = read_shards(out, merge, request_key(req, n, _fingerprints(mman, dman, index_dir)), task)
        params, prec, sharded = info["params"], info["precision"], {"shards": merge, "gen_s": info["gen_s"]}
        log(f"merged {merge} shards: {len(raw.results)} rows")
    params["n_examples"] = n
    if task == "rag":
        part = rag_finish(req, METHODS[req.method].retriever, raw)
    else:
        part = el_finish(req, raw, data, idx.doc_ids)  # type: ignore[union-attr]  (EL always has its index)
    params.update(part.params)
    head = part.head
    head.update({"tokens_per_s": part.tokens / part.gen_s if part.gen_s > 0 else None,
                 "s_per_question": part.gen_s / max(part.n_results, 1), "n": part.n_results,
                 "generated_tokens": part.tokens})
    metrics = {"task": task, "method": req.method, "retriever": METHODS[req.method].retriever, "setting": req.setting,
               "normalization": req.normalization, "pipeline_query": req.pipeline_query,
               "index_subset": idx.manifest.get("subset") if idx is not None else None,
               "dataset": Path(req.data).resolve().name, "model": str(Path(req.model).resolve()),
               "checkpoint_mode": ocfg.get("mode"), "headline": head, **part.details, "sharded": sharded,
               "wall_s": {"generation": part.gen_s, "total": time.perf_counter() - t_start}}
    files = _write_results(req, out, task, part, metrics, n)
    write_manifest(out, "eval", fingerprint=fingerprint_files(out, ["predictions.jsonl"]), task=task, method=req.method,
                   model_dir=str(Path(req.model).resolve()), model_fingerprint=mman["fingerprint"],
                   prepared_dir=str(Path(req.data).resolve()), prepared_fingerprint=dman["fingerprint"],
                   index_fingerprint=params["index_fingerprint"], setting=req.setting, n=part.n_results,
                   normalization=req.normalization, mlflow_run_id=tracker.run_id, **prec)
    files["manifest"] = out / "manifest.json"
    if merge is not None:
        remove_shards(out)
    return {"metrics": metrics, "files": files, "params": params}


def _n_rows(req: RunConfig, data: Any) -> int:
    return len(data) if req.max_examples is None else min(req.max_examples, len(data))


def _generate(req: RunConfig, task: str, rt: Any, idx: Any, rows: list[int]) -> Raw:
    if task == "rag":
        return rag_generate(req, rt, idx, METHODS[req.method].retriever, rows)
    return el_generate(req, rt, idx, rows)


def _fingerprints(mman: dict, dman: dict, index_dir: Path | None) -> dict[str, Any]:
    index_fp = read_manifest(index_dir, expect_stage="index")["fingerprint"] if index_dir is not None else None
    return {"model": mman["fingerprint"], "data": dman["fingerprint"], "index": index_fp}


def _write_results(req: RunConfig, out: Path, task: str, part: Any, metrics: dict, n: int) -> dict[str, Path]:
    """predictions.jsonl, metrics.json and the plots; their paths."""
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
    return files


def _run_shard(req: RunConfig, out: Path, shard: tuple[int, int], task: str, dman: dict, mman: dict, ocfg: dict,
               index_dir: Path | None, needs_index: bool, log: Callable[[str], None]) -> None:
    """Decode shard ``shard`` = (I, N) of the rows into ``out``'s shards dir (kept when already there)."""
    i, shards = shard
    data = open_prepared(req.data)
    n = _n_rows(req, data)
    key = request_key(req, n, _fingerprints(mman, dman, index_dir))
    target = shard_dir(out, i, shards)
    if kept_shard(out, i, shards, key):
        log(f"shard {i}/{shards} of {out}: complete, kept")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with DirLock(target, lock_path=target.parent / f".{target.name}{LOCK_NAME}"):
        rt, data, idx, params = _load(req, target, task, ocfg, index_dir, needs_index, log)
        rows = shard_rows(n, i, shards)
        raw = _generate(req, task, rt, idx, rows)
        write_shard(out, i, shards, raw, key, {"params": params, "precision": rt.precision_record(),
                                               "first_row": rows[0] if rows else None})
    log(f"shard {i}/{shards} of {out}: {len(rows)} rows in {raw.gen_s:.1f}s of generation")
