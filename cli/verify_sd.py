"""`merging verify` on a diffusers pipeline folder: the UNet's noise prediction and the text encoders."""

from __future__ import annotations

import sys
from typing import Any

from .tables import Col, Grid, emit_json, say, sci, show


def show_report(doc: dict[str, Any], as_json: bool = False) -> None:
    """Print a pipeline verification (``merging.verify_pipeline``); exit 1 when an exact one fails."""
    if as_json:
        emit_json("merging.verify_sd/1", doc)
    else:
        cols = (Col("candidate"), Col("result"), Col("rel err", True), Col("worst part"), Col("loaded by"))
        cells = [[r["name"], r["verdict"], sci(r["effect_rel_error"]), max(r["errors"], key=r["errors"].get),
                  r["loaded_by"]] for r in doc["rows"]]  # fmt: skip
        title = f"verify on {doc['base']} (noise prediction, text encoders; exact at ≤ {doc['tolerance']:g})"
        show(Grid(title, cols, cells))
        say(f"reference: the inputs stacked by {doc['reference']}")
    if any(r["verdict"] == "FAIL" for r in doc["rows"]):
        sys.exit(1)
