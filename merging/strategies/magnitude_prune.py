"""magnitude_prune: keep each task delta's largest entries (--density), sum with weights, then svd.

Space: ΔW. Not exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from merging.deltas import Delta, LowRank
from merging.strategies import sparsify
from merging.strategies.base import Options, Strategy, additive, summed_bias, truncate_dense


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    ds = additive(deltas, "magnitude_prune", module)
    t = sparsify.prune_magnitude(sparsify.task_stack(ds), opts.density)
    combined = sparsify.weighted(t, weights).sum(0)
    b, a = truncate_dense(combined, opts, default_rank=max(d.rank for d in ds))
    return LowRank(b, a, 1.0, ds[0].target, bias=summed_bias(ds, weights))


STRATEGY = Strategy(
    "magnitude_prune",
    merge,
    "dW",
    False,
    "additive",
    "top-magnitude entries, weighted sum; then svd",
    ranked=True,
)
