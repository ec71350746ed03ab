"""Four evaluations and a training run started at once against one NEW sqlite MLflow store (issue #19).

Before the store was made once under a lock, this is what destroyed it: every evaluation failed to
log (``table latest_metrics already exists``, an alembic revision mismatch, ``duplicate column name``)
and the store stayed broken for every later run, ``compare`` included. Now every run is logged
complete (params, metrics, artifacts, FINISHED) and ``compare`` reads the store. Real processes, real
DeepSpeed training, the real MLflow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval_fixtures import random_model, world  # noqa: F401
from tests.train_fixtures import ROOT, TINY_MODEL, env

pytestmark = pytest.mark.slow

METHODS = ["onegen", "two-pass", "pipeline-bm25", "no-retrieval"]


def _commands(model: Path, world: Path, index: Path, uri: str, base: Path) -> dict[str, list[str]]:
    cmds = {}
    for m in METHODS:
        cmds[m] = [sys.executable, "-m", "evaluation", "run", "--model", str(model), "--data", str(world / "rag_dev"),
                   "--method", m, "--max-examples", "2", "--max-new-tokens", "6", "--force-retrieval-every", "3",
                   "--max-hops", "1", "--out", str(base / m), "--tracking-uri", uri, "--quiet",
                   *(["--index", str(index)] if m in ("onegen", "two-pass") else [])]
    cmds["train"] = [sys.executable, str(ROOT / "pipeline" / "train.py"), "--config", str(ROOT / "configs" / "tiny-cpu.yaml"),
                     f"data.train=[{world / 'rag_train'}]", "data.eval=[]", "optim.max_steps=2", "checkpoint_every=100",
                     "export=false", f"output_dir={base / 'train'}", f"mlflow_tracking_uri={uri}", *TINY_MODEL]
    return cmds


def test_evaluations_and_training_started_together_all_log_to_a_new_store(random_model, world, tmp_path):  # noqa: F811
    from mlflow import MlflowClient

    from evaluation.cli import main

    index = tmp_path / "index"
    assert main(["index", "--model", str(random_model), "--data", str(world / "rag_dev"), "--out", str(index),
                 "--quiet"]) == 0
    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert not db.exists()
    procs = {}
    for name, cmd in _commands(random_model, world, index, uri, tmp_path).items():
        with open(tmp_path / f"{name}.out", "w") as so, open(tmp_path / f"{name}.err", "w") as se:
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=so, stderr=se)
    for name, p in procs.items():
        p.wait(timeout=900)
    for name, p in procs.items():
        err = (tmp_path / f"{name}.err").read_text()
        assert p.returncode == 0, f"{name}:\n{err[-3000:]}"
        assert "MLflow is unavailable" not in err, f"{name} did not log:\n{err[-3000:]}"

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("onegen")
    for m in METHODS:
        out = tmp_path / m
        rid = json.loads((out / "manifest.json").read_text())["mlflow_run_id"]
        run = client.get_run(rid)
        assert run.info.status == "FINISHED" and run.info.experiment_id == exp.experiment_id
        assert run.data.tags["onegen.method"] == m and run.data.params["method"] == m
        head = json.loads((out / "metrics.json").read_text())["headline"]
        assert run.data.metrics["em"] == head["em"] and run.data.metrics["n"] == 2
        rec = json.loads((out / "tracking.json").read_text())
        assert run.data.params == rec["params"] and run.data.metrics == rec["metrics"], m
        assert rec["logged"] == [{**rec["logged"][0], "tracking_uri": uri, "run_id": rid}]
        assert {a.path for a in client.list_artifacts(rid)} >= {"predictions.jsonl", "metrics.json", "manifest.json"}
    train_id = (tmp_path / "train" / "mlflow_run_id").read_text().strip()
    train = client.get_run(train_id)
    assert train.info.status == "FINISHED" and train.data.tags["onegen.stage"] == "train"
    assert train.data.params["config.optim.max_steps"] == "2" and "world_size" in train.data.params
    assert [m.step for m in client.get_metric_history(train_id, "loss")] == [1, 2]
    # The store is whole: the comparison reads all four.
    png = tmp_path / "cmp" / "c.png"
    assert main(["compare", "--tracking-uri", uri, "--out", str(png)]) == 0
    rows = png.with_suffix(".csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == sorted(METHODS)
