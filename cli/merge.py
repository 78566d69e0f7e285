"""`merging merge`: combine adapters with a strategy into a new adapter folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

import merging
from merging import MergingError

from .common import (
    FloatList,
    complete_path,
    complete_strategy,
    console,
    err_console,
    progress_bar,
    telling_replaced,
)
from .tables import Col, Grid, count, emit_json, say, sci, show

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

RECIPE_KEYS = {"inputs", "output", "strategy", "weights", "rank", "energy", "clamp", "density"}
RECIPE_KEYS |= {"majority_sign", "seed", "signed", "aux", "base", "format", "force", "uniform_rank", "serve"}
RECIPE_KEYS |= {"inner", "alpha", "common_fraction", "budget", "layer_weights"}


def _read_recipe(path: Path) -> dict:
    """A recipe file (TOML, or YAML when PyYAML is installed) with the same keys as the options."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise MergingError(
                f"{path}: YAML recipes need PyYAML (pip install pyyaml), or use TOML"
            ) from None
        data = yaml.safe_load(text)
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise MergingError(f"{path}: invalid TOML ({e})") from e
    if not isinstance(data, dict):
        raise MergingError(f"{path}: a recipe is a table of options")
    if unknown := sorted(set(data) - RECIPE_KEYS):
        raise MergingError(
            f"{path}: unknown recipe key {unknown[0]!r}; valid keys: {', '.join(sorted(RECIPE_KEYS))}"
        )
    return data


@click.command("merge")
@click.argument("inputs", nargs=-1, shell_complete=complete_path)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Output folder.")
@click.option("--strategy", "-s", shell_complete=complete_strategy,
              help=f"One of: {', '.join(merging.strategy_names())}.")  # fmt: skip
@click.option("--weights", "-w", type=FloatList(), help="One weight per input, comma-separated (default 1).")
@click.option("--rank", type=int, help="svd/TIES/DARE rank budget (default: the largest input rank).")
@click.option(
    "--energy", type=float, help="svd: keep this fraction of ‖ΔW‖² per module instead of a fixed rank."
)
@click.option("--clamp", type=float, help="svd: clamp factors at this quantile, as PEFT and kohya.")
@click.option("--budget", type=int, help="svd: one global parameter budget, ranks allocated across modules.")
@click.option(
    "--density", type=float, help="TIES/DARE/magnitude_prune: fraction of entries kept (default 0.5)."
)
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), help="TIES sign election.")
@click.option("--seed", type=int, help="DARE seed (default 0): same seed, same file.")
@click.option("--signed", is_flag=True, default=None, help="geometric: accept non-positive IA³ entries.")
@click.option(
    "--inner", type=click.Choice(merging.INNER), help="knots/core: the merge in the shared basis (ties)."
)
@click.option("--alpha", type=float, help="knots/core/tsv/iso_c/iso_cts: global scale (default 1).")
@click.option("--common-fraction", type=float, help="iso_cts: share of the rank kept common (default 0.8).")
@click.option("--aux", type=click.Choice(["error", "sum"]), help="Overlapping modules_to_save / token rows.")
@click.option(
    "--base", type=click.Path(exists=True, path_type=Path), help="Base model folder (DoRA, --aux sum)."
)
@click.option(
    "--recipe", type=click.Path(exists=True, path_type=Path), help="TOML/YAML file with these options."
)
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf values in the inputs.")
@click.option(
    "--format", "fmt", type=click.Choice(["peft", "kohya", "gguf"]), help="Output format (default peft)."
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--uniform-rank", is_flag=True, default=None,
              help="One rank, lora_alpha = r everywhere (llama.cpp, TGI, LoRAX read the global alpha only).")
@click.option("--serve", type=click.Choice(["vllm"]),
              help="Pad to the smallest max_lora_rank the engine accepts (implies --uniform-rank).")
@click.option(
    "--push-to-hub", "push_to_hub", help="Publish the result to this Hub repo (user/name) afterwards."
)
@click.option("--base-model", help="The base's Hub id to record (when the inputs name a local folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (schema merging.merge/1).")
def merge_cmd(inputs, out, recipe, force, allow_nonfinite, push_to_hub, base_model, as_json, **opts) -> None:
    """Merge adapters (folders, or name=folder) into one adapter with a strategy.

    Example: merging merge a/ b/ -o merged/ --strategy cat --weights 1,0.5
    """
    spec = _read_recipe(recipe) if recipe else {}
    inputs = list(inputs)
    if not inputs and recipe:  # recipe inputs are relative to the recipe file
        inputs = [_beside(Path(recipe), p) for p in spec.get("inputs", [])]
    for key, value in opts.items():
        if value is not None:
            spec[key] = value
    out = out or (Path(spec["output"]) if "output" in spec else None)
    if not inputs:
        raise click.UsageError("give at least one INPUT adapter (or inputs in --recipe)")
    if out is None:
        raise click.UsageError("give -o/--output (or output in --recipe)")
    if not spec.get("strategy"):
        raise click.UsageError(f"give --strategy, one of: {', '.join(merging.strategy_names())}")
    if base_model and merging.hub_id(base_model) is None:
        raise click.UsageError(f"--base-model {base_model!r}: give the base's Hub id, user/name")
    base_dir = Path(spec["base"]) if spec.get("base") else None
    fmt = spec.get("fmt") or spec.get("format") or "peft"
    if fmt == "gguf" and not spec.get("base"):
        raise click.UsageError("--format gguf needs --base (the architecture, block and head counts)")
    serving_ = bool(spec.get("uniform_rank")) or spec.get("serve") is not None
    stream = fmt == "peft" and not serving_  # one module in memory at a time, read, merged and written
    pairs = merging.load_inputs(
        inputs, base=base_dir, weights=spec.get("weights"), allow_nonfinite=allow_nonfinite, lazy=stream
    )
    fields = ("rank", "energy", "clamp", "density", "majority_sign", "seed", "signed", "inner", "alpha")
    fields += ("common_fraction", "budget")
    options = {k: spec[k] for k in fields if k in spec}
    started = time.perf_counter()
    overwrite = force or bool(spec.get("force"))
    with telling_replaced(err_console if as_json else console):
        with progress_bar("merging") as update:
            result = merging.merge(
                pairs, strategy=spec["strategy"], aux=spec.get("aux", "error"), base=base_dir,
                progress=update, stream=stream, layer_weights=spec.get("layer_weights"), **options,
            )  # fmt: skip
            result = result.save(
                out, fmt, serve=spec.get("serve"), uniform_rank=bool(spec.get("uniform_rank")),
                base_model=base_model, base=base_dir, force=overwrite,
            )  # fmt: skip
        doc = merging.merge_summary(result, out, time.perf_counter() - started)
        emit_json("merging.merge/1", doc) if as_json else _summary(doc)
    if push_to_hub:
        from .publish import run_publish

        if fmt != "peft":
            raise click.UsageError("--push-to-hub publishes PEFT folders; drop --format")
        run_publish(Path(out), push_to_hub, base_model=base_model, out=err_console if as_json else console)


def _beside(recipe: Path, spec: str) -> str:
    """A recipe's input (``path`` or ``name=path``) with its path taken relative to the recipe file."""
    name, sep, path = spec.partition("=")
    if not sep or (recipe.parent / spec).exists():
        return str(recipe.parent / spec)
    return f"{name}={recipe.parent / path}"


SUMMARY_COLS = (Col("adapter"), Col("modules", True), Col("max rank", True), Col("params", True),
                Col("bytes", True), Col("max ΔW err", True))  # fmt: skip


def summary_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The summary table's cells."""
    return [[a["name"], str(a["modules"]), "" if a["max_rank"] is None else str(a["max_rank"]),
             count(a["params"]), "" if a["bytes"] is None else count(a["bytes"]), sci(a["weight_error_max"])]
            for a in doc["adapters"]]  # fmt: skip


def _summary(doc: dict[str, Any]) -> None:
    show(Grid(f"{doc['output']}  (strategy {doc['strategy']})", SUMMARY_COLS, summary_rows(doc)))
    for line in doc["serving"]:
        say(line)
    if doc["budget"]:
        say(doc["budget"])
    say(f"wrote {doc['output']} in {doc['seconds']:.2f} s")
