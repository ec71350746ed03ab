"""One writer per directory (``onegen.runlock``), with real processes: a holder in another process, a
holder killed by a real SIGKILL, concurrent takers in forked processes; and the refusal of a second
``prepare`` / ``world`` / ``evaluation index`` / ``evaluation run`` on a directory that is in use."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from onegen.runlock import LOCK_NAME, DirLock, LockTiming, RunLocked, read_lock
from tests.eval_fixtures import random_model, world  # noqa: F401
from tests.train_fixtures import ROOT, env

HOLDER = """
import sys
from onegen.runlock import DirLock
lock = DirLock(sys.argv[1], "holder of the test", lock_path=sys.argv[2] if len(sys.argv) > 2 else None).acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
lock.release()
"""


@contextmanager
def held_by_another_process(directory: Path, lock_path: Path | None = None):
    """A real second process holding the lock of ``directory`` until the block ends; yields its pid."""
    args = [sys.executable, "-c", HOLDER, str(directory)] + ([str(lock_path)] if lock_path else [])
    p = subprocess.Popen(args, cwd=ROOT, env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        if p.poll() is None:
            p.stdin.close()
            p.wait(timeout=30)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_second_holder_refuses_with_one_line_naming_the_first(tmp_path):
    with held_by_another_process(tmp_path) as holder:
        t0 = time.time()
        with pytest.raises(RunLocked) as e:
            DirLock(tmp_path).acquire()
        took = time.time() - t0
    msg = str(e.value)
    assert "\n" not in msg
    for part in (str(tmp_path), "in use by another run", f"host {socket.gethostname()}", f"pid {holder.pid}",
                 "started 20", "holder of the test", "wait for it to finish", str(tmp_path / LOCK_NAME)):
        assert part in msg, (part, msg)
    assert took < 1.0, f"refused after {took:.1f}s, not at once"
    # the holder released on its way out: the lock is free again
    with DirLock(tmp_path) as lock:
        assert read_lock(lock.path).holder["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_sigkilled_holder_on_this_host_is_taken_over(tmp_path):
    with held_by_another_process(tmp_path) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert read_lock(tmp_path / LOCK_NAME).holder["pid"] == holder.pid, "SIGKILL leaves the lock behind"
    said: list[str] = []
    with DirLock(tmp_path, log=said.append, timing=LockTiming(stale_s=3600)):  # the heartbeat alone would not do
        assert read_lock(tmp_path / LOCK_NAME).holder["pid"] == os.getpid()
    assert len(said) == 1 and "took over a stale lock" in said[0] and f"pid {holder.pid}" in said[0]
    assert "its process is gone" in said[0]


def _lock_of_another_host(path: Path, age_s: float) -> None:
    path.write_text(json.dumps({"host": "node-that-died", "pid": os.getpid(), "started_at": "2026-01-01T00:00:00+00:00",
                                "command": "train.py", "token": "theirs"}))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_lock_of_another_host_is_stale_only_after_its_heartbeat_timeout(tmp_path):
    timing = LockTiming(heartbeat_s=30, stale_s=120)
    _lock_of_another_host(tmp_path / LOCK_NAME, age_s=60)  # a live holder elsewhere: its pid means nothing here
    with pytest.raises(RunLocked, match="host node-that-died.*last heartbeat 60 s ago"):
        DirLock(tmp_path, timing=timing).acquire()
    _lock_of_another_host(tmp_path / LOCK_NAME, age_s=150)
    said: list[str] = []
    with DirLock(tmp_path, timing=timing, log=said.append):
        pass
    assert len(said) == 1 and "no heartbeat for 150 s (stale after 120 s)" in said[0] and "node-that-died" in said[0]


def test_heartbeat_keeps_a_live_lock_fresh(tmp_path):
    timing = LockTiming(heartbeat_s=0.1, stale_s=0.6)
    with DirLock(tmp_path, timing=timing):
        other = DirLock(tmp_path, timing=timing)
        other.host = "another-node"  # so only the heartbeat's age can tell whether the holder is alive
        time.sleep(1.5)
        assert read_lock(tmp_path / LOCK_NAME).age < 0.6
        with pytest.raises(RunLocked):
            other.acquire()


def test_released_on_exception(tmp_path):
    with pytest.raises(ValueError):
        with DirLock(tmp_path):
            assert (tmp_path / LOCK_NAME).exists()
            raise ValueError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == [], "no temp or guard file left"


def test_a_holder_that_lost_its_lock_finds_out(tmp_path):
    lost: list[dict] = []
    lock = DirLock(tmp_path, timing=LockTiming(heartbeat_s=0.05), on_lost=lambda _lock, holder: lost.append(holder))
    lock.acquire()
    _lock_of_another_host(tmp_path / LOCK_NAME, age_s=0)  # as a taker would leave it after a takeover
    deadline = time.time() + 5
    while not lost and time.time() < deadline:
        time.sleep(0.02)
    lock.release()
    assert lost and lost[0]["host"] == "node-that-died"
    assert (tmp_path / LOCK_NAME).exists(), "release leaves the new holder's lock alone"


def test_a_late_taker_never_removes_the_lock_that_replaced_the_stale_one(tmp_path):
    """The interleaving a naive takeover (unlink, then create) gets wrong, laid out step by step: A judges
    the lock stale, B takes it over first, then A goes on with what it saw."""
    path = tmp_path / LOCK_NAME
    _lock_of_another_host(path, age_s=1000)
    late = DirLock(tmp_path, log=lambda m: None)
    seen_stale = read_lock(path)
    with DirLock(tmp_path, log=lambda m: None):  # B
        fresh = path.read_bytes()
        assert late._take_over(seen_stale) is False
        assert path.read_bytes() == fresh, "B's lock was replaced"
        with pytest.raises(RunLocked):
            late.acquire()
    assert not list(tmp_path.iterdir())


def _taker(directory: str, start, results, hold) -> None:
    start.wait()
    try:
        lock = DirLock(directory, log=lambda m: None).acquire()
    except RunLocked as e:
        results.put(("refused", os.getpid(), str(e)))
        return
    results.put(("won", os.getpid(), ""))
    hold.wait(30)
    lock.release()


@pytest.mark.parametrize("round_", range(5))
def test_concurrent_takers_of_a_stale_lock_exactly_one_wins(tmp_path, round_):
    ctx = multiprocessing.get_context("fork")
    dead = ctx.Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "dead"}))
    n = 8
    start, hold, results = ctx.Barrier(n), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_taker, args=(str(tmp_path), start, results, hold)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in range(n)]
    hold.set()
    for p in procs:
        p.join(timeout=30)
    winners = [pid for what, pid, _ in got if what == "won"]
    assert len(winners) == 1, got
    for what, _, msg in got:
        if what == "refused":
            assert f"pid {winners[0]}" in msg, msg
    assert not (tmp_path / LOCK_NAME).exists() and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- the stages


def test_prepare_and_world_refuse_an_output_dir_in_use(world, tmp_path, capsys):  # noqa: F811
    from data_prep.__main__ import main

    out = tmp_path / "prepared"
    with held_by_another_process(out) as holder:
        rc = main(["prepare", "--kind", "2wiki", "--input", str(world / "raw" / "dev.json"), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2
        lines = _error_lines(err)
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "in use by another run" in lines[0], err
        assert "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME], "nothing written"

        rc = main(["world", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and len(_error_lines(err)) == 1 and f"pid {holder.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_index_and_eval_run_refuse_a_dir_in_use(world, random_model, tmp_path, capsys):  # noqa: F811
    from evaluation.cli import main

    index = tmp_path / "index"
    with held_by_another_process(index, tmp_path / f".index{LOCK_NAME}") as holder:
        rc = main(["index", "--model", str(random_model), "--data", str(world / "rag_dev"), "--out", str(index)])
        err = capsys.readouterr().err
        assert rc == 2 and len(_error_lines(err)) == 1 and f"pid {holder.pid}" in err, err
        assert not index.exists() and not list(tmp_path.glob(".index.tmp-*")), "nothing built"

    results = tmp_path / "results"
    with held_by_another_process(results) as holder:
        rc = main(["run", "--model", str(random_model), "--data", str(world / "rag_dev"), "--method", "no-retrieval",
                   "--out", str(results), "--no-mlflow", "--max-examples", "2"])
        err = capsys.readouterr().err
        assert rc == 2 and len(_error_lines(err)) == 1 and f"pid {holder.pid}" in err, err
        assert sorted(p.name for p in results.iterdir()) == [LOCK_NAME], "nothing written"
