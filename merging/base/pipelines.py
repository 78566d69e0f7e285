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
from merging.storage.tensorfiles import LazyWeights

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


class PipelineWeights:
    """Base weights of a pipeline folder by module path ``<component>.<path>``, read one at a time."""

    def __init__(self, folder: Path, saved: dict[str, str]) -> None:
        self.folder = Path(folder)
        self.parts: dict[str, ModelWeights] = {}
        for c in components(self.folder):
            mine = {m: p for m, p in saved.items() if m.startswith(f"{c}.")}
            own = {m.partition(".")[2]: p.partition(".")[2] for m, p in mine.items()}
            self.parts[c] = ModelWeights(self.folder / c, own)

    def module_weight(self, module: str) -> torch.Tensor:
        """The weight of ``<component>.<path>``."""
        comp, _, path = module.partition(".")
        if comp not in self.parts:
            raise FormatError(f"{self.folder}: module {module} is in no component of the pipeline")
        return self.parts[comp].module_weight(path)


def weights(folder: Path) -> PipelineWeights | ModelWeights:
    """Lazy base weights of a model, pipeline or component folder (``module_weight(path)``)."""
    if is_pipeline(folder):
        from merging.base.layout import BaseLayout

        return PipelineWeights(folder, dict(BaseLayout.from_folder(folder).saved))
    return ModelWeights(Path(folder))


class ModelWeights:
    """A model's lazy weights by module path, or under the path older checkpoints use (text_model.*)."""

    def __init__(self, folder: Path, saved: dict[str, str] | None = None) -> None:
        self.folder, self.lazy, self.saved = folder, LazyWeights(folder), saved

    def module_weight(self, module: str) -> torch.Tensor:
        """The module's weight tensor as stored."""
        if f"{module}.weight" in self.lazy:
            return self.lazy.module_weight(module)
        if self.saved is None:
            from merging.base.layout import BaseLayout

            self.saved = dict(BaseLayout.from_folder(self.folder).saved)
        return self.lazy.module_weight(self.saved.get(module, module))
