"""Which rows each rank trains on at each step: a pure function of (seed, epoch, dataset sizes).

Rows are cut into *units* of ``micro_batch_size`` rows of one dataset (a micro-batch never mixes a
RAG row and an EL row, which use different document pools); ``data.train_weights`` sets how many passes
over each dataset one epoch makes. Units are shuffled per epoch with a
seeded RNG; step s on rank r takes units ``[s*W*G + g*W + r for g in range(G)]`` (W ranks, G
accumulation steps). Units do not depend on the world size, so the resumable data position is
simply "units consumed" and no example is skipped or repeated across a resume.
"""

from __future__ import annotations

import numpy as np

from onegen.errors import ConfigError


def _passes(sizes: list[int], weights: list[float] | None) -> list[list[int]]:
    """Per dataset, how many rows each of its passes takes in one epoch at its mixing weight (default 1):
    whole passes, then a part (weight 2.5 -> [n, n, n/2]; 1 -> [n], the unweighted epoch)."""
    out = []
    for d, n in enumerate(sizes):
        whole, part = divmod(weights[d] if weights else 1.0, 1.0)
        out.append([n] * int(whole) + ([int(round(part * n))] if part > 0 else []))
    return out


def epoch_units(sizes: list[int], micro_batch: int, seed: int, epoch: int,
                weights: list[float] | None = None) -> list[tuple[int, list[int]]]:
    """``[(dataset index, row indices)]`` for one epoch; the last partial unit of each pass is dropped.
    ``weights`` (default all 1) sets how many passes over each dataset an epoch makes: every pass is its
    own permutation, cut into units apart, so no unit holds a row twice."""
    rng = np.random.default_rng([seed, epoch])
    units = []
    for d, (n, passes) in enumerate(zip(sizes, _passes(sizes, weights))):
        for take in passes:
            order = rng.permutation(n)[:take]
            for start in range(0, take - micro_batch + 1, micro_batch):
                units.append((d, order[start:start + micro_batch].tolist()))
    perm = rng.permutation(len(units))
    return [units[i] for i in perm]


def units_per_epoch(sizes: list[int], micro_batch: int, grad_accum: int, world_size: int,
                    weights: list[float] | None = None) -> int:
    """Micro-batches of one epoch that fill whole optimizer steps (0 when the data cannot fill one)."""
    n_units = sum(take // micro_batch for passes in _passes(sizes, weights) for take in passes)
    return n_units - n_units % (world_size * grad_accum)


class BatchPlan:
    def __init__(self, sizes: list[int], micro_batch: int, grad_accum: int, world_size: int, seed: int,
                 weights: list[float] | None = None):
        self.sizes, self.micro_batch, self.grad_accum = sizes, micro_batch, grad_accum
        self.world_size, self.seed, self.weights = world_size, seed, weights
        self.per_step = world_size * grad_accum
        self._cache: dict[int, list] = {}
        n_units = units_per_epoch(sizes, micro_batch, 1, 1, weights)
        if n_units < self.per_step:
            raise ConfigError(f"the training data has {n_units} micro-batches of {micro_batch} rows, fewer than one "
                              f"optimizer step needs ({world_size} ranks × {grad_accum} accumulation): lower "
                              f"optim.micro_batch_size or optim.grad_accum, or give more rows")
        self.units_per_epoch = units_per_epoch(sizes, micro_batch, grad_accum, world_size, weights)  # whole steps only

    def units(self, epoch: int) -> list:
        if epoch not in self._cache:
            self._cache = {epoch: epoch_units(self.sizes, self.micro_batch, self.seed, epoch, self.weights)}
        return self._cache[epoch]

    def position(self, units_consumed: int) -> tuple[int, int]:
        """(epoch, unit offset inside it) of the next unit."""
        return divmod(units_consumed, self.units_per_epoch)

    def step_units(self, units_consumed: int, rank: int) -> list[tuple[int, int, list[int]]]:
        """This rank's ``grad_accum`` units of the next optimizer step: ``[(epoch, dataset, rows)]``."""
        epoch, offset = self.position(units_consumed)
        units = self.units(epoch)
        out = []
        for g in range(self.grad_accum):
            d, rows = units[offset + g * self.world_size + rank]
            out.append((epoch, d, rows))
        return out
