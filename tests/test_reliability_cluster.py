"""The trainer on a shared cluster, for real (issue #19): a second run on the same output dir, a
launcher SIGKILLed alone, one rank SIGKILLed, a rerun with nothing left to do.

Real DeepSpeed ZeRO-3 on CPU (gloo) on the tiny model of ``test_reliability_training.py``, real
torchrun / DeepSpeed launchers and real signals; nothing is mocked.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from pipeline import checkpoint as ckpt
from pipeline.tracking import read_local_metrics
from tests.train_fixtures import ROOT, env, make_world, run, train_cmd

pytestmark = pytest.mark.slow

COMMON = ["optim.micro_batch_size=4", "checkpoint_every=2", "export=false"]
ORPHAN_LIMIT_S = 30  # issue #19: every rank stops within 30 s of its launcher's death


@dataclass
class Setup:
    world: Path
    store: Path

    def cmd(self, launcher: str, out: Path, steps: int, *extra: str) -> list[str]:
        return train_cmd(launcher, self.world, out, f"optim.max_steps={steps}", *COMMON,
                         f"mlflow_tracking_uri=sqlite:///{self.store}", *extra)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    from mlflow import MlflowClient

    base = tmp_path_factory.mktemp("cluster")
    MlflowClient(tracking_uri=f"sqlite:///{base / 'mlflow.db'}").search_experiments()  # tables made once
    return Setup(make_world(base / "world"), base / "mlflow.db")


def _steps(out: Path) -> list[int]:
    try:
        return [r["step"] for r in read_local_metrics(out)]
    except ValueError:  # a line being written
        return []


def _start(cmd: list[str], logs: Path) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "out", "w") as so, open(logs / "err", "w") as se:  # files: a full pipe would stall the run
        return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=so, stderr=se, start_new_session=True)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while step not in _steps(out):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
        assert time.time() < deadline, f"no step {step} within {timeout}s"
        time.sleep(0.02)


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training processes under a launcher (they, unlike the launchers, carry RANK)."""
    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RANK" in p.environ():
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _files(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


def _check_resumed_to_the_end(rerun: subprocess.CompletedProcess, out: Path, steps: int, resumable: Path | None) -> None:
    assert f"resuming from {resumable.name}" in rerun.stdout if resumable else "resuming" not in rerun.stdout
    assert f"done: step {steps}" in rerun.stdout
    assert _steps(out) == list(range(1, steps + 1)), "each step logged once"
    assert all((p / ckpt.MARKER).exists() for p in (out / "checkpoints").glob("step-*")), "no partial checkpoint left"


def test_second_run_on_the_output_dir_refuses_and_the_first_is_unharmed(setup, tmp_path):
    """A 2-rank torchrun started on the output dir of a running training refuses before it builds anything
    (one `error:` line naming the holder; both ranks exit); the first run then ends as if alone. Its rerun,
    with nothing left to do, prints the checkpoint's final losses, not nan."""
    out, steps = tmp_path / "run", 6
    first_cmd = setup.cmd("python", out, steps)
    first = _start(first_cmd, tmp_path / "first")
    try:
        _wait_for_step(out, 1, first)
        # Paused mid-run, as a suspended job is: the second run is tried while the first holds the dir
        # for certain, however fast either is on this machine.
        os.kill(first.pid, signal.SIGSTOP)
        try:
            t0 = time.time()
            second = subprocess.run(setup.cmd("torchrun", out, steps), cwd=ROOT, env=env(), capture_output=True,
                                    text=True, timeout=300)
            refused_in = time.time() - t0
            steps_seen = _steps(out)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            _kill_all([psutil.Process(first.pid)])
    print(f"second run refused in {refused_in:.1f}s (process start-up included)")
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, second.stderr[-3000:]
    for part in ("in use by another run", f"host {socket.gethostname()}", f"pid {first.pid}", "started 20",
                 "pipeline/train.py", str(out / ".onegen.lock")):
        assert part in errors[0], (part, errors[0])
    assert "starting DeepSpeed" not in second.stdout, "refused before the engine, the resume and any clean-up"
    assert "resuming" not in second.stdout
    assert _steps(out)[:len(steps_seen)] == steps_seen

    first_out = (tmp_path / "first" / "out").read_text()
    assert first.returncode == 0, (tmp_path / "first" / "err").read_text()[-3000:]
    assert f"done: step {steps}" in first_out
    assert _steps(out) == list(range(1, steps + 1)), "each step once: nobody else wrote metrics.jsonl"
    assert [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")] == ["step-000004", "step-000006"]
    assert not (out / ".onegen.lock").exists(), "released at the end"

    again = run(first_cmd)
    last = read_local_metrics(out)[-1]
    done = next(line for line in again.stdout.splitlines() if "done: step" in line)
    assert "nothing left to train" in again.stdout and "resuming from step-000006" in again.stdout
    assert f"loss {last['loss']:.4f} (gen {last['loss_gen']:.4f}, ret {last['loss_ret']:.4f})" in done, done
    assert "nan" not in done
    assert _steps(out) == list(range(1, steps + 1))


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sigkill_of_the_launcher_alone_stops_every_rank(setup, tmp_path, launcher):
    """Only the launcher is SIGKILLed: each rank notices within a second that it was re-parented and
    stops itself (SIGKILL, the fault checkpoints survive), long before the run's end (DeepSpeed's `launch`,
    left between them, exits too); nothing changes in the output dir after; the same command resumes from
    the last complete checkpoint."""
    out, steps = tmp_path / "run", 60  # a tiny step takes ~0.15 s: without the watchdog the orphans would end the run
    cmd = setup.cmd(launcher, out, steps)
    proc = _start(cmd, tmp_path / "logs")
    ranks: list[psutil.Process] = []
    try:
        _wait_for_step(out, 3, proc)
        ranks = _ranks(proc)
        assert len(ranks) == 2, [r.cmdline() for r in ranks]
        others = [p for p in psutil.Process(proc.pid).children(recursive=True) if p not in ranks]  # deepspeed's `launch`
        os.kill(proc.pid, signal.SIGKILL)
        killed_at, step_at_kill = time.time(), max(_steps(out))
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(ranks + others, timeout=ORPHAN_LIMIT_S)
        stopped_in = time.time() - killed_at
        assert not alive, f"still running {ORPHAN_LIMIT_S}s after the launcher's death: {[p.pid for p in alive]}"
    finally:
        _kill_all(ranks + ([psutil.Process(proc.pid)] if proc.poll() is None else []))
    last = max(_steps(out))
    print(f"{launcher}: killed after step {step_at_kill}; every rank stopped {stopped_in:.1f}s later, after step {last}")
    assert last < steps and not (out / "checkpoints" / ckpt.tag_for(steps)).exists(), "the orphans trained on"
    assert "its launcher" in (tmp_path / "logs" / "err").read_text()
    before = _files(out)
    time.sleep(2)
    assert _files(out) == before, "something wrote into the output dir after every rank was gone"

    if launcher == "deepspeed":
        return  # the rerun is the same under either launcher: checked once, under torchrun (~20 s)
    # Rank 0 either stopped itself too (its lock is left, stale) or, when its peer went first, failed in a
    # collective and released the lock on its way out.
    left_lock = (out / ".onegen.lock").exists()
    resumable = ckpt.latest_complete(out / "checkpoints")
    rerun = run(cmd)
    assert ("took over a stale lock" in rerun.stdout and "its process is gone" in rerun.stdout) == left_lock
    _check_resumed_to_the_end(rerun, out, steps, resumable)


def test_sigkill_of_one_rank_stops_the_other_and_fails_the_launcher(setup, tmp_path):
    """Rank 1 is SIGKILLed: torchrun stops rank 0 and exits non-zero (within its 30 s grace); the rerun resumes."""
    out, steps = tmp_path / "run", 30
    cmd = setup.cmd("torchrun", out, steps)
    proc = _start(cmd, tmp_path / "logs")
    ranks: list[psutil.Process] = []
    try:
        _wait_for_step(out, 3, proc)
        ranks = _ranks(proc)
        victim = next(r for r in ranks if r.environ()["RANK"] == "1")
        survivor = next(r for r in ranks if r.environ()["RANK"] == "0")
        victim.kill()
        killed_at = time.time()
        rc = proc.wait(timeout=120)
        launcher_exit = time.time() - killed_at
        gone, alive = psutil.wait_procs([survivor], timeout=5)
    finally:
        _kill_all(ranks + ([psutil.Process(proc.pid)] if proc.poll() is None else []))
    print(f"rank 1 killed: torchrun exited {rc} {launcher_exit:.1f}s later, rank 0 stopped")
    assert rc != 0 and not alive
    assert launcher_exit < 60
    last = max(_steps(out))
    assert last < steps and not (out / "checkpoints" / ckpt.tag_for(steps)).exists()
    assert re.search(r"exitcode\s*:\s*-9", (tmp_path / "logs" / "err").read_text()), "torchrun names the killed rank"

    resumable = ckpt.latest_complete(out / "checkpoints")
    _check_resumed_to_the_end(run(cmd), out, steps, resumable)
