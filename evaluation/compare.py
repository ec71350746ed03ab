"""``compare``: the eval runs of an MLflow experiment side by side — a table, a PNG, CSV and markdown.

Reads only MLflow (tags ``onegen.*``, params, metrics, and each run's ``predictions.jsonl``
artifact), so it works the same against a sqlite store or a server. By default one row per
(method, checkpoint, dataset, setting): the latest finished run; ``--all`` keeps every run. Rows
are in the table's order: per dataset and setting, the methods in ``METHOD_ORDER``.

EM, F1 and free-generation Recall@1 come with a 95% bootstrap CI over the questions
(``onegen.bootstrap``, from the per-question scores of ``predictions.jsonl``), in the table
("0.800 [0.667, 0.933]"), the CSV and as error bars in the figure. Teacher-forced Recall@1 has no
per-question values on disk, hence no interval.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from rich.console import Console
from rich.table import Table

from evaluation.checks import model_manifest
from evaluation.plots import comparison_figure
from onegen.bootstrap import CI, RESAMPLES, SEED, bootstrap_ci, question_values
from onegen.errors import ConfigError
from onegen.methods import METHOD_NAMES
from onegen.mlflow_store import open_client, sqlite_path
from onegen.mlflow_tags import (EVAL_STAGE, TAG_DATASET, TAG_METHOD, TAG_MODE, TAG_MODEL, TAG_SETTING, TAG_STAGE, TAG_TASK,
                                TAG_TRAIN_RUN)

# (column header, where it comes from); metrics are MLflow metric names (evaluation.tracking.metric_name)
COLUMNS = [
    ("method", f"tag:{TAG_METHOD}"),
    ("mode", f"tag:{TAG_MODE}"),
    ("model", f"tag:{TAG_MODEL}"),
    ("dataset", f"tag:{TAG_DATASET}"),
    ("setting", f"tag:{TAG_SETTING}"),
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
METHOD_ORDER = METHOD_NAMES  # onegen.methods: OneGen, its two-pass variant, the pipelines, no retrieval
# table column -> its per-question score in predictions.jsonl (the mean of which is the headline value)
CI_KEYS = {"EM": "em", "F1": "f1", "R@1 free": "hop_recall_at_1"}
# the figure's panels: (table column, panel title)
FIGURE_PANELS = [("EM", "EM"), ("F1", "F1"), ("R@1 free", "Recall@1\nfree generation"),
                 ("R@1 TF", "Recall@1\nteacher-forced"), ("EL F1", "entity linking\nF1"), ("s/q", "seconds\nper question")]
BASE_MODELS = {"tiny": "tiny Llama (built from a config)", "smollm2": "SmolLM2-135M-Instruct"}


def collect(tracking_uri: str, experiment: str, *, all_runs: bool = False,
            fingerprints: set[str] | None = None) -> list[dict[str, Any]]:
    """Rows (one per eval run; latest per method/checkpoint/dataset/setting unless ``all_runs``; only the
    checkpoints of ``fingerprints`` when given)."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise ConfigError(f"no MLflow store at {db}: run `python -m evaluation run ...` first, or point "
                          f"--tracking-uri at the store the eval runs were logged to")
    try:  # a store left unusable is replaced when it holds no runs, else a StoreError says what to do
        client = open_client(tracking_uri)
    except OSError as e:  # a server that does not answer
        raise ConfigError(f"MLflow at {tracking_uri} is unavailable ({e})") from None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"no experiment {experiment!r} in {tracking_uri}; experiments there: {names}")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_STAGE}` = '{EVAL_STAGE}'",
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
        if fingerprints is not None and params.get("model_fingerprint") not in fingerprints:
            continue
        key = (tags.get(TAG_METHOD), params.get("model_fingerprint"), tags.get(TAG_DATASET), tags.get(TAG_SETTING))
        if not all_runs and key in seen:
            continue
        seen.add(key)
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
                               "train_run_id": tags.get(TAG_TRAIN_RUN), "base_model": params.get("model_source"),
                               "task": tags.get(TAG_TASK)}
        for name, src in COLUMNS:
            kind, field = src.split(":", 1)
            row[name] = tags.get(field) if kind == "tag" else metrics.get(field)
        rows.append(row)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    # The table's order: per dataset and setting, the methods in METHOD_ORDER (whatever their checkpoint).
    rows.sort(key=lambda r: (str(r["dataset"]), str(r["setting"]), order.get(r["method"], 99), str(r["model"])))
    return rows


def cis_from_records(records: list[dict], row: dict, *, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, CI]:
    """Bootstrap CIs of the row's EM / F1 / free Recall@1 from its per-question records.

    A metric whose per-question mean is not the run's logged value (predictions of another run)
    gets no interval rather than a wrong one."""
    out = {}
    for col, key in CI_KEYS.items():
        if row.get(col) is None:
            continue
        ci = bootstrap_ci(question_values(records, key), resamples=resamples, seed=seed)
        if ci is not None and abs(ci.mean - float(row[col])) <= 1e-6:
            out[col] = ci
    return out


def attach_cis(rows: list[dict], tracking_uri: str, *, resamples: int = RESAMPLES, seed: int = SEED) -> None:
    """``row["ci"]``: the CIs of each row, from its run's ``predictions.jsonl`` artifact ({} when absent)."""
    client = open_client(tracking_uri)
    for row in rows:
        row["ci"] = {}
        if all(row.get(col) is None for col in CI_KEYS):
            continue
        try:
            records = _predictions(client, row["run_id"])
        except Exception:  # an artifact store out of reach, or a run logged without predictions: no CI
            continue
        row["ci"] = cis_from_records(records, row, resamples=resamples, seed=seed)


def _predictions(client, run_id: str) -> list[dict]:
    """The run's ``predictions.jsonl`` artifact: read in place from a local store, else downloaded."""
    uri = client.get_run(run_id).info.artifact_uri
    if uri.startswith("file://"):
        text = (Path(unquote(urlparse(uri).path)) / "predictions.jsonl").read_text()
    else:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run otherwise
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(client.download_artifacts(run_id, "predictions.jsonl", tmp)).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
    """The cells; a value with a bootstrap CI reads ``0.800 [0.667, 0.933]``."""
    return [[r["ci"][h].fmt() if h in r.get("ci", {}) else _fmt(h, r.get(h)) for h in headers()] for r in rows]


def rich_table(rows: list[dict], title: str):
    t = Table(title=title, show_lines=False)
    for h in headers():
        # A value with its CI may wrap in a narrow terminal, after the value only: "0.800" / "[0.667,0.933]".
        t.add_column(h, justify="right" if h in BAR_METRICS + ["tok/s", "s/q", "n"] else "left",
                     no_wrap=h not in ("model", *CI_KEYS))
    for cells in table_rows(rows):
        t.add_row(*(c.replace(", ", ",") for c in cells))
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
    w.writerow(headers() + [f"{h} {end}" for h in CI_KEYS for end in ("CI low", "CI high")] + ["run_id", "train_run_id"])
    for r in rows:
        ci = r.get("ci", {})
        bounds = [getattr(ci[h], end) if h in ci else "" for h in CI_KEYS for end in ("low", "high")]
        w.writerow([("" if r.get(h) is None else r.get(h)) for h in headers()] + bounds
                   + [r["run_id"], r.get("train_run_id") or ""])
    return buf.getvalue()


def _unique(values) -> list:
    return list(dict.fromkeys(v for v in values if v is not None))


def _base_name(source: str | None) -> str | None:
    """The base model a checkpoint was trained from (param ``model_source``), readable."""
    if not source:
        return None
    return BASE_MODELS.get(source, Path(source).name or source)


def row_label(r: dict, rows: list[dict]) -> str:
    """The method, and under it what tells the rows apart (checkpoint, dataset, n) where they differ."""
    extra = []
    models = _unique(x.get("model") for x in rows)
    if len(models) > 1:
        modes = _unique(x.get("mode") for x in rows)
        one_mode_each = len(modes) == len(models) == len(_unique((x.get("model"), x.get("mode")) for x in rows))
        extra.append(f"{r.get('mode')} checkpoint" if one_mode_each else str(r.get("model")))
    if len(_unique((x.get("dataset"), x.get("setting")) for x in rows)) > 1:
        extra.append(f"{r.get('dataset')} ({r.get('setting')})")
    if len(_unique(x.get("n") for x in rows)) > 1 and r.get("n") is not None:
        extra.append(f"n = {int(r['n'])}")
    return "\n".join([str(r.get("method"))] + ([" · ".join(extra)] if extra else []))


def figure_data(rows: list[dict], experiment: str) -> dict[str, Any]:
    """What the comparison figure draws, in the table's order (pure; ``plot`` renders it).

    ``labels``/``methods``: one per row; ``panels``: one per metric some row has (``values`` and
    ``cis``, a (low, high) or None, per row); ``title`` names the experiment and the base model;
    ``subtitle`` the dataset, n, the checkpoints and what the error bars are."""
    panels = []
    for col, title in FIGURE_PANELS:
        values = [r.get(col) for r in rows]
        if all(v is None for v in values):
            continue
        cis = [(r["ci"][col].low, r["ci"][col].high) if col in r.get("ci", {}) else None for r in rows]
        panels.append({"column": col, "title": title, "values": values, "cis": cis,
                       "unit": "s" if col == "s/q" else "score"})
    bases = _unique(_base_name(r.get("base_model")) for r in rows) or _unique(r.get("model") for r in rows)
    sub = []
    datasets = _unique(f"{r.get('dataset')} ({r.get('setting')} setting)" for r in rows)
    if len(datasets) == 1:
        sub.append(datasets[0])
    ns = _unique(r.get("n") for r in rows)
    if len(ns) == 1:
        what = "texts" if all(r.get("task") == "el" for r in rows) else "questions"
        sub.append(f"n = {int(ns[0])} held-out {what} per method")
    sub.append("checkpoints: " + ", ".join(f"{m} ({mode})" for m, mode in _unique((r.get("model"), r.get("mode")) for r in rows)))
    subtitle = " · ".join(sub)
    if any(c is not None for p in panels for c in p["cis"]):
        subtitle += f"\nerror bars: 95% bootstrap CI over questions ({RESAMPLES:,} resamples)"
        if any(p["column"] == "R@1 TF" for p in panels):
            subtitle += "; none on teacher-forced Recall@1 (not kept per question)"
    return {"labels": [row_label(r, rows) for r in rows], "methods": [r.get("method") for r in rows], "panels": panels,
            "title": f"{experiment}: {', '.join(map(str, bases))}", "subtitle": subtitle}


def plot(rows: list[dict], png: Path, experiment: str) -> Path:
    d = figure_data(rows, experiment)
    return comparison_figure(d["labels"], d["methods"], d["panels"], png, d["title"], d["subtitle"])


def compare(tracking_uri: str, experiment: str, out_png: str | Path, *, all_runs: bool = False,
            models: list[str] | None = None, console=None) -> dict[str, Any]:
    """Print the table; write PNG + CSV + markdown (same stem). Returns the rows and the paths.
    ``models``: only the runs of these checkpoint dirs (their manifest fingerprints)."""
    console = console or Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)
    fps = {model_manifest(m)["fingerprint"] for m in models} if models else None
    rows = collect(tracking_uri, experiment, all_runs=all_runs, fingerprints=fps)
    if not rows and fps:
        raise ConfigError(f"experiment {experiment!r} at {tracking_uri} has no finished eval run of "
                          f"{', '.join(map(str, models))}: evaluate it first, or leave models out")
    if not rows:
        raise ConfigError(f"experiment {experiment!r} at {tracking_uri} has no finished eval runs "
                          f"(tag {TAG_STAGE}={EVAL_STAGE}); run `python -m evaluation run ...` first")
    attach_cis(rows, tracking_uri)
    title = f"onegen eval runs — experiment {experiment!r} ({len(rows)} runs)"
    console.print(rich_table(rows, title))
    if any(r["ci"] for r in rows):
        console.print(f"[95% bootstrap CI over questions, {RESAMPLES} resamples, seed {SEED}]", markup=False)
    png = Path(out_png)
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png, experiment)
    csv_path, md_path = png.with_suffix(".csv"), png.with_suffix(".md")
    csv_path.write_text(to_csv(rows))
    md_path.write_text(to_markdown(rows))
    console.print(f"chart {png}\ntable {csv_path}  {md_path}")
    return {"rows": rows, "png": png, "csv": csv_path, "md": md_path}
