"""`merging verify` on a diffusers pipeline folder: the UNet's noise prediction and the text encoders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from merging import strategies
from merging.base.layout import BaseLayout
from merging.core.adapter import weighted
from merging.errors import MergingError
from merging.eval.verify_diffusers import verify_sd
from merging.formats import sources
from merging.merge import pipeline as merge_lib
from merging.strategies import Options

from .tables import Col, Grid, emit_json, say, sci, show

TOLERANCE = 1e-4


def _claims_exact(merged) -> bool:
    """Whether a merged kohya file's recipe (metadata ``merging.recipe``) names an always-exact strategy."""
    meta = merged[0].config.get("metadata", {}) if len(merged) == 1 else {}
    try:
        name = json.loads(meta.get("merging.recipe", "{}")).get("strategy")
        return bool(name) and strategies.get(name).exact == "always"
    except (ValueError, MergingError):
        return False


def run(inputs, base: Path, merged_files, strategy_names, weights, options: Options, as_json=False) -> None:
    """Verify merged adapters on a pipeline folder; exit 1 when an exact one fails."""
    layout = BaseLayout.from_folder(base)
    adapters = [ad.refine_targets(layout.modules) for ad, _ in sources.load_inputs(inputs, base=layout)]
    pairs = weighted(adapters, weights)
    candidates = []
    for file in merged_files:
        merged = [ad.refine_targets(layout.modules) for ad in sources.load(file, base=layout)]
        candidates.append((str(file), merged, _claims_exact(merged)))
    for name in strategy_names:
        result = merge_lib.merge(pairs, name, options)
        candidates.append((name, result.adapters, result.exact))
    files = [Path(s) for s in inputs] if all(Path(s).is_file() for s in inputs) else None
    rows, reference = verify_sd(base, pairs, candidates, files)
    if as_json:
        emit_json("merging.verify_sd/1", {
            "base": str(base), "tolerance": TOLERANCE, "reference": reference,
            "rows": [{"name": r.name, "verdict": r.verdict(TOLERANCE), "effect_rel_error": r.error,
                      "errors": dict(r.errors), "loaded_by": r.loader} for r in rows],
        })  # fmt: skip
    else:
        cols = (Col("candidate"), Col("result"), Col("rel err", True), Col("worst part"), Col("loaded by"))
        cells = [[r.name, r.verdict(TOLERANCE), sci(r.error), max(r.errors, key=r.errors.get), r.loader]
                 for r in rows]  # fmt: skip
        title = f"verify on {base} (noise prediction, text encoders; exact at ≤ {TOLERANCE:g})"
        show(Grid(title, cols, cells))
        say(f"reference: the inputs stacked by {reference}")
    if any(r.verdict(TOLERANCE) == "FAIL" for r in rows):
        sys.exit(1)
