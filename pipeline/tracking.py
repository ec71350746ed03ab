"""Metrics and MLflow, on rank 0 only.

Every metric row is first appended to ``OUTPUT/metrics.jsonl`` (local, durable, survives anything),
then sent to MLflow. MLflow defaults to a sqlite store under the run's output; a tracking server
is used when its URI is given. The store is opened through ``onegen.mlflow_store`` (made once under a
lock, calls that wait out a locked sqlite store); if MLflow fails (server down, gone mid-run) training
goes on: the user is told once, and the local file keeps every metric. A resumed run continues the
same MLflow run (its id is kept in ``OUTPUT/mlflow_run_id``); a crash marks the run FAILED.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from onegen.manifest import atomic_write_bytes
from onegen.mlflow_run import MlflowRun


def default_tracking_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker(MlflowRun):
    """The training run's tracker (``enabled`` on rank 0 only)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, tracking_uri: str | None, experiment: str,
                 run_name: str, tags: dict[str, str] | None = None):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.local = self.output_dir / "metrics.jsonl"
        uri = (tracking_uri or default_tracking_uri(self.output_dir)) if enabled else ""
        super().__init__(uri, f"metrics are kept in {self.local} and training goes on")
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.output_dir / "mlflow_run_id"
        previous = id_file.read_text().strip() if id_file.exists() else None
        self.start(experiment, run_name, tags or {}, resume_id=previous or None)
        if self.ok and self.run_id is not None:
            id_file.write_text(self.run_id + "\n")

    @property
    def mlflow_ok(self) -> bool:
        return self.ok

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(params).items()}
        super().log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
        if not self.enabled:
            return
        with open(self.local, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        super().log_metrics(metrics, step, timestamp_ms)


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
    # heavy (matplotlib): imported where the figure is drawn, with its Agg backend set first
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

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
