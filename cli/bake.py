"""`merging bake`: fold adapters into the base weights and write a full model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from merging.base.quantized import QUANTS
from merging.export import qlora
from merging.export.bake import bake
from merging.export.gguf_bake import OUTTYPES, bake_gguf
from merging.formats import sources

from .common import FloatList, complete_path, console, err_console, progress_bar, telling_replaced
from .tables import Col, Grid, emit_json, say, show


@click.command("bake")
@click.argument("inputs", nargs=-1, required=True, shell_complete=complete_path)
@click.option(
    "--base", required=True, type=click.Path(exists=True, path_type=Path), help="Base model folder."
)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--weights", "-w", type=FloatList(), help="Input weights (default 1).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON (merging.bake/1).")
@click.option("--base-quant", type=click.Choice(QUANTS),
              help="The adapters were trained on the base in this bitsandbytes quantisation (QLoRA): measure "
                   "the bakes against PEFT on that base first.")  # fmt: skip
@click.option("--outtype", type=click.Choice(OUTTYPES), default="same", show_default=True,
              help="A .gguf base: the type of the adapted tensors (same: each keeps its own quantisation).")
@click.option("--into", type=click.Choice(["original", "dequantized"]), default=None,
              help="With --base-quant: fold into the original float weights or into dequant(W) (default).")
def bake_cmd(inputs, base, out, weights, force, as_json, base_quant, outtype, into) -> None:
    """Write the base model with the adapters folded in, streaming one shard (or GGUF tensor) at a time.

    Example: merging bake --base BASE merged/ -o baked-model/   (or --base model.gguf -o out.gguf)
    """
    gguf_base = Path(base).suffix == ".gguf"
    if not gguf_base and outtype != "same":
        raise click.UsageError("--outtype is for a .gguf base (a model folder keeps its dtypes)")
    if gguf_base and base_quant:
        raise click.UsageError("--base-quant is for a transformers base; a .gguf base keeps its own types")
    pairs = sources.load_inputs(inputs, base=None if gguf_base else base, weights=weights)
    if into == "dequantized" and not base_quant:
        raise click.UsageError("--into dequantized needs --base-quant (the quantisation the adapters saw)")
    into, table = into or ("dequantized" if base_quant else "original"), None
    if base_quant:
        with progress_bar(f"measuring the bakes on {base_quant}"):
            table = qlora.bake_table(base, pairs, base_quant)
        if not as_json:
            show(Grid(f"bakes against PEFT on the {base_quant} base (the adapters as trained)",
                      (Col("into"), Col("rel err", True), Col("max |Δ|", True), Col("top-1", True),
                       Col("KL", True)),
                      [[r.into, f"{r.effect_rel_error:.1e}", f"{r.max_abs_diff:.1e}",
                        f"{r.top1_agreement:.0%}", f"{r.kl:.1e}"] for r in table]), err_console)  # fmt: skip
    with telling_replaced(err_console if as_json else console):
        with progress_bar("baking") as update:
            if gguf_base:
                bake_gguf(base, pairs, out, outtype=outtype, force=force, progress=update)
            else:
                bake(base, pairs, out, force=force, progress=update, base_quant=base_quant, into=into)
    files = [Path(out)] if gguf_base else sorted(p for p in Path(out).iterdir() if p.is_file())
    doc = {"output": str(out), "base": str(base), "inputs": [{"source": str(ad.source), "weight": w}
           for ad, w in pairs], "files": {p.name: p.stat().st_size for p in files}}  # fmt: skip
    if table is not None:
        doc |= {"base_quant": base_quant, "into": into, "bakes": [asdict(r) for r in table]}
    if as_json:
        return emit_json("merging.bake/1", doc)
    size = sum(doc["files"].values())
    say(f"wrote {out}: {len(files)} files, {size:,} bytes ({size / 2**20:.1f} MiB)")
