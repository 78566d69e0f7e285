"""DoRA stacked with other adapters, as PEFT runs it (peft/tuners/lora/dora.py, DoraLinearLayer.forward).

A DoRA adapter on a linear layer with base weight W and bias b, given the result R of everything stacked
inside it (the base and earlier adapters), computes

    y = s ⊙ (R − b) + b + s ⊙ (scale · B A x),   s = m / ‖W + scale · B A‖_row

with the norm taken on the BASE weight alone (PEFT's ``get_base_layer()``), not on W plus the other
adapters. So a DoRA scales by s whatever is stacked inside it, and nothing outside it; in weight space
W_eff ← diag(s) (W_eff + scale · B A) with the bias unchanged. That holds exactly when nothing inside it
changed the bias (no IA³ on the output side, no LoRA bias) and PEFT stacks it at weight 1; anything else
is refused in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from merging.deltas import AdditiveDelta, Delta, Dense, LowRank, Scale
from merging.errors import UnsupportedError

Stack = Sequence[tuple[Delta, float]]


def is_dora(d: Delta) -> bool:
    """Whether a delta is a DoRA LoRA (it carries a magnitude vector)."""
    return isinstance(d, LowRank) and d.magnitude is not None


def row_scale(d: LowRank, base: torch.Tensor) -> torch.Tensor:
    """s = m / ‖W + scale·BA‖ per output row (float32), from the base weight in stored layout."""
    w = d.target.to_matrix(base.float())
    norm = (w + d.scale * (d.b.float() @ d.a.float())).norm(dim=1)
    return d.magnitude.float() / norm  # (out,)


def check(mod: str, stack: Stack) -> None:
    """Refuse, in one line, a DoRA stacked where its PEFT semantics cannot be reproduced exactly."""
    for i, (d, w) in enumerate(stack):
        if not is_dora(d):
            continue
        if d.target.layer != "linear":
            raise UnsupportedError(f"module {mod}: DoRA on a {d.target.layer} layer is not supported here")
        if w != 1.0:
            raise UnsupportedError(f"module {mod}: a DoRA input stacks at weight 1 only (got {w:g})")
        if d.bias is not None:
            raise UnsupportedError(f"module {mod}: DoRA with a LoRA bias is not supported")
        inner = stack[:i]
        if any(isinstance(e, Scale) or getattr(e, "bias", None) is not None for e, _ in inner):
            raise UnsupportedError(
                f"module {mod}: a DoRA input over IA³ or a LoRA bias on the same module rescales the bias; "
                "put the DoRA input first"
            )


def fold(stack: Stack, base: torch.Tensor) -> torch.Tensor:
    """W_eff − W in matrix form (float32) for a stack of additive and DoRA deltas over base weight W."""
    w0 = stack[0][0].target.to_matrix(base.float())
    m = w0.clone()
    for d, wt in stack:
        if is_dora(d):
            m = row_scale(d, base)[:, None] * (m + d.scale * (d.b.float() @ d.a.float()))
        elif isinstance(d, AdditiveDelta):
            m.add_(d.dense(), alpha=wt)
        else:
            raise UnsupportedError(f"cannot fold {type(d).__name__} under a DoRA delta")
    return m - w0


def resolve(mod: str, stack: Stack, base_weight: Callable[[str], torch.Tensor] | None) -> list:
    """A module's stack with its DoRA part as one exact Dense(W_eff − W) (weight 1) where there is one.

    Without base weights the stack is returned as it is (strategies then refuse the DoRA delta by name).
    The additive deltas stacked inside a DoRA are scaled by it, so they are folded into that Dense too.
    """
    last = max((i for i, (d, _) in enumerate(stack) if is_dora(d)), default=None)
    if last is None or base_weight is None:
        return list(stack)
    check(mod, stack)
    inside, outside = stack[: last + 1], stack[last + 1 :]
    target = stack[last][0].target
    return [(Dense(fold(inside, base_weight(mod)), target), 1.0), *outside]
