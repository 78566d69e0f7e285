"""`merging bake`: fold adapters into the base weights and write a full model."""

from __future__ import annotations

from pathlib import Path

import click

from merging.base import pipelines as sdbase
from merging.export.bake import bake
from merging.export.bake_pipeline import bake_pipeline
from merging.formats import sources

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
    pairs = sources.load_inputs(inputs, base=base, weights=weights)
    with telling_replaced(err_console if as_json else console):
        with progress_bar("baking") as update:
            if sdbase.is_pipeline(base):  # a diffusers pipeline: its denoiser and text encoders
                bake_pipeline(base, pairs, out, force=force, progress=update)
            else:
                bake(base, pairs, out, force=force, progress=update)
    files = sorted(p for p in Path(out).iterdir() if p.is_file())
    doc = {"output": str(out), "base": str(base), "inputs": [{"source": str(ad.source), "weight": w}
           for ad, w in pairs], "files": {p.name: p.stat().st_size for p in files}}  # fmt: skip
    if as_json:
        return emit_json("merging.bake/1", doc)
    size = sum(doc["files"].values())
    say(f"wrote {out}: {len(files)} files, {size:,} bytes ({size / 2**20:.1f} MiB)")
