"""What the literature's methods (knots, core, tsv, iso_c, iso_cts) share: the inputs as float64 factors.

Every input enters through its exact low-rank form (LoHa and LoKr as ``cat`` and ``svd`` convert them),
with c_i = weight_i × its own scale folded into B; IA³ and DoRA are refused as ``svd`` refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core.deltas import Delta, LowRank, Target
from merging.errors import UnsupportedError
from merging.strategies.base import additive

RANK_RTOL = 1e-9  # numerical rank: σ > RANK_RTOL·σ₁ (TSV-M and Iso work on it, not on min(out, in))

Factors = list[tuple[torch.Tensor, torch.Tensor]]  # per input: c_i·B_i (out, r_i), A_i (r_i, in_flat)


def task_factors(
    deltas: Sequence[Delta], weights: Sequence[float], strategy: str, module: str
) -> tuple[Factors, Target]:
    """Each input's (c_i·B_i, A_i) in float64 and the module's target; a LoRA bias is refused by name."""
    out = []
    for d, w in zip(additive(deltas, strategy, module), weights, strict=True):
        lr = d.low_rank()
        if getattr(d, "bias", None) is not None or lr.bias is not None:
            raise UnsupportedError(
                f"{strategy}: module {module} has a LoRA bias, which it does not merge; use cat or svd"
            )
        out.append(((w * lr.scale) * lr.b.double(), lr.a.double()))
    return out, deltas[0].target


def numerical_rank(s: torch.Tensor, reference: float) -> int:
    """How many singular values in s exceed RANK_RTOL × reference (σ₁ of the matrix they describe)."""
    return int((s > RANK_RTOL * reference).sum())


def result(b: torch.Tensor, a: torch.Tensor, target: Target) -> LowRank:
    """The merged module as a plain LoRA with scale 1: b (out, k), a (k, in_flat), stored in float32."""
    if b.shape[1] == 0:  # nothing above the noise: a zero delta of rank 1
        b, a = b.new_zeros(b.shape[0], 1), a.new_zeros(1, a.shape[1])
    return LowRank(b.float().contiguous(), a.float().contiguous(), 1.0, target)
