"""Tune: learn the inputs' merge weights on eval sets, write the merge and a recipe remaking it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from merging.api.adapters import options_given
from merging.base.load import load_base
from merging.core.adapter import weighted
from merging.core.progress import Progress
from merging.errors import MergingError
from merging.eval import data as eval_data
from merging.eval import tune as tune_lib
from merging.eval.verify import base_weights
from merging.formats import peft as peft_format
from merging.formats import sources
from merging.merge import pipeline
from merging.merge.result import MergeResult, recipe, write_result
from merging.storage.atomic import atomic_folder
from merging.storage.files import refuse_overlap, write_text
from merging.strategies import Options

TUNE_RECIPE = "tune_recipe.toml"  # in the output folder: `merging merge --recipe` remakes the merge
TUNE_RECORD = "tune.json"  # the search and the retention measured


@dataclass(frozen=True)
class Tuned:
    """A tuning run: the weights per input, the search, retention on the reporting split, what was written."""

    weights: dict[str, float]  # input name → its learnt weight (adapter granularity's, else the base)
    found: tune_lib.TuneResult
    measured: dict[str, Any]  # "before" (stacked) and "after" (tuned): skill → retention, reporting split
    result: MergeResult
    plots: list[str]


def tune(
    inputs: Sequence[str | Path], base: str | Path, evals: Mapping[str, str | Path], out: str | Path, *,
    granularity: str = "adapter", objective: str = "worst", strategy: str = "cat", rank: int | None = None,
    budget: int | None = None, steps: int = 6, lr: float = 0.3, batch: int = 4, seed: int = 0,
    tune_fraction: float = 0.5, device: str = "auto", force: bool = False, progress: Progress | None = None,
    density: float | None = None, alpha: float | None = None, common_fraction: float | None = None,
    knobs: Sequence[str] | None = None, evaluations: int = 40, patience: int = 15,
    regularisation: float = 3.0, tune_dtype: str = "auto",
) -> Tuned:  # fmt: skip
    """Learn the merge weights that keep every skill and write the merge with tune_recipe.toml
    (``merging merge --recipe`` remakes it byte for byte) and tune.json (``merging tune``).

    Args:
        inputs: the adapters (as ``merging.load_inputs`` takes them); their names key ``evals``.
        base: the base model: a folder, a .gguf file, or a Hub id in the cache (with its tokenizer).
        evals: input name → a JSONL file of (prompt, answer) texts, split into tuning and reporting parts.
        out: the output folder.
        granularity: "adapter" (one weight per input) or "layer" (one per input per layer).
        objective: "worst" (the worst skill's retention), "mean", or λ in [0, 1]: λ·worst + (1 − λ)·mean.
        strategy: cat (exact, tuned by gradient); any other strategy gradient-free (scipy.optimize), with
            ``rank``/``budget`` and its own knobs (``density``, ``alpha``, ``common_fraction``: the start).
        steps, lr, batch, seed: the search (Adam's step or the free search's first step; examples per skill
            per step); the seed also seeds the split and DARE's drop masks, and the recipe records it.
        knobs: the strategy's knobs tuned with the weights (default: density for TIES/DARE, common_fraction
            for iso_cts; () for none).
        evaluations, patience: gradient-free: merges measured at most; stop after this many without gain.
        regularisation: per-layer weights: penalty on their mean squared distance from the per-input ones.
        tune_dtype: the search's losses: "float32", "bfloat16" (autocast, float32 accumulation), or "auto":
            bfloat16 where the device has native bfloat16 units. The reporting part is measured in float32.
        tune_fraction: the share of each eval file tuned on; the rest is the reporting part.
        device: where the base is loaded.
        force: replace an existing output folder.
        progress: called as progress(done, total, item).
    """
    specs = [_absolute(str(s)) for s in inputs]
    model, tokenizer = load_base(base, device, "float32", task_type=sources.task_type(specs))
    if tokenizer is None:
        raise MergingError(f"{base}: tune needs a tokenizer beside the model")
    pairs = sources.load_inputs(specs, base=model)
    refuse_overlap(Path(out), [base, *(ad.source for ad, _ in pairs)])
    eval_sets = {name: eval_data.read_eval(Path(path)) for name, path in evals.items()}
    split = tune_lib.split_evals(eval_sets, seed=seed, fraction=tune_fraction)
    how = tune_lib.check_objective(objective)
    settings = tune_lib.Settings(granularity, how, steps, lr, batch, seed,  # type: ignore[arg-type]
                                 evaluations, patience, knobs=None if knobs is None else tuple(knobs),
                                 regularisation=regularisation, dtype=tune_dtype)  # fmt: skip
    options = options_given(rank=rank, budget=budget, seed=seed, density=density, alpha=alpha,
                            common_fraction=common_fraction)  # fmt: skip
    found = tune_lib.tune(model, tokenizer, pairs, split.tune, settings=settings, strategy=strategy,
                          options=options, progress=progress)  # fmt: skip
    adapters = [ad for ad, _ in pairs]
    options = replace(options, **found.knobs)  # type: ignore[arg-type]
    merged_pairs, layer_w = tune_lib.merge_inputs(adapters, found.weights)
    result = pipeline.merge(merged_pairs, strategy, options, base_weights=base_weights(model),
                            layer_weights=layer_w)  # fmt: skip
    measured = tune_lib.held_out(model, tokenizer, pairs, weighted(result.adapters), split.report, seed=seed)
    record = _record(found, measured, split)
    with atomic_folder(Path(out), force=force, owns=_owned) as tmp:  # the merge and its records, or nothing
        write_result(result, tmp, recipe(result, adapters).to_dict(), force=True)  # tmp is empty
        write_text(tmp / TUNE_RECIPE, recipe_toml(specs, base, strategy, found, options))
        write_text(tmp / TUNE_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
        plots = _plots(record, tmp)
    return Tuned({ad.name: w for ad, w in merged_pairs}, found, measured, result, plots)


def _owned(folder: Path) -> set[str]:
    """What a new tune replaces in an old output: the adapter's files and the tune's own records and plots."""
    return peft_format.owned(folder) | {TUNE_RECIPE, TUNE_RECORD, "tune_search.png", "tune_retention.png"}


def _absolute(spec: str) -> str:
    """An input spec (``path`` or ``name=path``) with a local path made absolute (Hub ids as given)."""
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).exists():
        return str(Path(spec).resolve()) if Path(spec).exists() else spec
    return f"{name}={Path(path).resolve()}" if Path(path).exists() else spec


def recipe_toml(inputs: Sequence[str], base: str | Path, strategy: str, found: tune_lib.TuneResult,
                options: Options) -> str:  # fmt: skip
    """A `merging merge --recipe` file that remakes the tuned merge (inputs and base as absolute paths)."""
    q = json.dumps  # a JSON string is a TOML basic string
    lines = ["# Made by `merging tune`; `merging merge --recipe THIS -o OUT` remakes the tuned merge.",
             f"inputs = [{', '.join(q(s) for s in inputs)}]", f"strategy = {q(strategy)}",
             f"weights = [{', '.join(repr(w) for w in found.weights.inputs)}]"]  # fmt: skip
    if Path(base).is_dir():
        lines.append(f"base = {q(str(Path(base).resolve()))}")
    for key in ("rank", "budget", "density", "alpha", "common_fraction", "seed"):  # given, or tuned
        value = getattr(options, key)
        if value is not None and (key in found.knobs or value != getattr(Options(), key)):
            lines.append(f"{key} = {value!r}")
    if found.weights.layers:
        lines.append("\n[layer_weights]")
        lines += [f"{q(k)} = [{', '.join(repr(w) for w in v)}]" for k, v in found.weights.layers.items()]
    return "\n".join(lines) + "\n"


def _record(found: tune_lib.TuneResult, measured: dict, split: tune_lib.Split) -> dict:
    return {
        "strategy": found.strategy, "granularity": found.granularity, "knobs": found.knobs,
        "dtype": found.dtype,
        "weights": list(found.weights.inputs),
        "layer_weights": {k: list(v) for k, v in found.weights.layers.items()},
        "trace": [{"step": s.step, "objective": s.objective, "on": s.on, "retention": s.retention}
                  for s in found.steps],
        "tuning_objective": {"start": found.start.objective, "end": found.end.objective,
                             "chosen": found.chosen.objective},
        "split": {n: {"tune": len(split.tune[n]), "report": len(split.report[n])} for n in split.tune},
        "reporting_split": measured,
    }  # fmt: skip


def _plots(record: dict, folder: Path) -> list[str]:
    """tune_search.png and tune_retention.png in ``folder`` (those with data); [] without matplotlib."""
    from merging.export.plots import draw_before_after, draw_search, pyplot

    plt = pyplot()
    if plt is None:
        return []
    out = []
    trace = [(s["step"], s["objective"], s["on"]) for s in record["trace"]]
    if draw_search(plt, trace, folder / "tune_search.png"):
        out.append("tune_search.png")
    before, after = record["reporting_split"]["before"], record["reporting_split"]["after"]
    intervals = record["reporting_split"].get("intervals")
    if draw_before_after(plt, before, after, folder / "tune_retention.png", intervals):
        out.append("tune_retention.png")
    return out
