"""Where adapters come from: a PEFT folder, or a merged stack folder (IA³ + LoRA written together)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from merging.adapter import Adapter
from merging.errors import FormatError, SourceError
from merging.examples import sha256_file
from merging.formats import peft as peft_format
from merging.tensorfiles import tensor_files

STACK_FILE = "merging_stack.json"


def load(path: str | Path, *, allow_nonfinite: bool = False) -> list[Adapter]:
    """The adapters a path holds, in stacking order: one for a PEFT folder, several for a merged stack.

    Args:
        path: a PEFT adapter folder, or a folder with merging_stack.json.
        allow_nonfinite: accept NaN/Inf values.
    """
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{p}: no such file or folder")
    if (p / STACK_FILE).is_file():
        try:
            names = json.loads((p / STACK_FILE).read_text())["stack"]
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{p / STACK_FILE}: not a valid stack manifest ({e})") from e
        return [peft_format.read(p / n, allow_nonfinite=allow_nonfinite) for n in names]
    if peft_format.is_peft_folder(p):
        return [peft_format.read(p, allow_nonfinite=allow_nonfinite)]
    raise SourceError(f"{p}: not an adapter (no adapter_config.json or {STACK_FILE})")


def describe(adapter: Adapter) -> dict[str, Any]:
    """Name, source, base model and sha256 of each weight file: what a recipe records about an input."""
    files = {}
    if adapter.source is not None and adapter.source.exists():
        files = {f.name: sha256_file(f) for f in tensor_files(adapter.source)}
    return {
        "name": adapter.name,
        "path": str(adapter.source) if adapter.source else None,
        "base_model": adapter.base_model,
        "revision": adapter.revision,
        "kinds": sorted(adapter.kinds),
        "sha256": files,
    }


def load_spec(spec: str, *, allow_nonfinite: bool = False) -> list[Adapter]:
    """Load ``path`` or ``name=path``; with a name, the adapter (or each of a stack) is renamed."""
    from dataclasses import replace

    name, path = None, spec
    if "=" in spec and not Path(spec).exists():
        name, _, path = spec.partition("=")
    adapters = load(path, allow_nonfinite=allow_nonfinite)
    if name is None:
        return adapters
    if len(adapters) == 1:
        return [replace(adapters[0], name=name)]
    return [replace(a, name=f"{name}/{a.name}") for a in adapters]
