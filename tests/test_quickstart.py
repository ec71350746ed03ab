"""The README's main command, at reduced size, end to end: prep → train (2 ranks, ZeRO-3) → 5 evaluations → MLflow → table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train_fixtures import ROOT, env

pytestmark = pytest.mark.slow

METHODS = ["onegen", "two-pass", "pipeline-bm25", "pipeline-minilm", "no-retrieval"]


def test_quickstart_small_end_to_end(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "onegen.quickstart", "--small", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    summary = (out / "summary.md").read_text()
    for m in METHODS:
        row = next(line for line in summary.splitlines() if line.startswith(f"| {m} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        em, f1, r1 = cells[1:4]
        for v in (em, f1):
            assert 0.0 <= float(v) <= 1.0, row
        if m != "no-retrieval":  # no retrieval has no Recall@1 by definition
            assert 0.0 <= float(r1) <= 1.0, row
    assert "mlflow ui --backend-store-uri sqlite:///" in p.stdout
    # long stages show their progress bar (here, without a terminal, as a plain line)
    assert any(line.lstrip().startswith("train:") and "%|" in line for line in p.stdout.splitlines()), p.stdout[-3000:]
    # every run is in the MLflow store, training and evaluation
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")  # not set_tracking_uri: it exports an env var
    exp = client.get_experiment_by_name("quickstart-small")
    runs = client.search_runs([exp.experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"train-onegen", "train-git"} | {f"eval-{m}" for m in METHODS} <= names, names
    assert all(r.info.status == "FINISHED" for r in runs)
    for plot in ("comparison.png", "train-onegen/training_curves.png", "train-git/training_curves.png"):
        assert (out / plot).stat().st_size > 1000, plot
    # a rerun reuses every finished stage
    again = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done before") >= 7
    assert json.loads((out / "summary.json").read_text())["methods"].keys() >= set(METHODS)


def test_quickstart_rejects_bad_steps_before_doing_anything(tmp_path):
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, "-m", "onegen.quickstart", "--steps", "0", "--out", str(out)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--steps must be >= 1, got 0" in r.stderr
    assert not out.exists()
