"""Verify: merged adapters against the original inputs stacked by their own runtime (``merging.verify``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merging import strategies as registry
from merging.api.adapters import options_given
from merging.base.layout import BaseLayout
from merging.base.quantized import load_judged_base
from merging.core.adapter import Adapter, weighted
from merging.core.progress import Progress
from merging.errors import MergingError
from merging.eval.results import Report, judge_note
from merging.eval.verify import PROMPTS, Candidate, base_weights, claims_exact
from merging.eval.verify import verify as verify_lib
from merging.eval.verify_diffusers import verify_sd
from merging.formats import sources
from merging.merge import pipeline
from merging.merge.result import MergeResult, read_recipe
from merging.storage.atomic import atomic_file
from merging.storage.files import write_text

PIPELINE_TOLERANCE = 1e-4  # a diffusers pipeline's noise prediction and text encoders: exact at or below


def verify(
    inputs: Sequence[str | Path] | MergeResult, base: str | Path, *,
    merged: Sequence[str | Path | MergeResult] = (), strategies: Sequence[str] = (),
    weights: Sequence[float] | None = None, rank: int | None = None, energy: float | None = None,
    density: float = 0.5, seed: int = 0, device: str = "auto", device_map: str | None = None,
    dtype: str = "float32", prompts: Sequence[str] | Path | None = None, max_new_tokens: int = 8,
    save: str | Path | None = None, progress: Progress | None = None, inner: str | None = None,
    alpha: float | None = None, common_fraction: float | None = None, base_quant: str | None = None,
) -> Report:  # fmt: skip
    """Check merged adapters reproduce the inputs stacked active, on the real base model (``merging verify``).

    Args:
        inputs: the original adapters (as ``merging.load_inputs`` takes them), or a MergeResult: its
            inputs, and itself as a candidate.
        base: the base model: a folder, a .gguf file, or a Hub id in the cache.
        merged: merged folders (their recipe gives the weights and the exactness claim) or MergeResults.
        strategies: merge on the fly with these strategies (``rank``, ``energy``, ``density``, ``seed``,
            and the literature methods' ``inner``, ``alpha``, ``common_fraction`` when given).
        weights: the inputs' weights (default: the first merged folder's recipe's, else 1 each).
        device, device_map, dtype: where and how the base is loaded.
        prompts: the batch (default: a fixed set), or a file with one prompt per line.
        max_new_tokens: length of the greedy continuations compared.
        save: also write the report's JSON to this file (atomically).
        progress: called as progress(done, total, item).
        base_quant: load the base through bitsandbytes in nf4/fp4/int8, as QLoRA adapters were trained.

    Returns:
        The Report: one row per candidate with its verdict (``report.failed`` when an exact one fails).
    """
    if isinstance(inputs, MergeResult):
        given = inputs
        merged, inputs, weights = [given, *merged], [], weights or given.weights or None
    results = [m for m in merged if isinstance(m, MergeResult)]
    folders = [Path(m) for m in merged if not isinstance(m, MergeResult)]
    specs = [str(s) for s in inputs]
    task = sources.task_type([*specs, *map(str, folders)])
    model, tokenizer, layout = load_judged_base(base, base_quant, task, device=device, dtype=dtype,
                                                device_map=device_map)  # fmt: skip
    if specs:
        adapters = [ad for ad, _ in sources.load_inputs(specs, base=layout)]
    else:
        adapters = [ad.refine_targets(layout.modules) for ad in results[0].inputs]
    candidates = [Candidate("merged", [a.refine_targets(layout.modules) for a in r.adapters], r.strategy,
                            r.exact) for r in results]  # fmt: skip
    recipe_weights = None
    for folder in folders:
        found = [ad.refine_targets(layout.modules) for ad in sources.load(folder, base=layout)]
        recipe = read_recipe(folder)
        recipe_weights = recipe_weights or (recipe.weights if recipe else None) or None
        exact = claims_exact(recipe, adapters, found)
        strategy = recipe.strategy if recipe else None
        candidates.append(Candidate(str(folder), found, strategy, exact, folder=folder))
    if recipe_weights and len(recipe_weights) != len(adapters):
        recipe_weights = None  # the recipe merged other inputs: compare against these, weight 1 each
    pairs = weighted(adapters, weights or recipe_weights)
    options = options_given(rank=rank, energy=energy, density=density, seed=seed, inner=inner, alpha=alpha,
                            common_fraction=common_fraction)  # fmt: skip
    for name in strategies:
        result = pipeline.merge(pairs, name, options, base_weights=base_weights(model))
        label = f"{name} r={rank}" if registry.get(name).ranked and rank is not None else name
        candidates.append(Candidate(label, result.adapters, name, result.exact))
    lines = _prompts(prompts)
    report = verify_lib(model, tokenizer, pairs, candidates, prompts=lines, max_new_tokens=max_new_tokens,
                        base_name=str(base), progress=progress)  # fmt: skip
    if save:
        with atomic_file(Path(save), force=True) as tmp:
            write_text(tmp, report.to_json() + "\n")
    return report


def _prompts(prompts: Sequence[str] | Path | None) -> list[str]:
    """The prompt batch: the given lines, a file's lines, or the fixed default set (blank lines dropped)."""
    if prompts is None:
        return [p for p in PROMPTS if p.strip()]
    lines = Path(prompts).read_text().splitlines() if isinstance(prompts, Path) else list(prompts)
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise MergingError(f"{prompts}: no prompts (one per line)")
    return lines


def verify_pipeline(
    inputs: Sequence[str | Path], base: str | Path, *, merged: Sequence[str | Path] = (),
    strategies: Sequence[str] = (), weights: Sequence[float] | None = None, rank: int | None = None,
    energy: float | None = None, density: float = 0.5, seed: int = 0, inner: str | None = None,
    alpha: float | None = None, common_fraction: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``verify`` on a diffusers pipeline folder: the UNet's noise prediction and the text encoders.

    Returns:
        The ``merging verify --json`` document (schema merging.verify_sd/1): base, tolerance, the reference
        runtime, and one row per candidate (verdict, relative error, errors per part, loaded by).
    """
    layout = BaseLayout.from_folder(base)
    specs = [str(s) for s in inputs]
    adapters = [ad.refine_targets(layout.modules) for ad, _ in sources.load_inputs(specs, base=layout)]
    pairs = weighted(adapters, weights)
    candidates = []
    for file in merged:
        found = [ad.refine_targets(layout.modules) for ad in sources.load(file, base=layout)]
        candidates.append((str(file), found, _claims_exact(found)))
    options = options_given(rank=rank, energy=energy, density=density, seed=seed, inner=inner, alpha=alpha,
                            common_fraction=common_fraction)  # fmt: skip
    for name in strategies:
        result = pipeline.merge(pairs, name, options)
        candidates.append((name, result.adapters, result.exact))
    files = [Path(s) for s in specs] if all(Path(s).is_file() for s in specs) else None
    rows, reference = verify_sd(Path(base), pairs, candidates, files)
    return {"base": str(base), "tolerance": PIPELINE_TOLERANCE, "reference": reference,
            "rows": [{"name": r.name, "verdict": r.verdict(PIPELINE_TOLERANCE), "effect_rel_error": r.error,
                      "errors": dict(r.errors), "loaded_by": r.loader} for r in rows]}  # fmt: skip


def _claims_exact(merged: Sequence[Adapter]) -> bool:
    """Whether a merged kohya file's recipe (metadata ``merging.recipe``) names an always-exact strategy."""
    meta = merged[0].config.get("metadata", {}) if len(merged) == 1 else {}
    try:
        name = json.loads(meta.get("merging.recipe", "{}")).get("strategy")
        return bool(name) and registry.get(name).exact == "always"
    except (ValueError, MergingError):
        return False


def judged_by(report: Report) -> str:
    """One paragraph naming who stacked the inputs and who loaded each merged result."""
    return judge_note(report.reference_reason, report.reference_checks, report.rows)
