"""The stack folder: an IA³ + LoRA merge written as a pair of PEFT folders and a manifest naming them.

A merge with both parts is ``out/ia3`` and ``out/lora`` (PEFT folders) plus ``out/merging_stack.json``,
``{"stack": ["ia3", "lora"]}``: the members in stacking order (IA³ applied first, LoRA on top). The merge
writes it (``write``), ``sources.load`` reads it back as one set (``read``), and replacing or publishing a
folder owns the members it names (``members``). Nothing else knows the file's name or shape.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from merging.errors import FormatError
from merging.storage.files import write_text

STACK_FILE = "merging_stack.json"


def is_stack(folder: Path) -> bool:
    """Whether ``folder`` holds a stack manifest."""
    return (Path(folder) / STACK_FILE).is_file()


def write(folder: Path, names: Sequence[str]) -> None:
    """Write the manifest naming the members of ``folder`` in stacking order (into a folder being made)."""
    write_text(Path(folder) / STACK_FILE, json.dumps({"stack": list(names)}, indent=2) + "\n")


def read(folder: Path) -> list[str]:
    """The members of a stack folder in stacking order, or a FormatError naming the manifest."""
    manifest = Path(folder) / STACK_FILE
    try:
        names = json.loads(manifest.read_text())["stack"]
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{manifest}: not a valid stack manifest ({e})") from e
    return names


def members(manifest: Path) -> list[str]:
    """The member names a manifest file lists (strings only); [] for a missing or malformed manifest, which
    ``read`` reports when the folder is loaded."""
    try:
        names = json.loads(Path(manifest).read_text())["stack"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
