"""The merge pipeline: align the inputs, run a strategy module by module, assemble the result.

Per module the inputs are taken in the order given (innermost first, as they would be stacked) and
cleaned up by ``merge.stack`` (one layer kind, LyCORIS IA³ resolved, IA³ folded into the additive deltas
stacked inside it, DoRA resolved). Additive deltas go through the chosen strategy (or ``cat`` when the
strategy only merges IA³); IA³ vectors through the chosen strategy (or ``multiplicative`` when it only
merges additive deltas). LyCORIS IA³ (``AddedScale``, additive per network) alone on a module sums exactly
into one LyCORIS IA³. Where a module has both, the result is one IA³ adapter applied first plus one LoRA
adapter on top: exactly the stacked outputs.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

from merging import strategies
from merging.core import dora
from merging.core.adapter import Adapter, Pair, align, common_invocation
from merging.core.deltas import AdditiveDelta, Delta, LowRank, stacked_factors, sum_error
from merging.core.lazy import LazyDeltas, is_lazy
from merging.core.lycoris_ia3 import AddedScale, summed
from merging.core.progress import Progress
from merging.errors import MergingError, UnsupportedError
from merging.merge import budget
from merging.merge.aux_parts import merge_aux, merge_tied
from merging.merge.result import MergeResult, ModuleReport
from merging.merge.spectra import Spectra
from merging.merge.stack import BaseWeights, base_matrix, module_stack, plain_lora, split
from merging.storage.threads import serial
from merging.strategies import Options, Strategy, linear


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
    errors: bool = True  # measure each module's weight-space error for its report


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
    errors: bool = True,
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
        errors: measure each module's weight-space error (``ModuleReport.error``); False leaves it None, for
            a merge only measured on data (``tune``'s search: O(out·R²) per module saved).

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
    plan = _Plan(adapters, weights, chosen, add_strategy, ia3_strategy, options, base_weights, layer_w,
                 errors=errors)  # fmt: skip
    if spectra is not None and add_strategy.spectrum is not None:
        spectra.check(add_strategy.name, options, weights, adapters, layer_w)
        plan = replace(plan, spectra=spectra)
    modules = read_order(adapters, align(adapters))
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

        kept = [m for m in modules if plan.ranks is None or plan.ranks.get(m, 1) > 0]
        for mod in (m for m in modules if m not in kept):  # the budget left it out: no PEFT layer of rank 0
            built.add(mod)
            reports.append(_merge_module(plan, mod)[2])
        ties = {m: s for m, s in tied.items() if s in kept}
        deltas = LazyDeltas(kept, build, "lora")
        out = [Adapter("lora", deltas, base, rev, aux=extra, tied=ties, config=config)]
        return MergeResult(out, reports, *names, options, weights, _recorded(layer_w), tuple(adapters))
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
            m: dora.as_dora(d, base_matrix([(d, 1.0)], m, base_weights)) if plain_lora(d) else d
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
        options, weights, _recorded(layer_w), tuple(adapters),
    )  # fmt: skip


def read_order(adapters: Sequence[Adapter], modules: Sequence[str]) -> list[str]:
    """The modules in an order every streamed input holds them in, by name where the files leave a choice
    (each file is read front to back, hashed as it is read; PEFT's files, sorted by name, give name order).
    Where the inputs disagree, the first input's order wins and the rest go by name."""
    orders = [[m for m in ad.deltas if m in modules] for ad in adapters if is_lazy(ad.deltas)]
    after: dict[str, set[str]] = {m: set() for m in modules}  # module → those a file holds next
    for order in orders:
        for a, b in zip(order, order[1:], strict=False):
            after[a].add(b)
    waiting = dict.fromkeys(modules, 0)
    for m in modules:
        for b in after[m]:
            waiting[b] += 1
    ready = [m for m in modules if waiting[m] == 0]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        m = heapq.heappop(ready)
        out.append(m)
        for b in after[m]:
            waiting[b] -= 1
            if waiting[b] == 0:
                heapq.heappush(ready, b)
    if len(out) == len(modules):
        return out
    rank = {m: i for i, m in enumerate(orders[0])}  # the orders disagree: the first input's, then names
    return sorted(modules, key=lambda m: (rank.get(m, len(rank)), m))


def _recorded(layer_w: dict[str, list[float]]) -> dict[str, tuple[float, ...]] | None:
    return {k: tuple(v) for k, v in layer_w.items()} or None


def _stack(plan: _Plan, mod: str) -> list[tuple[Delta, float]]:
    """One module's (delta, weight) pairs in stacking order, on one layer kind and shape."""
    keep = linear.refuse_kind if plan.additive.name == "linear" else None  # it averages LoRA factors
    return module_stack(plan.adapters, plan.weights, plan.layer_weights, plan.base_weights, mod, keep)


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
    if plan.additive.name == "linear" and any(dora.is_dora(d) for d, _ in stack):
        raise linear.refuse_dora(mod)  # its factors are averaged, a DoRA's magnitude cannot be
    parts = split(stack, mod, plan.base_weights, compose_dora=plan.additive.name == "cat")
    scale_part, add_part, composed = parts.scales, parts.adds, parts.composed
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
        skip = plan.additive.exact == "always" or not plan.errors
        err = None if skip else weight_space_error(merged, ds, ws)
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
        add_part = split(stack, mod, plan.base_weights).adds
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
