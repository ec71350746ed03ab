"""Every ``torch.distributed`` collective the project runs goes through here.

NCCL (GPU clusters) rejects a CPU tensor in a collective ("No backend type associated with device
type cpu"), and gloo (CPU, and so every test here) accepts tensors on any device. So a tensor a
collective sees is built *here*, on the device the caller names (the engine's device), never
left to torch's default; ``check_devices`` refuses any tensor that is not on the device the
process group needs, and the tests run these functions on a device that is not the default
(``meta``) to prove the tensors land where they are asked to.

Functions take ``device`` explicitly: there is no default, so a caller cannot forget it.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
import torch.distributed as dist

REQUIRED_DEVICE_TYPE = {"nccl": "cuda", "gloo": None, "mpi": None}  # None: any device the backend can copy from


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def check_devices(*tensors: torch.Tensor, group: Any = None) -> None:
    """Refuse a tensor the process group's backend cannot take (a CPU tensor under NCCL)."""
    if not initialized():
        return
    need = REQUIRED_DEVICE_TYPE.get(str(dist.get_backend(group)))
    for t in tensors:
        if need is not None and t.device.type != need:
            raise RuntimeError(f"a {t.device.type} tensor was handed to a {dist.get_backend(group)} collective, "
                               f"which needs {need} tensors: build it on the engine's device")


def all_reduce_(t: torch.Tensor, op: Any = None, group: Any = None) -> torch.Tensor:
    """In-place all-reduce (sum by default) of a tensor that already lives on the right device."""
    if initialized():
        check_devices(t, group=group)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def sum_across_ranks(values: Sequence[float], device: torch.device | str) -> list[float]:
    """Element-wise sum of ``values`` over every rank (float64, built on ``device``)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    return all_reduce_(t).tolist()


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True on every rank when at least one rank's ``flag`` is true (all ranks agree on a stop)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_(t, op=dist.ReduceOp.MAX).item())


def all_gather_equal(t: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on each rank), without gradient."""
    if not initialized():
        return [t]
    check_devices(t, group=group)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def all_gather_autograd(t: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``t`` with gradients flowing back to the rank that owns each part.

    ``torch.distributed.nn.functional.all_gather`` (plain ``dist.all_gather`` silently drops the
    gradients: measured relative error 1.7, design §3). Deprecated in favour of
    ``_functional_collectives``, whose autograd on gloo is not the proven path.
    """
    if not initialized():
        return [t]
    check_devices(t, group=group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # imported here, under catch_warnings: the deprecated module warns (FutureWarning) on import
        from torch.distributed.nn.functional import all_gather

        return list(all_gather(t, group=group))


def barrier(group: Any = None) -> None:
    if initialized():
        dist.barrier(group=group)


def shutdown(clean: bool) -> None:
    """Leave the process group before the interpreter exits.

    A gloo group left to the interpreter's exit can abort the process ("terminate called without an
    active exception", SIGABRT: a rank that had finished its work failed the job). ``clean``: every
    rank got here normally, so they first wait for each other (no rank tears down while another still
    sends); after a failure a barrier could wait for a rank that is gone, so there is none.
    """
    if not initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1
