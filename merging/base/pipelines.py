"""diffusers bases: a pipeline folder (model_index.json + component folders) or one component folder.

A pipeline's adaptable components (unet or transformer, text encoders) are built from their configs on the
meta device (names and shapes, no memory) and named ``<component>.<module path>``; a single component
folder is one model. Weights are read on demand from each component's safetensors, under the names its
checkpoints use. diffusers is an optional extra (``pip install merging[sd]``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from merging.errors import FormatError, SourceError

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")  # AutoModel picks wrong


def is_pipeline(folder: Path) -> bool:
    """A diffusers pipeline folder (it has model_index.json)."""
    return (Path(folder) / "model_index.json").is_file()


def is_component(folder: Path) -> bool:
    """A diffusers model folder (its config.json names a ``_class_name``)."""
    cfg = Path(folder) / "config.json"
    return cfg.is_file() and "_class_name" in _json(cfg)


def is_text_encoder(folder: Path) -> bool:
    """A pipeline's text encoder folder (its architecture is one AutoModel would not build as such)."""
    cfg = Path(folder) / "config.json"
    return cfg.is_file() and bool(set(_json(cfg).get("architectures") or ()) & set(TEXT_ENCODERS))


def _json(file: Path) -> dict:
    try:
        return json.loads(Path(file).read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{file}: not readable JSON ({e})") from None


def components(folder: Path) -> list[str]:
    """The adaptable components a pipeline folder holds, in a fixed order."""
    index = _json(Path(folder) / "model_index.json")
    found = [c for c in COMPONENTS if c in index and (Path(folder) / c / "config.json").is_file()]
    if not found:
        raise FormatError(f"{folder}: a diffusers pipeline without unet, transformer or text encoder folders")
    return found


def skeleton(folder: Path) -> torch.nn.Module:
    """One component (diffusers model or transformers text encoder) built from its config on meta."""
    folder = Path(folder)
    cfg = _json(folder / "config.json")
    with torch.device("meta"):
        if "_class_name" in cfg:
            try:
                import diffusers
            except ImportError:
                raise SourceError(f"{folder}: a diffusers model; install the sd extra (diffusers)") from None
            cls = getattr(diffusers, cfg["_class_name"], None)
            if cls is None:
                raise FormatError(f"{folder}: diffusers has no model class {cfg['_class_name']!r}")
            return cls.from_config(cls.load_config(str(folder)))
        import transformers

        arch = (cfg.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            raise FormatError(f"{folder}: config.json names no transformers architecture ({arch!r})")
        return cls(transformers.AutoConfig.from_pretrained(str(folder)))


def pipeline_skeletons(folder: Path) -> dict[str, torch.nn.Module]:
    """Every adaptable component of a pipeline folder, on meta, by component name."""
    return {c: skeleton(Path(folder) / c) for c in components(folder)}
