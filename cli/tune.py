"""`merging tune`: learn the inputs' merge weights on eval sets; write the merge and a recipe remaking it."""

from __future__ import annotations

import time
from pathlib import Path

import click

import merging

from .common import progress_bar, telling_replaced
from .tables import Col, Grid, say, show, signed_pct


def eval_files(specs: tuple[str, ...]) -> dict[str, Path]:
    """``NAME=FILE.jsonl`` eval options as skill name → file."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise click.BadParameter(f"--eval {spec!r}: expected NAME=FILE")
        out[name] = Path(path)
    return out


@click.command("tune")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--base", required=True, help="Base model: a folder, a .gguf file, or a Hub id in the cache.")
@click.option(
    "--eval",
    "evals",
    multiple=True,
    required=True,
    help="NAME=FILE.jsonl: texts of the input named NAME (split into tuning and reporting parts).",
)
@click.option(
    "--granularity",
    type=click.Choice(["adapter", "layer"]),
    default="adapter",
    show_default=True,
    help="One weight per input, or one per input per layer.",
)
@click.option(
    "--objective",
    default="worst",
    show_default=True,
    help="worst (the worst skill's retention), mean, or λ in [0, 1]: λ·worst + (1 − λ)·mean.",
)
@click.option(
    "--strategy",
    "-s",
    default="cat",
    show_default=True,
    help="cat (exact, tuned by gradient); any other strategy (iso_c, iso_cts, tsv, ties, svd --rank/--budget"
    "...) gradient-free with scipy.optimize, its knobs too.",
)
@click.option("--rank", type=int, help="svd/ties: rank per module.")
@click.option("--budget", type=int, help="svd: one global parameter budget.")
@click.option("--density", type=float, help="TIES/DARE: where the density search starts (default 0.5).")
@click.option("--alpha", type=float, help="iso_c/iso_cts/tsv/knots/core: global scale (default 1).")
@click.option("--common-fraction", type=float, help="iso_cts: where the common share starts (default 0.8).")
@click.option(
    "--knobs",
    help="Knobs tuned with the weights, comma-separated (density, common_fraction, "
    "alpha); default: density for TIES/DARE, common_fraction for iso_cts; '' for none.",
)
@click.option(
    "--evaluations", type=int, default=40, show_default=True, help="Gradient-free: merges measured at most."
)
@click.option(
    "--patience",
    type=int,
    default=15,
    show_default=True,
    help="Gradient-free: stop after this many evaluations without improvement (0: never).",
)
@click.option(
    "--regularisation",
    type=float,
    default=3.0,
    show_default=True,
    help="--granularity layer: penalty on the per-layer weights' mean squared distance from the "
    "per-input solution.",
)
@click.option("--steps", type=int, default=6, show_default=True)
@click.option("--lr", type=float, default=0.3, show_default=True,
              help="Adam's step (the gradient-free search's first step).")  # fmt: skip
@click.option(
    "--batch",
    type=int,
    default=4,
    show_default=True,
    help="Examples per skill in each gradient step (0: the whole tuning part).",
)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the split, the search and DARE's masks.")  # fmt: skip
@click.option(
    "--tune-fraction",
    type=float,
    default=0.5,
    show_default=True,
    help="Share of each eval file tuned on; the rest is the reporting part.",
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--tune-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
    help="The search's losses: auto = bfloat16 where the CPU/GPU has native bf16 units, else float32 (the "
    "reporting part is measured in float32 either way).",
)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def tune_cmd(
    inputs, base, evals, granularity, objective, strategy, rank, budget, density, alpha, common_fraction,
    knobs, evaluations, patience, regularisation, steps, lr, batch, seed, tune_fraction, device, tune_dtype,
    out, force,
) -> None:  # fmt: skip
    """Learn the merge weights that keep every skill (by default the worst one's retention) and write the
    merge, with tune_recipe.toml (`merging merge --recipe` remakes it byte for byte) and tune.json.

    Example: merging tune a/ b/ --base B --eval a=a.jsonl --eval b=b.jsonl -o t/
    """
    started = time.perf_counter()
    files = eval_files(evals)
    with telling_replaced():
        with progress_bar("tuning") as update:
            tuned = merging.tune(
                inputs, base, files, out, granularity=granularity, objective=objective, strategy=strategy,
                rank=rank, budget=budget, steps=steps, lr=lr, batch=batch, seed=seed,
                tune_fraction=tune_fraction, device=device, force=force, progress=update, density=density,
                alpha=alpha, common_fraction=common_fraction, evaluations=evaluations, patience=patience,
                regularisation=regularisation, tune_dtype=tune_dtype,
                knobs=None if knobs is None else [k.strip() for k in knobs.split(",") if k.strip()],
            )  # fmt: skip
    _show(tuned.weights, tuned.found, tuned.measured)
    seconds = time.perf_counter() - started
    written = f"{merging.TUNE_RECIPE}, {merging.TUNE_RECORD}, {len(tuned.plots)} plots"
    say(f"wrote {out} ({written}) in {seconds:.0f} s")


def _show(weights: dict[str, float], found, measured: dict) -> None:
    cols = (Col("skill"), Col("weight", True), Col("before (stacked)", True), Col("after (tuned)", True))
    rows = [[n, f"{weights[n]:g}" if n in weights else "", signed_pct(measured["before"][n]),
             signed_pct(measured["after"][n])] for n in measured["before"]]  # fmt: skip
    show(Grid("retention on the reporting split (100% = as the adapter alone)", cols, rows))
    say(f"tuning objective {found.start.objective:.3f} → {found.end.objective:.3f} "
        f"(chosen {found.chosen.objective:.3f})")  # fmt: skip
