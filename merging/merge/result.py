"""A merge's result and its output: the merged adapter(s), per-module reports, the recipe, the folder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from merging import formats
from merging.base import pipelines as sdbase
from merging.base.layout import BaseLayout
from merging.core.adapter import Adapter
from merging.errors import UnsupportedError
from merging.formats import stack_folder
from merging.formats.base import Provenance
from merging.formats.peft import RECIPE_FILE, owned, recipe_text
from merging.merge.recipe import Recipe, Versions, inputs_of
from merging.storage.files import atomic_folder, refuse_overlap, write_text
from merging.strategies import Options


@dataclass(frozen=True)
class ModuleReport:
    """What the merge did to one module."""

    module: str
    kind: str  # "lora", "ia3" or "lora+ia3"
    rank: int
    numel: int
    error: float | None  # ‖ΔW_merged − Σ w_i ΔW_i‖_F / ‖Σ w_i ΔW_i‖_F, from factors (additive part)
    exact: bool = True  # reproduces the stacked outputs, by the strategies' exactness rules
    scale: float | None = None  # the merged LoRA's scale (alpha / r), for what serving needs


@dataclass(frozen=True, eq=False)
class MergeResult:
    """The merged adapter(s) in stacking order (IA³ first when there is one) and per-module reports.

    A streamed result (``merge(..., stream=True)``) builds each module when the writer asks for it; its
    ``modules`` fill in as that happens.
    """

    adapters: list[Adapter]
    modules: list[ModuleReport]
    strategy: str
    additive_strategy: str | None
    ia3_strategy: str | None
    options: Options
    weights: list[float] = field(default_factory=list)
    layer_weights: dict[str, tuple[float, ...]] | None = None  # layer → one weight per input (tuned merges)
    inputs: tuple[Adapter, ...] = ()  # what was merged, in stacking order (the recipe hashes their files)

    @property
    def exact(self) -> bool:
        """Reproduces the stacked outputs, by the strategies' exactness rules, in every module."""
        return all(m.exact for m in self.modules)


def read_recipe(folder: Path) -> Recipe | None:
    """The merge_recipe.json of a merged folder, typed (None when there is none)."""
    return Recipe.read(folder)


def recipe(result: MergeResult, inputs: Sequence[Adapter]) -> Recipe:
    """The merge recipe: inputs (with sha256 of their weight files), weights, strategy, options, versions."""
    return Recipe(
        inputs_of(inputs, result.weights), result.strategy, result.additive_strategy, result.ia3_strategy,
        result.options, tuple(a.name for a in result.adapters), Versions.current(), result.layer_weights,
    )  # fmt: skip


def write_result(
    result: MergeResult, out: Path, recipe_data: Provenance, *, force: bool = False, fmt: str = "peft",
    base: BaseLayout | str | Path | None = None, inputs: Sequence[Path | None] = (),
) -> Path:  # fmt: skip
    """Write the merged adapter(s) with the recipe, atomically.

    peft: one adapter makes ``out`` a PEFT folder with merge_recipe.json; IA³ plus LoRA make ``out/ia3``,
    ``out/lora`` and a ``merging_stack.json`` naming them in stacking order (``sources.load`` reads it
    back as one set). kohya / gguf: ``out`` is one file, the recipe in its metadata (``merging.recipe``).
    ``base`` (a layout or a model folder) is what GGUF needs for its architecture and heads.
    ``recipe_data`` may be a function giving the recipe: the PEFT writer calls it once the weights are
    written (the inputs' hashes finish meanwhile); ``inputs`` are then the paths no output may overlap.
    """
    writer = formats.get(fmt)
    if not callable(recipe_data):
        inputs = [*inputs, *(i.get("path") for i in recipe_data.get("inputs", ()) if isinstance(i, dict))]
    elif writer.name != "peft" or len(result.adapters) != 1:
        recipe_data = recipe_data()
    refuse_overlap(out, [*inputs, base if isinstance(base, str | Path) else None])
    if len(result.adapters) == 1:
        pipeline = isinstance(base, (str, Path)) and sdbase.is_pipeline(Path(base))
        pipeline = pipeline or isinstance(base, BaseLayout)
        layout = BaseLayout.of(base) if base is not None and (writer.uses_base or pipeline) else None
        return writer.write(result.adapters[0], out, provenance=recipe_data, base=layout, force=force)
    if writer.name != "peft":
        raise UnsupportedError(f"an IA³ + LoRA pair has no single {fmt} file; write it with --format peft")
    with atomic_folder(Path(out), force=force, owns=owned) as tmp:
        for ad in result.adapters:
            writer.write(ad, tmp / ad.name)
        stack_folder.write(tmp, [ad.name for ad in result.adapters])
        write_text(tmp / RECIPE_FILE, recipe_text(recipe_data))
    return Path(out)
