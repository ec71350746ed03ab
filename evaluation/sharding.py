"""What every sharded step of evaluation shares: which part of the work a process takes, where its
shard lives, and waiting for the others.

A step over N processes (an index build: ``evaluation.index_shards``; a run over questions:
``evaluation.run_shards``) cuts its items into N contiguous slices; process I writes its slice's
output into ``OUT.shards/shard-I-of-N/`` (complete when its manifest is there), and a merge turns
the N shards into the one output ``OUT``. Under ``torchrun``/``deepspeed`` (``WORLD_SIZE`` > 1)
rank I takes slice I and rank 0 merges; a job array runs ``--shard I/N`` tasks, then ``--merge N``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

from onegen.errors import ConfigError, ManifestMismatch
from onegen.manifest import read_manifest

WAIT_POLL_S = 2.0


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, 0 <= I < N; ``"array"``: this task of a SLURM job array
    (``sbatch --array=0-3``: task ``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``)."""
    if text == "array":
        env = os.environ
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            raise ConfigError("--shard array: not a task of a SLURM job array (no SLURM_ARRAY_TASK_ID / "
                              "SLURM_ARRAY_TASK_COUNT); give I/N")
        text = (f"{int(env['SLURM_ARRAY_TASK_ID']) - int(env.get('SLURM_ARRAY_TASK_MIN', '0'))}"
                f"/{env['SLURM_ARRAY_TASK_COUNT']}")
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: needs 0 <= I < N")
    return i, n


def launcher_shard() -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` when this process is one rank of several under a launcher; else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def set_up_rank() -> str | None:
    """A launched rank's device (``cuda:LOCAL_RANK`` on GPUs, else None) and, on CPU, its share of the
    cores (ranks of one node would otherwise each start a thread per core and slow each other down)."""
    import torch  # torch: only a launched rank needs it here

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return None


def shards_dir(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".shards")


def shard_dir(out_dir: str | Path, i: int, n: int) -> Path:
    return shards_dir(out_dir) / f"shard-{i:05d}-of-{n:05d}"


def shard_slice(count: int, i: int, n: int) -> slice:
    """The contiguous part I of N of ``count`` items (sizes differ by at most one)."""
    return slice(count * i // n, count * (i + 1) // n)


def complete_manifest(d: Path, stage: str, files: Sequence[str]) -> dict | None:
    """The manifest of shard directory ``d`` when it is complete (its ``stage`` manifest, written last,
    and its ``files``), else None."""
    try:
        man = read_manifest(d, expect_stage=stage)
    except (ManifestMismatch, FileNotFoundError):
        return None
    return man if all((d / f).is_file() for f in files) else None


def wait_for_shards(out_dir: str | Path, n: int, stage: str, files: Sequence[str], timeout_s: float | None = None,
                    log: Callable[[str], None] = print) -> None:
    """Block until the ``n`` shards of ``out_dir`` are complete (rank 0 of a launcher, before it merges)."""
    t0 = time.monotonic()
    said = False
    while True:
        missing = [i for i in range(n) if complete_manifest(shard_dir(out_dir, i, n), stage, files) is None]
        if not missing:
            return
        if not said:
            log(f"waiting for shard(s) {', '.join(map(str, missing))} of {n}")
            said = True
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise ConfigError(f"shard(s) {missing} of {out_dir} not complete after {timeout_s:.0f}s")
        time.sleep(WAIT_POLL_S)
