"""A base model given as its weights only: a ``model.safetensors`` state dict, or a folder of safetensors
without a config.json (custom torch models, PEFT's own test models).

The layout comes from the tensor headers: each ``<module>.weight`` is a module, its kind read from the number
of dimensions (3-D Conv1d, 4-D Conv2d, 5-D Conv3d). A 2-D weight may be a Linear, an Embedding or GPT-2's
Conv1D, which a state dict does not tell apart: its kind is "unknown" and each delta keeps its own (checked
against the stored shape). Grouped convolutions cannot be told from their weights either (no groups).
"""

from __future__ import annotations

from pathlib import Path

from merging.core.deltas import CONV_DIMS, Layer
from merging.errors import FormatError
from merging.storage.tensorfiles import list_tensors

KINDS: dict[int, Layer] = {2: "unknown", **{n: kind for kind, n in CONV_DIMS.items()}}  # type: ignore[dict-item]


def is_state_dict(path: Path) -> bool:
    """A .safetensors file, or a folder holding .safetensors files and no config.json / model_index.json."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".safetensors"
    return (
        path.is_dir()
        and not (path / "config.json").exists()
        and not (path / "model_index.json").exists()
        and any(path.glob("*.safetensors"))
    )


def state_dict_modules(path: Path) -> tuple[dict[str, tuple[Layer, tuple[int, ...]]], frozenset[str]]:
    """Module path → (layer kind, stored weight shape), and the modules with a bias, from the headers."""
    tensors = {t.name: t.shape for t in list_tensors(Path(path)) if t.file.suffix == ".safetensors"}
    if not tensors:
        raise FormatError(f"{path}: no safetensors weights (want model.safetensors or a folder of them)")
    modules = {
        name.removesuffix(".weight"): (KINDS[len(shape)], tuple(shape))
        for name, shape in tensors.items() if name.endswith(".weight") and len(shape) in KINDS
    }  # fmt: skip
    return modules, frozenset(m for m in modules if f"{m}.bias" in tensors)
