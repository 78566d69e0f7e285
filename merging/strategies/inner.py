"""The merge knots and core run inside their shared basis (``--inner``): linear, TIES or DARE-TIES.

Built from the pieces of ``sparsify`` as the KnOTS and Core Space repositories compose them: TIES trims
each task's block over all its entries (``prune_kth``: the authors' count, one entry more than our
``ties``), elects the sign of the sum (a zero sum takes the majority sign) and takes the disjoint mean;
DARE-TIES drops at random and rescales by 1/density (our seeded generator), then elects and averages
without a magnitude trim; linear is the plain sum.
"""

from __future__ import annotations

import torch

from merging.strategies import sparsify
from merging.strategies.base import Options


def merge_inner(t: torch.Tensor, opts: Options, module: str) -> torch.Tensor:
    """Merge the stacked task blocks t (T, k, n) into one (k, n) with ``opts.inner``."""
    if opts.inner == "linear":
        return t.sum(0)
    if opts.inner == "ties":
        t = sparsify.prune_kth(t, opts.density)
    else:
        t = sparsify.prune_random(t, opts.density, opts.generator(module))
    return sparsify.disjoint_mean(t, sparsify.elect_sign_resolved(t))
