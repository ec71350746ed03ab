"""Bootstrap confidence intervals of a per-question mean (EM, F1, Recall@1), pure numpy.

A headline metric is the mean of one value per question (``predictions.jsonl``: ``scores.em``,
``scores.f1``, ``scores.hop_recall_at_1``); with 30–50 held-out questions its sampling error is
large, so figures and tables show it: the percentile bootstrap (resample the questions with
replacement, ``resamples`` times, take the 2.5th and 97.5th percentiles of the resampled means).
Seeded, so a rerun draws the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class CI:
    mean: float
    low: float
    high: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        """``0.800 [0.667, 0.933]``."""
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap_ci(values: Sequence[float], *, resamples: int = RESAMPLES, level: float = LEVEL,
                 seed: int = SEED) -> CI | None:
    """Percentile-bootstrap CI of the mean of ``values``; None when there is no value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    mean = float(x.mean())
    # Quantiles of resampled means can sit a rounding error off a constant sample's mean.
    return CI(mean, min(float(low), mean), max(float(high), mean), int(x.size))


def question_values(records: Iterable[dict[str, Any]], key: str) -> list[float]:
    """``record["scores"][key]`` of each prediction record that has a finite value (the same records
    ``metrics.aggregate`` averages: a question without gold hops has no recall and is left out)."""
    out = []
    for r in records:
        v = (r.get("scores") or {}).get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):  # a bool counts 0/1, as in aggregate
            out.append(float(v))
    return out


def question_ci(predictions: Sequence[dict], score: str) -> CI | None:
    """The interval of a per-question score over ``predictions.jsonl`` rows (their ``scores[score]``)."""
    return bootstrap_ci([p["scores"][score] for p in predictions if score in p.get("scores", {})])
