"""`merging verify`: merged adapters against the inputs stacked active, on the real base model."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from cli.common import FloatList, console, progress_bar
from merging import merge as merge_lib
from merging import sdbase, sources, strategies
from merging.adapter import weighted
from merging.basemodel import BaseLayout, load_base
from merging.errors import MergingError
from merging.fileio import atomic_file, write_text
from merging.results import Report, judge_note
from merging.strategies import Options
from merging.verify import PROMPTS, Candidate, base_weights, claims_exact, verify


def _fmt(v, spec=".2e") -> str:
    return "" if v is None else format(v, spec)


def show(report: Report) -> None:
    """The verification table."""
    table = Table(
        title=f"verify on {report.base} ({report.device}, {report.dtype}; exact at ≤ {report.tolerance:g})"
    )
    cols = (
        "candidate",
        "strategy",
        "effect-rel err",
        "max |Δ|",
        "KL",
        "top-1",
        "greedy",
        "ΔW err max",
        "result",
    )
    for col in cols:
        table.add_column(col, justify="left" if col in ("candidate", "strategy") else "right")
    for r in report.rows:
        verdict = {"PASS": "[green]PASS", "FAIL": "[red]FAIL"}.get(r.verdict, r.verdict)
        table.add_row(
            r.name, r.strategy or "", _fmt(r.effect_rel_error), _fmt(r.max_abs_diff), _fmt(r.kl),
            _fmt(r.top1_agreement, ".1%"), _fmt(r.greedy_agreement, ".1%"), _fmt(r.weight_error_max), verdict,
        )  # fmt: skip
    console.print(table)
    console.print(judge_note(report.reference_reason, report.reference_checks, report.rows))


@click.command("verify")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--base", required=True, help="Base model: a folder, a .gguf file, or a Hub id in the cache.")
@click.option("--merged", "merged_dirs", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="A merged adapter folder to check (repeatable).")  # fmt: skip
@click.option(
    "--strategy", "-s", "strategy_names", multiple=True, help="Merge on the fly with this strategy."
)
@click.option("--weights", "-w", type=FloatList(), help="Input weights (default: the recipe's, else 1).")
@click.option("--rank", type=int)
@click.option("--energy", type=float)
@click.option("--density", type=float, default=0.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--save", type=click.Path(path_type=Path), help="Also write the JSON report to this file.")
def verify_cmd(inputs, base, merged_dirs, strategy_names, weights, rank, energy, density, seed, device,
               device_map, dtype, prompts, max_new_tokens, as_json, save) -> None:  # fmt: skip
    """Check merged adapters reproduce the inputs stacked active; exit 1 when an exact one fails.

    Example: merging verify --base BASE a/ b/ -s cat -s svd --rank 4
    """
    if not merged_dirs and not strategy_names:
        raise click.UsageError("give --merged OUT or --strategy NAME (or both)")
    if sdbase.is_pipeline(Path(base)):  # Stable Diffusion: the denoiser and text encoders
        from cli import verify_sd

        options = Options(rank=rank, energy=energy, density=density, seed=seed)
        return verify_sd.run(inputs, Path(base), merged_dirs, strategy_names, weights, options)
    task = sources.task_type([*inputs, *map(str, merged_dirs)])
    model, tokenizer = load_base(base, device, dtype, device_map=device_map, task_type=task)
    layout = BaseLayout.from_model(model)
    adapters = [ad for ad, _ in sources.load_inputs(inputs, base=layout)]
    candidates = []
    recipe_weights = None
    for folder in merged_dirs:
        merged = [ad.refine_targets(layout.modules) for ad in sources.load(folder, base=layout)]
        recipe = merge_lib.read_recipe(folder)
        recipe_weights = recipe_weights or (recipe.weights if recipe else None) or None
        exact = claims_exact(recipe, adapters, merged)
        strategy = recipe.strategy if recipe else None
        candidates.append(Candidate(str(folder), merged, strategy, exact, folder=Path(folder)))
    if recipe_weights and len(recipe_weights) != len(adapters):
        recipe_weights = None  # the recipe merged other inputs: compare against these, weight 1 each
    pairs = weighted(adapters, weights or recipe_weights)
    options = Options(rank=rank, energy=energy, density=density, seed=seed)
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
        click.echo(report.to_json())
    else:
        show(report)
    if report.failed:
        sys.exit(1)
