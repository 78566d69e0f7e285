"""`merging verify`: merged adapters against the inputs stacked active, on the real base model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from merging import strategies
from merging.base import pipelines as sdbase
from merging.base.layout import BaseLayout
from merging.base.load import load_base
from merging.base.quantized import QUANTS, load_quantized_base
from merging.core.adapter import weighted
from merging.errors import MergingError
from merging.eval.results import Report, judge_note
from merging.eval.verify import PROMPTS, Candidate, base_weights, claims_exact, verify
from merging.formats import sources
from merging.merge import pipeline as merge_lib
from merging.merge import result as result_lib
from merging.storage.atomic import atomic_file
from merging.storage.files import write_text
from merging.strategies import Options
from merging.strategies.base import INNER

from . import tables
from .common import FloatList, complete_path, complete_strategy, progress_bar
from .tables import Col, Grid, emit_json, pct, say, sci

VERIFY_COLS = (Col("candidate"), Col("result"), Col("strategy"), Col("rel err", True), Col("max |Δ|", True),
               Col("KL", True), Col("top-1", True), Col("greedy", True), Col("ΔW err", True))  # fmt: skip


def rows(report: Report) -> list[list[str]]:
    """The verification table's cells: the verdict beside the name, numbers in compact form."""
    return [[r.name, r.verdict, r.strategy or "", sci(r.effect_rel_error), sci(r.max_abs_diff), sci(r.kl),
             pct(r.top1_agreement), pct(r.greedy_agreement), sci(r.weight_error_max)]
            for r in report.rows]  # fmt: skip


def show(report: Report) -> None:
    """The verification table and who judged it."""
    title = f"verify on {report.base} ({report.device}, {report.dtype}; exact at ≤ {report.tolerance:g})"
    tables.show(Grid(title, VERIFY_COLS, rows(report)))
    say(judge_note(report.reference_reason, report.reference_checks, report.rows))


def _options(rank, energy, density, seed, inner, alpha, common_fraction) -> Options:
    """The options verify's --strategy merges with (the literature methods' defaults unless given)."""
    given = {"inner": inner, "alpha": alpha, "common_fraction": common_fraction}
    extra = {k: v for k, v in given.items() if v is not None}
    return Options(rank=rank, energy=energy, density=density, seed=seed, **extra)


@click.command("verify")
@click.argument("inputs", nargs=-1, required=True, shell_complete=complete_path)
@click.option("--base", required=True, shell_complete=complete_path,
              help="Base model: a folder, a .gguf file, or a Hub id in the cache.")  # fmt: skip
@click.option("--merged", "merged_dirs", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="A merged adapter folder to check (repeatable).")  # fmt: skip
@click.option("--strategy", "-s", "strategy_names", multiple=True, shell_complete=complete_strategy,
              help="Merge on the fly with this strategy.")  # fmt: skip
@click.option("--weights", "-w", type=FloatList(), help="Input weights (default: the recipe's, else 1).")
@click.option("--rank", type=int)
@click.option("--energy", type=float)
@click.option("--density", type=float, default=0.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--inner", type=click.Choice(INNER), help="knots/core: the merge in the shared basis (ties).")
@click.option("--alpha", type=float, help="knots/core/tsv/iso_c/iso_cts: global scale (default 1).")
@click.option("--common-fraction", type=float, help="iso_cts: share of the rank kept common (default 0.8).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--device-map", help="'auto' spreads a base larger than one device over GPUs and CPU (accelerate)."
)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
)
@click.option(
    "--prompts", type=click.Path(exists=True, path_type=Path), help="A file with one prompt per line."
)
@click.option("--max-new-tokens", type=int, default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema merging.verify/1).")
@click.option("--save", type=click.Path(path_type=Path), help="Also write the JSON report to this file.")
@click.option("--base-quant", type=click.Choice(QUANTS),
              help="Load the base through bitsandbytes as QLoRA adapters were trained (float32 compute).")
def verify_cmd(inputs, base, merged_dirs, strategy_names, weights, rank, energy, density, seed, inner, alpha,
               common_fraction, device, device_map, dtype, prompts, max_new_tokens, as_json,
               save, base_quant) -> None:  # fmt: skip
    """Check merged adapters reproduce the inputs stacked active; exit 1 when an exact one fails.

    Example: merging verify --base BASE a/ b/ -s cat -s svd --rank 4
    """
    if not merged_dirs and not strategy_names:
        raise click.UsageError("give --merged OUT or --strategy NAME (or both)")
    if sdbase.is_pipeline(Path(base)):  # Stable Diffusion: the denoiser and text encoders
        from . import verify_sd

        options = _options(rank, energy, density, seed, inner, alpha, common_fraction)
        return verify_sd.run(inputs, Path(base), merged_dirs, strategy_names, weights, options, as_json)
    task = sources.task_type([*inputs, *map(str, merged_dirs)])
    if base_quant:
        model, tokenizer = load_quantized_base(base, base_quant, task)
    else:
        model, tokenizer = load_base(base, device, dtype, device_map=device_map, task_type=task)
    layout = BaseLayout.from_folder(base, task) if base_quant else BaseLayout.from_model(model)
    adapters = [ad for ad, _ in sources.load_inputs(inputs, base=layout)]
    candidates = []
    recipe_weights = None
    for folder in merged_dirs:
        merged = [ad.refine_targets(layout.modules) for ad in sources.load(folder, base=layout)]
        recipe = result_lib.read_recipe(folder)
        recipe_weights = recipe_weights or (recipe.weights if recipe else None) or None
        exact = claims_exact(recipe, adapters, merged)
        strategy = recipe.strategy if recipe else None
        candidates.append(Candidate(str(folder), merged, strategy, exact, folder=Path(folder)))
    if recipe_weights and len(recipe_weights) != len(adapters):
        recipe_weights = None  # the recipe merged other inputs: compare against these, weight 1 each
    pairs = weighted(adapters, weights or recipe_weights)
    options = _options(rank, energy, density, seed, inner, alpha, common_fraction)
    for name in strategy_names:
        result = merge_lib.merge(pairs, name, options, base_weights=base_weights(model))
        label = f"{name} r={rank}" if strategies.get(name).ranked and rank is not None else name
        candidates.append(Candidate(label, result.adapters, name, result.exact))
    lines = [ln for ln in (Path(prompts).read_text().splitlines() if prompts else PROMPTS) if ln.strip()]
    if not lines:
        raise MergingError(f"{prompts}: no prompts (one per line)")
    with progress_bar("verifying") as update:
        report = verify(model, tokenizer, pairs, candidates,
                        prompts=lines, max_new_tokens=max_new_tokens,
                        base_name=str(base), progress=update)  # fmt: skip
    if save:
        with atomic_file(Path(save), force=True) as tmp:
            write_text(tmp, report.to_json() + "\n")
    if as_json:
        emit_json("merging.verify/1", report.to_dict())
    else:
        show(report)
    if report.failed:
        sys.exit(1)
