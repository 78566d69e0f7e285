"""A base's weights read lazily by module path, one tensor at a time: a transformers model, a diffusers
component, or a pipeline (``<component>.<path>``), under the names its checkpoints use (text_model.*)."""

from __future__ import annotations

from pathlib import Path

import torch

from merging.base.layout import BaseLayout
from merging.base.pipelines import components, is_pipeline
from merging.errors import FormatError
from merging.storage.tensorfiles import LazyWeights


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
            self.saved = dict(BaseLayout.from_folder(self.folder).saved)
        return self.lazy.module_weight(self.saved.get(module, module))
