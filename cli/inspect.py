"""`merging inspect PATH`: what a checkpoint folder or file holds."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from merging.tensorfiles import list_tensors


def _module_of(name: str) -> tuple[str, str]:
    """Split a tensor name into (module path, tensor part) for display."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith(("lora_", "hada_", "lokr_", "ia3_")) or p in {"weight", "bias"}:
            return ".".join(parts[:i]) or name, ".".join(parts[i:])
    return ".".join(parts[:-1]) or name, parts[-1]


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def inspect_cmd(path: Path) -> None:
    """Show the modules, tensors, shapes and dtypes a checkpoint holds.

    Example: merging inspect path/to/adapter_or_model
    """
    infos = list_tensors(path)
    modules: dict[str, list] = defaultdict(list)
    for t in infos:
        modules[_module_of(t.name)[0]].append(t)
    table = Table(title=str(path), show_lines=False)
    for col in ("module", "tensors", "shapes", "dtype"):
        table.add_column(col)
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
