"""No orphaned ranks: a rank whose launcher died stops itself.

torchrun starts each rank in a session of its own and the DeepSpeed launcher forwards only SIGINT and
SIGTERM, so a launcher that is SIGKILLed (``kill -9``, the OOM killer, a lost job step) leaves its ranks
running: measured, they trained to the end and saved ``step-000040`` while a rerun was starting on the
same directory (issue #19). So each rank started by a launcher runs a daemon thread that checks once a
second that its launcher is still there (its parent pid has not changed: reliable, unlike a pid that
can be reused); once it is gone, the rank SIGKILLs itself. That is the very fault every checkpoint is
proven to survive (``tests/test_reliability_training.py``): a save without ``COMPLETE`` is never resumed,
``metrics.jsonl`` rows past the resumed checkpoint are dropped, and the output dir's lock (held by rank 0)
is taken over by the rerun since its pid is gone.

Watched only under a launcher: torchrun (``TORCHELASTIC_RUN_ID`` is set), or the DeepSpeed launcher
(the parent is ``deepspeed.launcher.launch``; its own parent, the ``deepspeed`` command, is watched too,
since killing that one leaves ``launch`` alive). A plain ``python pipeline/train.py`` is never watched:
its parent is a shell that may exit on purpose (``nohup``). ``ONEGEN_ORPHAN_WATCHDOG=0`` turns it off.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

POLL_S = 1.0


def ppid_of(pid: int) -> int | None:
    """The parent pid of ``pid`` (None when it is gone or /proc is not there)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_chain(environ: dict | None = None) -> list[tuple[int, int]]:
    """``(pid, parent pid)`` pairs that must hold for as long as this rank runs; empty when it was not
    started by a launcher (or the watchdog is turned off)."""
    env = os.environ if environ is None else environ
    if env.get("ONEGEN_ORPHAN_WATCHDOG", "1") == "0":
        return []
    me, parent = os.getpid(), os.getppid()
    if env.get("TORCHELASTIC_RUN_ID"):
        return [(me, parent)]
    if "deepspeed.launcher.launch" in _cmdline(parent):
        grandparent = ppid_of(parent)
        return [(me, parent)] + ([(parent, grandparent)] if grandparent and grandparent > 1 else [])
    return []


def broken_link(chain: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The first ``(pid, parent)`` of ``chain`` whose parent is gone (the process was re-parented)."""
    for pid, parent in chain:
        now = os.getppid() if pid == os.getpid() else ppid_of(pid)
        if now != parent:
            return pid, parent
    return None


def _watch(chain: list[tuple[int, int]], poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        broken = broken_link(chain)
        if broken is None:
            continue
        try:
            print(f"[train] rank {os.environ.get('RANK', '?')} (pid {os.getpid()}): its launcher (pid {broken[1]}) is "
                  f"gone; stopping this rank now so that it writes nothing more. Rerun the same command to resume "
                  f"from the last complete checkpoint", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # the launcher held the other end of our stderr
            pass
        os.kill(os.getpid(), signal.SIGKILL)


def start_watchdog(poll_s: float = POLL_S) -> threading.Thread | None:
    """Start the watchdog thread when this process is a rank under a launcher; the thread, or None."""
    chain = launcher_chain()
    if not chain:
        return None
    t = threading.Thread(target=_watch, args=(chain, poll_s), name="onegen-orphan-watchdog", daemon=True)
    t.start()
    return t
