"""Right-padding ragged token rows into one batch: the ids and their attention mask.

The trainer's collator (``pipeline.collator``: query, target and document micro-batches) and the
shared state encoders (``onegen.hidden``: index building, teacher-forced vectors) pad the same way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def pad_rows(rows: Sequence[Sequence[int]], pad_value: int,
             multiple: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, attention_mask)``, both ``[len(rows), L]`` int64 on the CPU: each row left-aligned and
    followed by ``pad_value``; the mask is 1 over each row's own tokens. ``L`` is the longest row,
    rounded up to ``multiple`` when given (0 for no rows)."""
    length = max((len(r) for r in rows), default=0)
    if multiple and length % multiple:
        length += multiple - length % multiple
    values = torch.full((len(rows), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        mask[i, : len(r)] = 1
    return values, mask
