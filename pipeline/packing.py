"""Padding-free batches (``data.packing``): the rows of a micro-batch packed into a few long sequences.

Query rows (grit: with their retrieval rows) and document rows are packed separately, each into bins
(first-fit-decreasing by length). A bin is its rows' tokens one after the other, with
``position_ids`` restarting at 0 at each row; bins are right-padded to the longest, and the pad tail
gets its own run of positions 0, 1, … so that it is a sequence of its own. ``onegen.hidden.last_hidden``
then passes ``position_ids`` and no attention mask: transformers (``masking_utils.
find_packed_sequence_indices``) starts a new sequence wherever a position is not its predecessor + 1
and builds a block-diagonal causal mask (sdpa, eager), or the varlen path (flash-attn), so no token
attends across rows. ``attention_mask`` stays 1 on real tokens and 0 on the pad tail (token counts).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from onegen.roles import IGNORE_INDEX

if TYPE_CHECKING:  # the collator imports this module
    from pipeline.collator import Batch


# Bin sizes tried, as multiples of a side's longest row: wider bins hold more rows but pad every bin
# to the widest one and, under a dense mask, make attention dearer per token.
CAPACITY_SCALES = (1.0, 1.25, 1.5, 2.0)


def attention_width(attention: str, hidden: int, intermediate: int) -> float:
    """``data.pack_tokens`` 0: the sequence width at which a dense mask's attention costs as much per token
    as the rest of a block (projections 8·H², MLP 6·H·I against attention 4·H per token of width), so
    ``choose_capacity`` can weigh padding against attention; 0.0 with flash-attn (varlen: attention
    follows each row's own length whatever the packing, so one sequence is best)."""
    return 0.0 if attention == "flash_attention_2" else (8 * hidden * hidden + 6 * hidden * intermediate) / (4 * hidden)


def _width(lengths: list[int], bins: list[list[int]], multiple: int | None) -> int:
    width = max((sum(lengths[i] for i in b) for b in bins), default=0)
    return width + (multiple - width % multiple) % multiple if multiple else width


def choose_capacity(lengths: list[int], attention_at: float, multiple: int | None = None) -> int:
    """The bin size (one of ``CAPACITY_SCALES`` × the longest row) whose packed tensor costs least:
    ``bins × width × (1 + width / attention_at)``; the smallest on ties (``1.0`` never pads more
    than the padded layout does)."""
    longest = max(lengths, default=0)
    best: tuple[float, int] | None = None
    for scale in CAPACITY_SCALES:
        capacity = int(scale * longest)
        bins = first_fit_decreasing(lengths, capacity)
        width = _width(lengths, bins, multiple)
        cost = len(bins) * width * (1 + width / attention_at)
        if best is None or cost < best[0]:
            best = (cost, capacity)
    return best[1] if best else 0


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices per bin: longest rows first, each into the first bin with room; ``sum <= capacity``
    per bin unless a row alone is longer (it gets a bin of its own). Rows keep their order in a bin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, left in enumerate(room):
            if lengths[i] <= left:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def pack_rows(
    ids: torch.Tensor, mask: torch.Tensor, pack_tokens: int, pad_id: int, multiple: int | None = None,
    targets: torch.Tensor | None = None, attention_at: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Packs right-padded rows ``[N, L]``. Returns ``(ids, mask, position_ids, targets, row_bin, row_offset)``:
    the packed ``[P, Lp]`` tensors (``targets`` relocated with their tokens, None if not given) and, per
    input row, its bin and the position of its first token there. A bin holds at most
    ``max(pack_tokens, longest row)`` tokens (0: one bin for all rows): a longer cap would not widen
    ``Lp``, which is at least the longest row, and fewer bins are less padding. ``Lp`` is rounded up
    to ``multiple``. ``attention_at`` > 0 (with ``pack_tokens`` 0): the cheapest bin size by
    ``choose_capacity`` (a dense mask)."""
    lengths = [int(n) for n in mask.sum(1).tolist()]
    if not pack_tokens and attention_at > 0:
        pack_tokens = choose_capacity(lengths, attention_at, multiple)
    capacity = max(pack_tokens, max(lengths, default=0)) if pack_tokens else max(sum(lengths), 1)
    bins = first_fit_decreasing(lengths, capacity)
    width = _width(lengths, bins, multiple)
    out_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    out_mask = torch.zeros((len(bins), width), dtype=torch.long)
    out_tgt = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long) if targets is not None else None
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    row_bin = torch.zeros(len(lengths), dtype=torch.long)
    row_offset = torch.zeros(len(lengths), dtype=torch.long)
    for b, rows in enumerate(bins):
        at = 0
        for i in rows:
            n = lengths[i]
            out_ids[b, at:at + n] = ids[i, :n]
            out_mask[b, at:at + n] = 1
            positions[b, at:at + n] = torch.arange(n)
            if out_tgt is not None:
                out_tgt[b, at:at + n] = targets[i, :n]  # per-row targets: the last one never reaches the next row
            row_bin[i], row_offset[i] = b, at
            at += n
        positions[b, at:] = torch.arange(width - at)  # the pad tail: a sequence of its own
    return out_ids, out_mask, positions, out_tgt, row_bin, row_offset


def pack_batch(batch: Batch, pack_tokens: int, pad_id: int = 0, multiple: int | None = None,
               attention_at: float = 0.0) -> Batch:
    """The same batch with its query rows and, separately, its document rows packed (``pack_rows``;
    ``attention_at``: each side's bin size chosen by ``choose_capacity``). RET indices are remapped; everything
    else keeps its meaning (counts, doc order, hashes)."""
    if batch.position_ids is not None:
        raise ValueError("batch is already packed")
    ids, mask, pos, tgt, q_bin, q_off = pack_rows(batch.input_ids, batch.attention_mask, pack_tokens, pad_id,
                                                  multiple, batch.gen_targets, attention_at)
    d_ids, d_mask, d_pos, _, d_bin, d_off = pack_rows(batch.doc_input_ids, batch.doc_attention_mask, pack_tokens,
                                                      pad_id, multiple, attention_at=attention_at)
    return replace(
        batch,
        input_ids=ids,
        attention_mask=mask,
        gen_targets=tgt,
        position_ids=pos,
        q_ret_row=q_bin[batch.q_ret_row],
        q_ret_pos=q_off[batch.q_ret_row] + batch.q_ret_pos,
        doc_input_ids=d_ids,
        doc_attention_mask=d_mask,
        doc_position_ids=d_pos,
        doc_ret_row=d_bin,
        doc_ret_pos=d_off + batch.doc_ret_pos,
    )
