"""The trainer under faults, for real: SIGKILL of every rank, a half-written checkpoint, a full disk,
an MLflow server that dies mid-run, a tampered checkpoint; and same seed → same losses.

Every run is real DeepSpeed ZeRO-3 on CPU (gloo) on the tiny model. Losses are compared with
``rtol=0``: on CPU with the same seed, world size and thread count the run is bitwise deterministic
(gloo sums two ranks in a fixed order, no dropout, negatives are a pure function of (example, epoch,
seed)), and a resume restores the fp32 master weights, Adam moments, LR schedule and data position
exactly. Any tolerance would hide a resume that silently drops, say, the optimizer state.
"""

from __future__ import annotations

import pickle
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.tracking import read_local_metrics
from tests.train_fixtures import ROOT, env, make_world, run, train_cmd

pytestmark = pytest.mark.slow

COMMON = ["optim.micro_batch_size=4", "checkpoint_every=2", "export=false"]
STEPS_1, STEPS_2 = 4, 6  # 1-rank and 2-rank references
COMPARED = ("loss", "loss_gen", "loss_ret", "grad_norm", "lr")


@dataclass
class Setup:
    world: Path
    store: Path  # one MLflow sqlite store made once: creating one runs alembic migrations, ~8 s a run

    def one_rank(self, out: Path, *extra: str) -> list[str]:
        return train_cmd("python", self.world, out, f"optim.max_steps={STEPS_1}", *COMMON,
                         f"mlflow_tracking_uri=sqlite:///{self.store}", *extra)

    def two_ranks(self, out: Path) -> list[str]:
        return train_cmd("torchrun", self.world, out, f"optim.max_steps={STEPS_2}", *COMMON,
                         f"mlflow_tracking_uri=sqlite:///{self.store}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    from mlflow import MlflowClient

    base = tmp_path_factory.mktemp("reliability")
    MlflowClient(tracking_uri=f"sqlite:///{base / 'mlflow.db'}").search_experiments()  # creates the tables
    return Setup(make_world(base / "world"), base / "mlflow.db")


@pytest.fixture(scope="module")
def ref1(setup, tmp_path_factory) -> Path:
    """An uninterrupted 1-rank run: checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ref1") / "run"
    run(setup.one_rank(out))
    return out


@pytest.fixture(scope="module")
def ref2(setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref2") / "run"
    run(setup.two_ranks(out))
    return out


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in read_local_metrics(out)]


def _assert_same_losses(out: Path, ref: Path) -> None:
    got, want = read_local_metrics(out), read_local_metrics(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want], "each step once, none missing"
    for g, w in zip(got, want):
        for k in COMPARED:
            assert g[k] == w[k], f"step {g['step']} {k}: {g[k]!r} != {w[k]!r} (uninterrupted run)"


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a lost node would: torchrun starts each worker
    in its own session, so killing the launcher's process group alone would leave the ranks running."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(procs, timeout=30)


def _wait_until(done, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        try:
            if done():
                return
        except ValueError:  # metrics.jsonl has a line being written
            pass
        time.sleep(0.01)
    raise AssertionError(f"no {what} within {timeout}s")


def _logged(out: Path, step: int):
    return lambda: step in _steps(out)


def test_same_seed_same_world_same_losses(setup, ref1, tmp_path):
    out = tmp_path / "again"
    run(setup.one_rank(out))
    _assert_same_losses(out, ref1)


@pytest.mark.parametrize("kill_at", ["random-step", "inside-save"])
def test_sigkill_two_ranks_then_rerun_resumes_exactly(setup, ref2, tmp_path, kill_at):
    """SIGKILL every process (random-step: after a random logged step plus a random delay; inside-save:
    as soon as a random checkpoint's dir appears, i.e. while DeepSpeed writes it); the same command
    resumes from the last COMPLETE checkpoint and ends with the uninterrupted run's losses, each step
    logged once, and no partial checkpoint dir left."""
    rng = random.Random(kill_at)
    out = tmp_path / "run"
    cmd = setup.two_ranks(out)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        if kill_at == "random-step":
            step = rng.randint(1, STEPS_2 - 2)
            _wait_until(_logged(out, step), proc, f"step {step} logged")
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            tag = ckpt.tag_for(rng.choice([2, 4]))
            _wait_until((out / "checkpoints" / tag).is_dir, proc, f"{tag} being written")
        assert proc.poll() is None, "the run finished before the kill: nothing was tested"
    finally:
        _kill_tree(proc)
    resumable = ckpt.latest_complete(out / "checkpoints")
    partial = [p.name for p in (out / "checkpoints").glob("step-*") if not (p / ckpt.MARKER).exists()]
    print(f"{kill_at}: killed after step {max(_steps(out), default=0)}; resumable: "
          f"{resumable.name if resumable else None}; partial: {partial}")

    rerun = run(cmd)
    if resumable is not None:
        assert f"resuming from {resumable.name}" in rerun.stdout
    else:
        assert "resuming" not in rerun.stdout
    assert "2 rank(s)" in rerun.stdout and f"done: step {STEPS_2}" in rerun.stdout
    _assert_same_losses(out, ref2)
    assert all((p / ckpt.MARKER).exists() for p in (out / "checkpoints").glob("step-*")), "no partial dir left"


def test_half_written_checkpoint_is_never_resumed(setup, ref1, tmp_path):
    """The state a kill inside the step-4 save leaves: files without COMPLETE, one truncated, a
    stray one, metrics rows past the last complete checkpoint and a torn last line."""
    out = tmp_path / "run"
    shutil.copytree(ref1, out, ignore=shutil.ignore_patterns("mlflow_run_id"))
    half = out / "checkpoints" / "step-000004"
    (half / ckpt.MARKER).unlink()
    optim = next(half.glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    (half / "stray.pt").write_bytes(b"partial")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 9.')

    rerun = run(setup.one_rank(out))
    assert "resuming from step-000002" in rerun.stdout
    _assert_same_losses(out, ref1)
    assert (half / ckpt.MARKER).exists() and not (half / "stray.pt").exists()
    for f in half.glob("*.pt"):
        ckpt.safe_load(f)  # rewritten whole
    assert (out / "checkpoints" / "latest").read_text() == "step-000004"


def _du(path: Path) -> int:
    """Bytes a tree takes on tmpfs (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*") if p.is_file())


def test_disk_full_while_saving_keeps_previous_checkpoint(setup, ref1, tmp_path):
    """A real full disk: ``checkpoints/`` is a tmpfs sized for one checkpoint and a half (in a private
    user+mount namespace, so no root and no leftover mount). The step-4 save hits ENOSPC; the user
    gets one line naming the dir; step 2 stays complete; after "freeing space" (remount larger) the
    same command resumes from step 2 and ends with the uninterrupted run's losses."""
    if shutil.which("unshare") is None:
        pytest.skip("util-linux `unshare` is not installed (needed for a private size-limited tmpfs)")
    out, logs = tmp_path / "run", tmp_path / "logs"
    ck = out / "checkpoints"
    ck.mkdir(parents=True)
    logs.mkdir()
    one = _du(ref1 / "checkpoints") - _du(ref1 / "checkpoints" / "step-000004")  # scripts + one checkpoint
    size = one + _du(ref1 / "checkpoints" / "step-000002") // 2
    cmd = shlex.join(setup.one_rank(out))
    script = f"""
        mount -t tmpfs -o size={size} onegen-full {ck} || exit 90
        {cmd} >{logs}/full.out 2>{logs}/full.err; echo $? >{logs}/full.rc
        cp -a {ck} {logs}/after_full
        mount -o remount,size=64m {ck}
        {cmd} >{logs}/rerun.out 2>{logs}/rerun.err; echo $? >{logs}/rerun.rc
        cp -a {ck} {logs}/after_rerun
    """
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=600)
    if p.returncode == 90 or not (logs / "full.rc").exists():
        pytest.skip(f"cannot mount a private tmpfs here (user namespaces disabled?): {p.stderr.strip()[:300]}")
    full_err = (logs / "full.err").read_text()
    assert (logs / "full.rc").read_text().strip() == "2", full_err[-3000:]
    lines = [line for line in full_err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(ck / "step-000004") in lines[0] and "no space left" in lines[0], full_err[-3000:]
    assert "Traceback" not in full_err
    after = logs / "after_full"
    assert (after / "step-000002" / ckpt.MARKER).exists()
    assert not (after / "step-000004" / ckpt.MARKER).exists()
    assert (after / "latest").read_text() == "step-000002"

    rerun_out = (logs / "rerun.out").read_text()
    assert (logs / "rerun.rc").read_text().strip() == "0", (logs / "rerun.err").read_text()[-3000:]
    assert "resuming from step-000002" in rerun_out
    _assert_same_losses(out, ref1)
    assert (logs / "after_rerun" / "step-000004" / ckpt.MARKER).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _watch_steps(out: Path, proc: subprocess.Popen, seen: dict[int, float], until=None, timeout: float = 300) -> None:
    """Note when each step's row appears in metrics.jsonl, until ``until()`` holds or the run ends."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ended = proc.poll() is not None  # before the read: the rows written before the exit are all seen
        try:
            for step in _steps(out):
                seen.setdefault(step, time.time())
        except ValueError:  # a line being written
            pass
        if until is not None and until():
            return
        if ended:
            if until is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) first")
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout}s")


def test_mlflow_server_dies_mid_run(setup, tmp_path):
    """Training logs to a real tracking server that is SIGKILLed after step 5: the run finishes, the
    user is told once, metrics.jsonl has every step, and the dead server costs seconds, not minutes.

    What the dead server costs is read from the steps themselves (when each row appeared), not from
    the run's remaining wall time: that grows with the machine's load (it flaked at a 60 s bound when
    the 35 remaining steps ran slowly on a busy machine), while MLflow's own retries of a dead server
    would stall one step for minutes."""
    steps, kill_at, port = 40, 5, _free_port()
    url = f"http://127.0.0.1:{port}"
    from mlflow import MlflowClient  # imported now: its import takes seconds the run would not wait for

    shutil.copy(setup.store, tmp_path / "server.db")  # tables already made: the server starts faster
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    out = tmp_path / "run"
    train, seen = None, {}
    try:
        deadline = time.time() + 180
        while not _healthy(url):
            assert server.poll() is None and time.time() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        MlflowClient(tracking_uri=url).search_experiments()  # warm: its store is opened before the run needs it
        cmd = setup.one_rank(out, f"optim.max_steps={steps}", "checkpoint_every=100", f"mlflow_tracking_uri={url}")
        with open(tmp_path / "train.out", "w") as so, open(tmp_path / "train.err", "w") as se:  # a pipe could fill up
            train = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=so, stderr=se)
        _watch_steps(out, train, seen, until=lambda: kill_at in seen)
        killed_at, logged_at_kill = time.time(), max(seen)
        _kill_tree(server)  # at once: no call to the server in between, however slow the machine
        _watch_steps(out, train, seen)
        train.wait(timeout=300)
        after_kill = time.time() - killed_at
    finally:
        _kill_tree(server)
        if train is not None and train.poll() is None:
            _kill_tree(train)
    stdout, stderr = (tmp_path / "train.out").read_text(), (tmp_path / "train.err").read_text()
    assert train.returncode == 0, stderr[-3000:]
    assert logged_at_kill < steps, "the run ended before the server died: nothing was tested"
    assert _steps(out) == list(range(1, steps + 1))
    assert stderr.count("MLflow is unavailable") == 1, stderr[-3000:]
    run_id = (out / "mlflow_run_id").read_text().strip()
    got = [m.step for m in MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'server.db'}").get_metric_history(run_id, "loss")]
    assert 1 in got, f"the server got no metrics before it died (steps {got})"
    # Seconds, not minutes: no step waits long on the dead server (MLflow's default retries would stall
    # one for minutes; here one failed call, 1 retry, 10 s timeout, then MLflow is skipped), and the
    # steps after its death are no slower than before it (no per-step cost either).
    times = [seen[s] for s in range(2, steps + 1)]
    before = [b - a for a, b in zip(times, times[1:]) if b <= killed_at]
    after = [seen[logged_at_kill + 1] - killed_at] + [seen[s + 1] - seen[s] for s in range(logged_at_kill + 1, steps)]
    print(f"server killed after step {logged_at_kill}; the run ended {after_kill:.1f}s later; step gaps before "
          f"{_median(before):.2f}s, after {_median(after):.2f}s (longest {max(after):.1f}s)")
    assert max(after) < 30, f"a step waited {max(after):.0f}s on the dead server"
    assert _median(after) <= 2 * _median(before) + 1, "steps got slower once the server was dead"
    assert f"done: step {steps}" in stdout


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def test_tampered_checkpoint_is_refused_without_running_code(setup, ref1, tmp_path):
    """DeepSpeed unpickles checkpoints with weights_only=False; ours go through ``safe_load``."""
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"module": Payload()}, evil)
    torch.load(evil, weights_only=False)  # the payload is real: DeepSpeed's own load would run it
    assert sentinel.exists()
    sentinel.unlink()
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        ckpt.safe_load(evil)
    assert not sentinel.exists()
    for f in (ref1 / "checkpoints" / "step-000004").glob("*.pt"):
        state = ckpt.safe_load(f)  # a real checkpoint holds only plain data and the allow-listed classes
        assert isinstance(state, dict)

    out = tmp_path / "run"
    shutil.copytree(ref1, out, ignore=shutil.ignore_patterns("mlflow_run_id"))
    target = next((out / "checkpoints" / "step-000004").glob("*model_states.pt"))
    shutil.copy(evil, target)
    p = subprocess.run(setup.one_rank(out, "optim.max_steps=6"), cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    assert not sentinel.exists(), "the checkpoint's pickle ran code"
    error = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert error and str(target.parent) in error[0] and "refusing to load" in error[0], p.stderr[-3000:]
