"""ties: TIES-merging (trim, elect sign, disjoint mean) on dense task deltas, then svd to the rank budget.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", https://arxiv.org/abs/2306.01708
Space: ΔW. Not exact. Options: --density, --majority-sign, --rank/--energy.
"""

from __future__ import annotations

from collections.abc import Sequence

from merging.deltas import Delta, LowRank
from merging.strategies import sparsify
from merging.strategies.base import Options, Strategy, additive, summed_bias, truncate_dense


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    ds = additive(deltas, "ties", module)
    t = sparsify.prune_magnitude(sparsify.task_stack(ds), opts.density)
    agree = sparsify.elect_sign(t, opts.majority_sign)  # elected on the unweighted deltas, as PEFT
    combined = sparsify.disjoint_mean(sparsify.weighted(t, weights), agree)
    b, a = truncate_dense(combined, opts, default_rank=max(d.rank for d in ds))
    return LowRank(b, a, 1.0, ds[0].target, bias=summed_bias(ds, weights))


STRATEGY = Strategy(
    "ties", merge, "dW", False, "additive", "trim, elect sign, disjoint mean; then svd", ranked=True
)
