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
The experiment is created as a machine-learning one (``pipeline.tracking.ensure_experiment``), so
the UI opens on its runs table (``ui_url``), not on MLflow 3's empty GenAI overview.

Tracking never kills an evaluation: when MLflow fails the user is told once and the results stay
on disk (``predictions.jsonl``, ``metrics.json``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.tracking import ensure_experiment, probe_server

EVAL_STAGE = "eval"
TAG_STAGE = "onegen.stage"
TAG_METHOD = "onegen.method"
TAG_DATASET = "onegen.dataset"
TAG_MODEL = "onegen.model"
TAG_MODE = "onegen.mode"
TAG_TASK = "onegen.task"
TAG_TRAIN_RUN = "onegen.train_run_id"
TAG_TRAIN_STORE = "onegen.train_tracking_uri"


def sqlite_uri(db: str | Path) -> str:
    return f"sqlite:///{Path(db).resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


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
    from onegen.errors import ConfigError

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


class EvalTracker:
    """One MLflow run (``MlflowClient``, no global active run); degrades to local files on failure."""

    def __init__(self, enabled: bool, uri: str, experiment: str, run_name: str, tags: dict[str, str],
                 train_run_id: str | None) -> None:
        self.enabled, self.uri, self.experiment = enabled, uri, experiment
        self.ok = False
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.nested = False  # never: eval runs are top-level runs (see the module docstring)
        self._client = None
        if not enabled:
            return
        try:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            import logging

            for name in ("mlflow.store.db.utils", "alembic"):  # schema-creation chatter on a new store
                logging.getLogger(name).setLevel(logging.WARNING)
            from mlflow.tracking import MlflowClient

            if uri.startswith(("http://", "https://")):
                probe_server(uri)  # fail in seconds, not after MLflow's minutes of HTTP retries
            db = sqlite_path(uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=uri)
            # A sqlite store keeps its artifacts beside it (not in ./mlruns of whatever cwd).
            art = (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None
            self.experiment_id = ensure_experiment(client, experiment, art)
            tags = dict(tags)
            if train_run_id:
                tags[TAG_TRAIN_RUN] = train_run_id
            run = client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            self._client = client
            self.ok = True
        except Exception as e:
            self._degrade(e)

    def _degrade(self, e: Exception) -> None:
        if self.ok or self.run_id is None:
            print(f"[onegen] MLflow is unavailable ({type(e).__name__}: {str(e)[:300]}); results are kept on disk only",
                  file=sys.stderr)
        self.ok = False

    def _call(self, fn: str, *args, **kw) -> None:
        if not self.ok:
            return
        try:
            getattr(self._client, fn)(self.run_id, *args, **kw)
        except Exception as e:
            self._degrade(e)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.ok:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items() if v is not None]
        for i in range(0, len(items), 90):
            self._call("log_batch", params=items[i:i + 90])

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        if not self.ok:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_name(k), float(v), now, 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self._call("log_batch", metrics=items[i:i + 500])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._call("set_tag", k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", status=status)
