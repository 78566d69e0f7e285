"""`merging compare`: a report over strategies and ranks on the same adapters."""

from __future__ import annotations

from pathlib import Path

import click

import merging

from . import compare_sd, tables
from .common import (
    FloatList,
    complete_path,
    complete_strategy,
    err_console,
    progress_bar,
    telling_replaced,
)
from .tables import Col, Grid, count, emit_json, pct, say, sci, signed_pct


def _ints(value: str | None) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()] if value else []
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def _items(value: str) -> list[str]:
    """A comma-separated option's items (the library checks them)."""
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command("compare")
@click.argument("inputs", nargs=-1, required=True, shell_complete=complete_path)
@click.option("--base", required=True, shell_complete=complete_path,
              help="Base model: a folder, a .gguf file, or a Hub id in the cache.")  # fmt: skip
@click.option("--strategies", "-s", "names", default="cat,svd,ties", show_default=True,
              shell_complete=complete_strategy,
              help=f"Comma-separated from: {', '.join(merging.strategy_names())}; or 'all'.")  # fmt: skip
@click.option("--ranks", default="", help="Ranks for the rank-based strategies, e.g. 4,8,16.")
@click.option("--weights", "-w", type=FloatList(), help="Input weights (default 1).")
@click.option("--density", type=float, default=0.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--inner", type=click.Choice(merging.INNER), default="ties", show_default=True,
              help="knots/core: the merge in the shared basis.")  # fmt: skip
@click.option("--alpha", type=float, default=1.0, show_default=True, help="Literature methods' global scale.")
@click.option("--common-fraction", type=float, default=0.8, show_default=True, help="iso_cts common share.")
@click.option(
    "--eval", "evals", multiple=True, help="NAME=FILE.jsonl: held-out texts of the input named NAME."
)
@click.option(
    "--budget",
    "budgets",
    default="",
    help="svd under one global parameter budget: counts, or rN for uniform rank N's size; comma-separated.",
)
@click.option(
    "--tune",
    "tune_steps",
    type=int,
    default=None,
    help="Add a row for the merge `merging tune` learns with each --tune-strategy (needs --eval), within "
    "this budget: Adam steps for cat, merges measured for the others; every row's retention is then "
    "measured on the evals' reporting split.",
)
@click.option(
    "--tune-strategy",
    "tune_strategies",
    default="cat",
    show_default=True,
    shell_complete=complete_strategy,
    help="The strategies --tune tunes, comma-separated (a 'tuned NAME' row each), e.g. cat,iso_c.",
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
)
@click.option(
    "--loss-dtype", default="float32", show_default=True,
    help="Held-out losses in float32, bfloat16 or auto: auto = bfloat16 where the CPU/GPU has native bf16 "
    "units, else float32 (≈1.6× faster losses; rows within their interval may swap; recorded in "
    "report.json; verification stays in --dtype).",
)
@click.option(
    "--tune-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
    help="The --tune search's losses: auto = bfloat16 where the CPU/GPU has native bf16 units, else float32 "
    "(only the weights chosen depend on it: the tuned row is measured like every row, in --loss-dtype).",
)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--force", is_flag=True, help="Replace an existing report folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's JSON (schema merging.compare/1).")
@click.option("--base-quant", type=click.Choice(("nf4", "fp4", "int8")),
              help="Load the base through bitsandbytes as QLoRA adapters were trained (float32 compute).")
def compare_cmd(
    inputs, base, names, ranks, weights, density, seed, inner, alpha, common_fraction, evals, budgets,
    tune_steps, tune_strategies, device, dtype, loss_dtype, tune_dtype, out, force, as_json, base_quant,
) -> None:  # fmt: skip
    """Run strategies (and ranks) on the same adapters; write report.json/.md/.html and plots.

    Example: merging compare a/ b/ --base BASE -s cat,svd --ranks 4 -o r/
    """
    if merging.is_pipeline(base):  # a diffusers pipeline: noise prediction and text encoders
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        chosen = merging.strategy_names() if names == "all" else chosen
        doc = merging.compare_pipeline(inputs, base, chosen, _ints(ranks), out, weights=weights,
                                       density=density, seed=seed, inner=inner, alpha=alpha,
                                       common_fraction=common_fraction, force=force)  # fmt: skip
        return compare_sd.show_report(doc, Path(base), out, as_json)
    eval_files = {}
    for spec in evals:
        name, sep, path = spec.partition("=")
        if not sep:
            raise click.BadParameter(f"--eval {spec!r}: expected NAME=FILE")
        eval_files[name] = Path(path)
    if tune_steps is not None and not eval_files:
        raise click.UsageError("--tune needs --eval sets to tune on")
    chosen = "all" if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    with telling_replaced(err_console if as_json else tables.console):
        report = merging.compare(
            inputs, base, out, strategies=chosen, ranks=_ints(ranks), weights=weights, density=density,
            seed=seed, inner=inner, alpha=alpha, common_fraction=common_fraction, evals=eval_files,
            budgets=_items(budgets), tune_steps=tune_steps, device=device, dtype=dtype, force=force,
            tune_strategies=_items(tune_strategies), stages=progress_bar,
            base_quant=base_quant, loss_dtype=loss_dtype, tune_dtype=tune_dtype,
        )  # fmt: skip
        if as_json:
            return emit_json("merging.compare/1", {"output": str(out), **report.to_dict()})
        show(report)
        say(f"wrote {out}/report.md, report.html, report.json and {len(report.plots or ())} plots")


COMPARE_COLS = (Col("strategy"), Col("result"), Col("exact"), Col("rel err", True), Col("KL", True),
                Col("top-1", True), Col("greedy", True), Col("ΔW err", True), Col("rank", True),
                Col("params", True))  # fmt: skip


def rows(report) -> list[list[str]]:
    """The fidelity table's cells in the terminal (report.md keeps its own, fuller, figures)."""
    return [[v.label, r.verdict, "yes" if r.exact else "no", sci(r.effect_rel_error), sci(r.kl),
             pct(r.top1_agreement), pct(r.greedy_agreement), sci(r.weight_error_max), str(v.max_rank),
             count(v.params)] for v in report.variants for r in [v.row]]  # fmt: skip


def skill_rows(report) -> list[list[str]]:
    """Skill retention: the stacked inputs, then one row per variant; one column per skill."""
    names, stack = report.skills.names, report.skills.stacked
    out = [["stacked inputs", *(_with_interval(stack[s]) for s in names)]] if names else []
    mark = merging.compare_best_mark
    return out + [[v.label, *(_with_interval(v.skills[s]) + mark(report, v.label, s) for s in names)]
                  for v in report.variants if names]  # fmt: skip


def _with_interval(skill) -> str:
    """A signed retention and its 95% interval when it has one."""
    if skill.interval is None:
        return signed_pct(skill.retention)
    low, high = signed_pct(skill.interval.low), signed_pct(skill.interval.high)
    return f"{signed_pct(skill.retention)} [{low}, {high}]"


def show(report) -> None:
    """The comparison tables in the terminal."""
    tables.show(Grid(report.title, COMPARE_COLS, rows(report)))
    say(merging.compare_judged(report))
    if report.skills.names:
        cols = (Col("strategy"), *(Col(s, True) for s in report.skills.names))
        tables.show(Grid("skill retention (100% = as the adapter alone)", cols, skill_rows(report)))
    for s in report.not_applicable:
        say(f"not applicable: {s.label}: {s.reason}")
    for note in report.notes:  # the reporting split, each tuned row's weights and cost
        say(note)
