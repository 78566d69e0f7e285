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


def _base_parts(base) -> tuple[list[str], dict]:
    """Module names and config dict of a base given as a model folder or a loaded transformers model."""
    if isinstance(base, (str, Path)):
        from merging.basemodel import module_shapes

        cfg = Path(base) / "config.json"
        return list(module_shapes(Path(base))), json.loads(cfg.read_text()) if cfg.exists() else {}
    from merging.adapter import base_shapes

    return list(base_shapes(base)), base.config.to_dict()


def load(path: str | Path, *, allow_nonfinite: bool = False, base=None) -> list[Adapter]:
    """The adapters a path holds, in stacking order: one for a PEFT folder or a kohya/GGUF file, several
    for a merged stack.

    Args:
        path: a PEFT adapter folder, a folder with merging_stack.json, a kohya/LyCORIS .safetensors file,
            or a llama.cpp .gguf LoRA file.
        allow_nonfinite: accept NaN/Inf values.
        base: the base model (a folder or a loaded model): maps kohya names to module paths and undoes
            GGUF's q/k permutation.
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
    if p.is_file() and p.suffix == ".gguf":
        from merging.formats import gguf

        info = None
        if base is not None:
            modules, config = _base_parts(base)
            info = gguf.BaseInfo.from_config(config, modules)
        return [gguf.read(p, info, allow_nonfinite=allow_nonfinite)]
    if p.is_file() and p.suffix == ".safetensors":
        from merging.formats import kohya

        modules = _base_parts(base)[0] if base is not None else None
        return [kohya.read(p, modules=modules, allow_nonfinite=allow_nonfinite)]
    raise SourceError(f"{p}: not an adapter (no adapter_config.json, {STACK_FILE}, .safetensors or .gguf)")


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


def load_spec(spec: str, *, allow_nonfinite: bool = False, base=None) -> list[Adapter]:
    """Load ``path`` or ``name=path``; with a name, the adapter (or each of a stack) is renamed."""
    from dataclasses import replace

    name, path = None, spec
    if "=" in spec and not Path(spec).exists():
        name, _, path = spec.partition("=")
    adapters = load(path, allow_nonfinite=allow_nonfinite, base=base)
    if name is None:
        return adapters
    if len(adapters) == 1:
        return [replace(adapters[0], name=name)]
    return [replace(a, name=f"{name}/{a.name}") for a in adapters]
