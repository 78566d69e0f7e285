"""`merging convert`: between PEFT folders, kohya/LyCORIS files and llama.cpp GGUF LoRA."""

from __future__ import annotations

from pathlib import Path

import click

import merging

from .common import complete_path, console, err_console, telling_replaced
from .tables import emit_json, say


@click.command("convert")
@click.argument("source", shell_complete=complete_path)
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder or file."
)
@click.option(
    "--to", "fmt", required=True, type=click.Choice(["peft", "kohya", "gguf"]), help="Output format."
)
@click.option("--base", type=click.Path(exists=True, path_type=Path),
              help="Base model folder: names kohya modules, gives GGUF its architecture.")  # fmt: skip
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16"]), default="f32", show_default=True,
              help="GGUF tensor type.")  # fmt: skip
@click.option("--prefix", default="lora_unet", show_default=True, help="kohya lora_name prefix.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--uniform-rank", is_flag=True, help="One rank and lora_alpha = r in every module.")
@click.option("--serve", type=click.Choice(["vllm"]), help="Pad to the smallest rank the engine accepts.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON (merging.convert/1).")
def convert_cmd(source, out, fmt, base, outtype, prefix, force, uniform_rank, serve, as_json) -> None:
    """Convert an adapter between formats (LoHa/LoKr become exact LoRA where the target needs it).

    Example: merging convert adapter/ -o adapter.gguf --to gguf --base BASE
    """
    if fmt == "gguf" and base is None:
        raise click.UsageError("--to gguf needs --base (the architecture, block and head counts)")
    with telling_replaced(err_console if as_json else console):
        doc = merging.convert(source, out, fmt, base=base, outtype=outtype, prefix=prefix, force=force,
                              uniform_rank=uniform_rank, serve=serve)  # fmt: skip
    if as_json:
        return emit_json("merging.convert/1", doc)
    say(f"wrote {out} ({fmt}, {doc['modules']} modules, {doc['params']:,} parameters, "
        f"{doc['bytes']:,} bytes)")  # fmt: skip
    for line in doc["serving"]:
        say(line)
