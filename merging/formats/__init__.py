"""The format registry: every on-disk format is one module with ``detect``, ``read`` and ``write``."""

from __future__ import annotations

from pathlib import Path

from merging.errors import MergingError, UnsupportedError
from merging.formats import gguf, kohya, peft
from merging.formats.base import Format, ReadOptions, WriteOptions

_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> None:
    """Add a format; a duplicate or malformed name is an error."""
    if not fmt.name.isidentifier() or fmt.name != fmt.name.lower():
        raise MergingError(f"format name {fmt.name!r} must be a lower-case identifier")
    if fmt.name in _REGISTRY:
        raise MergingError(f"format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt


for _module in (peft, kohya, gguf):
    register(_module.FORMAT)


def get(name: str) -> Format:
    """The format called ``name``; a miss lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedError(f"unknown format {name!r}; choose one of: {', '.join(names())}") from None


def names() -> list[str]:
    return list(_REGISTRY)


def detect(path: str | Path) -> Format | None:
    """The format whose container ``path`` is (a PEFT folder, a .safetensors or .gguf file), or None."""
    return next((fmt for fmt in _REGISTRY.values() if fmt.detect(Path(path))), None)


__all__ = ["Format", "ReadOptions", "WriteOptions", "detect", "get", "names", "register"]
