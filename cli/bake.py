"""`merging bake`: fold adapters into the base weights and write a full model."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import FloatList, console, progress_bar
from merging import sources
from merging.bake import bake
from merging.basemodel import module_shapes
from merging.errors import MergingError


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
    shapes = module_shapes(base)
    adapters = [ad.refine_targets(shapes) for item in inputs for ad in sources.load_spec(item, base=base)]
    ws = weights or [1.0] * len(adapters)
    if len(ws) != len(adapters):
        raise MergingError(f"{len(ws)} weights for {len(adapters)} input adapters")
    with progress_bar("baking") as update:
        bake(base, list(zip(adapters, ws, strict=True)), out, force=force, progress=update)
    console.print(f"wrote {out}")
