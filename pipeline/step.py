"""One optimizer step: this rank's micro-batches, their forwards and backwards, and the step's statistics.

The loss of every micro-batch is normalised by the *step's* global counts (GEN targets and RET
vectors over all its micro-batches and ranks, known from the collated batches before any forward),
and DeepSpeed is told not to divide by the accumulation steps again. So ``grad_accum`` micro-batches
give the gradients, and the logged losses, of one micro-batch holding all their rows; the logged
statistics are the step's, not its last micro-batch's.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

import onegen.distributed as collectives
from pipeline.collator import Batch
from pipeline.config import LossConfig
from pipeline.forward import loss_counts, merge_stats
from pipeline.grad_cache import cached_micro_batch

Collate = Callable[[int, int, list[int]], Batch]  # (epoch, dataset index, row indices) -> Batch


def accumulate(engine: Any, stats_of: Callable[[], dict], units: Sequence[tuple[int, int, list[int]]],
               collate: Collate, loss_cfg: LossConfig, device: torch.device) -> tuple[dict, float]:
    """Forward and backward every micro-batch of one step; returns (step statistics, global tokens).
    The statistics hold ``pad_frac``: the fraction of the fed positions that were padding.

    ``stats_of`` reads the statistics of the last forward (``OneGenTrainModule.last_stats``).
    ``engine.step()`` is called after each backward, as DeepSpeed expects; it updates the weights
    only at the accumulation boundary, which is set here: the last backward of the step (with gradient
    caching a micro-batch is several engine forwards and backwards, ``pipeline.grad_cache``).
    """
    world_size = collectives.world_size()
    batches = [collate(epoch, d_idx, rows) for epoch, d_idx, rows in units]
    counts = [loss_counts(b, loss_cfg) for b in batches]
    local = [sum(c[0] for c in counts), sum(c[1] for c in counts), sum(b.num_tokens() for b in batches),
             sum(b.num_slots() for b in batches)]
    n_gen, n_ret, n_tokens, n_slots = collectives.sum_across_ranks(local, device)
    parts = []
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        if loss_cfg.grad_cache and loss_cfg.uses_ret:
            parts.append(cached_micro_batch(engine, batch.to(device), loss_cfg, (n_gen, n_ret), world_size, last, device))
            continue
        engine.set_gradient_accumulation_boundary(last)  # the step's micro-batches, not a count in the config
        loss = engine(batch.to(device), totals=(n_gen, n_ret))
        parts.append(stats_of())
        engine.backward(loss, scale_wrt_gas=False)  # already normalised by the whole step's counts
        engine.step()
    stats = merge_stats(parts, loss_cfg)
    stats["pad_frac"] = 1.0 - n_tokens / max(n_slots, 1.0)
    return stats, n_tokens
