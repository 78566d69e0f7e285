"""One module's stack cleaned up for merging: its deltas on one layer kind, IA³ folded, DoRA resolved.

Per module the inputs are taken in the order given (innermost first, as they would be stacked).
LyCORIS IA³ (``AddedScale``) stacked with other kinds is resolved against the base weights (``Dense(w ⊙ W)``)
or refused. An input read without its base (layer kind "unknown") takes the layer kind and shape another
input knows. Where a module has both IA³ and additive deltas, the IA³ scalings are folded exactly into the
additive deltas stacked inside them (diag(l) into B's rows for side=out, into A's columns for side=in).
The merge (``pipeline._merge_module``) and svd's global budget (``pipeline._budget_ranks``) both read
modules through ``module_stack`` and ``split``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from merging.core import dora
from merging.core.adapter import Adapter, Stack, layer_of, same_shape
from merging.core.deltas import AdditiveDelta, Delta, LowRank, Scale
from merging.core.lycoris_ia3 import AddedScale
from merging.errors import ShapeMismatch, UnsupportedError

BaseWeights = Callable[[str], torch.Tensor]  # module path → its base weight (stored layout)
Refusal = Callable[[Delta, str], Exception]  # (delta, module) → the error to raise


@dataclass(frozen=True)
class Split:
    """A module's stack split for merging: IA³ vectors, additive deltas (IA³ folded in), DoRA's exact cat."""

    scales: list[tuple[Scale, float]]
    adds: list[tuple[Delta, float]]
    composed: Delta | None = None  # cat of a stack with DoRA in it: PEFT's DoRA composition, exact


def module_stack(
    adapters: Sequence[Adapter], weights: Sequence[float], layer_weights: Mapping[str, Sequence[float]],
    base_weights: BaseWeights | None, mod: str, keep_kinds: Refusal | None = None,
) -> list[tuple[Delta, float]]:  # fmt: skip
    """One module's (delta, weight) pairs in stacking order, on one layer kind and shape.

    ``keep_kinds``: a LoHa/LoKr that would become a LoRA beside a grouped conv (``_beside``) is refused with
    it instead (a strategy that works on LoRA factors, not on the sum: linear)."""
    weights = layer_weights.get(layer_of(mod), weights)
    inputs = zip(adapters, weights, strict=True)
    pairs = [(ad, ad.deltas[mod], w) for ad, w in inputs if mod in ad.deltas]
    same_shape(mod, [(ad, d) for ad, d, _ in pairs])
    stack = _lycoris_ia3([(d, w) for _, d, w in pairs], mod, base_weights)
    return _same_target(_beside(stack, mod, keep_kinds), mod)


def split(
    stack: list[tuple[Delta, float]], mod: str, base_weights: BaseWeights | None, *, compose_dora=False
) -> Split:
    """IA³ and additive parts of a module's stack; DoRA in it composed exactly (``compose_dora``, for cat)
    or turned into its additive contributions against the base weight."""
    composed = None
    if any(dora.is_dora(d) for d, _ in stack):  # PEFT's DoRA rescales what is stacked inside it
        w0 = base_matrix(stack, mod, base_weights)
        if compose_dora:
            composed = dora.compose(stack, w0, mod)
        else:
            stack = dora.contributions(stack, w0, mod)
    scales, adds = _compose(stack)
    return Split(scales, adds, composed)


def plain_lora(d: Delta) -> bool:
    """A LoRA without DoRA's magnitude."""
    return isinstance(d, LowRank) and d.magnitude is None


def base_matrix(stack: Stack, mod: str, base_weights: BaseWeights | None) -> torch.Tensor:
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


def _beside(
    stack: list[tuple[Delta, float]], mod: str, keep_kinds: Refusal | None = None
) -> list[tuple[Delta, float]]:
    """A grouped conv's stack with PEFT's LoRA on it (a full conv beside the layer, ``Target.beside``): every
    other additive delta (LoHa, LoKr: on the grouped weight itself) as that full conv's LoRA, exactly.

    PEFT's mixed model runs them side by side (PeftMixedModel); its LoRA's lora_A reads all input channels,
    so the sum is a full conv's delta whose weight outside each group's own channels is zero.
    """
    adds = [d for d, _ in stack if isinstance(d, AdditiveDelta)]
    beside = {d.target for d in adds if d.target.beside > 1}
    if not beside or all(d.target.beside > 1 for d in adds):
        return stack
    if len({(t.layer, t.shape, t.beside) for t in beside}) > 1:
        raise ShapeMismatch(f"module {mod}: LoRAs beside it disagree on the conv: {sorted(map(str, beside))}")
    full = beside.pop()
    g, out = full.beside, full.shape[0]
    grouped = (out, full.shape[1] // g, *full.shape[2:])  # the layer's weight (out, in/g, k...)
    if out % g:
        raise ShapeMismatch(f"module {mod}: {out} output channels do not split into {g} groups")

    def as_full(d: Delta) -> Delta:
        if not isinstance(d, AdditiveDelta) or d.target.beside > 1:
            return d
        if keep_kinds is not None and not isinstance(d, LowRank):
            raise keep_kinds(d, mod)
        if isinstance(d, LowRank) and not d.target.guessed:  # a LoRA that says its conv: not this one's
            raise ShapeMismatch(
                f"module {mod}: a LoRA on a {d.target.layer} {d.target.shape} and one beside a conv of {g} "
                f"groups {full.shape}: not the same layer"
            )
        try:  # LoHa/LoKr on the grouped weight (out, in/g, k...)
            on_weight = replace(d.target.refine(full.layer, grouped), from_factors=False)
            lr = replace(d, target=on_weight).low_rank()
        except ShapeMismatch as e:
            raise ShapeMismatch(f"module {mod}: beside a LoRA on {g} groups {full.shape}: {e}") from None
        if lr.magnitude is not None:
            raise UnsupportedError(f"module {mod}: DoRA on a grouped conv's weight with a LoRA beside it")
        b, a = full_conv_factors(lr.b, lr.a.reshape(lr.a.shape[0], *grouped[1:]), g)
        return LowRank(b, a.reshape(a.shape[0], -1), lr.scale, full, lr.bias)

    return [(as_full(d), w) for d, w in stack]


def full_conv_factors(b: torch.Tensor, a: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A grouped conv's delta B·A (B (out, r), A (r, in/g, k...)) as the full conv's (B' (out, g·r), A' (g·r,
    in, k...)) that computes the same: rank block j reads group j's input channels and feeds its outputs."""
    (out, r), per = b.shape, a.shape[1]
    b_full = b.new_zeros(out, g * r)
    a_full = a.new_zeros(g * r, g * per, *a.shape[2:])
    rows = out // g
    for j in range(g):
        b_full[j * rows : (j + 1) * rows, j * r : (j + 1) * r] = b[j * rows : (j + 1) * rows]
        a_full[j * r : (j + 1) * r, j * per : (j + 1) * per] = a
    return b_full, a_full


def _same_target(stack: list[tuple[Delta, float]], mod: str) -> list[tuple[Delta, float]]:
    """Every additive delta of a module on the one layer kind and shape its inputs know (any order)."""
    known = {(d.target.layer, d.target.shape) for d, _ in stack
             if isinstance(d, AdditiveDelta) and d.target.layer != "unknown"}  # fmt: skip
    if len(known) > 1:
        raise ShapeMismatch(f"module {mod}: the inputs disagree on its layer: {sorted(known)}")
    if not known:
        return stack
    layer, shape = known.pop()
    guessed = all(d.target.guessed for d, _ in stack if isinstance(d, AdditiveDelta))  # no LoRA says it

    def refined(d: Delta) -> Delta:
        return replace(d, target=replace(d.target.refine(layer, shape), from_factors=guessed))

    try:
        return [(refined(d) if isinstance(d, AdditiveDelta) else d, w) for d, w in stack]
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

