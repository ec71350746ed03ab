"""MLflow for evaluation runs: one MLflow run per ``python -m evaluation run``, linked to its training run.

Where runs go (``resolve_tracking_uri``), first match wins:

* ``--tracking-uri URI`` (a server, ``sqlite:///...``, ``file:...``);
* ``--tracking-uri train``: the store the checkpoint's *training* run lives in (the eval run sits
  beside it in the same experiment's runs table);
* ``$MLFLOW_TRACKING_URI``;
* a sqlite store next to the results: ``sqlite:///<RESULTS_DIR>/../mlflow.db`` (with the default
  ``--out runs/eval/<name>`` every eval run shares ``runs/eval/mlflow.db``, which is also where
  ``compare`` looks by default).

Link to training: the export's ``onegen_config.json`` (or its manifest) records ``mlflow_run_id``,
kept as the tag ``onegen.train_run_id``. Eval runs are never nested (``mlflow.parentRunId``): the
runs table folds child runs under their parent, which hid every evaluation behind its training run.
The experiment is created as a machine-learning one (``onegen.mlflow_store.ensure_experiment``), so
the UI opens on its runs table (``ui_url``), not on MLflow 3's empty GenAI overview. The store is
opened through ``onegen.mlflow_store``: a new sqlite store is made once under a lock (evaluations
started together no longer race to create it), and every call waits out a locked store.

Tracking never kills an evaluation: when MLflow fails the user is told once and the results stay
on disk (``predictions.jsonl``, ``metrics.json``, and ``tracking.json``: the run as it would have
been logged, which ``python -m evaluation log RESULTS_DIR`` logs later, ``evaluation.logbook``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from onegen.errors import ConfigError
from onegen.mlflow_run import MlflowRun
from onegen.mlflow_store import sqlite_uri
from onegen.mlflow_tags import TAG_TRAIN_RUN


def default_tracking_uri(results_dir: str | Path) -> str:
    return sqlite_uri(Path(results_dir).resolve().parent / "mlflow.db")


def train_link(model_dir: str | Path) -> tuple[str | None, str | None]:
    """``(training run id, URI of the store that run was logged to)`` of an exported checkpoint.

    The store: the ``mlflow_tracking_uri`` the training config named, else the trainer's default
    sqlite store in its output dir (the export sits in ``OUTPUT/model``). None when unknown.
    """
    model_dir = Path(model_dir)
    run_id = None
    cfg: dict[str, Any] = {}
    for name in ("onegen_config.json", "manifest.json"):
        p = model_dir / name
        if p.is_file():
            try:
                d = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue
            cfg = cfg or d
            run_id = run_id or d.get("mlflow_run_id")
    if not run_id:
        return None, None
    train_cfg = cfg.get("train_config") or {}
    if train_cfg.get("mlflow_tracking_uri"):
        return run_id, str(train_cfg["mlflow_tracking_uri"])
    for out in (model_dir.parent, Path(str(train_cfg.get("output_dir") or ""))):
        if str(out) and (out / "mlflow.db").is_file():
            return run_id, sqlite_uri(out / "mlflow.db")
    return run_id, None


def resolve_tracking_uri(uri: str | None, results_dir: str | Path, model_dir: str | Path | None = None) -> str:
    if uri == "train":
        if model_dir is None:
            raise ConfigError("--tracking-uri train needs the checkpoint (--model)")
        run_id, store = train_link(model_dir)
        if store is None:
            raise ConfigError(f"--tracking-uri train: {model_dir} does not say where its training run was logged "
                              f"(no mlflow_run_id, or no mlflow.db next to it); give the URI itself")
        return store
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_tracking_uri(results_dir)


def metric_name(key: str) -> str:
    """MLflow metric names allow [A-Za-z0-9_-. /]: ``recall@5`` -> ``recall_at_5``."""
    return key.replace("@", "_at_")


def headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics an eval run logs: finite numbers only, under MLflow names."""
    return {metric_name(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class EvalTracker(MlflowRun):
    """One MLflow run per evaluation; degrades to local files on failure.

    Whatever it logs (or would have logged, with MLflow off or down) is also kept in ``record``,
    written by ``save_record`` as ``RESULTS_DIR/tracking.json``: ``python -m evaluation log`` replays
    it into a store later, the same run (``evaluation.logbook``)."""

    def __init__(self, enabled: bool, uri: str, experiment: str, run_name: str, tags: dict[str, str],
                 train_run_id: str | None, *, start_time: int | None = None, kept: str | None = None) -> None:
        super().__init__(uri, kept or "results are kept on disk only (`python -m evaluation log RESULTS_DIR` "
                                      "logs them later)")
        self.enabled, self.experiment = enabled, experiment
        self.nested = False  # never: eval runs are top-level runs (see the module docstring)
        tags = dict(tags)
        if train_run_id:
            tags[TAG_TRAIN_RUN] = train_run_id
        self.record: dict[str, Any] = {"experiment": experiment, "run_name": run_name, "tracking_uri": uri or None,
                                       "start_time": start_time or int(time.time() * 1000), "tags": dict(tags),
                                       "params": {}, "metrics": {}, "metrics_time": None, "artifacts": [],
                                       "status": None, "end_time": None, "logged": []}
        if not enabled:
            return
        for name in ("mlflow.store.db.utils", "alembic"):  # schema-creation chatter on a new store
            logging.getLogger(name).setLevel(logging.WARNING)
        self.start(experiment, run_name, tags, start_time=self.record["start_time"])

    def log_params(self, params: dict[str, Any]) -> None:
        params = {k: str(v)[:6000] for k, v in params.items() if v is not None}
        self.record["params"].update(params)
        if self.enabled:
            super().log_params(params)

    def log_metrics(self, metrics: dict[str, Any], step: int = 0, timestamp_ms: int | None = None) -> None:
        metrics = headline_metrics(metrics)
        self.record["metrics"].update(metrics)
        self.record["metrics_time"] = timestamp_ms or int(time.time() * 1000)
        if self.enabled:
            super().log_metrics(metrics, step, self.record["metrics_time"])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.record["tags"].update({k: str(v) for k, v in tags.items()})
        if self.enabled:
            super().set_tags(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.record["artifacts"].append([str(Path(path).resolve()), artifact_path])
        if self.enabled:
            super().log_artifact(path, artifact_path)

    def end(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        self.record["status"], self.record["end_time"] = status, end_time or int(time.time() * 1000)
        if self.enabled:
            super().end(status, self.record["end_time"])

    def save_record(self, results_dir: str | Path) -> Path:
        """``RESULTS_DIR/tracking.json``: the run as logged, artifact paths relative to the results dir,
        and where it was logged (``logged``: store and run id, when MLflow took it)."""
        # here, not at the top: evaluation.logbook imports this module (an import cycle)
        from evaluation.logbook import write_record

        return write_record(results_dir, self.record, self.uri if self.ok else None, self.run_id if self.ok else None)
