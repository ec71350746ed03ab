"""An MLflow tracking server for cluster jobs (issue #19): ``slurm/mlflow.sh`` binds a cluster-internal
address (never 0.0.0.0) and publishes its URI; ``slurm/launch.sh --mlflow-server=DIR`` submits it first
(unless one answers) and points every job at it; ``--tracking-uri=URI`` points them at a given one.
Rendered with fake ``sbatch``/``srun`` (fast, as in test_slurm_render.py), and the server job run for
real outside SLURM (slow): an evaluation's tracker logs to it, and stopping the job removes its URI."""

from __future__ import annotations

import http.server
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_slurm_render import _env, _node_lines, _run, _sbatch_header

# Records what each sbatch call got: its arguments and the MLflow variables it would export to the job.
FAKE_SBATCH = r'''#!/usr/bin/env bash
n=$(( $(wc -l < "$FAKE_LOG" 2>/dev/null || echo 0) + 100 ))
printf '%s|%s|%s\n' "$*" "${ONEGEN_MLFLOW_URI_FILE:-}" "${MLFLOW_TRACKING_URI:-}" >> "$FAKE_LOG"
echo "$n;cluster"
'''


def _launch(tmp_path: Path, *args: str, **extra: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    env = _env(tmp_path, **extra)
    env.pop("ONEGEN_DRY_RUN")
    (tmp_path / "bin" / "sbatch").write_text(FAKE_SBATCH)
    log = tmp_path / "fake.log"
    log.unlink(missing_ok=True)
    p = subprocess.run(["bash", str(ROOT / "slurm" / "launch.sh"), *args], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    calls = [line.split("|") for line in log.read_text().splitlines()] if log.exists() else []
    return p, calls


def test_server_job_binds_an_internal_address_and_never_all_interfaces(tmp_path):
    header = _sbatch_header("mlflow.sh")
    assert "--output=logs/%x-%j.out" in header and not any("gpu" in h for h in header), header
    env = _env(tmp_path, SLURM_JOB_ID="4242")
    out = _run("mlflow.sh", [str(tmp_path / "store")], env, tmp_path)
    argv = shlex.split(out.splitlines()[-1].split(": ", 1)[1])
    host = argv[argv.index("--host") + 1]
    assert host and host not in ("0.0.0.0", "::") and argv[argv.index("--port") + 1] == str(15000 + 4242 % 5000)
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert argv[argv.index("--artifacts-destination") + 1] == str(tmp_path / "store" / "mlartifacts")
    assert argv[argv.index("--workers") + 1] == "1"  # one process writes the sqlite file
    for bad in ("0.0.0.0", "::"):
        p = subprocess.run(["bash", str(ROOT / "slurm" / "mlflow.sh"), str(tmp_path / "store")], cwd=tmp_path,
                           env={**env, "MLFLOW_HOST": bad}, capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "MLFLOW_HOST" in p.stderr, p.stderr


def test_launch_submits_a_server_first_and_points_the_jobs_at_it(tmp_path):
    store = tmp_path / "store"
    p, calls = _launch(tmp_path, "train", f"--mlflow-server={store}", "--time=1:00:00", "configs/x.yaml", "a=1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["100", "101"]  # the server's job id, then the training job's (last)
    server, train = calls
    assert server[0].split()[-2:] == [str(ROOT / "slurm" / "mlflow.sh"), str(store)] and "--time=1:00:00" in server[0]
    targs = train[0].split()
    assert "--dependency=after:100" in targs and targs[-2:] == ["configs/x.yaml", "a=1"] and "--time=1:00:00" in targs
    assert train[1] == str(store / "server.uri"), "the job is told where the server's URI will be"
    assert "scancel 100" in p.stderr
    p, calls = _launch(tmp_path, "eval", f"--mlflow-server={store}", "--", "runs/m/model", "runs/d")
    assert p.returncode == 0 and calls[1][0].split()[-3:] == [str(ROOT / "slurm" / "eval.sh"), "runs/m/model", "runs/d"]
    p, _ = _launch(tmp_path, "prep", f"--mlflow-server={store}", "--", "--kind", "2wiki")
    assert p.returncode == 2 and "train and eval" in p.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_a_server_that_answers_is_reused_and_a_given_uri_is_exported(tmp_path):
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        store = tmp_path / "store"
        store.mkdir()
        (store / "server.uri").write_text(f"http://127.0.0.1:{httpd.server_address[1]}\n")
        p, calls = _launch(tmp_path, "train", f"--mlflow-server={store}", "configs/x.yaml")
        assert p.returncode == 0, p.stderr
        assert len(calls) == 1 and "mlflow.sh" not in calls[0][0] and "--dependency" not in calls[0][0]
        assert calls[0][1] == str(store / "server.uri") and p.stdout.split() == ["100"]
    finally:
        httpd.shutdown()
    p, calls = _launch(tmp_path, "eval", "--tracking-uri=http://10.0.0.7:5000", "--", "m", "d")
    assert p.returncode == 0 and calls[0][2] == "http://10.0.0.7:5000" and "--tracking-uri" not in calls[0][0]


def test_jobs_read_the_servers_uri(tmp_path):
    uri_file = tmp_path / "server.uri"
    uri_file.write_text("http://10.1.2.3:15042\n")
    env = _env(tmp_path, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="cpu-a", SLURM_NNODES="1", SLURM_NODEID="0",
               SLURM_CPUS_ON_NODE="4", SLURM_GPUS_PER_NODE="0", ONEGEN_MLFLOW_URI_FILE=str(uri_file))
    (_, argv), = _node_lines(_run("train.sh", ["configs/tiny-cpu.yaml"], env, tmp_path))
    assert "mlflow_tracking_uri=http://10.1.2.3:15042" in argv
    out = _run("eval.sh", ["runs/m/model", "runs/d", "--method", "pipeline-bm25"], env, tmp_path)
    run = shlex.split(out.splitlines()[-1].split("eval: ", 1)[1])
    assert run[run.index("--tracking-uri") + 1] == "http://10.1.2.3:15042"
    uri_file.unlink()  # no server yet in a dry run: a warning, and the job's own default store
    out = _run("eval.sh", ["runs/m/model", "runs/d"], env, tmp_path)
    assert "no MLflow server URI" in out and "--tracking-uri train" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_server_job_serves_runs_and_withdraws_its_uri(tmp_path):
    from evaluation.tracking import EvalTracker

    store, port = tmp_path / "store", _free_port()
    env = _env(tmp_path, SLURM_JOB_ID="11", MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port), PYTHON=sys.executable)
    env.pop("ONEGEN_DRY_RUN")
    with open(tmp_path / "job.out", "w") as out:
        job = subprocess.Popen(["bash", str(ROOT / "slurm" / "mlflow.sh"), str(store)], cwd=tmp_path, env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (store / "server.uri").exists():
            assert job.poll() is None and time.time() < deadline, (tmp_path / "job.out").read_text()[-3000:]
            time.sleep(0.5)
        uri = (store / "server.uri").read_text().strip()
        assert uri == f"http://127.0.0.1:{port}"
        tracker = EvalTracker(True, uri, "onegen", "r", {"onegen.stage": "eval"}, None)
        tracker.log_metrics({"em": 0.5})
        tracker.end()
        assert tracker.ok and (store / "mlflow.db").is_file()
        from mlflow import MlflowClient

        assert MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.metrics == {"em": 0.5}
    finally:
        if job.poll() is None:
            job.send_signal(signal.SIGTERM)  # what scancel sends the batch shell
        job.wait(timeout=60)
    assert not (store / "server.uri").exists(), "a stopped server's URI is withdrawn"
    deadline = time.time() + 60
    while _listening(port):
        if time.time() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            raise AssertionError("the MLflow server outlived its job")
        time.sleep(0.5)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
