"""The module DeepSpeed wraps: the causal LM plus the joint loss, so every step runs through
``engine(...)`` (DeepSpeed's forward hooks and ZeRO-3 parameter fetching see one forward per
micro-step, whatever the loss does inside: two forwards, an LM head on gathered rows, all-gathers).
"""

from __future__ import annotations

import torch

from pipeline.collator import Batch
from pipeline.config import LossConfig
from pipeline.forward import compute_joint_loss
from pipeline.grad_cache import Chunk, replay_loss


class OneGenTrainModule(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, loss_cfg: LossConfig, world_size: int):
        super().__init__()
        self.lm = lm
        self.loss_cfg = loss_cfg
        self.world_size = world_size
        self.last_stats: dict = {}
        self.last_replay: tuple[torch.Tensor, torch.Tensor] | None = None  # (CE sum, count) of the last grad-cache re-run

    def forward(self, batch: Batch | list[Chunk], totals: tuple[float, float] | None = None) -> torch.Tensor:
        """``totals``: the step's global (GEN, RET) counts (``pipeline.step``); None: this batch's own.
        A list of ``Chunk`` is gradient caching's re-run of some rows (``pipeline.grad_cache``)."""
        if isinstance(batch, list):
            if totals is None:
                raise ValueError("a grad-cache chunk needs the step's totals")
            loss, gen_sum, n_gen = replay_loss(self.lm, batch, self.loss_cfg, self.world_size, totals[0])
            self.last_replay = (gen_sum, n_gen)
            return loss
        loss, self.last_stats = compute_joint_loss(self.lm, batch, self.loss_cfg, world_size=self.world_size,
                                                   totals=totals)
        return loss
