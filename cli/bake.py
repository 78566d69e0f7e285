"""`merging bake`: fold adapters into the base weights and write a full model."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import FloatList, console, progress_bar, telling_replaced
from merging import sources
from merging.bake import bake


@click.command("bake")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--base", required=True, type=click.Path(exists=True, path_type=Path), help="Base model folder."
)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--weights", "-w", type=FloatList(), help="Input weights (default 1).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def bake_cmd(inputs, base, out, weights, force) -> None:
    """Write the base model with the adapters folded in, streaming one shard at a time.

    Example: merging bake --base BASE merged/ -o baked-model/
    """
    pairs = sources.load_inputs(inputs, base=base, weights=weights)
    with telling_replaced():
        with progress_bar("baking") as update:
            bake(base, pairs, out, force=force, progress=update)
        console.print(f"wrote {out}")
