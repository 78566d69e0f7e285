"""svd: best rank-k approximation of Σ w_i ΔW_i, from stacked factors (QR + SVD of a small core).

Space: ΔW. Exact when k ≥ the rank of the sum. Cost O((out + in)·R²) per module, R = Σ r_i; no dense
(out, in) matrix. Rank from --rank (default: the largest input rank, as PEFT) or --energy; --clamp as PEFT.
--budget: one global parameter count, ranks allocated across modules by ``merging.budget`` (the merge
pipeline sets each module's rank).
"""

from __future__ import annotations

from collections.abc import Sequence

from merging.deltas import Delta, LowRank
from merging.strategies.base import Options, Strategy, additive, stacked_factors, summed_bias, truncate


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    """Truncated SVD of the weighted sum computed from the stacked factors.

    Returns:
        A LowRank of rank k with scale 1.
    """
    ds = additive(deltas, "svd", module)
    b, a = stacked_factors(ds, weights)
    bk, ak = truncate(b, a, opts, default_rank=max(d.rank for d in ds))
    return LowRank(bk, ak, 1.0, ds[0].target, bias=summed_bias(ds, weights))


STRATEGY = Strategy(name="svd", fn=merge, space="dW", exact="full_rank", handles="additive", ranked=True,
                    doc="best rank-k approximation of the exact sum", reads=("budget",))  # fmt: skip
