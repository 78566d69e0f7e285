"""`merging inspect PATH`: what a checkpoint folder or file holds."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from merging import formats, serving, sources
from merging.adapter import KIND_NAMES
from merging.deltas import LowRank, Scale
from merging.errors import NotAnAdapter
from merging.ia3 import AddedScale
from merging.tensorfiles import list_tensors, tensor_files

ADAPTER_PARTS = ("lora_", "hada_", "lokr_", "ia3_")


def _module_of(name: str) -> tuple[str, str]:
    """Split a tensor name into (module path, tensor part) for display."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith(("lora_", "hada_", "lokr_", "ia3_")) or p in {"weight", "bias"}:
            return ".".join(parts[:i]) or name, ".".join(parts[i:])
    return ".".join(parts[:-1]) or name, parts[-1]


@click.command("inspect")
@click.argument("spec")
def inspect_cmd(spec: str) -> None:
    """Show what a checkpoint holds: an adapter's deltas, or any tensor file's modules and shapes.

    Example: merging inspect path/to/adapter_or_model
    """
    path = Path(spec)
    if not path.exists():  # a Hub id (user/repo[@rev][:subfolder]) through the huggingface_hub cache
        for ad in sources.load(spec):
            _inspect_adapter(Path(spec), ad)
        return
    adapter = _as_adapter(path)
    if adapter is not None:
        _inspect_adapter(path, adapter)
        return
    infos = list_tensors(path)
    modules: dict[str, list] = defaultdict(list)
    for t in infos:
        modules[_module_of(t.name)[0]].append(t)
    table = Table(title=str(path), show_lines=False)
    for col in ("module", "tensors", "shapes", "dtype"):
        table.add_column(col, overflow="fold" if col == "module" else "ellipsis")
    for mod, ts in modules.items():
        table.add_row(
            mod,
            ", ".join(_module_of(t.name)[1] for t in ts),
            ", ".join("×".join(map(str, t.shape)) for t in ts),
            ", ".join(sorted({t.dtype for t in ts})),
        )
    console = Console()
    console.print(table)
    files = {t.file for t in infos}
    size = sum(f.stat().st_size for f in files)
    console.print(
        f"{len(modules)} modules, {len(infos)} tensors, {sum(t.numel for t in infos):,} parameters, "
        f"{size / 2**20:.1f} MiB in {len(files)} file(s)"
    )
    if any(_module_of(t.name)[1].startswith(ADAPTER_PARTS) for t in infos):
        console.print(
            "these look like adapter tensors, but there is no adapter_config.json: the adapter type, its "
            "scale (alpha / r) and its targets are unknown without it",
            highlight=False, soft_wrap=True,
        )  # fmt: skip


def _as_adapter(path: Path):
    """The adapter a path holds (PEFT folder, kohya file, GGUF LoRA), or None for other tensor files."""
    fmt = formats.detect(path)
    if fmt is None:
        return None
    try:
        return fmt.read(path, options=formats.ReadOptions(keep_permuted=True))
    except NotAnAdapter:
        return None  # a model, not an adapter: list its tensors


def _inspect_adapter(path: Path, ad) -> None:
    """Per-module delta kind, shape, rank, scale and norm of an adapter."""
    rev = f" @ {ad.revision}" if ad.revision else ""
    table = Table(title=f"{path}{rev}  ({', '.join(sorted(ad.kinds))}; base: {ad.base_model or 'unknown'})")
    for col in ("module", "delta", "shape (out, in)", "rank", "scale", "‖ΔW‖", "params"):
        left = col in ("module", "delta")
        table.add_column(col, justify="left" if left else "right", overflow="fold" if left else "ellipsis")
    for mod, d in ad.deltas.items():
        if isinstance(d, (Scale, AddedScale)):  # PEFT's l, or LyCORIS's w = l − 1 (added: w ⊙ W)
            v, kind = (d.l, "ia3") if isinstance(d, Scale) else (d.w, "ia3 lycoris, w")
            table.add_row(mod, f"{kind} ({d.side})", str(v.numel()), "", "", f"{float(v.float().norm()):.4g}",
                          f"{d.numel:,}")  # fmt: skip
            continue
        kind = "dora" if isinstance(d, LowRank) and d.magnitude is not None else KIND_NAMES[type(d)]
        norm = "needs base" if kind == "dora" else f"{d.norm():.4g}"
        shape = "×".join(map(str, d.target.matrix_shape))
        table.add_row(mod, kind, shape, str(d.rank), f"{d.scale:.4g}", norm, f"{d.numel:,}")
    for mod, src in ad.tied.items():
        table.add_row(mod, f"tied to {src}", "", "", "", "", "0")
    for mod, a in ad.aux.items():
        table.add_row(mod, type(a).__name__, "", "", "", "", f"{sum(t.numel() for t in _aux_tensors(a)):,}")
    console = Console()
    console.print(table)
    size = sum(f.stat().st_size for f in tensor_files(ad.source or path))
    console.print(f"{len(ad.deltas)} modules, {ad.numel:,} parameters, {size / 2**20:.2f} MiB on disk")
    for line in serving.of([ad]).lines():
        console.print(line, highlight=False, soft_wrap=True)


def _aux_tensors(a) -> list:
    return list(a.tensors.values()) if hasattr(a, "tensors") else [a.rows]
