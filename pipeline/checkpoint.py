"""Resumable checkpoints: DeepSpeed state + our data position, marked complete only when whole.

Layout: ``OUTPUT/checkpoints/step-000050/`` holds DeepSpeed's files (model/optimizer partitions,
scheduler), ``client_state`` (our step and data position, RNG), and ``COMPLETE`` — written by rank 0
after every rank has finished writing (a barrier). A directory without ``COMPLETE`` (killed mid-write,
disk full) is never resumed from, and is removed by the next successful save.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from onegen.manifest import atomic_write_json

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(ckpt_root: str | Path) -> list[Path]:
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_complete(ckpt_root: str | Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def save(engine, ckpt_root: str | Path, step: int, client_state: dict, keep: int) -> Path:
    root = Path(ckpt_root)
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    client_state = dict(client_state, torch_rng=torch.get_rng_state())
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        atomic_write_json(root / tag / MARKER, {"step": step, "units_consumed": client_state.get("units_consumed")})
        prune(root, keep)
    if dist.is_initialized():
        dist.barrier()
    return root / tag


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop incomplete leftovers older than the newest."""
    complete = complete_checkpoints(root)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    newest = int(complete[-1].name.split("-")[1]) if complete else -1
    for p in root.glob("step-*"):
        if not (p / MARKER).exists() and int(p.name.split("-")[1]) < newest:
            shutil.rmtree(p, ignore_errors=True)


def load(engine, path: Path) -> dict:
    """Restore DeepSpeed state from a complete checkpoint; return our client state."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rng = client_state.get("torch_rng")
    if rng is not None:
        torch.set_rng_state(rng)
    return client_state


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())
