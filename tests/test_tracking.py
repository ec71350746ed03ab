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
