"""``onegen.mlflow_store`` on real sqlite files and the real MLflow (issue #19): a new store made once by
processes that start together, a creator killed mid-way, unusable stores set aside (no runs) or refused
(runs), and "database is locked" waited out, on a bare sqlite connection and on a real MLflow call."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from onegen.mlflow_store import (RetryPolicy, StoreError, call_with_retry, inspect_store, is_locked_error, open_client,
                                 prepare_store, sqlite_uri)
from tests.train_fixtures import ROOT, env


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A store made once (its migrations take seconds): tests copy it."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    prepare_store(sqlite_uri(db))
    return db


def _tables(db: Path) -> set[str]:
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


def _half_migrated(template: Path, db: Path) -> Path:
    """What racing creators left in the issue: an older schema revision and an alembic batch table."""
    from onegen.mlflow_store import _schema_target

    shutil.copy(template, db)
    con = sqlite3.connect(db)
    head = _schema_target()[0]
    older = next(r for r in _schema_target()[1] if r != head)
    con.execute("UPDATE alembic_version SET version_num = ?", (older,))
    con.execute("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)")
    con.commit()
    con.close()
    return db


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---- one new store, many processes at once -----------------------------------------------------------

CHILD = r"""
import sys, time
from pathlib import Path
import mlflow.store.db.utils  # the slow imports first: the processes then reach the store together
from mlflow.entities import Metric
from onegen.mlflow_store import ensure_experiment, open_client
uri, name, base, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
(base / f"ready-{name}").touch()
while len(list(base.glob("ready-*"))) < n:
    time.sleep(0.005)
client = open_client(uri)
exp = ensure_experiment(client, "shared")
run = client.create_run(exp, run_name=name)
client.log_batch(run.info.run_id, metrics=[Metric("x", 1.0, 0, 0)])
client.set_terminated(run.info.run_id)
print(run.info.run_id)
"""


def test_processes_started_together_share_a_new_store(tmp_path):
    """Four processes open one new store at the same moment: it is made once, every run is logged."""
    db, n = tmp_path / "store" / "mlflow.db", 4
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, sqlite_uri(db), f"p{i}", str(tmp_path), str(n)], cwd=ROOT,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ids = {out.strip() for out, _ in outs}
    assert len(ids) == n and inspect_store(db).kind == "ready"
    client = open_client(sqlite_uri(db))
    assert [e.name for e in client.search_experiments()].count("shared") == 1
    for rid in ids:
        run = client.get_run(rid)
        assert run.info.status == "FINISHED" and run.data.metrics == {"x": 1.0}
    assert not list(db.parent.glob(".mlflow.db.creating-*")) and not list(db.parent.glob("*.unusable-*"))


def test_a_creator_killed_midway_leaves_no_half_made_store(tmp_path):
    """The tables are made in a temp file renamed into place: SIGKILL during the migrations leaves no
    mlflow.db at all, and the next process makes the store (and removes the dead one's temp file)."""
    db = tmp_path / "mlflow.db"
    code = "import sys; from onegen.mlflow_store import prepare_store; prepare_store(sys.argv[1])"
    p = subprocess.Popen([sys.executable, "-c", code, sqlite_uri(db)], cwd=ROOT, env=env(), stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".mlflow.db.creating-*")):
        assert p.poll() is None, f"the creator ended before it was killed: {p.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.005)
    time.sleep(0.2)  # inside the migrations
    p.kill()
    p.wait(timeout=30)
    assert p.returncode == -9, "the creator finished first: nothing was tested"
    assert not db.exists() and list(tmp_path.glob(".mlflow.db.creating-*"))
    prepare_store(sqlite_uri(db))
    assert inspect_store(db).kind == "ready" and not list(tmp_path.glob(".mlflow.db.creating-*"))


# ---- stores left unusable ------------------------------------------------------------------------------

def test_an_unusable_store_without_runs_is_set_aside_and_replaced(template, tmp_path, capsys):
    db = _half_migrated(template, tmp_path / "mlflow.db")
    state = inspect_store(db)
    assert state.kind == "unusable" and "_alembic_tmp_experiments" in state.detail and state.runs == 0
    client = open_client(sqlite_uri(db))
    client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri()))
    assert inspect_store(db).kind == "ready"
    aside = list(tmp_path.glob("mlflow.db.unusable-*"))
    assert len(aside) == 1 and "_alembic_tmp_experiments" in _tables(aside[0]), "the old file is kept, not deleted"
    err = capsys.readouterr().err
    assert "was unusable" in err and "held no runs" in err and aside[0].name in err


def test_an_unusable_store_with_runs_is_left_alone_and_explained(template, tmp_path, capsys):
    from evaluation.cli import main
    from evaluation.tracking import EvalTracker

    db = tmp_path / "mlflow.db"
    shutil.copy(template, db)
    client = open_client(sqlite_uri(db))
    client.create_run(client.create_experiment("onegen", artifact_location=(tmp_path / "art").as_uri()),
                      tags={"onegen.stage": "eval"})
    _half_migrated(db, tmp_path / "broken.db")
    db = tmp_path / "broken.db"
    before = _sha(db)
    with pytest.raises(StoreError) as e:
        prepare_store(sqlite_uri(db))
    msg = str(e.value)
    assert "_alembic_tmp_experiments" in msg and "1 run(s)" in msg and "python -m evaluation log" in msg
    # An evaluation's tracker says so in full and goes on without MLflow; compare stops with the message.
    tracker = EvalTracker(True, sqlite_uri(db), "onegen", "r", {}, None)
    assert not tracker.ok and "1 run(s)" in capsys.readouterr().err
    assert main(["compare", "--tracking-uri", sqlite_uri(db), "--out", str(tmp_path / "c.png")]) == 2
    assert "is unusable" in capsys.readouterr().err
    assert _sha(db) == before and not list(tmp_path.glob("broken.db.unusable-*"))


# ---- "database is locked" ------------------------------------------------------------------------------

def _hold_exclusive(db: Path, seconds: float) -> threading.Thread:
    """Another connection holds an exclusive transaction on ``db`` for ``seconds`` (no reader or writer passes)."""
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")

    def release():
        time.sleep(seconds)
        holder.execute("COMMIT")
        holder.close()

    t = threading.Thread(target=release, daemon=True)
    t.start()
    return t


def test_a_locked_database_is_waited_out_and_other_errors_are_not(tmp_path):
    db = tmp_path / "x.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    tries: list[float] = []

    def write() -> None:
        tries.append(time.time())
        c = sqlite3.connect(db, timeout=0.05)
        try:
            c.execute("INSERT INTO t VALUES (1)")
            c.commit()
        finally:
            c.close()

    holder, notes, t0 = _hold_exclusive(db, 1.5), [], time.time()
    call_with_retry(write, policy=RetryPolicy(attempts=10, first_delay_s=0.1, max_delay_s=1.0), note=notes.append)
    holder.join()
    assert len(tries) > 1 and time.time() - t0 >= 1.4 and "locked" in notes[0]
    assert sqlite3.connect(db).execute("SELECT count(*) FROM t").fetchone()[0] == 1
    # Bounded: the lock outlasts the attempts -> the locked error itself, after exactly `attempts` tries.
    tries.clear()
    holder = _hold_exclusive(db, 3.0)
    with pytest.raises(sqlite3.OperationalError) as e:
        call_with_retry(write, policy=RetryPolicy(attempts=3, first_delay_s=0.05, max_delay_s=0.1), note=notes.append)
    holder.join()
    assert len(tries) == 3 and is_locked_error(e.value)
    # Any other error is raised at once.
    tries.clear()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        call_with_retry(lambda: (tries.append(0), sqlite3.connect(db).execute("SELECT * FROM nope")))
    assert len(tries) == 1


@pytest.mark.slow
def test_a_real_mlflow_call_outlasting_its_own_lock_wait_is_retried(template, tmp_path, capsys):
    """MLflow waits 20 s for a locked sqlite store, then fails the call: the tracker retries it, and the
    metric is logged once the other writer lets go (a lock of 23 s here)."""
    from mlflow import MlflowClient

    from pipeline.tracking import Tracker

    db = tmp_path / "mlflow.db"
    shutil.copy(template, db)
    tracker = Tracker(tmp_path / "run", enabled=True, tracking_uri=sqlite_uri(db), experiment="x", run_name="r")
    assert tracker.mlflow_ok
    holder, t0 = _hold_exclusive(db, 23.0), time.time()
    tracker.log_metrics({"loss": 1.5}, step=1)
    waited = time.time() - t0
    holder.join()
    err = capsys.readouterr().err
    assert tracker.mlflow_ok, err[-3000:]
    assert waited >= 22 and "MLflow store is locked" in err and "MLflow is unavailable" not in err
    history = MlflowClient(tracking_uri=sqlite_uri(db)).get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5)]
