"""cat: Σ w_i ΔW_i as one LoRA of rank Σ r_i, factors concatenated. Space: ΔW. Exact.

LoHa, LoKr and dense inputs enter through their exact low-rank forms.
"""

from __future__ import annotations

from collections.abc import Sequence

from merging.core.deltas import Delta, LowRank, stacked_factors
from merging.storage import origins
from merging.strategies.base import Options, Strategy, additive, summed_bias


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    """Concatenate the weighted factors: B = [w_1 s_1 B_1, ...], A = [A_1; ...], scale 1.

    Scales and weights go into B, so A is the inputs' A blocks end to end: where they were read as stored
    (float32 PEFT files), the output's A is copied from them in the kernel (``storage.origins``).

    Args:
        deltas: additive deltas of one module, aligned on one base weight shape.
        weights: one weight per delta.

    Returns:
        A LowRank of rank Σ r_i whose product is exactly Σ w_i ΔW_i.
    """
    ds = additive(deltas, "cat", module)
    b, a = stacked_factors(list(zip(ds, weights, strict=True)))  # (out, R), (R, in_flat)
    origins.concatenated(a, [d.low_rank().a for d in ds])  # A's bytes are the inputs': the writer copies them
    return LowRank(b, a, 1.0, ds[0].target, bias=summed_bias(ds, weights))


STRATEGY = Strategy(name="cat", fn=merge, space="dW", exact="always", handles="additive",
                    doc="exact sum as one LoRA of rank Σ r_i", reads=(), moves_memory=True)  # fmt: skip
