"""svd: best rank-k approximation of Σ w_i ΔW_i, from stacked factors (QR + SVD of a small core).

Space: ΔW. Exact when k ≥ the rank of the sum. Cost O((out + in)·R²) per module, R = Σ r_i; no dense
(out, in) matrix. Rank from --rank (default: the largest input rank, as PEFT) or --energy; --clamp as PEFT.
--budget: one global parameter count, ranks allocated across modules by ``merging.budget`` (the merge
pipeline sets each module's rank).
"""

from __future__ import annotations

from collections.abc import Sequence

from merging.core.deltas import Delta, LowRank, stacked_factors
from merging.strategies.base import (
    Options,
    Spectrum,
    Strategy,
    additive,
    factored_spectrum,
    summed_bias,
)  # fmt: skip


def spectrum(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> Spectrum:
    """The SVD of the weighted sum computed from the stacked factors (every triplet: at most Σ r_i)."""
    ds = additive(deltas, "svd", module)
    b, a = stacked_factors(list(zip(ds, weights, strict=True)))  # (out, R), (R, in_flat)
    return factored_spectrum(b, a, ds[0].target, max(d.rank for d in ds), summed_bias(ds, weights))


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    """Truncated SVD of the weighted sum computed from the stacked factors.

    Returns:
        A LowRank of rank k with scale 1.
    """
    return spectrum(deltas, weights, opts, module).delta(opts)


STRATEGY = Strategy(name="svd", fn=merge, space="dW", exact="full_rank", handles="additive", ranked=True,
                    doc="best rank-k approximation of the exact sum", reads=("budget",),
                    spectrum=spectrum)  # fmt: skip
