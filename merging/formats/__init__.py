"""The format registry: every on-disk format is one module with ``detect``, ``read`` and ``write``."""

from __future__ import annotations

from pathlib import Path

from merging.core.registry import Registry
from merging.formats import gguf, kohya, peft
from merging.formats.base import Format, ReadOptions, WriteOptions

_REGISTRY: Registry[Format] = Registry("format")


def register(fmt: Format) -> None:
    """Add a format; a duplicate or malformed name is an error."""
    _REGISTRY.register(fmt.name, fmt)


for _module in (peft, kohya, gguf):
    register(_module.FORMAT)


get = _REGISTRY.get  # the format called name; a miss lists the valid names
names = _REGISTRY.names


def detect(path: str | Path) -> Format | None:
    """The format whose container ``path`` is (a PEFT folder, a .safetensors or .gguf file), or None."""
    return next((fmt for fmt in _REGISTRY.items() if fmt.detect(Path(path))), None)


__all__ = ["Format", "ReadOptions", "WriteOptions", "detect", "get", "names", "register"]
