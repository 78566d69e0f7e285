"""`merging verify` on a diffusers pipeline folder: the UNet's noise prediction and the text encoders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.table import Table

from cli.common import console
from merging import merge as merge_lib
from merging import sources, strategies
from merging.adapter import weighted
from merging.basemodel import BaseLayout
from merging.errors import MergingError
from merging.sdverify import verify_sd
from merging.strategies import Options

TOLERANCE = 1e-4


def _claims_exact(merged) -> bool:
    """Whether a merged kohya file's recipe (metadata ``merging.recipe``) names an always-exact strategy."""
    meta = merged[0].config.get("metadata", {}) if len(merged) == 1 else {}
    try:
        name = json.loads(meta.get("merging.recipe", "{}")).get("strategy")
        return bool(name) and strategies.get(name).exact == "always"
    except (ValueError, MergingError):
        return False


def run(inputs, base: Path, merged_files, strategy_names, weights, options: Options) -> None:
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
    table = Table(title=f"verify on {base} (noise prediction, text encoders; exact at ≤ {TOLERANCE:g})")
    for col in ("candidate", "effect-rel err", "worst component", "loaded by", "result"):
        table.add_column(col, justify="right" if col in ("effect-rel err", "result") else "left")
    for r in rows:
        worst = max(r.errors, key=r.errors.get)
        table.add_row(r.name, f"{r.error:.2e}", worst, r.loader, r.verdict(TOLERANCE))
    console.print(table)
    console.print(f"reference: the inputs stacked by {reference}")
    if any(r.verdict(TOLERANCE) == "FAIL" for r in rows):
        sys.exit(1)
