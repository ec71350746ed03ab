"""Packed batches (``data.packing``, ``pipeline.packing``) train exactly like padded ones.

The same rows padded and packed give the same loss and gradients for every mode and retrieval loss
(sdpa and eager, one bin and several); a row's tokens never reach another row packed beside it; the
layout keeps every RET position, every CE target and the bins' capacity.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices

from onegen.hidden import last_hidden
from onegen.roles import IGNORE_INDEX
from pipeline.config import LossConfig
from pipeline.packing import attention_width, choose_capacity, first_fit_decreasing, pack_batch, pack_rows
from tests.test_grad_equality import PAD, RD, ROWS, RQ, collate, loss_grads, rel_diff, tiny_llama

MODES = ("onegen", "git", "rit", "grit")
SEVERAL = 24  # below the longest query row (38 tokens), above the longest doc (10): several bins each


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pack_tokens", [0, SEVERAL])
@pytest.mark.parametrize("ret_loss", ["bpr", "infonce"])
@pytest.mark.parametrize("mode", MODES)
def test_packed_equals_padded(mode: str, ret_loss: str, pack_tokens: int, attn: str):
    model = tiny_llama(torch.float32, attn)
    cfg = LossConfig(mode=mode, ret_loss=ret_loss)
    padded, packed = collate(ROWS, mode), collate(ROWS, mode, packing=True, pack_tokens=pack_tokens)
    assert packed.position_ids is not None and packed.input_ids.shape[0] < padded.input_ids.shape[0]
    if pack_tokens and mode != "git":
        assert packed.input_ids.shape[0] > 1 and packed.doc_input_ids.shape[0] > 1
    ref, ref_stats = loss_grads(model, padded, cfg)
    got, stats = loss_grads(model, packed, cfg)
    assert set(got) == set(ref)
    worst = max(rel_diff(got[n], ref[n]) for n in ref)
    assert worst <= 1e-5, worst
    for key in ("loss", "loss_gen", "loss_ret"):
        assert stats[key] == pytest.approx(ref_stats[key], rel=1e-5, abs=1e-7), key
    for key in ("n_gen", "n_ret", "hits", "n_acc"):
        assert stats[key] == ref_stats[key], key


def _row_states(model, rows: list[dict], resets: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Last-layer states of each query row read from one packed bin (``resets=False``: positions run
    through the whole bin, so transformers sees one sequence), and the packed position ids."""
    b = collate(rows)
    ids, _, pos, _, row_bin, row_off = pack_rows(b.input_ids, b.attention_mask, 0, PAD)
    if not resets:
        pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        h = last_hidden(model.get_decoder(), ids, torch.ones_like(ids), pos)
    lengths = b.attention_mask.sum(1).tolist()
    return [h[row_bin[i], row_off[i]:row_off[i] + n] for i, n in enumerate(lengths)], pos


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_changing_one_row_leaves_the_others_bit_identical(attn: str):
    model = tiny_llama(torch.float32, attn)
    changed = [dict(r) for r in ROWS]
    rng = np.random.default_rng(0)
    changed[0]["input_ids"] = [t if r == 2 else int(rng.integers(10, 280)) for t, r in
                               zip(ROWS[0]["input_ids"], ROWS[0]["roles"])]  # same length, same RET tokens
    before, pos = _row_states(model, ROWS)
    after, _ = _row_states(model, changed)
    assert find_packed_sequence_indices(pos) is not None
    assert not torch.equal(before[0], after[0])
    for i in range(1, len(ROWS)):
        assert torch.equal(before[i], after[i]), i
    # Control: without the position resets the rows form one sequence and row 0 leaks into the rest.
    leaky_before, _ = _row_states(model, ROWS, resets=False)
    leaky_after, _ = _row_states(model, changed, resets=False)
    assert not any(torch.equal(leaky_before[i], leaky_after[i]) for i in range(1, len(ROWS)))


def test_single_row_bins_are_plain_causal_rows():
    # Every bin one row and no pad tail: transformers sees no packing and uses the plain causal mask.
    rows = [dict(ROWS[2], example_id=f"r{i}") for i in range(3)]
    padded = collate(rows)
    ids, mask, pos, _, row_bin, _ = pack_rows(padded.input_ids, padded.attention_mask, 1, PAD)
    assert ids.shape[0] == 3 and bool(mask.all()) and find_packed_sequence_indices(pos) is None
    model = tiny_llama(torch.float32, "sdpa")
    with torch.no_grad():
        got = last_hidden(model.get_decoder(), ids, mask, pos)
        ref = last_hidden(model.get_decoder(), padded.input_ids, padded.attention_mask)
    n = ids.shape[1]
    torch.testing.assert_close(got, ref[row_bin.argsort(), :n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pack_tokens", [0, SEVERAL])
def test_layout_keeps_ret_positions_and_targets(mode: str, pack_tokens: int):
    padded, packed = collate(ROWS, mode), collate(ROWS, mode, packing=True, pack_tokens=pack_tokens)
    assert torch.equal(packed.input_ids, pack_batch(padded, pack_tokens, PAD, 8).input_ids)
    q_tok = packed.input_ids[packed.q_ret_row, packed.q_ret_pos]
    assert torch.equal(q_tok, padded.input_ids[padded.q_ret_row, padded.q_ret_pos]) and bool((q_tok == RQ).all())
    d_tok = packed.doc_input_ids[packed.doc_ret_row, packed.doc_ret_pos]
    assert torch.equal(d_tok, padded.doc_input_ids[torch.arange(padded.num_docs), padded.doc_ret_pos])
    assert bool((d_tok == RD).all()) and packed.num_docs == padded.num_docs
    assert packed.num_gen_targets() == padded.num_gen_targets() and packed.num_tokens() == padded.num_tokens()
    # Every CE target is the next token of its own row (never the first token of the row packed after it).
    b, t = torch.nonzero(packed.gen_targets != IGNORE_INDEX, as_tuple=True)
    assert torch.equal(packed.gen_targets[b, t], packed.input_ids[b, t + 1])
    assert torch.equal(packed.position_ids[b, t + 1], packed.position_ids[b, t] + 1)
    assert torch.equal(packed.gen_targets[packed.gen_targets != IGNORE_INDEX].sort().values,
                       padded.gen_targets[padded.gen_targets != IGNORE_INDEX].sort().values)
    layouts = ((packed.position_ids, packed.attention_mask), (packed.doc_position_ids, packed.doc_attention_mask))
    for pos, mask in layouts:
        if mask.numel() == 0:  # git: no docs
            continue
        starts = (pos == 0).sum(1)  # a row or the pad tail starts at each 0
        tails = (mask[:, -1] == 0).long()
        assert int((starts - tails).sum()) == int((pos[mask.bool()] == 0).sum())
        assert bool((mask[:, :-1] >= mask[:, 1:]).all())  # real tokens first, then the pad tail
    assert packed.padding_fraction() < padded.padding_fraction()


def test_bins_respect_capacity_and_keep_every_row():
    lengths = [50, 10, 10, 30, 5, 25, 40, 1]
    rows = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate(lengths)]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    for pack_tokens, cap in ((40, 50), (64, 64), (0, sum(lengths))):
        bins = first_fit_decreasing(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        p_ids, p_mask, _, _, row_bin, row_off = pack_rows(ids, mask, pack_tokens, PAD)
        assert p_ids.shape[0] == len(bins) and int(p_mask.sum(1).max()) <= cap
        for i, r in enumerate(rows):
            assert p_ids[row_bin[i], row_off[i]:row_off[i] + len(r)].tolist() == r
    # Over pack_tokens, the longest row is alone; the cap is then the longest row (the width it sets anyway).
    p_ids, p_mask, _, _, row_bin, _ = pack_rows(ids, mask, 40, PAD)
    assert int((row_bin == row_bin[0]).sum()) == 1 and sorted(p_mask.sum(1).tolist()) == [25, 46, 50, 50]
    assert pack_rows(ids, mask, 0, PAD)[0].shape == (1, sum(lengths))


def test_automatic_bins_weigh_padding_against_dense_attention():
    """data.pack_tokens 0: one sequence under flash-attn (varlen); with a dense mask, the bin size among
    1-2x the longest row whose tensor costs least, never more padding than the padded layout."""
    assert attention_width("flash_attention_2", 128, 384) == 0.0
    assert attention_width("sdpa", 128, 384) == attention_width("eager", 128, 384) == (8 * 128 + 6 * 384) / 4
    docs = [81, 75, 60, 55, 54, 52, 52, 40]  # short rows pair up in 1.5x the longest
    assert choose_capacity(docs, attention_at=1e9) > 81  # attention free: the least padding wins
    assert choose_capacity(docs, attention_at=1.0) == 81  # attention dear: no bin wider than a row
    queries = [256, 240, 230, 199]  # the tiny model's query rows: pairs would halve the rows but double attention
    assert choose_capacity(queries, attention_at=attention_width("sdpa", 128, 384)) == 256
    ids = torch.full((len(docs), 81), PAD)
    mask = torch.zeros((len(docs), 81), dtype=torch.long)
    for i, n in enumerate(docs):
        ids[i, :n], mask[i, :n] = 7, 1
    p_ids, p_mask = pack_rows(ids, mask, 0, PAD, attention_at=832.0)[:2]
    assert p_ids.numel() < ids.numel() and int(p_mask.sum()) == sum(docs)
    assert pack_rows(ids, mask, 0, PAD)[0].shape[0] == 1  # no attention width: one sequence


def test_no_docs_packs_to_empty_doc_tensors():
    no_ret = dict(ROWS[0], roles=[0 if r == 2 else r for r in ROWS[0]["roles"]], positives=[], negatives=[])
    b = collate([no_ret, ROWS[1]], "git", packing=True)
    assert b.doc_input_ids.shape[0] == 0 and b.doc_ret_row.numel() == 0 and b.input_ids.shape[0] == 1
