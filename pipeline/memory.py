"""How much memory a training process holds: peak and current, on GPU (allocated) or CPU (resident)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch


def peak_memory_mb() -> float:
    """Peak accelerator memory on GPU; peak resident memory of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_mb(reset_peak: bool = False) -> float:
    """Memory in use now: allocated accelerator memory on GPU (``reset_peak``: the GPU's peak starts
    again from here); resident memory of this process on CPU."""
    if torch.cuda.is_available():
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # no /proc (not Linux): the peak alone is logged
        return 0.0
