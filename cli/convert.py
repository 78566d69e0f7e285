"""`merging convert`: between PEFT folders, kohya/LyCORIS files and llama.cpp GGUF LoRA."""

from __future__ import annotations

from pathlib import Path

import click

from merging import formats
from merging.base.layout import BaseLayout
from merging.errors import MergingError
from merging.formats import sources
from merging.merge import serving
from merging.storage.files import refuse_overlap

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
    layout = BaseLayout.from_folder(base) if base is not None else None
    adapters = sources.load_spec(source, base=layout)
    if len(adapters) != 1:
        raise MergingError(f"{source}: holds {len(adapters)} adapters; convert them one at a time")
    ad = adapters[0]
    refuse_overlap(out, [ad.source, base])
    if layout is not None:
        ad = ad.refine_targets(layout.modules)
    if fmt == "gguf" and layout is None:
        raise click.UsageError("--to gguf needs --base (the architecture, block and head counts)")
    if uniform_rank or serve:
        rank = serving.vllm_rank(serving.of([ad]).max_rank) if serve == "vllm" else None
        ad = serving.uniform(ad, rank)
    options = formats.WriteOptions(prefix=prefix, out_type=outtype)
    with telling_replaced(err_console if as_json else console):
        formats.get(fmt).write(ad, out, base=layout, force=force, options=options)
    written = [Path(out)] if Path(out).is_file() else sorted(p for p in Path(out).rglob("*") if p.is_file())
    doc = {"source": source, "output": str(out), "format": fmt, "modules": len(ad.deltas), "params": ad.numel,
           "bytes": sum(p.stat().st_size for p in written), "serving": serving.of([ad]).lines()}  # fmt: skip
    if as_json:
        return emit_json("merging.convert/1", doc)
    say(f"wrote {out} ({fmt}, {doc['modules']} modules, {doc['params']:,} parameters, "
        f"{doc['bytes']:,} bytes)")  # fmt: skip
    for line in doc["serving"]:
        say(line)
