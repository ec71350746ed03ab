"""Resumable checkpoints: DeepSpeed state + our data position, marked complete only when whole.

Layout: ``OUTPUT/checkpoints/step-000050/`` holds DeepSpeed's files (model/optimizer partitions,
scheduler), ``client_state`` (our step and data position, RNG), and ``COMPLETE`` — written by rank 0
after every rank has written and fsynced its files (a barrier). A directory without ``COMPLETE``
(killed mid-write, disk full) is never resumed from; a starting run deletes it (see
``remove_incomplete``). ``latest`` (read by DeepSpeed's ``zero_to_fp32.py``) names the newest
complete checkpoint only.

A model with frozen weights (LoRA) saves only what trains (``has_frozen``): DeepSpeed's
``exclude_frozen_parameters``, loaded back by ``load_trainable``.

Loading never unpickles arbitrary objects: DeepSpeed calls ``torch.load(weights_only=False)``; we swap
its checkpoint engine's ``load`` for ``safe_load`` (``weights_only=True`` plus the few DeepSpeed
classes its optimizer state holds), so a tampered checkpoint is refused instead of running code.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from onegen.errors import OneGenError
from onegen.manifest import atomic_write_bytes, atomic_write_json

MARKER = "COMPLETE"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def tag_for(step: int) -> str:
    return f"step-{step:06d}"


def _step_of(p: Path) -> int:
    return int(p.name.split("-")[1])


def complete_checkpoints(ckpt_root: str | Path) -> list[Path]:
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / MARKER).is_file()]
    return sorted(found, key=_step_of)


def latest_complete(ckpt_root: str | Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def remove_incomplete(ckpt_root: str | Path) -> list[Path]:
    """Delete checkpoint dirs without ``COMPLETE`` (left by a kill or a full disk); call before training.

    They are never resumed from, and removing them first frees the space a full disk needs and keeps
    stale files of a half-written save out of the new one."""
    root = Path(ckpt_root)
    gone = [p for p in root.glob("step-*") if p.is_dir() and not (p / MARKER).exists()] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def save(engine, ckpt_root: str | Path, step: int, client_state: dict, keep: int) -> Path:
    root = Path(ckpt_root)
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    client_state = dict(client_state, **rng_state())
    try:
        # save_latest=False: DeepSpeed would point `latest` at this tag before it is complete
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=has_frozen(engine.module))
        _fsync_tree(root / tag)  # COMPLETE must not reach the disk before the data (a node crash, not just a kill)
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            atomic_write_json(root / tag / MARKER, {"step": step, "units_consumed": client_state.get("units_consumed")})
            atomic_write_bytes(root / "latest", tag.encode())
            prune(root, keep)
    except Exception as e:
        if _disk_full(e, root):
            prev = latest_complete(root)
            free_mib = shutil.disk_usage(root).free / 2**20
            raise OneGenError(
                f"could not write checkpoint {root / tag}: no space left on device ({free_mib:.1f} MiB free); "
                "it is incomplete and will not be resumed from; "
                + (f"the last complete one, {prev.name}, is intact: free space and rerun to resume from it"
                   if prev else "no complete checkpoint exists yet: free space and rerun")) from e
        raise
    if dist.is_initialized():
        dist.barrier()
    return root / tag


def _disk_full(e: BaseException, root: Path) -> bool:
    """torch.save reports a full disk as a RuntimeError without errno (``unexpected pos 576 vs 534``
    from its zip writer), so look at the chain, then at the disk itself."""
    chain: BaseException | None = e
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno in _FULL_ERRNOS:
            return True
        if "No space left on device" in str(chain) or "Disk quota exceeded" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    try:
        return shutil.disk_usage(root).free < 1 << 20
    except OSError:
        return False


def _fsync_tree(path: Path) -> None:
    """Every file under ``path``, then the directory itself (its entries)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            _fsync(p)
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (incomplete ones went at start: ``remove_incomplete``)."""
    complete = complete_checkpoints(root)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _allowed_globals() -> list:
    """The only classes DeepSpeed checkpoints hold besides tensors and builtins, measured by resuming
    ZeRO-3 (fp32, bf16, optimizer offloaded to CPU) and ZeRO-2 (fp32, bf16) runs: ZeRO-2 keeps a
    ``fragment_address`` (numel, start) per parameter; DynamicLossScaler is fp16's. Plain attribute
    holders: the unpickler may only build them and set attributes, nothing is called. On GPUs the
    optimizer state is the same tensors and numbers (FusedAdam and CPU Adam keep exp_avg/exp_avg_sq/step),
    which ``bench/gpu_smoke.sh`` confirms by resuming a bf16 run."""
    # heavy (deepspeed): imported only when a checkpoint is loaded
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum  # lazy: as above
    from deepspeed.utils.tensor_fragment import fragment_address  # lazy: as above

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path: str | Path, map_location=None):
    """``torch.load`` with ``weights_only=True``: tensors, containers, primitives and the allow-list."""
    with torch.serialization.safe_globals(_allowed_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def load(engine, path: Path) -> dict:
    """Restore DeepSpeed state from a complete checkpoint; return our client state."""
    engine.checkpoint_engine.load = safe_load  # every file DeepSpeed reads on resume goes through it
    try:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True,
                                                 custom_load_fn=load_trainable if has_frozen(engine.module) else None)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise OneGenError(f"checkpoint {path} holds a pickled object that is not plain data "
                          f"({found.group(1) if found else str(e).splitlines()[0]}); refusing to load it, as "
                          f"unpickling it could run code. Delete the checkpoint if you did not make it") from e
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    restore_rng(client_state)
    return client_state


def has_frozen(module: torch.nn.Module) -> bool:
    """A model with frozen weights (LoRA, ``model.train_layers``) is checkpointed without them: the
    frozen weights are rebuilt from the recipe on resume (``pipeline.model.build_model``), and only what
    trains, with its optimizer state, is saved."""
    return any(not p.requires_grad for p in module.parameters())


def load_trainable(src: dict, dst: torch.nn.Module) -> None:
    """DeepSpeed's module load for a checkpoint saved without its frozen weights: every key must be
    present but those of frozen parameters, and no key may be unknown."""
    result = dst.load_state_dict(src, strict=False)
    frozen = {n for n, p in dst.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise OneGenError(f"the checkpoint does not fit this model: missing trained weights {missing[:5]}, "
                          f"unknown keys {sorted(result.unexpected_keys)[:5]}")


def rng_state() -> dict:
    """The RNG states a resume restores: torch's CPU generator, and every CUDA device's on a GPU
    (dropout and any sampling on the GPU draw from those, not from the CPU generator)."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(client_state: dict) -> None:
    if client_state.get("torch_rng") is not None:
        torch.set_rng_state(client_state["torch_rng"].cpu())
    cuda = client_state.get("cuda_rng")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(f"the checkpoint holds the CUDA RNG state of {len(cuda)} device(s), this node has "
                          f"{torch.cuda.device_count()}: CUDA RNG states are not restored", stacklevel=2)
        else:
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())
