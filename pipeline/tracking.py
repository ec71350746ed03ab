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


# MLflow 3.x's UI opens an experiment by its kind: "genai_development" lands on the GenAI overview
# (traces, no runs), "custom_model_development" on the runs table; an experiment without the tag asks
# the user to choose. Its sidebar also has a global "workflow type" toggle (GenAI by default in 3.17,
# kept in the browser), which the URL's ?workflowType=machine_learning sets (the quickstart prints
# http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created as a machine-learning experiment when missing.

    An existing experiment without a kind gets this one (a kind someone chose is kept)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


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
            exp_id = ensure_experiment(client, experiment, local_artifact_root(self.uri))
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


def _curve_run(output_dir: Path) -> dict[str, Any]:
    """What the curves' title and panels need from ``OUTPUT/config.yaml`` (mode, model, retrieval loss)."""
    import yaml  # here, like matplotlib below: only the end-of-run plot needs it

    try:
        cfg = yaml.safe_load((output_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    model, loss = cfg.get("model") or {}, cfg.get("loss") or {}
    name = str(model.get("source") or "?")
    if name == "tiny":  # a model built from the config's fields: say which
        layers = model.get("num_layers")
        name = (f"tiny {model.get('architecture', 'llama')} (hidden {model.get('hidden_size')}, "
                f"{layers} layer{'' if layers == 1 else 's'})")
    return {"mode": loss.get("mode"), "model": name, "ret_loss": loss.get("ret_loss") or "retrieval"}


def curve_panels(rows: list[dict], mode: str | None, ret_loss: str = "retrieval") -> list[dict]:
    """The training-curve panels of ``metrics.jsonl`` rows (pure): losses, then retrieval accuracy.

    A ``git`` run has no retrieval loss (loss_ret is 0, its accuracies mean nothing): losses only.
    Without a known mode, a run whose loss_ret is 0 at every step is taken for one."""
    if mode is None:
        mode = "git" if not any(r.get("loss_ret") for r in rows) else None

    def series(key: str, label: str, marker: str | None = None) -> list[tuple]:
        # a sampled entity KB names the metric eval/retrieval_acc@N (pipeline.train._evaluate)
        found: dict[str, dict] = {}
        for r in rows:
            for k, v in r.items():
                if k == key or k.startswith(key + "@"):
                    found.setdefault(k, {})[r["step"]] = v
        return [(label + (f" (top-1 of {k.split('@', 1)[1]} sampled)" if "@" in k else ""),
                 *zip(*sorted(pts.items())), marker) for k, pts in found.items()]

    losses = [] if mode == "rit" else series("loss_gen", "loss_gen: next-token CE (nats/token)")
    if mode != "git":
        losses += series("loss_ret", f"loss_ret: {ret_loss} (nats/query)")
    units = {"loss_gen" if s[0].startswith("loss_gen") else "loss_ret" for s in losses}
    ylabel = {frozenset({"loss_gen"}): "loss (nats/token)", frozenset({"loss_ret"}): "loss (nats/query)"}
    panels = [{"title": "training losses", "ylabel": ylabel.get(frozenset(units), "loss (nats)"), "series": losses,
               "ylim": None}]
    if mode != "git":
        acc = series("ret_acc", "training batch") + series("eval/retrieval_acc", "held-out eval split", "o")
        panels.append({"title": "retrieval accuracy", "ylabel": "top-1 retrieval accuracy", "series": acc,
                       "ylim": (0, 1.02)})
    return panels


def plot_curves(output_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """Training curves of a run as a PNG: losses, and (unless ``git``) retrieval accuracy, against step."""
    rows = read_local_metrics(output_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    path = Path(path or output_dir / "training_curves.png")
    run = _curve_run(output_dir)
    panels = curve_panels(rows, run["mode"], run["ret_loss"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.9), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, xs, ys, marker in panel["series"]:
            ax.plot(xs, ys, label=label, marker=marker, markersize=3.5, linewidth=1.4)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(panel["ylabel"], fontsize=9)
        if panel["ylim"]:
            ax.set_ylim(*panel["ylim"])
        if panel["series"]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    mode = run["mode"] or ("git" if len(panels) == 1 else "?")
    fig.suptitle(f"training curves: {output_dir.name} ({mode} mode, {run['model']})", fontsize=11, fontweight="bold",
                 x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path
