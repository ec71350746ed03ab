"""One MLflow run, as training (``pipeline.tracking.Tracker``) and evaluation (``evaluation.tracking.EvalTracker``)
both write it.

Written through a client (``onegen.mlflow_store.open_client``), never through mlflow's global active
run: no atexit ``end_run`` against a server that died mid-run (more retries at exit), and no
``MLFLOW_TRACKING_URI`` exported to child processes. Every call waits out a locked sqlite store;
any other failure switches MLflow off for the rest of the run, with one message that says what is
kept instead. Tracking never kills the run it tracks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from onegen.errors import OneGenError
from onegen.mlflow_store import ensure_experiment, local_artifact_root, open_client

PARAMS_PER_BATCH = 90  # MLflow caps a log_batch at 100 params (and 100 tags)
METRICS_PER_BATCH = 500  # ... and at 1000 metrics
PARAM_CHARS = 6000


class MlflowRun:
    """An MLflow run at ``uri``; ``kept`` ends the one message printed when MLflow fails (what is kept)."""

    def __init__(self, uri: str, kept: str) -> None:
        self.uri = uri
        self.ok = False
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._kept = kept
        self._client: Any = None

    def start(self, experiment: str, run_name: str, tags: dict[str, str], *, resume_id: str | None = None,
              start_time: int | None = None) -> None:
        """Create the run (or set a resumed one RUNNING again); on failure MLflow is off for the run."""
        try:
            client = open_client(self.uri)
            self.experiment_id = ensure_experiment(client, experiment, local_artifact_root(self.uri))
            if resume_id:
                client.update_run(resume_id, status="RUNNING")
                self.run_id = resume_id
            else:
                self.run_id = client.create_run(self.experiment_id, run_name=run_name, tags=tags,
                                                start_time=start_time).info.run_id
            self._client = client
            self.ok = True
        except Exception as e:
            self._degrade(e)

    def _degrade(self, e: Exception) -> None:
        if self.ok or self.run_id is None:  # once: at start, or at the first failure after it
            what = str(e) if isinstance(e, OneGenError) else str(e)[:300]
            print(f"[onegen] MLflow is unavailable ({type(e).__name__}: {what}); {self._kept}", file=sys.stderr,
                  flush=True)
        self.ok = False

    def call(self, fn_name: str, *args: Any, **kw: Any) -> Any:
        """``client.<fn_name>(run_id, ...)`` unless MLflow is off; None when it fails (then it is off)."""
        if not self.ok:
            return None
        try:
            return getattr(self._client, fn_name)(self.run_id, *args, **kw)
        except Exception as e:
            self._degrade(e)
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        # heavy (mlflow): imported where used, so importing this module stays light
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.call("log_batch", params=items[i:i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
        # heavy (mlflow): imported where used, so importing this module stays light
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), METRICS_PER_BATCH):
            self.call("log_batch", metrics=items[i:i + METRICS_PER_BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        # heavy (mlflow): imported where used, so importing this module stays light
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.call("log_batch", tags=items[i:i + PARAMS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.call("log_artifact", str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        self.call("set_terminated", status=status, end_time=end_time)
