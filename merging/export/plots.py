"""The comparison report's plots (matplotlib): fidelity vs rank, per-layer error, size vs fidelity, skills."""

from __future__ import annotations

import re
from pathlib import Path

from merging.eval.results import Comparison

FLOOR = 1e-9  # errors are drawn no lower than this on log axes


def draw_all(plt, report: Comparison, folder: Path) -> list[str]:
    """Draw every plot that has data into folder; return the file names."""
    out = []
    for name, fn in (
        ("fidelity_vs_rank.png", _fidelity_vs_rank),
        ("per_layer_error.png", _per_layer),
        ("size_vs_fidelity.png", _size_vs_fidelity),
        ("skill_retention.png", _skills),
        ("tune_search.png", _search),
        ("tune_retention.png", _before_after),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if fn(ax, report):
            fig.tight_layout()
            fig.savefig(folder / name)
            out.append(name)
        plt.close(fig)
    return out


def _fidelity_vs_rank(ax, report: Comparison) -> bool:
    by: dict[str | None, list[tuple[int, float]]] = {}
    flat = []
    for v in report.variants:
        if v.rank is not None:
            by.setdefault(v.strategy, []).append((v.rank, max(v.row.effect_rel_error, FLOOR)))
        else:
            flat.append(v)
    if not by:
        return False
    for name, pts in sorted(by.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for v in flat:
        ax.axhline(
            max(v.row.effect_rel_error, FLOOR), linestyle="--", linewidth=1, label=f"{v.label} (any rank)"
        )
    ax.axhline(report.tolerance, color="black", linewidth=0.8, linestyle=":", label="exact tolerance")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank budget per module")
    ax.set_ylabel("effect-relative error vs stacked")
    ax.set_title("Fidelity against rank")
    ax.legend(fontsize=7, ncol=2)
    return True


def _layer(module: str) -> int | None:
    m = re.search(r"\.(\d+)\.", module)
    return int(m.group(1)) if m else None


def _per_layer(ax, report: Comparison) -> bool:
    drawn = False
    for v in report.variants:
        if v.row.exact or not v.row.module_errors:  # an exact variant's errors are rounding noise
            continue
        layers: dict[int, list[float]] = {}
        for mod, e in v.row.module_errors.items():
            if (i := _layer(mod)) is not None:
                layers.setdefault(i, []).append(e)
        if not layers:
            continue
        xs = sorted(layers)
        ax.plot(xs, [max(sum(layers[i]) / len(layers[i]), FLOOR) for i in xs], marker=".", label=v.label)
        drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean ‖ΔW_merged − ΔW_stack‖ / ‖ΔW_stack‖")
        ax.set_title("Per-layer weight-space error")
        ax.legend(fontsize=7, ncol=2)
    return drawn


def _size_vs_fidelity(ax, report: Comparison) -> bool:
    if not report.variants:
        return False
    for v in report.variants:
        ax.scatter(v.params, max(v.row.effect_rel_error, FLOOR), s=18)
        ax.annotate(v.label, (v.params, max(v.row.effect_rel_error, FLOOR)), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("merged adapter parameters")
    ax.set_ylabel("effect-relative error vs stacked")
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
