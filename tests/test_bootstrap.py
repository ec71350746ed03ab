"""``onegen.bootstrap``: the percentile-bootstrap CI of a per-question mean (pure, no model)."""

from __future__ import annotations

import math

import pytest

from onegen.bootstrap import CI, bootstrap_ci, question_values


def _hits(k: int, n: int) -> list[float]:
    return [1.0] * k + [0.0] * (n - k)


def test_ci_contains_the_mean_and_is_a_sane_width():
    ci = bootstrap_ci(_hits(24, 40))
    assert isinstance(ci, CI) and ci.n == 40 and ci.mean == pytest.approx(0.6)
    assert ci.low < ci.mean < ci.high
    # The normal approximation: 0.6 +- 1.96 * sqrt(0.6 * 0.4 / 40) = [0.448, 0.752].
    half = 1.96 * math.sqrt(0.6 * 0.4 / 40)
    assert ci.low == pytest.approx(0.6 - half, abs=0.04) and ci.high == pytest.approx(0.6 + half, abs=0.04)
    assert 0.0 <= ci.low and ci.high <= 1.0


def test_ci_shrinks_with_n():
    widths = [(c.high - c.low) for c in (bootstrap_ci(_hits(k, n)) for k, n in ((6, 10), (24, 40), (240, 400)))]
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[1] / widths[2] == pytest.approx(math.sqrt(10), rel=0.25)  # ~ 1/sqrt(n)


def test_deterministic_for_a_seed():
    values = [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 0.25] * 5
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert {bootstrap_ci(values, seed=s) for s in range(5)} != {bootstrap_ci(values, seed=0)}
    a, b = bootstrap_ci(values, resamples=1000), bootstrap_ci(values, resamples=2000)
    assert a.mean == b.mean and abs(a.low - b.low) < 0.05


def test_degenerate_samples():
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([1.0] * 30) == CI(1.0, 1.0, 1.0, 30)
    assert bootstrap_ci([0.0] * 30).fmt() == "0.000 [0.000, 0.000]"
    one = bootstrap_ci([0.7])
    assert (one.low, one.mean, one.high) == pytest.approx((0.7, 0.7, 0.7))


def test_question_values_are_what_the_headline_averages():
    records = [{"scores": {"em": 1.0, "hop_recall_at_1": 0.5}}, {"scores": {"em": 0.0, "hop_recall_at_1": None}},
               {"scores": {"em": True}}, {"scores": {"em": float("nan")}}, {"question": "no scores"}]
    assert question_values(records, "em") == [1.0, 0.0, 1.0]
    assert question_values(records, "hop_recall_at_1") == [0.5]  # a question without gold hops is left out
    assert question_values(records, "f1") == []
    assert bootstrap_ci(question_values(records, "em")).fmt(2) == "0.67 [0.00, 1.00]"
