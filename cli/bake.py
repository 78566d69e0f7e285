"""`merging bake`: fold adapters into the base weights and write a full model."""

from __future__ import annotations

from pathlib import Path

import click

import merging

from .common import FloatList, complete_path, console, err_console, progress_bar, telling_replaced
from .tables import emit_json, say


@click.command("bake")
@click.argument("inputs", nargs=-1, required=True, shell_complete=complete_path)
@click.option(
    "--base", required=True, type=click.Path(exists=True, path_type=Path), help="Base model folder."
)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--weights", "-w", type=FloatList(), help="Input weights (default 1).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON (merging.bake/1).")
def bake_cmd(inputs, base, out, weights, force, as_json) -> None:
    """Write the base model with the adapters folded in, streaming one shard at a time.

    Example: merging bake --base BASE merged/ -o baked-model/
    """
    with telling_replaced(err_console if as_json else console):
        with progress_bar("baking") as update:
            doc = merging.bake(inputs, base, out, weights=weights, force=force, progress=update)
    if as_json:
        return emit_json("merging.bake/1", doc)
    size = sum(doc["files"].values())
    say(f"wrote {out}: {len(doc['files'])} files, {size:,} bytes ({size / 2**20:.1f} MiB)")
