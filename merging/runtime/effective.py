"""The stacked inputs' effective weight and bias of one module: what folding writes and stacking computes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core import dora
from merging.core.deltas import AdditiveDelta, Delta, Layer, LowRank, Scale, Target
from merging.core.lycoris_ia3 import AddedScale
from merging.errors import UnsupportedError


def effective_weight(
    stack: Sequence[tuple[Delta, float]],
    w: torch.Tensor,
    b: torch.Tensor | None,
    kind: Layer,
    *,
    inplace: bool = False,
    full: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a stack of deltas amounts to (stored layout), in float32.

    Args:
        stack: (delta, weight) pairs, innermost first.
        w: the base weight as stored.
        b: the base bias or None.
        kind: the layer kind (sets the stored layout).
        inplace: a float32 ``w`` may be modified in place (the caller owns it; saves a copy).
        full: a LoRA beside a grouped conv (PEFT's) gives the full conv's weight (out, in, k...) the stack
            amounts to (for comparing); else it is refused: no grouped weight holds it.
    """
    target = Target(kind, tuple(w.shape))
    stack = [(d.resolve(w, kind) if isinstance(d, AddedScale) else d, wt) for d, wt in stack]  # from W itself
    besides = [d.target for d, _ in stack if getattr(d, "target", None) and d.target.beside > 1]
    if besides:
        beside = besides[0]
        if not full:
            raise UnsupportedError(
                f"a LoRA beside a {kind} of {beside.beside} groups {tuple(w.shape)} reads every input "
                "channel: no grouped weight holds it (PEFT refuses to merge it too); keep it as an adapter"
            )
        target, w = beside, beside.to_matrix(w).reshape(beside.shape)  # the full conv the grouped one is
        inplace = False
    w0 = target.to_matrix(w.float()).clone() if any(dora.is_dora(d) for d, _ in stack) else None
    m = target.to_matrix(w) if inplace and w.dtype == torch.float32 else target.to_matrix(w.float()).clone()
    for d, wt in stack:
        if dora.is_dora(d):
            if wt != 1.0:
                raise UnsupportedError(f"a DoRA input has no stacked meaning at weight {wt:g}")
            m = dora.fold(m, d, w0)
        elif isinstance(d, Scale):
            m = Scale((d.l.double() ** wt).float(), d.side, d.layer).fold(m)
        elif isinstance(d, LowRank):
            m.addmm_(d.b.float() * (wt * d.scale), d.a.float())  # in place, no (out, in) temporary
        elif isinstance(d, AdditiveDelta):
            m.add_(d.dense(), alpha=wt)  # in place: one (out, in) temporary, not two
        else:
            raise UnsupportedError(f"cannot fold {type(d).__name__} into a weight")
    return target.to_stored(m), effective_bias(stack, b)


def effective_bias(stack: Sequence[tuple[Delta, float]], b: torch.Tensor | None) -> torch.Tensor | None:
    """The bias a stack of deltas amounts to (float32): IA³ output scalings and LoRA/dense bias deltas."""
    bias = None if b is None else b.float().clone()
    for d, wt in stack:
        if isinstance(d, Scale):
            if d.side == "out" and bias is not None:
                bias = bias * (d.l.double() ** wt).float()
        elif getattr(d, "bias", None) is not None:
            extra = wt * d.scale * d.bias.float()
            bias = extra if bias is None else bias + extra
    return bias
