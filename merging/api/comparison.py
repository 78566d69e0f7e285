"""Compare strategies and ranks side by side on the same inputs, judged and measured (``merging.compare``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from merging import strategies as registry
from merging.base.load import load_base
from merging.core.adapter import Pair
from merging.core.progress import Progress
from merging.errors import MergingError
from merging.eval import compare as report_lib
from merging.eval import data as eval_data
from merging.eval import tune as tune_lib
from merging.eval.results import Comparison
from merging.export import report as report_out
from merging.formats import sources
from merging.merge import pipeline
from merging.storage.files import refuse_overlap
from merging.strategies import Options

Stages = Callable[[str], AbstractContextManager[Progress | None]]  # a progress callback per named stage


def _no_stages(name: str) -> AbstractContextManager[None]:
    return nullcontext()


def compare(
    inputs: Sequence[str | Path], base: str | Path, out: str | Path, *,
    strategies: Sequence[str] | str = ("cat", "svd", "ties"), ranks: Sequence[int] = (),
    weights: Sequence[float] | None = None, density: float = 0.5, seed: int = 0, inner: str = "ties",
    alpha: float = 1.0, common_fraction: float = 0.8, evals: Mapping[str, str | Path] | None = None,
    budgets: Sequence[int | str] = (), tune_steps: int | None = None, device: str = "auto",
    dtype: str = "float32", loss_dtype: str = "auto", force: bool = False, stages: Stages = _no_stages,
) -> Comparison:  # fmt: skip
    """Run strategies (and ranks) on the same adapters; write report.json/.md/.html and plots to ``out``.

    Args:
        inputs: the adapters (as ``merging.load_inputs`` takes them); their names key ``evals``.
        base: the base model: a folder, a .gguf file, or a Hub id in the cache (with its tokenizer).
        out: the report folder.
        strategies: strategy names, or "all".
        ranks: ranks for the rank-based strategies.
        weights: the inputs' weights (default 1 each).
        density, seed, inner, alpha, common_fraction: options shared by every variant.
        evals: input name → a JSONL file of held-out (prompt, answer) texts: skill retention per variant.
        budgets: svd under one global parameter budget: parameter counts, or "rN" for the size uniform
            rank N takes on these inputs.
        tune_steps: add a row for the merge ``tune`` learns in this many steps (needs ``evals``); every
            row's retention is then measured on the evals' reporting split.
        device, dtype: where and how the base is loaded.
        loss_dtype: what the held-out losses are computed in: "float32", "bfloat16" (autocast, float32
            accumulation; every row's losses alike), or "auto": bfloat16 where the device has native
            bfloat16 units (AVX-512 BF16 / AMX, a CUDA GPU that supports it), else float32. Recorded in
            report.json; verify's figures and PASS/FAIL stay in ``dtype``.
        force: replace an existing report folder.
        stages: gives a progress callback for each stage ("tuning", "comparing") as a context manager.

    Returns:
        The Comparison as written (with its plots).
    """
    if loss_dtype not in eval_data.LOSS_DTYPES:
        choices = ", ".join(eval_data.LOSS_DTYPES)
        raise MergingError(f"`loss_dtype` must be one of {choices}, got {loss_dtype!r}")
    model, tokenizer = load_base(base, device, dtype, task_type=sources.task_type([str(s) for s in inputs]))
    param = next(model.parameters())
    lowered = eval_data.loss_dtype(loss_dtype, param.device, param.dtype)
    if tokenizer is None:
        raise MergingError(f"{base}: compare needs a tokenizer beside the model")
    pairs = sources.load_inputs([str(s) for s in inputs], base=model, weights=weights)
    refuse_overlap(Path(out), [base, *(ad.source for ad, _ in pairs)])
    label = next((a.base_model for a, _ in pairs if a.base_model), None) or str(base)
    eval_sets = {name: eval_data.read_eval(Path(path)) for name, path in (evals or {}).items()}
    chosen = registry.names() if strategies == "all" else list(strategies)
    variants = report_lib.variants(chosen, list(ranks))
    variants += [report_lib.Variant("svd", budget=b) for b in budget_sizes(budgets, pairs)]
    extra: list[report_lib.Extra] = []
    notes: tuple[str, ...] = ()
    search = None
    if tune_steps is not None:
        if not eval_sets:
            raise MergingError("`tune_steps` needs `evals` to tune on")
        split = tune_lib.split_evals(eval_sets, seed=seed)
        with stages("tuning") as update:
            row, search = _tuned_row(model, tokenizer, pairs, split.tune, tune_steps, seed, update)
        extra, eval_sets = [row], split.report
        n_tune, n_report = sum(map(len, split.tune.values())), sum(map(len, split.report.values()))
        notes = (
            f"Every row's retention is measured on the reporting split ({n_report} examples); the tuned "
            f"row's weights were learnt on the other {n_tune} (seed {seed}), never on these.",
        )
    with stages("comparing") as update:
        opts = Options(density=density, seed=seed, inner=inner, alpha=alpha,  # type: ignore[arg-type]
                       common_fraction=common_fraction)  # (Options checks inner)
        report = report_lib.compare(model, tokenizer, pairs, variants, evals=eval_sets, options=opts,
                                    base_name=label, progress=update, extra=extra,
                                    loss_dtype=lowered if eval_sets else torch.float32)  # fmt: skip
    if eval_sets and lowered != param.dtype:
        notes += (f"Held-out losses in {report.loss_dtype} (`--loss-dtype {loss_dtype}`): every row's alike, "
                  f"the weights {report.dtype}; verification and PASS/FAIL in {report.dtype}.",)  # fmt: skip
    report = replace(report, notes=notes, search=search)
    return report_out.write_report(report, Path(out), force=force)


def budget_sizes(budgets: Sequence[int | str], pairs: Sequence[Pair]) -> list[int]:
    """Budgets as parameter counts: an integer, or "rN" for what uniform svd rank N keeps of ``pairs``."""
    out = []
    for item in budgets:
        text = str(item).strip()
        if text.startswith("r") and text[1:].isdigit():
            result = pipeline.merge(pairs, "svd", Options(rank=int(text[1:])))
            out.append(sum(a.numel for a in result.adapters if a.name == "lora"))
        elif text.isdigit():
            out.append(int(text))
        else:
            raise MergingError(f"`budget` {text!r}: a parameter count or rN")
    return out


def _tuned_row(model: Any, tokenizer: Any, pairs: Sequence[Pair], evals: dict, steps: int, seed: int,
               progress: Progress | None) -> tuple[report_lib.Extra, dict[str, Any]]:  # fmt: skip
    """The tuned merge as a report row, and its search record (weights learnt on ``evals``)."""
    started = time.perf_counter()
    found = tune_lib.tune(model, tokenizer, pairs, evals, settings=tune_lib.Settings(steps=steps, seed=seed),
                          progress=progress)  # fmt: skip
    merged_pairs, layer_w = tune_lib.merge_inputs([ad for ad, _ in pairs], found.weights)
    result = pipeline.merge(merged_pairs, "cat", layer_weights=layer_w)
    label = "tuned cat"
    search = {
        "label": label, "weights": {ad.name: w for ad, w in merged_pairs},
        "trace": [{"step": s.step, "objective": s.objective, "on": s.on} for s in found.steps],
        "tuning_objective": {"start": found.start.objective, "end": found.end.objective},
    }  # fmt: skip
    return report_lib.Extra(label, result, time.perf_counter() - started), search


def compare_judged(report: Comparison) -> str:
    """One paragraph naming who stacked the inputs and who loaded each variant's merge."""
    return report_out.judged(report)


def compare_best_mark(report: Comparison, label: str, skill: str) -> str:
    """"*" on the row that keeps ``skill`` best, "**" when its lead over the runner-up is significant."""
    return report_out.best_mark(report, label, skill)


def compare_pipeline(
    inputs: Sequence[str | Path], base: str | Path, chosen: Sequence[str], ranks: Sequence[int],
    out: str | Path, *, weights: Sequence[float] | None = None, density: float = 0.5, seed: int = 0,
    inner: str = "ties", alpha: float | None = None, common_fraction: float | None = None,
    force: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """``compare`` on a diffusers pipeline folder: each strategy's noise-prediction and text-encoder fidelity
    (effect-relative error, cosine) against diffusers stacking the inputs; writes the report folder.

    Returns:
        The report document (its ``schema`` field names it).
    """
    from merging.base.layout import BaseLayout
    from merging.core.adapter import weighted
    from merging.eval.compare_pipeline import compare_pipeline as measure
    from merging.eval.compare_pipeline import write_report

    given = {"alpha": alpha, "common_fraction": common_fraction}
    set_ = {k: v for k, v in given.items() if v is not None}
    options = Options(density=density, seed=seed, inner=inner, **set_)  # type: ignore[arg-type]
    layout = BaseLayout.from_folder(Path(base))
    specs = [str(s) for s in inputs]
    adapters = [ad.refine_targets(layout.modules) for ad, _ in sources.load_inputs(specs, base=layout)]
    pairs = weighted(adapters, weights)
    refuse_overlap(Path(out), [Path(base), *(ad.source for ad, _ in pairs)])
    files = [Path(s) for s in specs] if all(Path(s).is_file() for s in specs) else None
    doc = measure(Path(base), pairs, report_lib.variants(list(chosen), list(ranks)), options, files)
    write_report(doc, Path(out), force=force)
    return doc
