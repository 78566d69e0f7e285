"""Base models: their module layout without loading weights, and loading them for real."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True, eq=False)
class BaseLayout:
    """A base model without its weights: module path → (layer kind, stored weight shape), and its config.

    ``config`` is the transformers config as a dict (``{}`` when there is none).
    """

    modules: Mapping[str, tuple[Layer, tuple[int, ...]]]
    config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: str | Path) -> BaseLayout:
        """From a transformers model folder (config.json and the module tree built on the meta device)."""
        cfg = Path(folder) / "config.json"
        config = json.loads(cfg.read_text()) if cfg.is_file() else {}
        return cls(module_shapes(Path(folder)), config)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> BaseLayout:
        """From a loaded torch / transformers model."""
        config = getattr(model, "config", None)
        return cls(base_shapes(model), config.to_dict() if hasattr(config, "to_dict") else {})

    @classmethod
    def of(cls, base: BaseLayout | str | Path | torch.nn.Module) -> BaseLayout:
        """A base given as a layout, a model folder or a loaded model, as a layout."""
        if isinstance(base, BaseLayout):
            return base
        if isinstance(base, (str, Path)):
            return cls.from_folder(base)
        return cls.from_model(base)
