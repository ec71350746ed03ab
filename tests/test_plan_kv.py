"""Unit tests of two pure parts the rest relies on: the training data plan (what resume depends on)
and the decoding context's token bookkeeping."""

from __future__ import annotations

import pytest

from evaluation.kv import Context, ContextFull
from onegen.errors import ConfigError
from pipeline.plan import BatchPlan, epoch_units, units_per_epoch

pytestmark = pytest.mark.unit


def test_an_epoch_covers_each_row_at_most_once_and_never_mixes_datasets():
    units = epoch_units([10, 7], micro_batch=3, seed=0, epoch=0)
    assert len(units) == 10 // 3 + 7 // 3  # the partial unit of each dataset is dropped
    seen: dict[int, list[int]] = {0: [], 1: []}
    for d, rows in units:
        assert len(rows) == 3 and all(0 <= r < [10, 7][d] for r in rows)
        seen[d] += rows
    assert all(len(v) == len(set(v)) for v in seen.values())


def test_epochs_are_seeded_and_differ():
    a, b = epoch_units([20], 4, seed=1, epoch=0), epoch_units([20], 4, seed=1, epoch=0)
    assert a == b
    assert epoch_units([20], 4, seed=1, epoch=1) != a and epoch_units([20], 4, seed=2, epoch=0) != a


def test_units_per_epoch_fills_whole_steps_only():
    assert units_per_epoch([10, 7], micro_batch=3, grad_accum=2, world_size=2) == 4  # 5 units, steps of 4
    assert units_per_epoch([2], micro_batch=3, grad_accum=1, world_size=1) == 0


def test_a_step_gives_each_rank_disjoint_units_and_the_plan_does_not_depend_on_the_world_size():
    one = BatchPlan([24], micro_batch=2, grad_accum=2, world_size=1, seed=0)
    two = BatchPlan([24], micro_batch=2, grad_accum=1, world_size=2, seed=0)
    # the same units in the same order, whatever the split into ranks and accumulation steps
    flat_one = [u for s in range(3) for u in one.step_units(2 * s, rank=0)]
    flat_two = [u for s in range(3) for r in (0, 1) for u in two.step_units(2 * s, rank=r)]
    assert sorted(map(str, flat_one)) == sorted(map(str, flat_two))
    r0, r1 = two.step_units(0, 0), two.step_units(0, 1)
    assert not set(r0[0][2]) & set(r1[0][2])


def test_resume_position_crosses_epochs():
    plan = BatchPlan([8], micro_batch=2, grad_accum=1, world_size=1, seed=0)  # 4 units an epoch
    assert plan.position(5) == (1, 1)
    assert plan.step_units(5, 0)[0][0] == 1  # the unit after 5 consumed is in epoch 1
    assert plan.step_units(5, 0)[0][2] == epoch_units([8], 2, 0, 1)[1][1]


def test_mixing_weights_set_the_passes_over_each_dataset_and_weight_one_is_the_unweighted_plan():
    assert epoch_units([10, 7], 3, seed=0, epoch=0, weights=[1.0, 1.0]) == epoch_units([10, 7], 3, seed=0, epoch=0)
    units = epoch_units([12, 8], micro_batch=4, seed=0, epoch=0, weights=[0.5, 2.5])
    rows: dict[int, list[int]] = {0: [], 1: []}
    for d, r in units:
        assert len(set(r)) == len(r) == 4  # every pass is cut into units apart: no row twice in one micro-batch
        rows[d] += r
    assert len(rows[0]) == 4 and len(set(rows[0])) == 4  # half of 12 rows is 6: one unit of 4, the rest dropped
    assert len(rows[1]) == 20 and all(rows[1].count(i) >= 2 for i in range(8))  # two whole passes and a half
    assert units_per_epoch([12, 8], 4, 1, 1, weights=[0.5, 2.5]) == len(units) == 6
    assert [d for d, _ in epoch_units([12, 8], 4, 0, 0, weights=[0.0, 1.0])] == [1, 1]  # weight 0: left out
    plan = BatchPlan([12, 8], micro_batch=4, grad_accum=1, world_size=1, seed=0, weights=[0.5, 2.5])
    assert plan.units_per_epoch == 6 and plan.step_units(0, 0)[0][1:] == units[0]


@pytest.mark.parametrize("weights, needle", [([1.0], "one weight per data.train dir"), ([1.0, -1.0], ">= 0"),
                                             ([0.0, 0.0], "one > 0")])
def test_bad_mixing_weights_are_refused_with_the_field(weights, needle):
    from pipeline.config import DataConfig

    with pytest.raises(ConfigError, match=f"data.train_weights.*{needle}"):
        DataConfig(train=["a", "b"], train_weights=weights)


def test_a_plan_that_cannot_fill_one_step_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="lower optim.micro_batch_size"):
        BatchPlan([3], micro_batch=4, grad_accum=1, world_size=1, seed=0)


def test_context_bookkeeping_counts_what_each_forward_fed():
    c = Context(max_positions=10)
    c.push([1, 2, 3])
    assert c.pending == 3 and c.room() == 7
    assert c.take("prefill") == [1, 2, 3] and c.pending == 0
    c.push([4])
    assert c.take("decode") == [4]
    c.push([5, 6])
    c.take("decode")
    assert c.counts() == {"prefill": 1, "decode": 2} and c.tokens_fed == 6
    with pytest.raises(RuntimeError, match="nothing to feed"):
        c.take("decode")


def test_context_refuses_to_overflow_the_model_positions():
    c = Context(max_positions=4)
    c.push([1, 2, 3])
    with pytest.raises(ContextFull, match="exceeds the model's 4 positions"):
        c.push([4, 5])
    assert c.context == [1, 2, 3]  # nothing half-pushed
