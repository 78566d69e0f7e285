"""`merging tune`: learn the inputs' merge weights on eval sets; write the merge and a recipe remaking it."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import click

from merging.base.layout import load_base
from merging.core.adapter import weighted
from merging.errors import MergingError
from merging.eval import data as eval_data
from merging.eval import tune as tune_lib
from merging.eval.verify import base_weights
from merging.formats import sources
from merging.merge import pipeline as merge_lib
from merging.storage.files import refuse_overlap, write_text
from merging.strategies import Options

from .common import progress_bar, telling_replaced
from .tables import Col, Grid, say, show, signed_pct

RECIPE_TOML = "tune_recipe.toml"
RECORD = "tune.json"


def eval_sets(specs: tuple[str, ...]) -> dict[str, eval_data.Examples]:
    """``NAME=FILE.jsonl`` eval options as skill name → (prompt, answer) pairs."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise click.BadParameter(f"--eval {spec!r}: expected NAME=FILE")
        out[name] = eval_data.read_eval(Path(path))
    return out


def absolute(spec: str) -> str:
    """An input spec (``path`` or ``name=path``) with a local path made absolute (Hub ids as given)."""
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).exists():
        return str(Path(spec).resolve()) if Path(spec).exists() else spec
    return f"{name}={Path(path).resolve()}" if Path(path).exists() else spec


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
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split and the search.")
@click.option(
    "--tune-fraction",
    type=float,
    default=0.5,
    show_default=True,
    help="Share of each eval file tuned on; the rest is the reporting part.",
)
@click.option("--device", default="auto", show_default=True)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def tune_cmd(
    inputs, base, evals, granularity, objective, strategy, rank, budget, density, alpha, common_fraction,
    knobs, evaluations, patience, regularisation, steps, lr, batch, seed, tune_fraction, device, out, force,
) -> None:  # fmt: skip
    """Learn the merge weights that keep every skill (by default the worst one's retention) and write the
    merge, with tune_recipe.toml (`merging merge --recipe` remakes it byte for byte) and tune.json.

    Example: merging tune a/ b/ --base B --eval a=a.jsonl --eval b=b.jsonl -o t/
    """
    started = time.perf_counter()
    inputs = [absolute(s) for s in inputs]
    model, tokenizer = load_base(base, device, "float32", task_type=sources.task_type(inputs))
    if tokenizer is None:
        raise MergingError(f"{base}: tune needs a tokenizer beside the model")
    pairs = sources.load_inputs(inputs, base=model)
    refuse_overlap(out, [base, *(ad.source for ad, _ in pairs)])
    split = tune_lib.split_evals(eval_sets(evals), seed=seed, fraction=tune_fraction)
    asked = None if knobs is None else tuple(k.strip() for k in knobs.split(",") if k.strip())
    settings = tune_lib.Settings(granularity, tune_lib.check_objective(objective), steps, lr, batch, seed,
                                 evaluations, patience, knobs=asked,
                                 regularisation=regularisation)  # fmt: skip
    given = {"density": density, "alpha": alpha, "common_fraction": common_fraction}
    options = Options(
        rank=rank, budget=budget, seed=seed, **{k: v for k, v in given.items() if v is not None}
    )
    with progress_bar("tuning") as update:
        found = tune_lib.tune(model, tokenizer, pairs, split.tune, settings=settings, strategy=strategy,
                              options=options, progress=update)  # fmt: skip
    adapters = [ad for ad, _ in pairs]
    options = replace(options, **found.knobs)
    merged_pairs, layer_w = tune_lib.merge_inputs(adapters, found.weights)
    result = merge_lib.merge(merged_pairs, strategy, options, base_weights=base_weights(model),
                             layer_weights=layer_w)  # fmt: skip
    measured = tune_lib.held_out(model, tokenizer, pairs, weighted(result.adapters), split.report, seed=seed)
    with telling_replaced():
        recipe_data = merge_lib.recipe(result, adapters).to_dict()
        merge_lib.write_result(result, out, recipe_data, force=force)
        write_text(Path(out) / RECIPE_TOML, recipe_toml(inputs, base, strategy, found, options))
        record = _record(found, measured, split)
        write_text(Path(out) / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")
        plots = _plots(record, Path(out))
    _show({ad.name: w for ad, w in merged_pairs}, found, measured)
    seconds = time.perf_counter() - started
    say(f"wrote {out} ({RECIPE_TOML}, {RECORD}, {len(plots)} plots) in {seconds:.0f} s")


def recipe_toml(inputs, base: str, strategy: str, found: tune_lib.TuneResult, options: Options) -> str:
    """A `merging merge --recipe` file that remakes the tuned merge (inputs and base as absolute paths)."""
    q = json.dumps  # a JSON string is a TOML basic string
    lines = ["# Made by `merging tune`; `merging merge --recipe THIS -o OUT` remakes the tuned merge.",
             f"inputs = [{', '.join(q(s) for s in inputs)}]", f"strategy = {q(strategy)}",
             f"weights = [{', '.join(repr(w) for w in found.weights.inputs)}]"]  # fmt: skip
    if Path(base).is_dir():
        lines.append(f"base = {q(str(Path(base).resolve()))}")
    for key in ("rank", "budget", "density", "alpha", "common_fraction"):  # given, or tuned
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from merging.export.plots import draw_before_after, draw_search

    out = []
    trace = [(s["step"], s["objective"], s["on"]) for s in record["trace"]]
    if draw_search(plt, trace, folder / "tune_search.png"):
        out.append("tune_search.png")
    before, after = record["reporting_split"]["before"], record["reporting_split"]["after"]
    if draw_before_after(
        plt, before, after, folder / "tune_retention.png", record["reporting_split"].get("intervals")
    ):
        out.append("tune_retention.png")
    return out


def _show(weights: dict[str, float], found: tune_lib.TuneResult, measured: dict) -> None:
    cols = (Col("skill"), Col("weight", True), Col("before (stacked)", True), Col("after (tuned)", True))
    rows = [[n, f"{weights[n]:g}" if n in weights else "", signed_pct(measured["before"][n]),
             signed_pct(measured["after"][n])] for n in measured["before"]]  # fmt: skip
    show(Grid("retention on the reporting split (100% = as the adapter alone)", cols, rows))
    say(f"tuning objective {found.start.objective:.3f} → {found.end.objective:.3f} "
        f"(chosen {found.chosen.objective:.3f})")  # fmt: skip
