"""compare on a diffusers pipeline: each strategy (and rank) against the inputs stacked, per component.

The figures are verify's (``verify_diffusers``): the denoiser's noise prediction and each text encoder's
hidden states on seeded inputs, the reference diffusers stacking the input files where it loads them whole
(else ΔW added, and the report says why), each merge loaded the way diffusers loads it. Per candidate and
component: effect-relative error ‖y − y_ref‖ / ‖y_ref − y_base‖ and the cosine of the effects
(y − y_base, y_ref − y_base); the merged adapter's size; and per module the weight-space error
‖ΔW_merged − ΔW_stack‖ / ‖ΔW_stack‖ from factors (where every delta is additive). ``export.report_pipeline``
writes it as report.json, report.md and the plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from merging.core import dora
from merging.core.adapter import Adapter, Pair, stacks, weighted
from merging.core.deltas import AdditiveDelta
from merging.eval import verify
from merging.eval.compare import Variant
from merging.eval.verify_diffusers import verify_sd
from merging.merge import pipeline as merge_lib
from merging.strategies import Options

SCHEMA = "merging.compare_pipeline/1"


def compare_pipeline(
    folder: Path, pairs: Sequence[Pair], variants: Sequence[Variant], options: Options,
    input_files: Sequence[Path] | None = None,
) -> dict:  # fmt: skip
    """Every variant merged and judged on the pipeline; the report as a JSON-ready dict."""
    candidates, sizes, modules = [], {}, {}
    for v in variants:
        result = merge_lib.merge(pairs, v.strategy, replace(options, rank=v.rank or options.rank))
        candidates.append((v.label, result.adapters, result.exact))
        sizes[v.label] = sum(d.numel for ad in result.adapters for d in ad.deltas.values())
        modules[v.label] = module_errors(pairs, result.adapters)
    rows, reference = verify_sd(folder, pairs, candidates, input_files)
    by_label = {v.label: v for v in variants}
    return {
        "schema": SCHEMA, "base": str(folder), "reference": reference,
        "inputs": [{"source": str(ad.source), "weight": w} for ad, w in pairs],
        "rows": [{"label": r.name, "strategy": by_label[r.name].strategy, "rank": by_label[r.name].rank,
                  "exact": r.exact, "effect_rel_error": r.error, "errors": dict(r.errors),
                  "cosines": dict(r.cosines), "params": sizes[r.name], "loaded_by": r.loader,
                  "module_errors": modules[r.name]} for r in rows],
    }  # fmt: skip


def module_errors(inputs: Sequence[Pair], merged: Sequence[Adapter]) -> dict[str, float]:
    """Per module ‖ΔW_merged − ΔW_stack‖_F / ‖ΔW_stack‖_F from factors ({} unless every delta is additive:
    the others need the base weights)."""
    plans = (stacks(inputs).deltas, stacks(weighted(merged)).deltas)
    if not all(isinstance(d, AdditiveDelta) and not dora.is_dora(d) for p in plans for s in p.values()
               for d, _ in s):  # fmt: skip
        return {}
    return verify.module_errors(None, inputs, merged)
