"""``python -m evaluation log`` (issue #19): results kept on disk while MLflow was off (``--no-mlflow``) or
down (a dead server) are logged afterwards as the very run the evaluation would have made, linked to
the training run; ``compare`` then shows them; a second log is refused unless ``--force``; changed
results are refused; a run an outage left unfinished is replaced. Real sqlite stores, real MLflow."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluation.cli import main
from evaluation.logbook import RECORD
from onegen.mlflow_store import ensure_experiment, local_artifact_root, open_client, sqlite_uri
from onegen.mlflow_tags import TAG_LOGGED_LATER, TAG_RESULTS_ID, TAG_TRAIN_RUN
from tests.eval_fixtures import random_model, world  # noqa: F401
from tests.train_fixtures import ROOT


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again at once: nothing listens there


def _record(d: Path) -> dict:
    return json.loads((d / RECORD).read_text())


@pytest.fixture(scope="module")
def setup(random_model, world, tmp_path_factory):  # noqa: F811
    """A store with a training run; a checkpoint linked to it; three evaluations of it: one with
    --no-mlflow, one while the server was dead, one logged directly (the reference)."""
    base = tmp_path_factory.mktemp("eval_log")
    uri = sqlite_uri(base / "store" / "mlflow.db")
    client = open_client(uri)
    exp = ensure_experiment(client, "onegen", local_artifact_root(uri))  # as the trackers make it: artifacts beside it
    train = client.create_run(exp, run_name="train", tags={"onegen.stage": "train"})
    client.set_terminated(train.info.run_id)
    model = base / "train_out" / "model"
    shutil.copytree(random_model, model)
    cfg = json.loads((model / "onegen_config.json").read_text())
    (model / "onegen_config.json").write_text(json.dumps({**cfg, "mlflow_run_id": train.info.run_id}))
    common = ["run", "--model", str(model), "--data", str(world / "rag_dev"), "--max-examples", "2", "--max-new-tokens",
              "6", "--force-retrieval-every", "3", "--max-hops", "1", "--quiet"]
    dirs = {"offline": base / "offline", "outage": base / "outage", "direct": base / "direct"}
    assert main([*common, "--method", "pipeline-bm25", "--no-mlflow", "--tracking-uri", uri,
                 "--out", str(dirs["offline"])]) == 0
    assert main([*common, "--method", "no-retrieval", "--tracking-uri", f"http://127.0.0.1:{_dead_port()}",
                 "--out", str(dirs["outage"])]) == 0
    assert main([*common, "--method", "no-retrieval", "--tracking-uri", uri, "--out", str(dirs["direct"])]) == 0
    return {"base": base, "uri": uri, "client": client, "train_run": train.info.run_id, "dirs": dirs}


@pytest.fixture(scope="module")
def logged(setup):
    """The offline and the outage results logged into the store in one command."""
    d = setup["dirs"]
    assert main(["log", str(d["offline"]), str(d["outage"]), "--tracking-uri", setup["uri"]]) == 0
    return {k: _record(d[k])["logged"][-1]["run_id"] for k in ("offline", "outage")}


def test_results_kept_on_disk_are_logged_linked_and_compared(setup, logged):
    client = setup["client"]
    for key, rid in logged.items():
        rec, run = _record(setup["dirs"][key]), client.get_run(rid)
        assert run.info.status == "FINISHED" and run.info.run_name == rec["run_name"]
        assert run.data.tags[TAG_TRAIN_RUN] == setup["train_run"] and "mlflow.parentRunId" not in run.data.tags
        assert run.data.params == rec["params"] and run.data.params["train_run_id"] == setup["train_run"]
        assert run.data.metrics == rec["metrics"] and {"em", "f1", "n"} <= set(run.data.metrics)
        assert {a.path for a in client.list_artifacts(rid)} >= {"predictions.jsonl", "metrics.json", "manifest.json"}
        assert rec["logged"][-1]["tracking_uri"] == setup["uri"] and rec["logged"][-1]["by"] == "log"
    png = setup["base"] / "cmp" / "c.png"
    assert main(["compare", "--tracking-uri", setup["uri"], "--out", str(png), "--all"]) == 0
    csv = png.with_suffix(".csv").read_text()
    assert logged["offline"] in csv and logged["outage"] in csv and "pipeline-bm25" in csv


def test_the_outage_is_on_record_and_a_dead_store_is_an_error(setup, capsys):
    rec = _record(setup["dirs"]["outage"])
    assert rec["tracking_uri"].startswith("http://127.0.0.1:") and rec["status"] == "FINISHED"
    # Without --tracking-uri, `log` goes where the evaluation meant to: the server is still dead.
    t0 = time.time()
    assert main(["log", str(setup["dirs"]["outage"])]) == 2
    assert time.time() - t0 < 30 and "is unavailable" in capsys.readouterr().err


def test_a_second_log_is_refused_unless_forced(setup, logged, capsys):
    d, uri, client = setup["dirs"]["offline"], setup["uri"], setup["client"]
    assert main(["log", str(d), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "already logged" in err and logged["offline"] in err and "--force" in err
    # The directly logged evaluation is in the store too: refused as well.
    assert main(["log", str(setup["dirs"]["direct"]), "--tracking-uri", uri]) == 2
    assert main(["log", str(d), "--tracking-uri", uri, "--force"]) == 0
    rid = _record(d)["tags"][TAG_RESULTS_ID]
    exp = client.get_experiment_by_name("onegen").experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{TAG_RESULTS_ID}` = '{rid}'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def test_the_logged_run_is_the_run_the_evaluation_made(setup):
    """The directly logged run and the same results logged into another store by `log`: equal."""
    d = setup["dirs"]["direct"]
    direct_id = json.loads((d / "manifest.json").read_text())["mlflow_run_id"]
    other = sqlite_uri(setup["base"] / "other" / "mlflow.db")
    assert main(["log", str(d), "--tracking-uri", other]) == 0
    a, b = setup["client"].get_run(direct_id), open_client(other).get_run(_record(d)["logged"][-1]["run_id"])
    assert (a.info.run_name, a.info.status, a.info.start_time, a.info.end_time) == \
        (b.info.run_name, b.info.status, b.info.start_time, b.info.end_time)
    assert a.data.params == b.data.params and a.data.metrics == b.data.metrics
    onegen_tags = {k: v for k, v in a.data.tags.items() if k.startswith("onegen.")}
    assert {k: v for k, v in b.data.tags.items() if k.startswith("onegen.") and k != TAG_LOGGED_LATER} == onegen_tags
    assert TAG_LOGGED_LATER in b.data.tags and TAG_LOGGED_LATER not in a.data.tags

    def artifacts(client, rid):
        return sorted(f.path for top in client.list_artifacts(rid)
                      for f in (client.list_artifacts(rid, top.path) if top.is_dir else [top]))
    assert artifacts(setup["client"], direct_id) == artifacts(open_client(other), b.info.run_id)


def test_changed_results_are_refused(setup, tmp_path, capsys):
    d = tmp_path / "changed"
    shutil.copytree(setup["dirs"]["offline"], d)
    with open(d / "predictions.jsonl", "a") as f:
        f.write("{}\n")
    assert main(["log", str(d), "--tracking-uri", setup["uri"], "--force"]) == 2
    assert "not the file the evaluation wrote" in capsys.readouterr().err
    assert main(["log", str(tmp_path), "--tracking-uri", setup["uri"]]) == 2
    assert "has no tracking.json" in capsys.readouterr().err
    train = tmp_path / "train_out"  # what pipeline/train.py leaves: not an evaluation's results
    train.mkdir()
    (train / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (train / "config.yaml").write_text("output_dir: x\n")
    assert main(["log", str(train), "--tracking-uri", setup["uri"]]) == 2
    assert "is a training output dir" in capsys.readouterr().err


def test_a_run_left_unfinished_by_an_outage_is_replaced(setup, tmp_path):
    """MLflow died mid-evaluation: its run stays RUNNING. `log` makes the complete one and marks the
    partial one FAILED, pointing at its replacement (nothing is deleted)."""
    d = tmp_path / "partial"
    shutil.copytree(setup["dirs"]["offline"], d)
    rec = _record(d)
    rec["tags"][TAG_RESULTS_ID], rec["logged"] = "f" * 32, []
    (d / RECORD).write_text(json.dumps(rec))
    client = setup["client"]
    exp = client.get_experiment_by_name("onegen").experiment_id
    partial = client.create_run(exp, tags={TAG_RESULTS_ID: "f" * 32, "onegen.stage": "eval"}).info.run_id
    assert main(["log", str(d), "--tracking-uri", setup["uri"]]) == 0
    new = _record(d)["logged"][-1]["run_id"]
    old = client.get_run(partial)
    assert old.info.status == "FAILED" and old.data.tags["onegen.replaced_by"] == new
    assert client.get_run(new).info.status == "FINISHED"


def test_log_help_explains_itself():
    p = subprocess.run([sys.executable, "-m", "evaluation", "log", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    for word in ("tracking.json", "--force", "onegen.train_run_id", "--tracking-uri", "compare"):
        assert word in p.stdout, word


def test_a_results_dir_in_use_is_not_logged(setup, tmp_path, capsys):
    """`log` writes tracking.json: it waits for no one and refuses a dir an evaluation is writing."""
    from onegen.runlock import DirLock

    d = tmp_path / "busy"
    shutil.copytree(setup["dirs"]["offline"], d)
    before = (d / RECORD).read_bytes()
    with DirLock(d, "python -m evaluation run (a test)"):
        assert main(["log", str(d), "--tracking-uri", setup["uri"], "--force"]) == 2
    assert "in use" in capsys.readouterr().err
    assert (d / RECORD).read_bytes() == before
