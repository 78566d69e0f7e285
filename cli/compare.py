"""`merging compare`: a report over strategies and ranks on the same adapters."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import click

from merging import strategies
from merging.base import pipelines as sdbase
from merging.base.layout import load_base
from merging.errors import MergingError
from merging.eval import compare as report_lib
from merging.eval import tune as tune_lib
from merging.eval.results import Comparison
from merging.formats import sources
from merging.merge import pipeline as merge_lib
from merging.storage.files import refuse_overlap
from merging.strategies import Options
from merging.strategies.base import INNER

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


@click.command("compare")
@click.argument("inputs", nargs=-1, required=True, shell_complete=complete_path)
@click.option("--base", required=True, shell_complete=complete_path,
              help="Base model: a folder, a .gguf file, or a Hub id in the cache.")  # fmt: skip
@click.option("--strategies", "-s", "names", default="cat,svd,ties", show_default=True,
              shell_complete=complete_strategy,
              help=f"Comma-separated from: {', '.join(strategies.names())}; or 'all'.")  # fmt: skip
@click.option("--ranks", default="", help="Ranks for the rank-based strategies, e.g. 4,8,16.")
@click.option("--weights", "-w", type=FloatList(), help="Input weights (default 1).")
@click.option("--density", type=float, default=0.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--inner", type=click.Choice(INNER), default="ties", show_default=True,
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
    help="Add a row for the merge `merging tune` learns in this many steps (needs --eval); every "
    "row's retention is then measured on the evals' reporting split.",
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--force", is_flag=True, help="Replace an existing report folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's JSON (schema merging.compare/1).")
def compare_cmd(
    inputs, base, names, ranks, weights, density, seed, inner, alpha, common_fraction, evals, budgets,
    tune_steps, device, dtype, out, force, as_json,
) -> None:  # fmt: skip
    """Run strategies (and ranks) on the same adapters; write report.json/.md/.html and plots.

    Example: merging compare a/ b/ --base BASE -s cat,svd --ranks 4 -o r/
    """
    if sdbase.is_pipeline(Path(base)):  # a diffusers pipeline: noise prediction and text encoders
        chosen = strategies.names() if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
        opts = Options(density=density, seed=seed, inner=inner, alpha=alpha, common_fraction=common_fraction)
        return compare_sd.run(inputs, Path(base), chosen, _ints(ranks), weights, opts, out, force, as_json)
    model, tokenizer = load_base(base, device, dtype, task_type=sources.task_type(inputs))
    if tokenizer is None:
        raise MergingError(f"{base}: compare needs a tokenizer beside the model")
    pairs = sources.load_inputs(inputs, base=model, weights=weights)
    refuse_overlap(out, [base, *(ad.source for ad, _ in pairs)])
    label = next((a.base_model for a, _ in pairs if a.base_model), None) or str(base)
    eval_sets = {}
    for spec in evals:
        name, sep, path = spec.partition("=")
        if not sep:
            raise click.BadParameter(f"--eval {spec!r}: expected NAME=FILE")
        eval_sets[name] = report_lib.read_eval(Path(path))
    chosen = strategies.names() if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    variants = report_lib.variants(chosen, _ints(ranks))
    variants += [report_lib.Variant("svd", budget=b) for b in _budgets(budgets, pairs)]
    extra, notes, search = [], (), None
    if tune_steps is not None:
        if not eval_sets:
            raise click.UsageError("--tune needs --eval sets to tune on")
        split = tune_lib.split_evals(eval_sets, seed=seed)
        with progress_bar("tuning") as update:
            row, search = tuned_row(model, tokenizer, pairs, split.tune, tune_steps, seed, update)
        extra, eval_sets = [row], split.report
        n_tune, n_report = sum(map(len, split.tune.values())), sum(map(len, split.report.values()))
        notes = (
            f"Every row's retention is measured on the reporting split ({n_report} examples); the tuned "
            f"row's weights were learnt on the other {n_tune} (seed {seed}), never on these.",
        )
    with progress_bar("comparing") as update:
        opts = Options(density=density, seed=seed, inner=inner, alpha=alpha, common_fraction=common_fraction)
        report = report_lib.compare(
            model,
            tokenizer,
            pairs,
            variants,
            evals=eval_sets,
            options=opts,
            base_name=label,
            progress=update,
            extra=extra,
        )
    report = replace(report, notes=notes, search=search)
    with telling_replaced(err_console if as_json else tables.console):
        report = report_lib.write_report(report, out, force=force)
        if as_json:
            return emit_json("merging.compare/1", {"output": str(out), **report.to_dict()})
        show(report)
        say(f"wrote {out}/report.md, report.html, report.json and {len(report.plots or ())} plots")


COMPARE_COLS = (Col("strategy"), Col("result"), Col("exact"), Col("rel err", True), Col("KL", True),
                Col("top-1", True), Col("greedy", True), Col("ΔW err", True), Col("rank", True),
                Col("params", True))  # fmt: skip


def rows(report: Comparison) -> list[list[str]]:
    """The fidelity table's cells in the terminal (report.md keeps its own, fuller, figures)."""
    return [[v.label, r.verdict, "yes" if r.exact else "no", sci(r.effect_rel_error), sci(r.kl),
             pct(r.top1_agreement), pct(r.greedy_agreement), sci(r.weight_error_max), str(v.max_rank),
             count(v.params)] for v in report.variants for r in [v.row]]  # fmt: skip


def skill_rows(report: Comparison) -> list[list[str]]:
    """Skill retention: the stacked inputs, then one row per variant; one column per skill."""
    names, stack = report.skills.names, report.skills.stacked
    out = [["stacked inputs", *(signed_pct(stack[s].retention) for s in names)]] if names else []
    return out + [[v.label, *(signed_pct(v.skills[s].retention) for s in names)]
                  for v in report.variants if names]  # fmt: skip


def _budgets(value: str, pairs) -> list[int]:
    """--budget entries as parameter counts: an integer, or rN for what uniform svd rank N keeps here."""
    out = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        if item.startswith("r") and item[1:].isdigit():
            result = merge_lib.merge(pairs, "svd", Options(rank=int(item[1:])))
            out.append(sum(a.numel for a in result.adapters if a.name == "lora"))
        elif item.isdigit():
            out.append(int(item))
        else:
            raise click.BadParameter(f"--budget {item!r}: a parameter count or rN")
    return out


def tuned_row(model, tokenizer, pairs, evals, steps: int, seed: int, progress) -> tuple:
    """The tuned merge as a report row, and its search record (weights learnt on ``evals``)."""
    started = time.perf_counter()
    found = tune_lib.tune(model, tokenizer, pairs, evals, settings=tune_lib.Settings(steps=steps, seed=seed),
                          progress=progress)  # fmt: skip
    merged_pairs, layer_w = tune_lib.merge_inputs([ad for ad, _ in pairs], found.weights)
    result = merge_lib.merge(merged_pairs, "cat", layer_weights=layer_w)
    label = "tuned cat"
    search = {
        "label": label, "weights": {ad.name: w for ad, w in merged_pairs},
        "trace": [{"step": s.step, "objective": s.objective, "on": s.on} for s in found.steps],
        "tuning_objective": {"start": found.start.objective, "end": found.end.objective},
    }  # fmt: skip
    return report_lib.Extra(label, result, time.perf_counter() - started), search


def show(report: Comparison) -> None:
    """The comparison tables in the terminal."""
    tables.show(Grid(report.title, COMPARE_COLS, rows(report)))
    say(report_lib.judged(report))
    if report.skills.names:
        cols = (Col("strategy"), *(Col(s, True) for s in report.skills.names))
        tables.show(Grid("skill retention (100% = as the adapter alone)", cols, skill_rows(report)))
    for s in report.not_applicable:
        say(f"not applicable: {s.label}: {s.reason}")
