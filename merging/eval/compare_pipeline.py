"""compare on a diffusers pipeline: each strategy (and rank) against the inputs stacked, per component.

The figures are verify's (``verify_diffusers``): the denoiser's noise prediction and each text encoder's
hidden states on seeded inputs, the reference diffusers stacking the input files where it loads them whole
(else ΔW added, and the report says why), each merge loaded the way diffusers loads it. Per candidate and
component: effect-relative error ‖y − y_ref‖ / ‖y_ref − y_base‖ and the cosine of the effects
(y − y_base, y_ref − y_base); the merged adapter's size. Written as report.json, report.md and
error_vs_rank.png (when matplotlib is installed and some strategy ran at several ranks), atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from merging.core.adapter import Pair
from merging.eval.compare import Variant
from merging.eval.verify_diffusers import verify_sd
from merging.merge import pipeline as merge_lib
from merging.storage.atomic import atomic_folder
from merging.strategies import Options

SCHEMA = "merging.compare_pipeline/1"


def compare_pipeline(
    folder: Path, pairs: Sequence[Pair], variants: Sequence[Variant], options: Options,
    input_files: Sequence[Path] | None = None,
) -> dict:  # fmt: skip
    """Every variant merged and judged on the pipeline; the report as a JSON-ready dict."""
    candidates, sizes = [], {}
    for v in variants:
        result = merge_lib.merge(pairs, v.strategy, replace(options, rank=v.rank or options.rank))
        candidates.append((v.label, result.adapters, result.exact))
        sizes[v.label] = sum(d.numel for ad in result.adapters for d in ad.deltas.values())
    rows, reference = verify_sd(folder, pairs, candidates, input_files)
    by_label = {v.label: v for v in variants}
    return {
        "schema": SCHEMA, "base": str(folder), "reference": reference,
        "inputs": [{"source": str(ad.source), "weight": w} for ad, w in pairs],
        "rows": [{"label": r.name, "strategy": by_label[r.name].strategy, "rank": by_label[r.name].rank,
                  "exact": r.exact, "effect_rel_error": r.error, "errors": dict(r.errors),
                  "cosines": dict(r.cosines), "params": sizes[r.name], "loaded_by": r.loader} for r in rows],
    }  # fmt: skip


def write_report(doc: dict, out: Path, *, force: bool = False) -> Path:
    """report.json, report.md and (matplotlib permitting) error_vs_rank.png in ``out``, atomically."""
    with atomic_folder(Path(out), force=force) as tmp:
        (tmp / "report.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
        (tmp / "report.md").write_text(markdown(doc))
        _plot(doc, tmp / "error_vs_rank.png")
    return Path(out)


def markdown(doc: dict) -> str:
    """The report as a Markdown table: one row per candidate, error and cosine per component."""
    comps = sorted({c for r in doc["rows"] for c in r["errors"]})
    head = ["candidate", "exact", "params", *(f"{c} err" for c in comps), *(f"{c} cos" for c in comps)]
    lines = [f"# compare on {doc['base']}", "", f"Reference: the inputs stacked by {doc['reference']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in doc["rows"]:
        cells = [r["label"], "yes" if r["exact"] else "no", f"{r['params']:,}"]
        cells += [f"{r['errors'][c]:.2e}" for c in comps] + [f"{r['cosines'][c]:.6f}" for c in comps]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(doc: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series: dict[str, list[tuple[int, float]]] = {}
    for r in doc["rows"]:
        if r["rank"] is not None:
            series.setdefault(r["strategy"], []).append((r["rank"], max(r["effect_rel_error"], 1e-12)))
    if not any(len(pts) > 1 for pts in series.values()):
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in sorted(series.items()):
        ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=name)
    ax.set(xlabel="rank", ylabel="effect-relative error (worst component)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
