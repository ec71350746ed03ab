"""The OneGen losses against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from onegen.errors import ConfigError
from pipeline.config import LossConfig
from pipeline.loss import bpr_loss, candidate_mask, gen_loss_sum, infonce_loss, top1_hits


def nls(x: float) -> float:
    """-log σ(x)"""
    return math.log1p(math.exp(-x))


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------------------------- BPR


def test_bpr_mean_over_negatives_summed_over_queries():
    q = t([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    pos = t([[0.6, 0.8], [0.0, 3.0], [1.0, 0.0]])  # s+ = 0.6, 1.0, (query 3 has no negative)
    neg = t(
        [
            [[0.0, 1.0], [-1.0, 0.0]],  # s- = 0, -1
            [[5.0, 0.0], [0.0, 7.0]],  # s- = 0, (masked)
            [[0.0, 1.0], [0.0, 1.0]],  # both masked
        ]
    )
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    total, count = bpr_loss(q, pos, neg, mask)
    expected = (nls(0.6 - 0.0) + nls(0.6 + 1.0)) / 2 + nls(1.0 - 0.0)
    assert count.item() == 2
    assert total.item() == pytest.approx(expected, rel=1e-12)


def test_bpr_is_scale_invariant_and_prefers_closer_positive():
    q = torch.randn(4, 8, dtype=torch.float64)
    pos, neg = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 3, 8, dtype=torch.float64)
    mask = torch.ones(4, 3, dtype=torch.bool)
    a, _ = bpr_loss(q, pos, neg, mask)
    b, _ = bpr_loss(3 * q, 0.5 * pos, 7 * neg, mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    better, _ = bpr_loss(q, q.clone(), neg, mask)  # positive identical to the query
    assert better.item() < a.item()


# ----------------------------------------------------------------------------------------- InfoNCE

A, B, C, D = 11, 22, 33, 44  # doc-id hashes


def test_infonce_known_value():
    tau = 0.5
    q = t([[1.0, 0.0], [0.0, 1.0]])
    cand = t([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # ids A, B, C
    total, count, hits = infonce_loss(q, torch.tensor([0, 1]), cand, torch.tensor([A, B, C]), torch.tensor([A, B]), tau)
    e = math.exp
    q0 = -math.log(e(1 / tau) / (e(1 / tau) + e(0) + e(-1 / tau)))
    q1 = -math.log(e(1 / tau) / (e(0) + e(1 / tau) + e(0)))
    assert count.item() == 2 and hits.item() == 2
    assert total.item() == pytest.approx(q0 + q1, rel=1e-12)


def test_infonce_false_negative_masking_changes_value_exactly():
    tau = 0.5
    q = t([[1.0, 0.0]])
    cand = t([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])  # cosines 1, 0, 0.8
    pos_idx = torch.tensor([0])
    e = math.exp
    # Third candidate is another doc: it is a negative.
    unmasked, _, _ = infonce_loss(q, pos_idx, cand, torch.tensor([A, B, D]), torch.tensor([A]), tau)
    assert unmasked.item() == pytest.approx(-math.log(e(2) / (e(2) + e(0) + e(1.6))), rel=1e-12)
    # Same id as the positive: a false negative, dropped from the denominator.
    masked, _, _ = infonce_loss(q, pos_idx, cand, torch.tensor([A, B, A]), torch.tensor([A]), tau)
    assert masked.item() == pytest.approx(-math.log(e(2) / (e(2) + e(0))), rel=1e-12)
    assert unmasked.item() - masked.item() == pytest.approx(math.log((e(2) + e(0) + e(1.6)) / (e(2) + e(0))), rel=1e-12)


def test_infonce_positive_copy_that_is_not_first_still_counts():
    # Two ranks both hold doc A; the query's own positive is the *second* copy.
    tau = 0.5
    q = t([[1.0, 0.0]])
    cand = t([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    got, _, _ = infonce_loss(q, torch.tensor([2]), cand, torch.tensor([A, B, A]), torch.tensor([A]), tau)
    e = math.exp
    assert got.item() == pytest.approx(-math.log(e(2) / (e(2) + e(0))), rel=1e-12)


def test_infonce_duplicate_negative_counted_once():
    tau = 0.5
    q = t([[1.0, 0.0]])
    cand = t([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # B held by two ranks
    dup, _, _ = infonce_loss(q, torch.tensor([0]), cand, torch.tensor([A, B, B]), torch.tensor([A]), tau)
    once, _, _ = infonce_loss(q, torch.tensor([0]), cand[:2], torch.tensor([A, B]), torch.tensor([A]), tau)
    assert dup.item() == pytest.approx(once.item(), rel=1e-12)
    m = candidate_mask(torch.tensor([0]), torch.tensor([A, B, B]), torch.tensor([A]))
    assert m.tolist() == [[True, True, False]]


def test_infonce_gradient_matches_autograd_of_reference_formula():
    torch.manual_seed(0)
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    cand = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 2, 3, 4, 5, 6])
    pos_idx = torch.tensor([0, 2, 5])
    got, _, _ = infonce_loss(q, pos_idx, cand, ids, ids[pos_idx], 0.1)
    ref = F.cross_entropy(F.normalize(q, dim=-1) @ F.normalize(cand, dim=-1).T / 0.1, pos_idx, reduction="sum")
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    g1 = torch.autograd.grad(got, (q, cand))
    g2 = torch.autograd.grad(ref, (q, cand))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_top1_hits():
    logits = t([[3.0, 1.0, 2.0], [0.0, 5.0, float("-inf")], [1.0, 1.0, 0.0]])
    # row 0: positive 0 wins; row 1: positive 2 is masked -> loses; row 2: tie is not a hit
    assert top1_hits(logits, torch.tensor([0, 2, 0])).item() == 1


# ------------------------------------------------------------------------------------- generation


class RecordingHead(torch.nn.Module):
    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.head(x)


def test_gen_loss_sum_equals_full_logits_ce_and_gathers_first():
    torch.manual_seed(0)
    bsz, length, hid, vocab = 3, 7, 8, 13
    hidden = torch.randn(bsz, length, hid)
    targets = torch.randint(0, vocab, (bsz, length))
    keep = torch.rand(bsz, length) < 0.4
    keep[0, 0] = True
    targets[~keep] = -100
    head = RecordingHead(torch.nn.Linear(hid, vocab, bias=False))
    total, count = gen_loss_sum(hidden, targets, head)
    n = int(keep.sum())
    assert head.shapes == [(n, hid)]  # only the gathered rows reach the LM head
    full = head.head(hidden)  # [B, L, V]
    ref = F.cross_entropy(full.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100, reduction="sum")
    assert count.item() == n
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, ref)


def test_gen_loss_sum_bf16_is_computed_in_float32():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 8).bfloat16()
    targets = torch.tensor([[1, -100, 2, -100], [-100, 3, -100, 4]])
    head = torch.nn.Linear(8, 6, bias=False).bfloat16()
    total, count = gen_loss_sum(hidden, targets, head)
    assert total.dtype == torch.float32 and count.item() == 4


def test_gen_loss_sum_with_no_target_still_calls_head_and_backprops():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    head = RecordingHead(torch.nn.Linear(4, 5))
    total, count = gen_loss_sum(hidden, torch.full((2, 3), -100), head)
    assert head.shapes == [(0, 4)]  # every rank runs the head (ZeRO-3 hooks), even with nothing to learn
    assert count.item() == 0 and total.item() == 0.0
    total.backward()
    assert hidden.grad is not None and not hidden.grad.any()


# ---------------------------------------------------------------------------------------- config


def test_loss_config_modes():
    assert LossConfig(mode="git", lambda_ret=0.7).effective_lambdas() == (1.0, 0.0)
    assert LossConfig(mode="rit", lambda_gen=0.3).effective_lambdas() == (0.0, 1.0)
    assert LossConfig(mode="onegen", lambda_gen=0.5, lambda_ret=2.0).effective_lambdas() == (0.5, 2.0)
    with pytest.raises(ConfigError, match="loss.mode"):
        LossConfig(mode="both")
    with pytest.raises(ConfigError, match="loss.ret_loss"):
        LossConfig(ret_loss="triplet")
    with pytest.raises(ConfigError, match="loss.temperature"):
        LossConfig(temperature=0.0)


def test_a_recipe_with_a_zero_temperature_is_refused_on_load(tmp_path):
    """The trainer's loss takes the recipe's own ``loss`` section: its check names the recipe's line."""
    from onegen.config import load_config
    from pipeline.config import TrainConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 0\nloss:\n  mode: onegen\n  temperature: 0\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:4, field 'loss\.temperature': must be > 0"):
        load_config(TrainConfig, recipe)
