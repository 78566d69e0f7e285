"""Bootstrap intervals: they cover the true retention at their nominal rate, and a lead is significant only
when the paired difference says so."""

from __future__ import annotations

import numpy as np
import pytest

from merging.eval import data, intervals


def _draw(rng: np.random.Generator, n: int, keep: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example loss sums whose true retention is ``keep``: the merge keeps that share of each gain."""
    base = rng.normal(8.0, 2.0, n)
    gain = rng.gamma(2.0, 1.0, n)  # skewed, as real per-example gains are; mean 2
    alone = base - gain
    merged = base - keep * gain + rng.normal(0.0, 0.8, n)  # noise of mean 0: the truth stays ``keep``
    return base, alone, merged


def test_intervals_cover_the_true_retention_at_their_nominal_rate():
    rng = np.random.default_rng(0)
    hits, widths = 0, []
    for i in range(200):
        base, alone, merged = _draw(rng, 24, 0.4)
        got = intervals.retention_interval(base, alone, merged, seed=i)
        point = data.retention(base.mean(), alone.mean(), merged.mean())
        assert got.low <= point <= got.high
        hits += got.low <= 0.4 <= got.high
        widths.append(got.high - got.low)
    assert hits >= 180  # ≥ 90% of 200 draws at 95% nominal
    assert 0.1 < float(np.median(widths)) < 1.0  # informative: neither a point nor everything


def test_a_lead_is_significant_only_when_the_paired_difference_excludes_zero():
    rng = np.random.default_rng(1)
    base, alone, merged = _draw(rng, 32, 0.3)
    better = merged - 0.5 * (base - alone)  # the same examples, 50 points more of each gain kept
    found = intervals.lead(base, alone, {"plain": merged, "better": better}, seed=0)
    assert (found.best, found.runner_up, found.significant) == ("better", "plain", True)
    assert found.difference.low == pytest.approx(0.5, abs=0.05) == found.difference.high  # paired: exact
    noisy = merged + rng.normal(0.0, 1.0, 32)  # as good on average, different per example
    close = intervals.lead(base, alone, {"plain": merged, "noisy": noisy}, seed=0)
    assert not close.significant and close.difference.low < 0 < close.difference.high
    assert intervals.lead(base, alone, {"one": merged}).runner_up is None
    assert intervals.retention_interval(base, base, merged) is None  # no gain alone: no retention
    assert intervals.retention_interval(base[:1], alone[:1], merged[:1]) is None  # one example: no interval
