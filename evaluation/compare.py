"""``compare``: the eval runs of an MLflow experiment side by side — a table, a PNG, CSV and markdown.

Reads only MLflow (tags ``onegen.*``, params, metrics), so it works the same against a sqlite store
or a server. By default one row per (method, checkpoint, dataset, setting): the latest finished run;
``--all`` keeps every run.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from onegen.errors import ConfigError

# (column header, where it comes from); metrics are MLflow metric names (evaluation.tracking.metric_name)
COLUMNS = [
    ("method", "tag:onegen.method"),
    ("mode", "tag:onegen.mode"),
    ("model", "tag:onegen.model"),
    ("dataset", "tag:onegen.dataset"),
    ("setting", "tag:onegen.setting"),
    ("n", "metric:n"),
    ("EM", "metric:em"),
    ("F1", "metric:f1"),
    ("R@1 free", "metric:recall_at_1_free"),
    ("R@1 TF", "metric:recall_at_1_tf"),
    ("EL F1", "metric:el_f1"),
    ("tok/s", "metric:tokens_per_s"),
    ("s/q", "metric:s_per_question"),
]
BAR_METRICS = ["EM", "F1", "R@1 free", "R@1 TF", "EL F1"]
METHOD_ORDER = ["onegen", "two-pass", "pipeline-bm25", "pipeline-minilm", "no-retrieval"]


def collect(tracking_uri: str, experiment: str, *, all_runs: bool = False) -> list[dict[str, Any]]:
    """Rows (one per eval run; latest per method/checkpoint/dataset/setting unless ``all_runs``)."""
    from mlflow.tracking import MlflowClient

    from evaluation.tracking import sqlite_path

    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise ConfigError(f"no MLflow store at {db}: run `python -m evaluation run ...` first, or point "
                          f"--tracking-uri at the store the eval runs were logged to")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"no experiment {experiment!r} in {tracking_uri}; experiments there: {names}")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string="tags.`onegen.stage` = 'eval'",
                                  order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    rows: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for run in runs:
        if not all_runs and run.info.status != "FINISHED":
            continue
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        key = (tags.get("onegen.method"), params.get("model_fingerprint"), tags.get("onegen.dataset"),
               tags.get("onegen.setting"))
        if not all_runs and key in seen:
            continue
        seen.add(key)
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
                               "train_run_id": tags.get("onegen.train_run_id")}
        for name, src in COLUMNS:
            kind, field = src.split(":", 1)
            row[name] = tags.get(field) if kind == "tag" else metrics.get(field)
        rows.append(row)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    rows.sort(key=lambda r: (str(r["dataset"]), str(r["model"]), order.get(r["method"], 99), str(r["setting"])))
    return rows


def _fmt(name: str, v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if name == "n":
            return str(int(v))
        if name in ("tok/s",):
            return f"{v:.1f}"
        if name == "s/q":
            return f"{v:.3f}"
        return f"{v:.3f}"
    return str(v)


def headers() -> list[str]:
    return [c for c, _ in COLUMNS]


def table_rows(rows: list[dict]) -> list[list[str]]:
    return [[_fmt(h, r.get(h)) for h in headers()] for r in rows]


def rich_table(rows: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for h in headers():
        t.add_column(h, justify="right" if h in BAR_METRICS + ["tok/s", "s/q", "n"] else "left", no_wrap=h != "model")
    for cells in table_rows(rows):
        t.add_row(*cells)
    return t


def to_markdown(rows: list[dict]) -> str:
    hs = headers()
    lines = ["| " + " | ".join(hs) + " |", "|" + "|".join("---:" if h in BAR_METRICS + ["tok/s", "s/q", "n"] else "---"
                                                          for h in hs) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(headers() + ["run_id", "train_run_id"])
    for r in rows:
        w.writerow([("" if r.get(h) is None else r.get(h)) for h in headers()] + [r["run_id"], r.get("train_run_id") or ""])
    return buf.getvalue()


def label(r: dict) -> str:
    return f"{r['method']} · {r['mode']} · {r['model']} · {r['dataset']}" + (f" ({r['setting']})" if r.get("setting") == "open" else "")


def plot(rows: list[dict], png: Path, title: str) -> Path:
    from evaluation.plots import grouped_bars

    metrics = [m for m in BAR_METRICS if any(r.get(m) is not None for r in rows)] or BAR_METRICS
    series = {f"{i + 1}. {label(r)}": [r.get(m) for m in metrics] for i, r in enumerate(rows)}
    side = {f"{i + 1}. {label(r)}": r.get("tok/s") for i, r in enumerate(rows)}
    return grouped_bars(metrics, series, png, title, "score", side=side, side_label="generated tokens / s")


def compare(tracking_uri: str, experiment: str, out_png: str | Path, *, all_runs: bool = False,
            console=None) -> dict[str, Any]:
    """Print the table; write PNG + CSV + markdown (same stem). Returns the rows and the paths."""
    import sys

    from rich.console import Console

    console = console or Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)
    rows = collect(tracking_uri, experiment, all_runs=all_runs)
    if not rows:
        raise ConfigError(f"experiment {experiment!r} at {tracking_uri} has no finished eval runs "
                          f"(tag onegen.stage=eval); run `python -m evaluation run ...` first")
    title = f"onegen eval runs — experiment {experiment!r} ({len(rows)} runs)"
    console.print(rich_table(rows, title))
    png = Path(out_png)
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png, title)
    csv_path, md_path = png.with_suffix(".csv"), png.with_suffix(".md")
    csv_path.write_text(to_csv(rows))
    md_path.write_text(to_markdown(rows))
    console.print(f"chart {png}\ntable {csv_path}  {md_path}")
    return {"rows": rows, "png": png, "csv": csv_path, "md": md_path}
