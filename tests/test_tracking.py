"""Training never dies of MLflow: a server that is down is noticed in seconds, metrics stay local."""

from __future__ import annotations

import socket
import time

from pipeline.tracking import Tracker, read_local_metrics


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again at once: nothing listens there


def test_tracking_server_down_degrades_to_local_metrics(tmp_path, capsys):
    t0 = time.time()
    tracker = Tracker(tmp_path, enabled=True, tracking_uri=f"http://127.0.0.1:{_dead_port()}", experiment="x",
                      run_name="r")
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.5}, step=1)
    tracker.log_metrics({"loss": 1.25}, step=2)
    tracker.end("FINISHED")
    assert time.time() - t0 < 30, "a dead server must not stall training"
    assert not tracker.mlflow_ok
    assert "MLflow is unavailable" in capsys.readouterr().err
    assert [r["loss"] for r in read_local_metrics(tmp_path)] == [1.5, 1.25]


def test_default_store_is_sqlite_under_the_run(tmp_path):
    tracker = Tracker(tmp_path, enabled=True, tracking_uri=None, experiment="x", run_name="r")
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.end("FINISHED")
    assert tracker.mlflow_ok and (tmp_path / "mlflow.db").exists() and (tmp_path / "mlflow_run_id").exists()
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 2.0


def test_experiment_opens_on_the_runs_table_and_eval_runs_are_top_level(tmp_path):
    """MLflow 3 opens a GenAI experiment on an empty overview and folds child runs under their parent:
    the experiment is a machine-learning one, and an eval run is a top-level run linked by tag."""
    from mlflow import MlflowClient

    from evaluation.tracking import EvalTracker
    from onegen.mlflow_tags import TAG_METHOD, TAG_TRAIN_RUN
    from onegen.mlflow_store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train = Tracker(tmp_path / "train", enabled=True, tracking_uri=uri, experiment="qs", run_name="train-onegen")
    train.end("FINISHED")
    ev = EvalTracker(True, uri, "qs", "eval-onegen", {TAG_METHOD: "onegen", "onegen.dataset": "rag_dev"}, train.run_id)
    ev.log_metrics({"em": 0.8, "recall_at_1_free": 1.0})
    ev.end("FINISHED")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("qs")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    run = client.get_run(ev.run_id)
    assert "mlflow.parentRunId" not in run.data.tags and not ev.nested
    assert run.data.tags[TAG_TRAIN_RUN] == train.run_id and run.data.tags[TAG_METHOD] == "onegen"
    assert run.data.metrics == {"em": 0.8, "recall_at_1_free": 1.0}
    # both are top-level rows of the runs table
    top = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.parentRunId IS NULL")
    assert {r.info.run_id for r in top} == {train.run_id, ev.run_id}


def test_an_existing_experiment_without_a_kind_gets_one_and_a_chosen_kind_is_kept(tmp_path):
    from mlflow import MlflowClient

    from onegen.mlflow_store import EXPERIMENT_KIND_TAG, ensure_experiment

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    a = client.create_experiment("old")
    b = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert ensure_experiment(client, "old") == a and ensure_experiment(client, "genai") == b
    assert client.get_experiment(a).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(b).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    """A rerun of the same output dir (a resume) sets the same MLflow run RUNNING again and adds to it."""
    from mlflow import MlflowClient

    first = Tracker(tmp_path, enabled=True, tracking_uri=None, experiment="x", run_name="r")
    first.log_metrics({"loss": 2.0}, step=1)
    first.end("FAILED")  # what a crash leaves
    again = Tracker(tmp_path, enabled=True, tracking_uri=None, experiment="x", run_name="r")
    assert again.mlflow_ok and again.run_id == first.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(again.run_id).info.status == "RUNNING"
    again.log_metrics({"loss": 1.0}, step=2)
    again.end("FINISHED")
    assert [(m.step, m.value) for m in client.get_metric_history(again.run_id, "loss")] == [(1, 2.0), (2, 1.0)]
    assert client.get_run(again.run_id).info.status == "FINISHED"
