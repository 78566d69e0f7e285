"""dare_ties: DARE (random drop and rescale) then TIES sign election and disjoint mean; then svd.

Yu et al., "Language Models are Super Mario", https://arxiv.org/abs/2311.03099
Space: ΔW. Not exact. Reproducible: the drop masks come from --seed and the module name.
"""

from __future__ import annotations

from collections.abc import Sequence

from merging.deltas import Delta, LowRank
from merging.strategies import sparsify
from merging.strategies.base import Options, Strategy, additive, summed_bias, truncate_dense


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    ds = additive(deltas, "dare_ties", module)
    t = sparsify.prune_random(sparsify.task_stack(ds), opts.density, opts.generator(module))
    agree = sparsify.elect_sign(t, opts.majority_sign)  # elected on the unweighted deltas, as PEFT
    combined = sparsify.disjoint_mean(sparsify.weighted(t, weights), agree)
    b, a = truncate_dense(combined, opts, default_rank=max(d.rank for d in ds))
    return LowRank(b, a, 1.0, ds[0].target, bias=summed_bias(ds, weights))


STRATEGY = Strategy(
    "dare_ties", merge, "dW", False, "additive", "random drop + rescale, TIES sign; then svd", ranked=True
)
