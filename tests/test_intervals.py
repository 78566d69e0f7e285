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


def test_the_report_shows_intervals_and_marks_the_best_row(tmp_path):
    """Intervals and leads survive report.json, and the tables show them (a report without them, as from
    before the bootstrap, renders its rows as before)."""
    import dataclasses
    import json
    from pathlib import Path

    from merging.eval.results import Comparison
    from merging.export import report as report_out

    path = Path(__file__).resolve().parents[1] / "reports" / "example" / "report.json"
    committed = Comparison.from_dict(json.loads(path.read_text()))
    unbooted = lambda skills: {s: dataclasses.replace(k, interval=None) for s, k in skills.items()}  # noqa: E731
    bare = tuple(dataclasses.replace(x, skills=unbooted(x.skills)) for x in committed.variants)
    plain = dataclasses.replace(committed, variants=bare, leads={})  # no bootstrap ran
    v = plain.variants[1]
    skills = {s: dataclasses.replace(k, interval=intervals.Interval(k.retention - 0.1, k.retention + 0.2))
              for s, k in v.skills.items()}  # fmt: skip
    leads = {"add": intervals.Lead(v.label, "cat", intervals.Interval(0.05, 0.3)),
             "sort": intervals.Lead("cat", v.label, intervals.Interval(-0.1, 0.3))}  # fmt: skip
    rows = (*plain.variants[:1], dataclasses.replace(v, skills=skills), *plain.variants[2:])
    report = dataclasses.replace(plain, variants=rows, leads=leads)
    assert Comparison.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    _, cells = report_out.skill_rows(report)
    add = report.skills.names.index("add") + 1
    r = v.skills["add"].retention
    assert cells[2][add] == f"{r:.0%} [{r - 0.1:.0%}, {r + 0.2:.0%}] **"  # best, and significantly
    assert cells[1][report.skills.names.index("sort") + 1].endswith("% *")  # cat: best, not significantly
    assert report_out.skill_rows(plain)[1][2][add] == f"{r:.0%}"  # no interval: as before
    assert report_out.lead_rows(report)[1] == [["add", v.label, "cat", "[+5%, +30%]", "yes"],
                                               ["sort", "cat", v.label, "[-10%, +30%]", "no"]]  # fmt: skip
    written = report_out.write_report(report, tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| skill | best | runner-up | lead (95% interval) | significant |" in md
    assert written.leads == leads
