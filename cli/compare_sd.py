"""`merging compare` on a diffusers pipeline folder: the noise-prediction and text-encoder fidelity table."""

from __future__ import annotations

from pathlib import Path

from .tables import Col, Grid, emit_json, say, sci, show


def show_report(doc: dict, base: Path, out: Path, as_json: bool) -> None:
    """Print what ``merging.compare_pipeline`` measured (it has written the report folder)."""
    if as_json:
        return emit_json(doc["schema"], doc)
    comps = sorted({c for r in doc["rows"] for c in r["errors"]})
    cols = (Col("candidate"), Col("params", True), *(Col(f"{c} err", True) for c in comps),
            Col("worst cos", True))  # fmt: skip
    cells = [[r["label"], f"{r['params']:,}", *(sci(r["errors"][c]) for c in comps),
              f"{min(r['cosines'].values()):.6f}"] for r in doc["rows"]]  # fmt: skip
    show(Grid(f"compare on {base} (noise prediction, text encoders)", cols, cells))
    say(f"reference: the inputs stacked by {doc['reference']}; report in {out}")
