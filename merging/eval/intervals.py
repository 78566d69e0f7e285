"""Error bars: a seeded bootstrap over examples for every retention, paired where two merges are compared.

A skill's retention is (ΣL_base − ΣL) / (ΣL_base − ΣL_alone) over its examples' answer-token
cross-entropy sums (every example has the same answer tokens in all three, so this is the ratio of the
mean losses ``retention`` computes). ``scipy.stats.bootstrap`` resamples the examples (the same ones for
base, alone and merged: paired) and gives a 95% BCa interval; two merges measured on the same examples are
compared by the interval of their retentions' difference, so a lead is significant when that interval
excludes 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A confidence interval [low, high] (NaN ends when the bootstrap could not give one)."""

    low: float
    high: float

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high


@dataclass(frozen=True)
class Lead:
    """The best merge on one skill, the runner-up, and the paired interval of best − runner-up."""

    best: str
    runner_up: str | None
    difference: Interval | None  # None without a runner-up

    @property
    def significant(self) -> bool:
        return self.difference is not None and self.difference.low > 0


def _retention(base, alone, merged, axis=-1):
    return (base.sum(axis) - merged.sum(axis)) / (base.sum(axis) - alone.sum(axis))


def _difference(base, alone, one, other, axis=-1):
    return _retention(base, alone, one, axis) - _retention(base, alone, other, axis)


def _bootstrap(samples: Sequence[np.ndarray], statistic, seed: int) -> Interval | None:
    """The 95% BCa interval of ``statistic`` over paired examples (percentile where BCa degenerates)."""
    if len(samples[0]) < 2:
        return None
    for method in ("BCa", "percentile"):
        with np.errstate(all="ignore"):
            res = _scipy_bootstrap(samples, statistic, seed, method)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(low) and np.isfinite(high):
            return Interval(low, high)
    return None


def _scipy_bootstrap(samples, statistic, seed: int, method: str):
    import warnings

    from scipy import stats

    with warnings.catch_warnings():  # a degenerate BCa warns and gives NaN: the percentile follows
        warnings.simplefilter("ignore")
        return stats.bootstrap(tuple(samples), statistic, paired=True, vectorized=True,
                               n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method=method,
                               rng=np.random.default_rng(seed))  # fmt: skip


def retention_interval(base, alone, merged, *, seed: int = 0) -> Interval | None:
    """The retention's interval from per-example loss sums (three (n,) arrays on the same examples); None
    with fewer than 2 examples or when the adapter alone does not improve on the base."""
    base, alone, merged = (np.asarray(x, dtype=np.float64) for x in (base, alone, merged))
    if base.sum() - alone.sum() <= 0:
        return None
    return _bootstrap((base, alone, merged), _retention, seed)


def lead(base, alone, merged: Mapping[str, np.ndarray], *, seed: int = 0) -> Lead | None:
    """Which of ``merged`` (label → per-example loss sums) keeps the skill best, and by how much over the
    runner-up (paired: the same resampled examples for both)."""
    base, alone = np.asarray(base, dtype=np.float64), np.asarray(alone, dtype=np.float64)
    if not merged or base.sum() - alone.sum() <= 0:
        return None
    ranked = sorted(merged, key=lambda k: -float(_retention(base, alone, np.asarray(merged[k]))))
    if len(ranked) == 1:
        return Lead(ranked[0], None, None)
    one, other = (np.asarray(merged[k], dtype=np.float64) for k in ranked[:2])
    return Lead(ranked[0], ranked[1], _bootstrap((base, alone, one, other), _difference, seed))
