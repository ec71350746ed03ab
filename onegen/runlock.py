"""One writer per directory: a lock file that every writing stage holds for its life.

Two runs writing one directory corrupt it (a second training resumes from the first's checkpoint, trains
alongside it, duplicates ``metrics.jsonl`` rows and deletes the first's save in progress as
"incomplete"). ``flock``/``fcntl`` locks are not a fix on a cluster: on NFS and Lustre they depend on the
mount (``local_lock``, ``flock`` mount options, a lock daemon) and are silently node-local on some, so a
run on another node would not see them. What every shared filesystem does get right is an atomic
``link(2)`` (or ``open(O_CREAT|O_EXCL)``) of one name, the classic NFS lock:

* The lock is the file ``DIR/.onegen.lock`` (``lock_path`` can put it elsewhere: the index, whose dir is
  replaced by a rename, keeps it beside the dir). It is created by linking a fully written temp file to
  that name, so it appears whole or not at all, and only one creator succeeds. It records the holder:
  host, pid, start time, command, a random token.
* Heartbeat: a daemon thread touches the file (its mtime) every ``heartbeat_s`` (30 s) and checks that
  it is still the holder.
* A second run refuses at once with one line naming the holder and what to do (``RunLocked``, a
  ``OneGenError``: the CLIs print ``error: ...`` and exit 2), unless ``ONEGEN_LOCK_WAIT_S`` asks it to
  wait for the lock first (e.g. a requeued job).
* A stale lock is taken over, and the taker says so: at once when the holder ran on this host and its
  pid is gone (or a zombie); from any host when the heartbeat is older than ``stale_s`` (120 s: four
  missed beats, above NFS attribute caching of up to 60 s; nodes' clocks must agree to well under that,
  which NTP gives). Takeover is race-free: takers serialise on a second exclusive file, the stale lock
  is renamed aside and checked to be the very file judged stale, then the lock is created as usual;
  of two takers exactly one wins.
* Released when the ``with`` block ends, normally or by an exception. A SIGKILLed holder leaves the file;
  the next run takes it over as above. A holder that finds its lock taken over (it was frozen longer
  than ``stale_s``, e.g. a suspended job) kills itself rather than write beside the new holder.

``ONEGEN_LOCK_HEARTBEAT_S``, ``ONEGEN_LOCK_STALE_S`` and ``ONEGEN_LOCK_WAIT_S`` set the three times.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from onegen.errors import OneGenError

LOCK_NAME = ".onegen.lock"
GUARD_STALE_S = 10.0  # a takeover takes milliseconds: an older guard file is a dead taker's


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise OneGenError(f"{name}={raw!r} is not a number of seconds") from None


@dataclass
class LockTiming:
    """How often a holder proves it is alive, when a silent one counts as gone, how long to wait."""

    heartbeat_s: float = field(default=30.0, metadata={"help": "seconds between heartbeats"})
    stale_s: float = field(default=120.0, metadata={"help": "a lock without heartbeat for this long is stale"})
    wait_s: float = field(default=0.0, metadata={"help": "wait this long for a held lock before refusing"})

    @classmethod
    def from_env(cls) -> "LockTiming":
        d = cls()
        return cls(_env_seconds("ONEGEN_LOCK_HEARTBEAT_S", d.heartbeat_s), _env_seconds("ONEGEN_LOCK_STALE_S", d.stale_s),
                   _env_seconds("ONEGEN_LOCK_WAIT_S", d.wait_s))


class RunLocked(OneGenError):
    """Another live run holds the directory's lock."""


@dataclass
class Seen:
    """A lock file as read: its holder (empty when unreadable), age of its heartbeat, raw bytes."""

    holder: dict
    age: float
    raw: bytes


def read_lock(path: Path) -> Seen | None:
    """The lock file at ``path``, or None when there is none."""
    try:
        raw = path.read_bytes()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        holder = {}
    return Seen(holder if isinstance(holder, dict) else {}, max(0.0, age), raw)


def describe(holder: dict) -> str:
    cmd = str(holder.get("command", "?"))
    cmd = cmd if len(cmd) <= 160 else cmd[:157] + "..."
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}, "
            f"command {cmd!r}")


def pid_gone(pid: int) -> bool:
    """True when no process ``pid`` runs on this host (a zombie counts as gone: it writes nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] in "ZX"
    except (OSError, ValueError, IndexError):
        return False


def stale_reason(seen: Seen, timing: LockTiming, host: str | None = None) -> str | None:
    """Why the lock's holder is gone, or None while it may be alive."""
    h = seen.holder
    if h.get("host") == (host or socket.gethostname()) and isinstance(h.get("pid"), int) and pid_gone(h["pid"]):
        return "its process is gone"
    if seen.age > timing.stale_s:
        return f"no heartbeat for {seen.age:.0f} s (stale after {timing.stale_s:.0f} s)"
    return None


def _kill_self(lock: "DirLock", holder: dict) -> None:
    try:
        print(f"error: the lock of {lock.directory} was taken over by another run ({describe(holder)}) while this "
              f"one was not heard from for over {lock.timing.stale_s:.0f} s; stopping this run so that only one writes",
              file=sys.stderr, flush=True)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


class DirLock:
    """``with DirLock(dir, "training"):`` — the lock of ``dir`` for the block's life (see the module doc)."""

    def __init__(self, directory: str | Path, command: str | None = None, *, lock_path: str | Path | None = None,
                 timing: LockTiming | None = None, log: Callable[[str], None] | None = None,
                 on_lost: Callable[["DirLock", dict], None] = _kill_self) -> None:
        self.directory = Path(directory)
        self.path = Path(lock_path) if lock_path is not None else self.directory / LOCK_NAME
        self.timing = timing or LockTiming.from_env()
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.on_lost = on_lost
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self.info = {"host": self.host, "pid": os.getpid(), "started": time.time(),
                     "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
                     "command": command or shlex.join(sys.argv), "token": self.token}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._beat is not None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> "DirLock":
        """Take the lock, taking over a stale one; ``RunLocked`` when a live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timing.wait_s
        while not self._create():
            seen = read_lock(self.path)
            if seen is None:
                continue  # released between our two looks: try again
            why = stale_reason(seen, self.timing, self.host)
            if why is not None:
                if self._take_over(seen):
                    self.log(f"[lock] {self.directory}: took over a stale lock ({describe(seen.holder)}): {why}")
                    break
                time.sleep(0.05)  # another run is taking it over, or took it: look again
                continue
            if time.monotonic() >= deadline:
                raise RunLocked(
                    f"{self.directory} is in use by another run ({describe(seen.holder)}; last heartbeat "
                    f"{seen.age:.0f} s ago): wait for it to finish, or, if you are sure it is gone, delete {self.path} "
                    f"and rerun (a lock whose holder is gone is taken over by itself: at once on the same host, after "
                    f"{self.timing.stale_s:.0f} s without heartbeat from another host)")
            time.sleep(min(1.0, self.timing.heartbeat_s / 4))
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"onegen-lock-heartbeat:{self.directory}", daemon=True)
        self._beat.start()
        return self

    def release(self) -> None:
        if self._beat is None:
            return
        self._stop.set()
        self._beat.join(timeout=5)
        self._beat = None
        seen = read_lock(self.path)
        if seen is not None and seen.holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        """Create the lock file whole (link of a written temp file): False when it exists."""
        tmp = self.path.with_name(f"{self.path.name}.{self.host}.{os.getpid()}.{self.token[:8]}.tmp")
        tmp.write_text(json.dumps(self.info))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            # NFS may report a link that did happen as failed (a lost reply): the link count tells.
            if os.stat(tmp).st_nlink == 2:
                return True
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return self._create_excl()  # a filesystem without hard links
        finally:
            tmp.unlink(missing_ok=True)

    def _create_excl(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.info))
        return True

    def _take_over(self, stale: Seen) -> bool:
        """Replace the stale lock ``stale`` by ours; False when another run got there first."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > GUARD_STALE_S:
                    guard.unlink()
            except FileNotFoundError:
                pass
            return False
        try:
            now = read_lock(self.path)
            if now is None or now.raw != stale.raw or stale_reason(now, self.timing, self.host) is None:
                return False
            aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            moved = aside.read_bytes()
            if moved != stale.raw:  # a new lock appeared between our look and the rename: put it back
                try:
                    os.link(aside, self.path)
                except OSError:
                    pass
                aside.unlink(missing_ok=True)
                return False
            aside.unlink(missing_ok=True)
            return self._create()
        finally:
            guard.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timing.heartbeat_s):
            seen = read_lock(self.path)
            if seen is None and self._create():  # deleted by hand while we run: nobody else has it, take it back
                continue
            seen = seen or read_lock(self.path)
            if seen is not None and seen.holder.get("token") != self.token:
                self._beat_lost(seen.holder)
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def _beat_lost(self, holder: dict) -> None:
        self._beat = None
        self.on_lost(self, holder)
