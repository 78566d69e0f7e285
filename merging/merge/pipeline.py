"""The merge pipeline: align the inputs, run a strategy module by module, assemble the result.

Per module the inputs are taken in the order given (innermost first, as they would be stacked).
Additive deltas go through the chosen strategy (or ``cat`` when the strategy only merges IA³);
IA³ vectors through the chosen strategy (or ``multiplicative`` when it only merges additive deltas).
LyCORIS IA³ (``AddedScale``, additive per network) sums exactly into one LyCORIS IA³; stacked with other
kinds on one module it is resolved against the base weights (``Dense(w ⊙ W)``) or refused.
An input read without its base (layer kind "unknown") takes the layer kind and shape another input knows.
Where a module has both, the IA³ scalings are folded exactly into the additive deltas stacked inside
them (diag(l) into B's rows for side=out, into A's columns for side=in), so the result is one IA³
adapter applied first plus one LoRA adapter on top: exactly the stacked outputs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from merging import formats, strategies
from merging.base import pipelines as sdbase
from merging.base.layout import BaseLayout
from merging.core import dora
from merging.core.adapter import (
    Adapter,
    Pair,
    Stack,
    align,
    common_invocation,
    layer_of,
    same_shape,
)  # fmt: skip
from merging.core.deltas import (
    AdditiveDelta,
    Delta,
    LowRank,
    Scale,
    stacked_factors,
    sum_error,
)
from merging.core.lazy import LazyDeltas
from merging.core.lycoris_ia3 import AddedScale, summed
from merging.core.progress import Progress
from merging.errors import MergingError, ShapeMismatch, UnsupportedError
from merging.formats.base import Provenance
from merging.formats.peft import RECIPE_FILE, owned, recipe_text
from merging.formats.sources import STACK_FILE
from merging.merge import budget
from merging.merge.aux_parts import merge_aux, merge_tied
from merging.merge.recipe import Recipe, Versions, inputs_of
from merging.storage.atomic import atomic_folder
from merging.storage.files import refuse_overlap, write_text
from merging.storage.threads import serial
from merging.strategies import Options, Strategy

BaseWeights = Callable[[str], torch.Tensor]  # module path → its base weight (stored layout)


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

    @property
    def exact(self) -> bool:
        """Reproduces the stacked outputs, by the strategies' exactness rules, in every module."""
        return all(m.exact for m in self.modules)


@dataclass(eq=False)
class Spectra:
    """Each module's spectrum, shared by merges of the same inputs that differ only in rank.

    For a strategy with a ``spectrum`` (svd, TIES, DARE, magnitude pruning) the rank-k merge of a module is
    the top k of one SVD, so ``compare``'s rank variants compute it once per module: the first merge fills
    this, the others read it (bit for bit the merges they would make alone). It holds the leading ``keep``
    triplets of each module; a merge that needs more computes its own. A merge with other inputs, weights
    or options than the first is refused.
    """

    keep: int
    by_module: dict[str, Any] = field(default_factory=dict)  # module → strategies.base.Spectrum
    seconds: float = 0.0  # spent computing them (what each sharing merge would have spent alone)
    _key: tuple | None = None
    _held: list = field(default_factory=list)  # the first merge's inputs, kept alive: their ids key it

    def check(self, plan: _Plan) -> None:
        """Bind to the first merge's inputs and options; refuse another's."""
        opts = replace(plan.options, rank=None, energy=None, clamp=None)
        key = (plan.additive.name, opts, tuple(plan.weights), tuple(map(id, plan.adapters)),
               tuple(sorted((k, tuple(v)) for k, v in plan.layer_weights.items())))  # fmt: skip
        if self._key is None:
            self._key, self._held = key, list(plan.adapters)
        elif key != self._key:
            raise MergingError("`spectra` are shared by merges of the same inputs and options; got others")


@dataclass(frozen=True)
class _Plan:
    """What every module's merge needs: the inputs, the strategies and the base weights."""

    adapters: list[Adapter]
    weights: list[float]
    chosen: Strategy
    additive: Strategy
    ia3: Strategy
    options: Options
    base_weights: BaseWeights | None
    layer_weights: dict[str, list[float]] = field(default_factory=dict)
    ranks: dict[str, int] | None = None  # svd's rank per module under a global budget
    spectra: Spectra | None = None


def merge(
    pairs: Sequence[Pair],
    strategy: str,
    options: Options | None = None,
    *,
    aux: str = "error",
    base_weights: BaseWeights | None = None,
    progress: Progress | None = None,
    stream: bool = False,
    layer_weights: Mapping[str, Sequence[float]] | None = None,
    spectra: Spectra | None = None,
) -> MergeResult:
    """Merge adapters with a strategy, module by module.

    Args:
        pairs: the inputs as (adapter, weight) in stacking order (innermost first); ``adapter.weighted``
            makes them.
        strategy: a registered strategy name (see ``strategies.names()``).
        options: strategy options.
        aux: what to do when auxiliary modules overlap: "error", or "sum" them as deltas against the base.
        base_weights: gives a module's base weight; needed for DoRA inputs and ``aux="sum"``.
        progress: called as progress(done, total, module).
        stream: when every input is additive without DoRA (LoRA, LoHa, LoKr), return a result whose deltas
            are merged when read (``LazyDeltas``): with lazily read inputs, one module is in memory at a time.
        layer_weights: layer (``adapter.layer_of``: ``model.layers.3``) → one weight per input, replacing
            ``pairs``' weights on that layer's modules (as ``merging tune --granularity layer`` learns them).
        spectra: shared by merges of these inputs that differ only in rank (see ``Spectra``).

    Returns:
        A MergeResult with one LoRA adapter, one IA³ adapter, or both (IA³ first).
    """
    if not pairs:
        raise MergingError("nothing to merge: give at least one adapter")
    adapters, weights = [a for a, _ in pairs], [float(w) for _, w in pairs]
    options = options or Options()
    chosen = strategies.get(strategy)
    add_strategy = chosen if chosen.handles in ("additive", "both") else strategies.get("cat")
    ia3_strategy = chosen if chosen.handles in ("ia3", "both") else strategies.get("multiplicative")
    layer_w = _check_layer_weights(layer_weights, len(adapters))
    plan = _Plan(adapters, weights, chosen, add_strategy, ia3_strategy, options, base_weights, layer_w)
    if spectra is not None and add_strategy.spectrum is not None:
        spectra.check(plan)
        plan = replace(plan, spectra=spectra)
    modules = align(adapters)
    plan = replace(plan, ranks=_budget_ranks(plan, modules))
    gate = common_invocation(adapters)
    tied = merge_tied(adapters)
    extra = merge_aux(adapters, aux, base_weights, set(modules))
    base = next((a.base_model for a in adapters if a.base_model), None)
    rev = next((a.revision for a in adapters if a.revision), None)
    config = _common_config(adapters, gate)
    reports: list[ModuleReport] = []
    names = (chosen.name, add_strategy.name, None)
    if stream and add_strategy is chosen and all(ad.kinds <= {"lora", "loha", "lokr"} for ad in adapters):
        built: set[str] = set()

        quiet = serial if add_strategy.moves_memory else nullcontext  # (merging.threads)

        def build(mod: str) -> Delta:
            with quiet():  # the module's reads (finite checks) and its concatenation
                merged, _, report = _merge_module(plan, mod)
            if mod not in built:
                built.add(mod)
                reports.append(report)
                if progress:
                    progress(len(built), len(modules), mod)
            return merged

        ties = {m: s for m, s in tied.items() if s in modules}
        deltas = LazyDeltas(modules, build, "lora")
        out = [Adapter("lora", deltas, base, rev, aux=extra, tied=ties, config=config)]
        return MergeResult(out, reports, *names, options, weights, _recorded(layer_w))
    lora: dict[str, Delta] = {}
    ia3: dict[str, Delta] = {}
    for i, mod in enumerate(modules):
        merged, merged_l, report = _merge_module(plan, mod)
        if merged is not None:
            lora[mod] = merged
        if merged_l is not None:
            ia3[mod] = merged_l
        reports.append(report)
        if progress:
            progress(i + 1, len(modules), mod)
    if any(dora.is_dora(d) for d in lora.values()):  # PEFT's use_dora is per adapter: every module gets one
        lora = {
            m: dora.as_dora(d, _base_matrix([(d, 1.0)], m, base_weights)) if _plain_lora(d) else d
            for m, d in lora.items()
        }  # fmt: skip
    out = []
    if ia3:
        out.append(Adapter("ia3", ia3, base, rev, aux={} if lora else extra, config=config))
    if lora or not ia3:
        ties = {m: s for m, s in tied.items() if s in lora}
        out.append(Adapter("lora", lora, base, rev, aux=extra, tied=ties, config=config))
    return MergeResult(
        out, reports, chosen.name, add_strategy.name if lora else None, ia3_strategy.name if ia3 else None,
        options, weights, _recorded(layer_w),
    )  # fmt: skip


def _recorded(layer_w: dict[str, list[float]]) -> dict[str, tuple[float, ...]] | None:
    return {k: tuple(v) for k, v in layer_w.items()} or None


def _stack(plan: _Plan, mod: str) -> list[tuple[Delta, float]]:
    """One module's (delta, weight) pairs in stacking order, on one layer kind and shape."""
    weights = plan.layer_weights.get(layer_of(mod), plan.weights)
    inputs = zip(plan.adapters, weights, strict=True)
    pairs = [(ad, ad.deltas[mod], w) for ad, w in inputs if mod in ad.deltas]
    same_shape(mod, [(ad, d) for ad, d, _ in pairs])
    return _same_target(_lycoris_ia3([(d, w) for _, d, w in pairs], mod, plan.base_weights), mod)


def _merge_module(plan: _Plan, mod: str) -> tuple[Delta | None, Delta | None, ModuleReport]:
    """One module: (its merged additive delta, its merged IA³ vector, the report); either may be None."""
    stack = _stack(plan, mod)
    if all(isinstance(d, AddedScale) for d, _ in stack):
        if plan.additive is not plan.chosen:
            raise UnsupportedError(
                f"module {mod}: LyCORIS IA³ networks add w ⊙ W each; {plan.chosen.name} models PEFT's "
                "product of IA³ vectors: use cat (their exact sum)"
            )
        merged = summed([d for d, _ in stack], [w for _, w in stack], mod)
        return merged, None, ModuleReport(mod, "ia3", 0, merged.numel, None)
    composed = None
    if any(dora.is_dora(d) for d, _ in stack):  # PEFT's DoRA rescales what is stacked inside it
        w0 = _base_matrix(stack, mod, plan.base_weights)
        if plan.additive.name == "cat":
            composed = dora.compose(stack, w0, mod)
        else:
            stack = dora.contributions(stack, w0, mod)
    scale_part, add_part = _compose(stack)
    rank, numel, err, kinds, exact = 0, 0, None, [], True
    merged = merged_l = None
    if add_part and plan.ranks is not None and plan.ranks[mod] == 0:  # the global budget left it out
        exact, err = False, 1.0
    elif add_part:
        ds, ws = zip(*add_part, strict=True)
        opts = plan.options
        if plan.ranks is not None:
            opts = replace(opts, rank=plan.ranks[mod], budget=None)
        merged = composed if composed is not None else _additive(plan, ds, ws, opts, mod)
        rank, numel = merged.rank, merged.numel
        exact = plan.additive.exact_for(merged, ds, plan.options)
        # an always-exact strategy is exact by construction (tests check it); the check costs O(out·R²)
        err = None if plan.additive.exact == "always" else weight_space_error(merged, ds, ws)
        kinds.append("lora")
    if scale_part:
        ds, ws = zip(*scale_part, strict=True)
        merged_l = plan.ia3.fn(ds, ws, plan.options, mod)
        exact = exact and plan.ia3.exact_for(merged_l, ds)
        numel += merged_l.numel
        kinds.append("ia3")
    scale = merged.scale if isinstance(merged, LowRank) else None
    return merged, merged_l, ModuleReport(mod, "+".join(kinds), rank, numel, err, exact, scale)


def _additive(plan: _Plan, ds: Sequence[Delta], ws: Sequence[float], opts: Options, mod: str) -> Delta:
    """The additive strategy's merge of one module; from the shared spectrum where there is one."""
    shared, spectrum_fn = plan.spectra, plan.additive.spectrum
    if shared is None or spectrum_fn is None:
        return plan.additive.fn(ds, ws, opts, mod)
    spec = shared.by_module.get(mod)
    if spec is None or not spec.covers(opts):
        started = time.perf_counter()
        spec = spectrum_fn(ds, ws, opts, mod)
        if mod not in shared.by_module:
            shared.by_module[mod] = spec.top(shared.keep)
        shared.seconds += time.perf_counter() - started
    return spec.delta(opts)


def _budget_ranks(plan: _Plan, modules: Sequence[str]) -> dict[str, int] | None:
    """svd's ranks per module under the global parameter budget (None when no budget is asked)."""
    if plan.options.budget is None:
        return None
    if plan.additive.name != "svd":
        name = plan.additive.name
        raise UnsupportedError(f"`budget` allocates svd ranks across modules; {name} takes --rank")
    spectra = {}
    for mod in modules:  # a first pass over the inputs, one module at a time
        stack = _stack(plan, mod)
        if all(isinstance(d, AddedScale) for d, _ in stack):
            continue
        if any(dora.is_dora(d) for d, _ in stack):
            stack = dora.contributions(stack, _base_matrix(stack, mod, plan.base_weights), mod)
        _, add_part = _compose(stack)
        if add_part:
            spectra[mod] = budget.spectrum(*stacked_factors(add_part))
    return budget.allocate(spectra, plan.options.budget)


def _check_layer_weights(layer_weights: Mapping[str, Sequence[float]] | None, n: int) -> dict[str, list]:
    """Per-layer weights as floats, one per input each, or an error naming the layer."""
    out = {}
    for layer, ws in (layer_weights or {}).items():
        if len(ws) != n:
            raise MergingError(f"`layer_weights`: layer {layer} has {len(ws)} weights for {n} input adapters")
        out[layer] = [float(w) for w in ws]
    return out


def _common_config(adapters: Sequence[Adapter], gate: tuple[int, ...] | None) -> dict[str, Any]:
    """What the merged adapter keeps of its inputs' configs: the task type they share, aLoRA's tokens."""
    tasks = {ad.config.get("task_type") for ad in adapters}
    config: dict[str, Any] = {"task_type": tasks.pop()} if len(tasks) == 1 else {}
    if gate is not None:
        config["alora_invocation_tokens"] = list(gate)
    return config


def weight_space_error(
    merged: AdditiveDelta, deltas: Sequence[AdditiveDelta], weights: Sequence[float]
) -> float:
    """‖ΔW_merged − Σ w_i ΔW_i‖_F / ‖Σ w_i ΔW_i‖_F computed from stacked factors (no dense matrix)."""
    return sum_error(list(zip(deltas, weights, strict=True)), [(merged, 1.0)])


def _plain_lora(d: Delta) -> bool:
    return isinstance(d, LowRank) and d.magnitude is None


def _base_matrix(stack: Stack, mod: str, base_weights: BaseWeights | None) -> torch.Tensor:
    """The base weight of a module with DoRA in its stack, in matrix form (float32)."""
    if base_weights is None:
        raise UnsupportedError(f"module {mod}: a DoRA delta needs its base weights; pass `base_weights`")
    dora.check(mod, stack)
    if any(isinstance(d, Scale) for d, _ in stack):
        raise UnsupportedError(f"module {mod}: IA³ and DoRA on one module are not supported")
    return stack[0][0].target.to_matrix(base_weights(mod).float())


def _lycoris_ia3(
    stack: Sequence[tuple[Delta, float]], mod: str, base_weights: BaseWeights | None
) -> list[tuple[Delta, float]]:
    """LyCORIS IA³ stacked with other kinds: resolved as Dense(w ⊙ W) with the base weights, else refused."""
    lycoris = [isinstance(d, AddedScale) for d, _ in stack]
    if all(lycoris) or not any(lycoris):
        return list(stack)
    if base_weights is None:
        raise UnsupportedError(
            f"module {mod}: a LyCORIS IA³ (w ⊙ W, from the base weight) stacked with other adapter kinds "
            "needs the base weights: pass --base"
        )
    return [(d.resolve(base_weights(mod), d.layer) if isinstance(d, AddedScale) else d, w) for d, w in stack]


def _same_target(stack: list[tuple[Delta, float]], mod: str) -> list[tuple[Delta, float]]:
    """Every additive delta of a module on the one layer kind and shape its inputs know (any order)."""
    known = {(d.target.layer, d.target.shape) for d, _ in stack
             if isinstance(d, AdditiveDelta) and d.target.layer != "unknown"}  # fmt: skip
    if len(known) > 1:
        raise ShapeMismatch(f"module {mod}: the inputs disagree on its layer: {sorted(known)}")
    if not known:
        return stack
    layer, shape = known.pop()
    try:
        return [
            (replace(d, target=d.target.refine(layer, shape)) if isinstance(d, AdditiveDelta) else d, w)
            for d, w in stack
        ]
    except ShapeMismatch as e:
        raise ShapeMismatch(f"module {mod}: {e}") from None


def _compose(
    stack: Sequence[tuple[Delta, float]],
) -> tuple[list[tuple[Scale, float]], list[tuple[Delta, float]]]:
    """Split a module's stack into IA³ vectors and additive deltas, folding later IA³ into earlier deltas.

    y = l ⊙ (inner(x)) scales every additive delta stacked inside it (rows of B); y = inner(l ⊙ x)
    scales their inputs (columns of A). With weights w ≠ 1 on IA³, l^w is what gets folded.
    """
    scales_: list[tuple[Scale, float]] = []
    adds: list[tuple[Delta, float]] = []
    for d, w in stack:
        if isinstance(d, Scale):
            if adds:
                l = d.l.double() ** w
                adds = [(_fold(a, l.float(), d.side), aw) for a, aw in adds]
            scales_.append((d, w))
        else:
            adds.append((d, w))
    if len({s.side for s, _ in scales_}) > 1:
        raise UnsupportedError(
            "IA³ adapters scale both the input and the output of one module; cannot merge them"
        )
    return scales_, adds


def _fold(d: Delta, l: torch.Tensor, side: str) -> LowRank:
    lr = d.low_rank()
    if side == "out":
        bias = None if lr.bias is None else lr.bias.float() * l
        return replace(lr, b=lr.b.float() * l[:, None], bias=bias)
    a = lr.a.float()
    return replace(lr, a=a * l.repeat_interleave(a.shape[1] // l.numel())[None, :])


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
        stack = {"stack": [ad.name for ad in result.adapters]}
        write_text(tmp / STACK_FILE, json.dumps(stack, indent=2) + "\n")
        write_text(tmp / RECIPE_FILE, recipe_text(recipe_data))
    return Path(out)
