"""dare_linear: DARE (random drop and rescale) then the weighted sum; then svd to the rank budget.

Yu et al., "Language Models are Super Mario", https://arxiv.org/abs/2311.03099
Space: ΔW. Not exact (equal to the sum in expectation). Reproducible through --seed.
"""

from __future__ import annotations

from collections.abc import Sequence

from merging.deltas import Delta, LowRank
from merging.strategies import sparsify
from merging.strategies.base import Options, Strategy, additive, summed_bias, truncate_dense


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    ds = additive(deltas, "dare_linear", module)
    t = sparsify.prune_random(sparsify.task_stack(ds), opts.density, opts.generator(module))
    combined = sparsify.weighted(t, weights).sum(0)
    b, a = truncate_dense(combined, opts, default_rank=max(d.rank for d in ds))
    return LowRank(b, a, 1.0, ds[0].target, bias=summed_bias(ds, weights))


STRATEGY = Strategy(
    "dare_linear",
    merge,
    "dW",
    False,
    "additive",
    "random drop + rescale, weighted sum; then svd",
    ranked=True,
)
