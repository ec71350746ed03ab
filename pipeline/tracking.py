"""Metrics and MLflow, on rank 0 only.

Every metric row is first appended to ``OUTPUT/metrics.jsonl`` (local, durable, survives anything),
then sent to MLflow. MLflow defaults to a sqlite store under the run's output; a tracking server
is used when its URI is given. If MLflow fails (server down, gone mid-run) training goes on: the
user is told once, and the local file keeps every metric. A resumed run continues the same
MLflow run (its id is kept in ``OUTPUT/mlflow_run_id``); a crash marks the run FAILED.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from onegen.manifest import atomic_write_bytes


def default_tracking_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def probe_server(uri: str, timeout: float = 5.0) -> None:
    """Raise when an MLflow server does not answer ``/health`` within ``timeout`` seconds.

    MLflow's own client retries a dead server for minutes; training must not wait that long."""
    import urllib.request

    with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
        if r.status != 200:
            raise ConnectionError(f"{uri}/health answered HTTP {r.status}")


def limit_http_retries() -> None:
    """A server that goes away mid-run costs seconds per call, not minutes (user settings win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside it (not in ./mlruns of whatever the cwd is)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    def __init__(self, output_dir: str | Path, *, enabled: bool, tracking_uri: str | None, experiment: str,
                 run_name: str, tags: dict[str, str] | None = None):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.mlflow_ok = False
        self.run_id: str | None = None
        self.local = self.output_dir / "metrics.jsonl"
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri or default_tracking_uri(self.output_dir)
        self._client = None
        try:
            from mlflow import MlflowClient

            if self.uri.startswith(("http://", "https://")):
                limit_http_retries()
                probe_server(self.uri)
            # A client, not mlflow's global active run: no atexit end_run against a server that died
            # mid-run (more retries at exit), and no MLFLOW_TRACKING_URI exported to child processes.
            client = MlflowClient(tracking_uri=self.uri)
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(
                experiment, artifact_location=local_artifact_root(self.uri))
            id_file = self.output_dir / "mlflow_run_id"
            previous = id_file.read_text().strip() if id_file.exists() else None
            if previous:
                client.update_run(previous, status="RUNNING")
                self.run_id = previous
            else:
                self.run_id = client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
            id_file.write_text(self.run_id + "\n")
            self._client = client
            self.mlflow_ok = True
        except Exception as e:  # never let tracking kill training
            self._degrade(e)

    def _degrade(self, e: Exception) -> None:
        if self.mlflow_ok or self.run_id is None:
            print(f"[onegen] MLflow is unavailable ({type(e).__name__}: {str(e)[:200]}); metrics are kept in "
                  f"{self.local} and training goes on", file=sys.stderr)
        self.mlflow_ok = False

    def _call(self, fn_name: str, *args, **kw) -> None:
        if not (self.enabled and self.mlflow_ok):
            return
        try:
            getattr(self._client, fn_name)(self.run_id, *args, **kw)
        except Exception as e:
            self._degrade(e)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
            self._call("log_batch", params=[Param(k, str(v)[:6000]) for k, v in items[i:i + 90]])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        with open(self.local, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        now = int(time.time() * 1000)
        self._call("log_batch", metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("log_batch", tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", status=status)


def read_local_metrics(output_dir: str | Path) -> list[dict]:
    p = Path(output_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def truncate_local_metrics(output_dir: str | Path, step: int) -> int:
    """Keep only rows up to ``step`` (a resume redoes later steps); also drops a line torn by a kill.

    Returns how many rows were dropped. MLflow keeps its history: redone steps appear there twice."""
    p = Path(output_dir) / "metrics.jsonl"
    if not p.exists():
        return 0
    kept, dropped = [], 0
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_bytes(p, "".join(f"{line}\n" for line in kept).encode())
    return dropped


def plot_curves(output_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """loss, loss_gen, loss_ret and retrieval accuracy against step, as a PNG."""
    rows = read_local_metrics(output_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path or Path(output_dir) / "training_curves.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax in (("loss_gen", axes[0]), ("loss_ret", axes[0]), ("ret_acc", axes[1]), ("eval/retrieval_acc", axes[1])):
        # a sampled entity KB names the metric eval/retrieval_acc@N (pipeline.train._evaluate)
        pts = [(r["step"], v) for r in rows for k, v in r.items() if k == key or k.startswith(key + "@")]
        if pts:
            xs, ys = zip(*sorted(dict(pts).items()))
            ax.plot(xs, ys, label=key, marker="o" if key.startswith("eval") else None, markersize=3)
    axes[0].set_title("losses")
    axes[1].set_title("retrieval accuracy (in-batch / held-out)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
