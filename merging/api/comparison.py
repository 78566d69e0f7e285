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
from merging.api.adapters import options_given
from merging.base.quantized import load_judged_base
from merging.core.adapter import Pair
from merging.core.progress import Progress
from merging.errors import MergingError
from merging.eval import compare as report_lib
from merging.eval import data as eval_data
from merging.eval import tune as tune_lib
from merging.eval.results import Comparison
from merging.eval.verify import base_weights
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
    budgets: Sequence[int | str] = (), tune_steps: int | None = None,
    tune_strategies: Sequence[str] = ("cat",), device: str = "auto", dtype: str = "float32",
    force: bool = False, stages: Stages = _no_stages, base_quant: str | None = None,
    loss_dtype: str = "float32", tune_dtype: str = "auto",
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
        tune_steps: add a row for the merge ``tune`` learns with each of ``tune_strategies`` (needs
            ``evals``), this many Adam steps for cat, merges measured for the others (gradient-free);
            every row's retention is then measured on the evals' reporting split.
        tune_strategies: the strategies tuned (a "tuned NAME" row each), with the shared options.
        device, dtype: where and how the base is loaded.
        loss_dtype: what the held-out losses are computed in: "float32", "bfloat16" (autocast, float32
            accumulation; every row's losses alike), or "auto": bfloat16 where the device has native
            bfloat16 units (AVX-512 BF16 / AMX, a CUDA GPU that supports it), else float32. Recorded in
            report.json; verify's figures and PASS/FAIL stay in ``dtype``.
        tune_dtype: the tuning search's losses, chosen as ``loss_dtype`` (default "auto"): only the weights
            chosen depend on it; the tuned rows are measured like every row. Recorded in report.json
            ("search") and the tuned row's note.
        force: replace an existing report folder.
        stages: gives a progress callback for each stage ("tuning", "comparing") as a context manager.
        base_quant: load the base through bitsandbytes in nf4/fp4/int8, as QLoRA adapters were trained:
            every row is then judged against PEFT stacking the inputs on that quantised base.

    Returns:
        The Comparison as written (with its plots).
    """
    for key, value in (("loss_dtype", loss_dtype), ("tune_dtype", tune_dtype)):
        if value not in eval_data.LOSS_DTYPES:
            choices = ", ".join(eval_data.LOSS_DTYPES)
            raise MergingError(f"`{key}` must be one of {choices}, got {value!r}")
    budgets = _check_budgets(budgets)  # before the model loads, as the loss dtype
    for name in tune_strategies if tune_steps is not None else ():
        registry.get(name)  # an unknown name fails before the model loads, listing the valid ones
    task = sources.task_type([str(s) for s in inputs])
    if base_quant and (evals or tune_steps is not None):
        raise MergingError("--eval/--tune run the adapters through our runtime, which does not wrap "
                           "bitsandbytes layers: compare on the quantised base without them")  # fmt: skip
    model, tokenizer, layout = load_judged_base(base, base_quant, task, device=device, dtype=dtype)
    param = next(model.parameters())
    lowered = eval_data.loss_dtype(loss_dtype, param.device, param.dtype)
    if tokenizer is None:
        raise MergingError(f"{base}: compare needs a tokenizer beside the model")
    pairs = sources.load_inputs([str(s) for s in inputs], base=layout, weights=weights)
    refuse_overlap(Path(out), [base, *(ad.source for ad, _ in pairs)])
    label = next((a.base_model for a, _ in pairs if a.base_model), None) or str(base)
    label += f" ({base_quant}, bitsandbytes)" if base_quant else ""
    eval_sets = {name: eval_data.read_eval(Path(path)) for name, path in (evals or {}).items()}
    chosen = registry.names() if strategies == "all" else list(strategies)
    variants = report_lib.variants(chosen, list(ranks))
    variants += [report_lib.Variant("svd", budget=b) for b in budget_sizes(budgets, pairs)]
    extra: list[report_lib.Extra] = []
    notes: tuple[str, ...] = ()
    search = None
    opts = Options(density=density, seed=seed, inner=inner, alpha=alpha,  # type: ignore[arg-type]
                   common_fraction=common_fraction)  # (Options checks inner)
    if tune_steps is not None:
        if not eval_sets:
            raise MergingError("`tune_steps` needs `evals` to tune on")
        split = tune_lib.split_evals(eval_sets, seed=seed)
        runs = []
        for name in dict.fromkeys(tune_strategies):
            with stages(f"tuning {name}") as update:
                runs.append(_tuned_row(model, tokenizer, pairs, split.tune, name, tune_steps, opts, update,
                                       tune_dtype))  # fmt: skip
        extra, eval_sets = [row for row, _ in runs], split.report
        search = tuning_record([record for _, record in runs])
        n_tune, n_report = sum(map(len, split.tune.values())), sum(map(len, split.report.values()))
        notes = (
            f"Every row's retention is measured on the reporting split ({n_report} examples); the tuned "
            f"rows' weights were learnt on the other {n_tune} (seed {seed}), never on these.",
            *(tuning_note(record) for _, record in runs),
        )
    with stages("comparing") as update:
        report = report_lib.compare(model, tokenizer, pairs, variants, evals=eval_sets, options=opts,
                                    base_name=label, progress=update, extra=extra,
                                    fold_approximate=not base_quant,
                                    loss_dtype=lowered if eval_sets else torch.float32)  # fmt: skip
    if eval_sets and lowered != param.dtype:
        notes += (f"Held-out losses in {report.loss_dtype} (`--loss-dtype {loss_dtype}`): every row's alike, "
                  f"the weights {report.dtype}; verification and PASS/FAIL in {report.dtype}.",)  # fmt: skip
    report = replace(report, notes=notes, search=search)
    return report_out.write_report(report, Path(out), force=force)


def budget_sizes(budgets: Sequence[int | str], pairs: Sequence[Pair]) -> list[int]:
    """Budgets as parameter counts: an integer, or "rN" for what uniform svd rank N keeps of ``pairs``."""
    out = []
    for text in _check_budgets(budgets):
        if text.startswith("r"):
            result = pipeline.merge(pairs, "svd", Options(rank=int(text[1:])))
            out.append(sum(a.numel for a in result.adapters if a.name == "lora"))
        else:
            out.append(int(text))
    return out


def _check_budgets(budgets: Sequence[int | str]) -> list[str]:
    """The budgets as text, each a parameter count or "rN"; anything else refused in one line."""
    texts = [str(item).strip() for item in budgets]
    for text in texts:
        if not (text.isdigit() or text.startswith("r") and text[1:].isdigit()):
            raise MergingError(f"`budget` {text!r}: a parameter count or rN")
    return texts


def _tuned_row(model: Any, tokenizer: Any, pairs: Sequence[Pair], evals: dict, strategy: str, budget: int,
               options: Options, progress: Progress | None,
               dtype: str = "float32") -> tuple[report_lib.Extra, dict]:  # fmt: skip
    """The merge ``strategy`` tuned within ``budget`` (Adam steps for cat, merges measured for the others) as
    a report row, and its search record (weights learnt on ``evals``, the search's losses in ``dtype``)."""
    started = time.perf_counter()
    settings = tune_lib.Settings(steps=budget, evaluations=max(budget, 1), seed=options.seed, dtype=dtype)
    found = tune_lib.tune(model, tokenizer, pairs, evals, settings=settings, strategy=strategy,
                          options=options, progress=progress)  # fmt: skip
    searched = time.perf_counter() - started
    merged_pairs, layer_w = tune_lib.merge_inputs([ad for ad, _ in pairs], found.weights)
    chosen = replace(options, **found.knobs)  # type: ignore[arg-type]
    result = pipeline.merge(merged_pairs, strategy, chosen, base_weights=base_weights(model),
                            layer_weights=layer_w)  # fmt: skip
    label = f"tuned {strategy}"
    search = {
        "label": label, "strategy": strategy, "weights": {ad.name: w for ad, w in merged_pairs},
        "knobs": found.knobs, "evaluations": found.evaluations, "seconds": round(searched, 2),
        "dtype": found.dtype,
        "seconds_per_evaluation": round(searched / max(found.evaluations, 1), 2),
        "trace": [{"step": s.step, "objective": s.objective, "on": s.on} for s in found.steps],
        "tuning_objective": {"start": found.start.objective, "end": found.end.objective,
                             "chosen": found.chosen.objective},
    }  # fmt: skip
    return report_lib.Extra(label, result, time.perf_counter() - started), search


def tuning_record(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The report's search record: the run that ends highest on the tuning split (never chosen on the
    reporting split), with every run under "runs"."""
    best = max(runs, key=lambda r: r["tuning_objective"]["chosen"])
    return best | {"runs": list(runs)} if len(runs) > 1 else best


def tuning_note(record: dict[str, Any]) -> str:
    """One line on a tuned row: its weights and knobs, the objective on the tuning split, the cost."""
    weights = ", ".join(f"{k} {v:g}" for k, v in record["weights"].items())
    knobs = "".join(f", {k} {v:g}" for k, v in record["knobs"].items())
    t = record["tuning_objective"]
    searched = f", searched in {record['dtype']}" if record.get("dtype", "float32") != "float32" else ""
    return (f"{record['label']}: weights {weights}{knobs}; tuning objective {t['start']:.3f} → "
            f"{t['chosen']:.3f} in {record['evaluations']} evaluations, "
            f"{record['seconds_per_evaluation']:.1f} s each{searched}.")  # fmt: skip


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
    from merging.export.report_pipeline import write_report

    options = options_given(density=density, seed=seed, inner=inner, alpha=alpha,
                            common_fraction=common_fraction)  # fmt: skip
    layout = BaseLayout.from_folder(Path(base))
    specs = [str(s) for s in inputs]
    adapters = [ad.refine_targets(layout.modules) for ad, _ in sources.load_inputs(specs, base=layout)]
    pairs = weighted(adapters, weights)
    refuse_overlap(Path(out), [Path(base), *(ad.source for ad, _ in pairs)])
    files = [Path(s) for s in specs] if all(Path(s).is_file() for s in specs) else None
    doc = measure(Path(base), pairs, report_lib.variants(list(chosen), list(ranks)), options, files)
    write_report(doc, Path(out), force=force)
    return doc
