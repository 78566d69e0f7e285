"""`merging compare` on a diffusers pipeline folder: noise-prediction and text-encoder fidelity."""

from __future__ import annotations

from pathlib import Path

from merging.base.layout import BaseLayout
from merging.core.adapter import weighted
from merging.eval import compare as report_lib
from merging.eval.compare_pipeline import SCHEMA, compare_pipeline, write_report
from merging.formats import sources
from merging.storage.files import refuse_overlap
from merging.strategies import Options

from .tables import Col, Grid, emit_json, say, sci, show


def run(inputs, base: Path, chosen, ranks, weights, options: Options, out: Path, force, as_json) -> None:
    """Compare strategies on a pipeline folder; write the report folder."""
    layout = BaseLayout.from_folder(base)
    adapters = [ad.refine_targets(layout.modules) for ad, _ in sources.load_inputs(inputs, base=layout)]
    pairs = weighted(adapters, weights)
    refuse_overlap(out, [base, *(ad.source for ad, _ in pairs)])
    files = [Path(s) for s in inputs] if all(Path(s).is_file() for s in inputs) else None
    doc = compare_pipeline(base, pairs, report_lib.variants(chosen, ranks), options, files)
    write_report(doc, out, force=force)
    if as_json:
        return emit_json(SCHEMA, doc)
    comps = sorted({c for r in doc["rows"] for c in r["errors"]})
    cols = (Col("candidate"), Col("params", True), *(Col(f"{c} err", True) for c in comps),
            Col("worst cos", True))  # fmt: skip
    cells = [[r["label"], f"{r['params']:,}", *(sci(r["errors"][c]) for c in comps),
              f"{min(r['cosines'].values()):.6f}"] for r in doc["rows"]]  # fmt: skip
    show(Grid(f"compare on {base} (noise prediction, text encoders)", cols, cells))
    say(f"reference: the inputs stacked by {doc['reference']}; report in {out}")
