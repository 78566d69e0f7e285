"""Base models: their module layout without loading weights, and loading them for real."""

from __future__ import annotations

from pathlib import Path

import torch

from merging.adapter import base_shapes
from merging.deltas import Layer
from merging.errors import FormatError


def _config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{folder}: not a transformers model folder ({e})") from e


def skeleton(folder: Path) -> torch.nn.Module:
    """The model built from its config on the meta device: module names and shapes, no memory."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = _config(Path(folder))
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def module_shapes(folder: Path) -> dict[str, tuple[Layer, tuple[int, ...]]]:
    """Module path → (layer kind, stored weight shape) of a transformers model folder, without its weights."""
    return base_shapes(skeleton(Path(folder)))
