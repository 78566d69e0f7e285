"""A merge's result and its output: the merged adapter(s), per-module reports, the recipe, the folder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from merging import formats
from merging.base import pipelines as sdbase
from merging.base.layout import BaseLayout
from merging.core.adapter import Adapter
from merging.errors import UnsupportedError
from merging.formats import stack_folder
from merging.formats.base import Provenance
from merging.formats.peft import RECIPE_FILE, owned, recipe_text
from merging.merge import serving
from merging.merge.recipe import Recipe, Versions, inputs_of
from merging.storage.atomic import atomic_folder
from merging.storage.files import refuse_overlap, write_text
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

    def for_serving(self, uniform_rank: bool = False, serve: str | None = None) -> MergeResult:
        """The LoRA part in uniform form (one rank, lora_alpha = r), padded for ``serve`` ("vllm")."""
        if not uniform_rank and serve is None:
            return self
        return replace(self, adapters=[serving.for_engine(a, serve) if a.name == "lora" else a
                                       for a in self.adapters])  # fmt: skip

    def save(
        self, out: str | Path, format: str = "peft", *, serve: str | None = None, uniform_rank: bool = False,
        base_model: str | None = None, base: BaseLayout | str | Path | None = None, force: bool = False,
    ) -> MergeResult:  # fmt: skip
        """Write the merge atomically with its recipe (``merging merge -o OUT``).

        Args:
            out: the output folder (peft) or file (kohya, gguf).
            format: "peft", "kohya" or "gguf".
            serve: pad the LoRA part to the smallest rank this engine accepts ("vllm"; implies uniform_rank).
            uniform_rank: one rank and lora_alpha = r everywhere (llama.cpp, TGI, LoRAX).
            base_model: the base's Hub id to record (when the inputs name a local folder).
            base: the base model folder (GGUF's architecture; a diffusers pipeline's component names).
            force: replace an existing output.

        Returns:
            The result as written (padded, renamed); a streamed result's ``modules`` are filled in.
        """
        result = self.for_serving(uniform_rank, serve)
        if base_model:
            result = replace(result, adapters=[replace(a, base_model=base_model) for a in result.adapters])

        def provenance() -> dict:  # after the weights: the inputs' sha256 run on a thread meanwhile
            return recipe(result, result.inputs).to_dict()

        sources_ = [ad.source for ad in result.inputs]
        write_result(result, Path(out), provenance, force=force, fmt=format, base=base, inputs=sources_)
        return result


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
    if isinstance(recipe_data, Mapping):
        inputs = [*inputs, *(i.get("path") for i in recipe_data.get("inputs", ()) if isinstance(i, dict))]
    elif callable(recipe_data) and (writer.name != "peft" or len(result.adapters) != 1):
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
        write_text(tmp / RECIPE_FILE, recipe_text(recipe_data if isinstance(recipe_data, Mapping) else {}))
    return Path(out)


def summary(result: MergeResult, out: str | Path, seconds: float) -> dict[str, Any]:
    """What a merge wrote (the ``merging merge --json`` document, schema merging.merge/1)."""
    files = [Path(out)] if Path(out).is_file() else sorted(Path(out).rglob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    adapters = []
    for ad in result.adapters:
        reps = [r for r in result.modules if r.module in ad.deltas]
        lora = ad.name == "lora"
        numel = sum(r.numel for r in reps) if len(result.adapters) == 1 else ad.numel  # a report: both parts
        errs = [r.error for r in reps if r.error is not None and lora]
        adapters.append({
            "name": ad.name, "modules": len(ad.deltas), "max_rank": max((r.rank for r in reps), default=0)
            if lora else None, "params": numel, "bytes": size if len(result.adapters) == 1 else None,
            "weight_error_max": max(errs) if errs else None,
        })  # fmt: skip
    lora_ranks = {r.module: (r.rank, r.scale) for r in result.modules if r.scale is not None}  # streamed
    serves = serving.of(result.adapters, lora_ranks).lines()
    return {"output": str(out), "strategy": result.strategy, "exact": result.exact, "seconds": seconds,
            "bytes": size, "adapters": adapters, "serving": serves,
            "budget": None if result.options.budget is None else budget_line(result)}  # fmt: skip


def budget_line(result: MergeResult) -> str:
    """What the global budget gave each module: the parameters used and the ranks, module by module."""
    lora = [r for r in result.modules if "lora" in r.kind or r.rank == 0 and r.error is not None]
    used = sum(r.numel for r in lora)
    ranks = ", ".join(f"{r.module} {r.rank}" for r in lora)
    return f"budget {result.options.budget:,} parameters, {used:,} used; rank per module: {ranks}"
