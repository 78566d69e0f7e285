"""The comparison report's plots (matplotlib): fidelity vs rank, per-layer error, size vs fidelity, skills."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from merging.eval.results import Comparison

FLOOR = 1e-9  # errors are drawn no lower than this on log axes


def pyplot() -> Any | None:
    """matplotlib's pyplot on the file-only Agg backend (no display needed); None when it is not installed
    (the ``plots`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def draw_all(plt, report: Comparison, folder: Path) -> list[str]:
    """Draw every plot that has data into folder; return the file names."""
    return draw(plt, folder, [
        ("fidelity_vs_rank.png", lambda ax: _fidelity_vs_rank(ax, report)),
        ("per_layer_error.png", lambda ax: _per_layer(ax, report)),
        ("size_vs_fidelity.png", lambda ax: _size_vs_fidelity(ax, report)),
        ("skill_retention.png", lambda ax: _skills(ax, report)),
        ("tune_search.png", lambda ax: _search(ax, report)),
        ("tune_retention.png", lambda ax: _before_after(ax, report)),
    ])  # fmt: skip


def draw(plt, folder: Path, plots: Sequence[tuple[str, Callable[[Any], bool]]]) -> list[str]:
    """Each (file name, draw(ax) → whether it had data) drawn on its own figure; the names written."""
    out = []
    for name, fn in plots:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if fn(ax):
            fig.tight_layout()
            fig.savefig(folder / name)
            out.append(name)
        plt.close(fig)
    return out


def _fidelity_vs_rank(ax, report: Comparison) -> bool:
    points = [(v.strategy, v.rank, v.label, v.row.effect_rel_error) for v in report.variants]
    return fidelity_vs_rank(ax, points, report.tolerance)


def fidelity_vs_rank(
    ax, points: Sequence[tuple[str | None, int | None, str, float]], tolerance: float | None,
    what: str = "effect-relative error vs stacked",
) -> bool:  # fmt: skip
    """Error against rank, a line per strategy (rank-free variants as dashed levels).

    Args:
        points: (strategy, rank or None, label, error) per variant.
        tolerance: drawn as the exact strategies' bar (None: not drawn).
        what: the y axis label.
    """
    by: dict[str | None, list[tuple[int, float]]] = {}
    flat = []
    for strategy, rank, label, err in points:
        if rank is not None:
            by.setdefault(strategy, []).append((rank, max(err, FLOOR)))
        else:
            flat.append((label, err))
    if not by:
        return False
    for name, pts in sorted(by.items(), key=lambda kv: str(kv[0])):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for label, err in flat:
        ax.axhline(max(err, FLOOR), linestyle="--", linewidth=1, label=f"{label} (any rank)")
    if tolerance is not None:
        ax.axhline(tolerance, color="black", linewidth=0.8, linestyle=":", label="exact tolerance")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank budget per module")
    ax.set_ylabel(what)
    ax.set_title("Fidelity against rank")
    ax.legend(fontsize=7, ncol=2)
    return True


def _layer(module: str) -> int | None:
    m = re.search(r"\.(\d+)\.", module)
    return int(m.group(1)) if m else None


def _per_layer(ax, report: Comparison) -> bool:
    # an exact variant's errors are rounding noise
    return per_layer(ax, [(v.label, v.row.module_errors) for v in report.variants if not v.row.exact])


def per_layer(ax, series: Sequence[tuple[str, Mapping[str, float]]]) -> bool:
    """Mean per-module weight-space error by layer index (the first number in a module path), per label."""
    drawn = False
    for label, errors in series:
        layers: dict[int, list[float]] = {}
        for mod, e in errors.items():
            if (i := _layer(mod)) is not None:
                layers.setdefault(i, []).append(e)
        if not layers:
            continue
        xs = sorted(layers)
        ax.plot(xs, [max(sum(layers[i]) / len(layers[i]), FLOOR) for i in xs], marker=".", label=label)
        drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean ‖ΔW_merged − ΔW_stack‖ / ‖ΔW_stack‖")
        ax.set_title("Per-layer weight-space error")
        ax.legend(fontsize=7, ncol=2)
    return drawn


def _size_vs_fidelity(ax, report: Comparison) -> bool:
    return size_vs_fidelity(ax, [(v.label, v.params, v.row.effect_rel_error) for v in report.variants])


def size_vs_fidelity(
    ax, points: Sequence[tuple[str, int, float]], what: str = "effect-relative error vs stacked"
) -> bool:
    """Error against the merged adapter's parameter count, one labelled point per (label, params, error)."""
    if not points:
        return False
    for label, params, err in points:
        ax.scatter(params, max(err, FLOOR), s=18)
        ax.annotate(label, (params, max(err, FLOOR)), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("merged adapter parameters")
    ax.set_ylabel(what)
    ax.set_title("Size against fidelity")
    return True


def _skills(ax, report: Comparison) -> bool:
    skills = report.skills.names
    if not skills:
        return False
    labels = ["stacked"] + [v.label for v in report.variants]
    rows = [report.skills.stacked, *(v.skills for v in report.variants)]
    width = 0.8 / len(skills)
    for j, s in enumerate(skills):
        values = [row[s].retention or 0.0 for row in rows]
        err = _errors([row[s] for row in rows])
        ax.bar([i + j * width for i in range(len(labels))], values, width, label=s, yerr=err, capsize=1.5,
               error_kw={"linewidth": 0.6})  # fmt: skip
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=60, ha="right", fontsize=7
    )
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_ylabel("skill retention (1 = as the adapter alone)")
    ax.set_xlabel("strategy")
    ax.set_title("Skill retention per strategy")
    ax.legend(fontsize=7)
    return True


def _errors(skills) -> list[list[float]] | None:
    """Matplotlib's asymmetric error bars (2, n) from the skills' 95% intervals; None when none has one."""
    if all(k.interval is None for k in skills):
        return None
    low = [0.0 if k.interval is None else max(0.0, (k.retention or 0.0) - k.interval.low) for k in skills]
    high = [0.0 if k.interval is None else max(0.0, k.interval.high - (k.retention or 0.0)) for k in skills]
    return [low, high]


def _search(ax, report: Comparison) -> bool:
    if report.search is None:
        return False
    return _draw_search(ax, [(s["step"], s["objective"], s["on"]) for s in report.search["trace"]])


def _before_after(ax, report: Comparison) -> bool:
    """Retention per skill: the inputs stacked as given, and the tuned row."""
    if report.search is None or not report.skills.names:
        return False
    tuned = next((v for v in report.variants if v.label == report.search["label"]), None)
    if tuned is None:
        return False
    before = {s: k.retention for s, k in report.skills.stacked.items()}
    intervals = {key: {s: None if k.interval is None else [k.interval.low, k.interval.high]
                       for s, k in got.items()}
                 for key, got in (("before", report.skills.stacked), ("after", tuned.skills))}  # fmt: skip
    return _draw_before_after(ax, before, {s: k.retention for s, k in tuned.skills.items()}, intervals)


def draw_search(plt, trace: list[tuple[int, float, str]], path: Path) -> bool:
    """The tuning search: objective against step (minibatch points and whole-tuning-split points)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    drawn = _draw_search(ax, trace)
    if drawn:
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return drawn


def _draw_search(ax, trace: list[tuple[int, float, str]]) -> bool:
    if not trace:
        return False
    for on, style, label in (("batch", "o-", "step's minibatch"), ("tune", "s", "whole tuning split")):
        pts = [(k, v) for k, v, o in trace if o == on]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("objective (retention)")
    ax.set_title("Tuning the merge weights")
    ax.legend(fontsize=8)
    return True


Retentions = dict[str, float | None]


def draw_before_after(
    plt, before: Retentions, after: Retentions, path: Path, intervals: dict | None = None
) -> bool:
    """Retention per skill on the reporting split: the inputs stacked as given, and the tuned merge (with
    the 95% intervals, ``intervals``: before/after → skill → [low, high], where given)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    drawn = _draw_before_after(ax, before, after, intervals)
    if drawn:
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return drawn


def _draw_before_after(ax, before: Retentions, after: Retentions, intervals: dict | None = None) -> bool:
    names = [n for n in before if before[n] is not None and after.get(n) is not None]
    if not names:
        return False
    x = range(len(names))

    def err(key: str, values: Retentions):
        got = (intervals or {}).get(key) or {}
        if not any(got.get(n) for n in names):
            return None
        return [[max(0.0, values[n] - got[n][0]) if got.get(n) else 0.0 for n in names],
                [max(0.0, got[n][1] - values[n]) if got.get(n) else 0.0 for n in names]]  # fmt: skip

    ax.bar([i - 0.2 for i in x], [before[n] for n in names], width=0.4, label="stacked as given",
           yerr=err("before", before), capsize=2)  # fmt: skip
    ax.bar([i + 0.2 for i in x], [after[n] for n in names], width=0.4, label="tuned merge",
           yerr=err("after", after), capsize=2)  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("retention on the reporting split")
    ax.set_title("Skill retention before and after tuning")
    ax.legend(fontsize=8)
    return True
