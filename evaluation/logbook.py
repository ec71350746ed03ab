"""``RESULTS_DIR/tracking.json`` and ``python -m evaluation log``: an eval's MLflow run, kept on disk, logged later.

``run`` writes ``tracking.json`` beside its results whether MLflow took the run or not (``--no-mlflow``,
a dead server, an unusable store): the experiment, run name, tags (among them ``onegen.train_run_id``,
the link to the training run, and ``onegen.results_id``, this results dir's id), params, metrics,
artifact paths (relative to the results dir), start/end times and status, plus ``logged``: the stores
and run ids it went to.

``log DIR...`` replays it into a store: the same run the evaluation would have made (same tags,
params, metrics, artifacts and times; the extra tag ``onegen.logged_later`` says when), so
``evaluation compare`` is whole again. A dir whose results id already has a FINISHED run in that
store and experiment is refused unless ``--force``; a run the outage left unfinished there is marked
FAILED and tagged ``onegen.replaced_by``. The results must be the ones the evaluation wrote
(``predictions.jsonl`` against the manifest's fingerprint).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evaluation.tracking import EvalTracker, default_tracking_uri
from onegen.errors import ConfigError, ManifestMismatch
from onegen.manifest import atomic_write_bytes, fingerprint_files, read_manifest
from onegen.mlflow_store import open_client
from onegen.mlflow_tags import TAG_LOGGED_LATER, TAG_REPLACED_BY, TAG_RESULTS_ID, TAG_TRAIN_STORE
from onegen.runlock import DirLock

RECORD = "tracking.json"
RECORD_VERSION = 1
_KEYS = ("experiment", "run_name", "tags", "params", "metrics", "artifacts", "status", "start_time")


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _relative(path: str, root: Path) -> str:
    """An artifact's path relative to the results dir (the dir may move); one outside it stays absolute."""
    p = Path(path)
    if not p.is_absolute():  # already relative to the results dir
        return path
    return str(p.relative_to(root)) if p.is_relative_to(root) else path


def write_record(results_dir: str | Path, record: dict[str, Any], uri: str | None, run_id: str | None) -> Path:
    """Write ``tracking.json`` (atomically); ``run_id``: the run MLflow took, in store ``uri``."""
    root = Path(results_dir).resolve()
    rec = json.loads(json.dumps(record))
    rec["version"] = RECORD_VERSION
    rec["artifacts"] = [[_relative(p, root), ap] for p, ap in rec["artifacts"]]
    if run_id:
        rec["logged"].append({"tracking_uri": uri, "run_id": run_id, "at": _now_iso(), "by": "run"})
    path = root / RECORD
    atomic_write_bytes(path, (json.dumps(rec, indent=2) + "\n").encode())
    return path


def read_record(results_dir: Path) -> dict[str, Any]:
    """``tracking.json`` of a finished evaluation, checked against the results it describes."""
    path = results_dir / RECORD
    if not path.is_file() and (results_dir / "metrics.jsonl").is_file() and (results_dir / "config.yaml").is_file():
        raise ConfigError(f"{results_dir} is a training output dir: `log` takes evaluation results dirs. Every "
                          f"metric of the training is in {results_dir / 'metrics.jsonl'}; logging it into MLflow "
                          f"afterwards is not supported")
    if not path.is_file():
        what = "a results dir of an older onegen" if (results_dir / "metrics.json").is_file() else "not a results dir"
        raise ConfigError(f"{results_dir} has no {RECORD}: {what} (`python -m evaluation run` writes one; "
                          f"rerun that evaluation to log it)")
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    missing = [k for k in _KEYS if k not in rec]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)} (written by another onegen version?)")
    if rec["status"] != "FINISHED":
        raise ConfigError(f"{path}: the evaluation did not finish (status {rec['status']}); nothing to log")
    man = read_manifest(results_dir, expect_stage="eval")
    if fingerprint_files(results_dir, ["predictions.jsonl"]) != man.get("fingerprint"):
        raise ManifestMismatch(f"{results_dir}/predictions.jsonl is not the file the evaluation wrote (its "
                               f"fingerprint differs from manifest.json's): refusing to log changed results")
    gone = [p for p, _ in rec["artifacts"] if not (results_dir / p).is_file()]
    if gone:
        raise ConfigError(f"{results_dir}: artifacts the evaluation logged are gone: {', '.join(gone)}")
    return rec


def log_uri(arg: str | None, rec: dict[str, Any], results_dir: Path) -> str:
    """Where ``log`` writes: ``--tracking-uri`` (``train``: the training run's store), else the store the
    evaluation meant to use, else ``$MLFLOW_TRACKING_URI``, else the default beside the results dir."""
    if arg == "train":
        store = rec["tags"].get(TAG_TRAIN_STORE)
        if not store:
            raise ConfigError(f"--tracking-uri train: {results_dir}'s checkpoint did not say where its training run "
                              f"was logged; give the URI itself")
        return store
    return arg or rec.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(results_dir)


def _earlier_runs(client: Any, experiment: str, results_id: str | None) -> tuple[list[str], list[str]]:
    """``(finished, unfinished)`` run ids of this results dir already in the experiment."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None or not results_id:
        return [], []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_RESULTS_ID}` = '{results_id}'")
    return ([r.info.run_id for r in runs if r.info.status == "FINISHED"],
            [r.info.run_id for r in runs if r.info.status != "FINISHED"])


@dataclass
class Logged:
    results_dir: Path
    tracking_uri: str
    run_id: str
    replaced: list[str]


def log_results(results_dir: str | Path, *, tracking_uri: str | None = None, experiment: str | None = None,
                force: bool = False, log: Callable[[str], None] = print) -> Logged:
    """Log one results dir's run into a store (see the module docstring); raise when it cannot.

    It holds the results dir's lock (``onegen.runlock``) meanwhile: never while an evaluation writes it."""
    root = Path(results_dir).resolve()
    if not root.is_dir():
        raise ConfigError(f"{root}: no such results dir")
    with DirLock(root, "python -m evaluation log"):
        return _log_locked(root, tracking_uri, experiment, force, log)


def _log_locked(root: Path, tracking_uri: str | None, experiment: str | None, force: bool,
                log: Callable[[str], None]) -> Logged:
    rec = read_record(root)
    uri = log_uri(tracking_uri, rec, root)
    experiment = experiment or rec["experiment"]
    try:
        client = open_client(uri)
        finished, unfinished = _earlier_runs(client, experiment, rec["tags"].get(TAG_RESULTS_ID))
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"MLflow at {uri} is unavailable ({type(e).__name__}: {str(e)[:300]}); "
                          f"{root} is not logged (give another --tracking-uri, or retry later)") from None
    if finished and not force:
        raise ConfigError(f"{root} is already logged in experiment {experiment!r} at {uri} (run {finished[0]}); "
                          f"--force logs it again")
    tags = {**rec["tags"], TAG_LOGGED_LATER: _now_iso()}
    tracker = EvalTracker(True, uri, experiment, rec["run_name"], tags, None, start_time=rec["start_time"],
                          kept=f"{root} is not logged")
    tracker.log_params(rec["params"])
    tracker.log_metrics(rec["metrics"], timestamp_ms=rec.get("metrics_time"))
    for path, artifact_path in rec["artifacts"]:
        tracker.log_artifact(root / path, artifact_path)
    tracker.end(rec["status"], rec.get("end_time"))
    if not tracker.ok:
        left = f" (run {tracker.run_id} is left incomplete there)" if tracker.run_id else ""
        raise ConfigError(f"logging {root} into {uri} failed (see the message above){left}")
    for rid in unfinished:  # what the outage left behind: kept, but out of the comparison
        client.set_terminated(rid, status="FAILED")
        client.set_tag(rid, TAG_REPLACED_BY, tracker.run_id)
    rec["logged"].append({"tracking_uri": uri, "run_id": tracker.run_id, "at": _now_iso(), "by": "log"})
    write_record(root, rec, None, None)
    log(f"logged {root} -> run {tracker.run_id} in experiment {experiment!r} at {uri}"
        + (f" (unfinished run(s) {', '.join(unfinished)} marked FAILED)" if unfinished else ""))
    return Logged(root, uri, tracker.run_id, unfinished)  # type: ignore[arg-type]
