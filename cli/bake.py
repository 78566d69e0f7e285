"""`merging bake`: fold adapters into the base weights and write a full model."""

from __future__ import annotations

from pathlib import Path

import click

import merging

from .common import FloatList, complete_path, console, err_console, progress_bar, telling_replaced
from .tables import Col, Grid, emit_json, say, show

# The library checks these again (merging.base.quantized.QUANTS, merging.export.gguf_bake.OUTTYPES); spelled
# out here so that `merging --help` imports no torch.
QUANTS = ("nf4", "fp4", "int8")
OUTTYPES = ("same", "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


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
@click.option("--single-file", is_flag=True,
              help="An SD1.5/SDXL pipeline base: write -o as one checkpoint file (UNet, VAE, text encoders "
                   "in the original layout) that from_single_file, A1111 and ComfyUI read; SD3: the "
                   "transformer in MMDiT names.")  # fmt: skip
def bake_cmd(inputs, base, out, weights, force, as_json, base_quant, outtype, into, single_file) -> None:
    """Write the base model with the adapters folded in, streaming one shard (or GGUF tensor) at a time.

    A .gguf base is baked at its own quantisation (--outtype), written as one .gguf file.

    Example: merging bake --base BASE merged/ -o baked-model/
    """
    def measured(table) -> None:
        if not as_json:
            show(Grid(f"bakes against PEFT on the {base_quant} base (the adapters as trained)",
                      (Col("into"), Col("rel err", True), Col("max |Δ|", True), Col("top-1", True),
                       Col("KL", True)),
                      [[r.into, f"{r.effect_rel_error:.1e}", f"{r.max_abs_diff:.1e}",
                        f"{r.top1_agreement:.0%}", f"{r.kl:.1e}"] for r in table]), err_console)  # fmt: skip

    with telling_replaced(err_console if as_json else console):
        with progress_bar("baking") as update:
            doc = merging.bake(inputs, base, out, weights=weights, force=force, progress=update,
                               base_quant=base_quant, into=into, outtype=outtype, measured=measured,
                               single_file=single_file)
    if as_json:
        return emit_json("merging.bake/1", doc)
    size = sum(doc["files"].values())
    say(f"wrote {out}: {len(doc['files'])} files, {size:,} bytes ({size / 2**20:.1f} MiB)")
