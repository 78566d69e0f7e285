"""The pipeline comparison's report (``eval.compare_pipeline``): report.json, report.md and, per component
(UNet or transformer, each text encoder), the LLM report's plots drawn by the same functions
(``export.plots``): fidelity against rank, size against fidelity, per-layer weight-space error."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from merging.export import plots
from merging.storage.atomic import atomic_folder


def write_report(doc: dict, out: Path, *, force: bool = False) -> Path:
    """report.json, report.md and (matplotlib permitting) the plots in ``out``, atomically."""
    with atomic_folder(Path(out), force=force) as tmp:
        names = _plots(doc, tmp)
        (tmp / "report.json").write_text(json.dumps(doc | {"plots": names}, indent=1, sort_keys=True))
        (tmp / "report.md").write_text(markdown(doc, names))
    return Path(out)


def components(doc: dict) -> list[str]:
    """The components the report measured (denoiser first, as verify orders them)."""
    return sorted({c for r in doc["rows"] for c in r["errors"]}, key=lambda c: (c.startswith("text_"), c))


def markdown(doc: dict, names: Sequence[str] = ()) -> str:
    """The report as a Markdown table: one row per candidate, error and cosine per component; the plots."""
    comps = components(doc)
    head = ["candidate", "exact", "params", *(f"{c} err" for c in comps), *(f"{c} cos" for c in comps)]
    lines = [f"# compare on {doc['base']}", "", f"Reference: the inputs stacked by {doc['reference']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in doc["rows"]:
        cells = [r["label"], "yes" if r["exact"] else "no", f"{r['params']:,}"]
        cells += [f"{r['errors'][c]:.2e}" for c in comps] + [f"{r['cosines'][c]:.6f}" for c in comps]
        lines.append("| " + " | ".join(cells) + " |")
    if names:
        lines += ["", "## Plots", ""] + [f"![{n}]({n})" for n in names]
    return "\n".join(lines) + "\n"


def _plots(doc: dict, folder: Path) -> list[str]:
    """Per component: fidelity_vs_rank_<c>.png, size_vs_fidelity_<c>.png, per_layer_error_<c>.png (those
    with data); [] without matplotlib."""
    plt = plots.pyplot()
    if plt is None:
        return []
    jobs = []
    for c in components(doc):
        what = f"{c}: effect-relative error vs stacked"
        ranks = [(r["strategy"], r["rank"], r["label"], r["errors"][c]) for r in doc["rows"]]
        sizes = [(r["label"], r["params"], r["errors"][c]) for r in doc["rows"]]
        layers = [(r["label"], {m: e for m, e in r.get("module_errors", {}).items() if m.startswith(f"{c}.")})
                  for r in doc["rows"] if not r["exact"]]  # fmt: skip  (an exact one's errors are rounding)
        jobs += [
            (f"fidelity_vs_rank_{c}.png", lambda ax, p=ranks, w=what: plots.fidelity_vs_rank(ax, p, None, w)),
            (f"size_vs_fidelity_{c}.png", lambda ax, p=sizes, w=what: plots.size_vs_fidelity(ax, p, w)),
            (f"per_layer_error_{c}.png", lambda ax, s=layers: plots.per_layer(ax, s)),
        ]
    return plots.draw(plt, folder, jobs)
