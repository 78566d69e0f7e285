"""`merging verify`: merged adapters against the inputs stacked active, on the real base model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

import merging

from . import tables
from .common import FloatList, complete_path, complete_strategy, progress_bar
from .tables import Col, Grid, emit_json, pct, say, sci

VERIFY_COLS = (Col("candidate"), Col("result"), Col("strategy"), Col("rel err", True), Col("max |Δ|", True),
               Col("KL", True), Col("top-1", True), Col("greedy", True), Col("ΔW err", True))  # fmt: skip


def rows(report) -> list[list[str]]:
    """The verification table's cells: the verdict beside the name, numbers in compact form."""
    return [[r.name, r.verdict, r.strategy or "", sci(r.effect_rel_error), sci(r.max_abs_diff), sci(r.kl),
             pct(r.top1_agreement), pct(r.greedy_agreement), sci(r.weight_error_max)]
            for r in report.rows]  # fmt: skip


def show(report) -> None:
    """The verification table and who judged it."""
    title = f"verify on {report.base} ({report.device}, {report.dtype}; exact at ≤ {report.tolerance:g})"
    tables.show(Grid(title, VERIFY_COLS, rows(report)))
    say(merging.judged_by(report))


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
@click.option("--inner", type=click.Choice(merging.INNER),
              help="knots/core: the merge in the shared basis (ties).")
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
@click.option("--base-quant", type=click.Choice(("nf4", "fp4", "int8")),
              help="Load the base through bitsandbytes as QLoRA adapters were trained (float32 compute).")
def verify_cmd(inputs, base, merged_dirs, strategy_names, weights, rank, energy, density, seed, inner, alpha,
               common_fraction, device, device_map, dtype, prompts, max_new_tokens, as_json,
               save, base_quant) -> None:  # fmt: skip
    """Check merged adapters reproduce the inputs stacked active; exit 1 when an exact one fails.

    Example: merging verify --base BASE a/ b/ -s cat -s svd --rank 4
    """
    if not merged_dirs and not strategy_names:
        raise click.UsageError("give --merged OUT or --strategy NAME (or both)")
    if merging.is_pipeline(base):  # Stable Diffusion: the denoiser and text encoders
        from . import verify_sd

        doc = merging.verify_pipeline(inputs, base, merged=merged_dirs, strategies=strategy_names,
                                      weights=weights, rank=rank, energy=energy, density=density,
                                      seed=seed, inner=inner, alpha=alpha,
                                      common_fraction=common_fraction)  # fmt: skip
        return verify_sd.show_report(doc, as_json)
    with progress_bar("verifying") as update:
        report = merging.verify(
            inputs, base, merged=merged_dirs, strategies=strategy_names, weights=weights, rank=rank,
            energy=energy, density=density, seed=seed, device=device, device_map=device_map, dtype=dtype,
            prompts=prompts, max_new_tokens=max_new_tokens, save=save, progress=update, inner=inner,
            alpha=alpha, common_fraction=common_fraction, base_quant=base_quant,
        )  # fmt: skip
    if as_json:
        emit_json("merging.verify/1", report.to_dict())
    else:
        show(report)
    if report.failed:
        sys.exit(1)
