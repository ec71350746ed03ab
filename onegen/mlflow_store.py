"""MLflow stores shared by many processes: made once under a lock, checked, and calls that wait out a lock.

Training (``pipeline.tracking``), evaluation (``evaluation.tracking``), ``evaluation compare`` and
``evaluation log`` all open their store through ``open_client``:

* **a sqlite store** (``sqlite:///PATH``) is made by ``prepare_store`` under an exclusive ``flock`` on
  ``PATH.lock``: the tables are created and migrated in a temp file beside it that is renamed into
  place, so no process ever sees a half-made store, and processes that start together never race
  through MLflow's own table creation (which is not locked: four evaluations started at once against
  a new store all failed, and left it broken for every later run). A store that is not at this
  MLflow's schema (a half-migrated one left by such a race, or one made by another MLflow) is set
  aside and replaced when it holds no runs; with runs in it, it is left alone and the error says
  what is wrong and what to do.
* **a tracking server** (``http(s)://``) is probed first (``/health``, seconds), and MLflow's HTTP
  retries are bounded (``limit_http_retries``): a dead server costs seconds, not minutes.
* **every client call** waits out ``database is locked`` (``RetryingClient``): MLflow already waits
  20 s per statement; on top of that a call is retried with jittered exponential backoff
  (``RetryPolicy``) before the caller gives MLflow up for the run.

sqlite across nodes (one file on NFS written from several machines) is not safe whatever the
locking: use a tracking server there (docs/slurm.md).
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import random
import sqlite3
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from onegen.errors import OneGenError

T = TypeVar("T")

# MLflow 3.x's UI opens an experiment by its kind: "genai_development" lands on the GenAI overview
# (traces, no runs), "custom_model_development" on the runs table; an experiment without the tag asks
# the user to choose. Its sidebar also has a global "workflow type" toggle (GenAI by default in 3.17,
# kept in the browser), which the URL's ?workflowType=machine_learning sets (the quickstart prints
# http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
LOCKED_MESSAGES = ("database is locked", "database table is locked")


class StoreError(OneGenError):
    """A sqlite MLflow store that cannot be used and holds runs (so it is not replaced)."""


# ---- URIs -------------------------------------------------------------------------------------------

def sqlite_uri(db: str | Path) -> str:
    return f"sqlite:///{Path(db).resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside it (not in ./mlruns of whatever the cwd is)."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


# ---- servers ----------------------------------------------------------------------------------------

def probe_server(uri: str, timeout: float = 5.0) -> None:
    """Raise when an MLflow server does not answer ``/health`` within ``timeout`` seconds.

    MLflow's own client retries a dead server for minutes; a run must not wait that long."""
    with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
        if r.status != 200:
            raise ConnectionError(f"{uri}/health answered HTTP {r.status}")


def limit_http_retries() -> None:
    """A server that goes away mid-run costs seconds per call, not minutes (user settings win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


# ---- a locked store: retries ------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """How a call waits out a locked store: ``attempts`` tries, sleeping ``first_delay_s`` doubled after
    each try up to ``max_delay_s``, each sleep scaled by a random 0.5-1.5 so that writers that collided
    do not collide again. With MLflow's own 20 s wait per statement, the default gives up after ~2 min."""

    attempts: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def is_locked_error(e: BaseException | None) -> bool:
    """Whether ``e`` (or an exception it was raised from) is sqlite's "database is locked"; MLflow wraps
    it in an ``MlflowException`` (TEMPORARILY_UNAVAILABLE), a server in its HTTP answer."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(m in str(e) for m in LOCKED_MESSAGES):
            return True
        e = e.__cause__ or e.__context__
    return False


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def call_with_retry(fn: Callable[..., T], *args: Any, policy: RetryPolicy = RetryPolicy(),
                    note: Callable[[str], None] = _say, **kw: Any) -> T:
    """``fn(*args, **kw)``, tried again while it fails with "database is locked" (``policy``); any other
    error, or the last locked one, is raised. A locked call rolls back whole, so a retry is safe."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn(*args, **kw)
        except Exception as e:
            if attempt == policy.attempts or not is_locked_error(e):
                raise
            delay = policy.delay(attempt)
            note(f"[onegen] MLflow store is locked by another writer ({getattr(fn, '__name__', 'call')}, try "
                 f"{attempt}/{policy.attempts}); retrying in {delay:.1f}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


class RetryingClient:
    """An ``MlflowClient`` whose every method waits out a locked store (``call_with_retry``)."""

    def __init__(self, client: Any, policy: RetryPolicy = RetryPolicy()) -> None:
        self.client = client
        self.policy = policy

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kw: Any) -> Any:
            return call_with_retry(attr, *args, policy=self.policy, **kw)

        return call


# ---- a sqlite store: made once, checked ---------------------------------------------------------------

@dataclass
class StoreState:
    kind: str  # "new" (no file, or no tables), "ready", "unusable"
    detail: str
    runs: int | None = None  # None: unknown (not a readable store)


@functools.lru_cache(maxsize=1)
def _schema_target() -> tuple[str, frozenset[str], frozenset[str]]:
    """This MLflow's schema: (head revision, every known revision, the tables its models need)."""
    # heavy (alembic, mlflow): imported only when a sqlite store is checked
    from alembic.script import ScriptDirectory
    from mlflow.store.db import utils  # imports every MLflow model, so Base.metadata is complete
    from mlflow.store.db.base_sql_model import Base  # lazy: as above

    script = ScriptDirectory.from_config(utils._get_alembic_config(db_url=""))
    known = frozenset(rev.revision for rev in script.walk_revisions())
    return utils._get_latest_schema_revision(), known, frozenset(Base.metadata.tables)


def inspect_store(db: Path) -> StoreState:
    """What the sqlite file ``db`` is: nothing yet, a store at this MLflow's schema, or unusable (why)."""
    if not db.exists() or db.stat().st_size == 0:
        return StoreState("new", "no store yet")
    try:
        con = sqlite3.connect(str(db), timeout=60)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            versions = ([r[0] for r in con.execute("SELECT version_num FROM alembic_version")]
                        if "alembic_version" in tables else [])
            runs = con.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return StoreState("unusable", f"not a readable sqlite database ({e})")
    if not tables - {"alembic_version"} and not versions:
        return StoreState("new", "an empty database")
    head, known, needed = _schema_target()
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    missing = sorted(needed - tables)
    if leftovers:
        why = f"an interrupted schema migration left {', '.join(leftovers)}"
    elif len(versions) != 1:
        why = f"its schema revision is {'not recorded' if not versions else 'ambiguous ' + str(versions)}"
    elif versions[0] not in known:
        why = f"schema revision {versions[0]} is unknown to this MLflow (a newer MLflow made it?)"
    elif versions[0] != head:
        why = (f"schema revision {versions[0]}, this MLflow needs {head} (an older MLflow made it, or its "
               f"creation was interrupted)")
    elif missing:
        why = f"tables missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
    else:
        return StoreState("ready", f"schema {head}", runs)
    return StoreState("unusable", why, runs)


@contextmanager
def _exclusive(lock: Path, what: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock`` (created, never deleted: deleting a lock file races)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"[onegen] waiting for another process to {what} (lock {lock})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _set_aside(db: Path) -> Path:
    """Rename ``db`` (and its journal files) to ``DB.unusable-<time>``: kept for the user, out of the way."""
    aside = db.with_name(f"{db.name}.unusable-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    for suffix in ("", "-journal", "-wal", "-shm"):
        src = Path(f"{db}{suffix}")
        if src.exists():
            os.replace(src, Path(f"{aside}{suffix}"))
    return aside


def _create(db: Path) -> None:
    """Make every table of this MLflow's schema in a temp file, then rename it to ``db``."""
    # heavy (sqlalchemy, mlflow): imported only when a store is made
    import sqlalchemy
    from mlflow.store.db import utils  # lazy: as above

    for name in ("alembic", "mlflow.store.db.utils"):  # schema-creation chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    for stale in db.parent.glob(f".{db.name}.creating-*"):  # a creator killed mid-way (we hold the lock)
        stale.unlink()
    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}", poolclass=sqlalchemy.pool.NullPool)
    try:
        utils._initialize_tables(engine)  # what `mlflow db upgrade` does on an empty database
    finally:
        engine.dispose()
    for leftover in (Path(f"{tmp}-journal"), Path(f"{tmp}-wal")):
        if leftover.exists():
            raise StoreError(f"making the MLflow store {db}: {leftover} was left behind")
    os.replace(tmp, db)


def prepare_store(uri: str, *, note: Callable[[str], None] = _say) -> None:
    """Make sure the sqlite store of ``uri`` exists at this MLflow's schema before anyone uses it.

    A new store is made once, under ``DB.lock``; an unusable one without runs is set aside
    (``DB.unusable-*``, never deleted) and replaced; one with runs raises ``StoreError``. Other
    URIs (servers, databases) are left to MLflow."""
    db = sqlite_path(uri)
    if db is None:
        return
    if inspect_store(db).kind == "ready":
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(db.with_name(db.name + ".lock"), f"make the MLflow store {db}"):
        state = inspect_store(db)  # another process may have made it while this one waited
        if state.kind == "ready":
            return
        if state.kind == "unusable":
            if state.runs != 0:
                raise StoreError(_unusable_message(db, uri, state))
            aside = _set_aside(db)
            note(f"[onegen] the MLflow store {db} was unusable ({state.detail}) and held no runs: it is kept as "
                 f"{aside.name} and a new store is made")
        _create(db)


def _unusable_message(db: Path, uri: str, state: StoreState) -> str:
    runs = "an unknown number of runs" if state.runs is None else f"{state.runs} run(s)"
    return (f"the MLflow store {db} is unusable: {state.detail}. It holds {runs}, so it is left as it is. "
            f"Either repair it (copy it first; then `mlflow db upgrade {uri}`; tables named _alembic_tmp_* "
            f"left by an interrupted migration must be dropped first), or move it aside and rerun: a new store "
            f"is made, and results kept on disk are logged into it with `python -m evaluation log RESULTS_DIR...`")


# ---- clients and experiments ------------------------------------------------------------------------

def open_client(uri: str, policy: RetryPolicy = RetryPolicy()) -> RetryingClient:
    """A client of ``uri`` whose calls wait out a locked store: a server is probed first (seconds),
    a sqlite store is made (or checked) once under its lock (``prepare_store``)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if is_server(uri):
        limit_http_retries()
        probe_server(uri)
    else:
        prepare_store(uri)
    # heavy (mlflow), and imported after the MLFLOW_* settings above are in the environment
    from mlflow import MlflowClient

    return RetryingClient(MlflowClient(tracking_uri=uri), policy)


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created as a machine-learning experiment when missing.

    An existing experiment without a kind gets this one (a kind someone chose is kept). Processes
    that start together may all find it missing: the ones that lose the race to create it use it."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id
