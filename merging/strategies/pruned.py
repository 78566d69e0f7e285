"""TIES, DARE and magnitude pruning: prune the dense task deltas, combine them, then svd to the rank budget.

Two pruning methods × two combiners, composed rather than subclassed (as mergekit does):

- prune: ``top_magnitude`` keeps each task delta's largest entries (``density``); ``dare`` drops
  entries at random and rescales the survivors (reproducible through ``seed``).
- combine: ``sign_elect_mean`` (TIES) elects a sign per entry and takes the disjoint mean of the agreeing
  entries (``majority_sign``); ``weighted_sum`` is Σ w_i τ_i.

TIES: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
https://arxiv.org/abs/2306.01708
DARE: Yu et al., "Language Models are Super Mario", https://arxiv.org/abs/2311.03099

Space: ΔW, per module. Not exact (DARE equals the sum only in expectation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch

from merging.core.deltas import Delta, LowRank
from merging.strategies import sparsify
from merging.strategies.base import Options, Spectrum, Strategy, additive, dense_spectrum, summed_bias

Prune = Callable[[torch.Tensor, Options, str], torch.Tensor]  # (task deltas, options, module) → pruned
Combine = Callable[[torch.Tensor, Sequence[float], Options], torch.Tensor]  # (n, out, in) → (out, in)


def top_magnitude(t: torch.Tensor, opts: Options, module: str) -> torch.Tensor:
    """Keep the ``density`` fraction of largest-magnitude entries of each task delta."""
    return sparsify.prune_magnitude(t, opts.density)


def dare(t: torch.Tensor, opts: Options, module: str) -> torch.Tensor:
    """DARE: random drop and rescale, seeded from ``seed`` and the module name."""
    return sparsify.prune_random(t, opts.density, opts.generator(module))


def sign_elect_mean(t: torch.Tensor, weights: Sequence[float], opts: Options) -> torch.Tensor:
    """Sign election on the unweighted deltas (as PEFT), then the disjoint mean of the weighted ones."""
    agree = sparsify.elect_sign(t, opts.majority_sign)
    return sparsify.disjoint_mean(sparsify.weighted(t, weights), agree)


def weighted_sum(t: torch.Tensor, weights: Sequence[float], opts: Options) -> torch.Tensor:
    """Σ w_i τ_i."""
    return sparsify.weighted(t, weights).sum(0)


def spectrum(
    deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str, *,
    name: str, prune: Prune, combine: Combine,
) -> Spectrum:  # fmt: skip
    """Prune the dense task deltas, combine them, and take the SVD of the result.

    Args:
        deltas: additive deltas of one module.
        weights: one weight per delta.
        name: the strategy's name (for error messages).
        prune, combine: the two steps.

    Returns:
        The combined delta's spectrum; its rank-k merge (``delta``) keeps ``rank`` triplets (default: the
        largest input rank).
    """
    ds = additive(deltas, name, module)
    t = prune(sparsify.task_stack(ds), opts, module)  # (n, out, in_flat)
    rank = max(d.rank for d in ds)
    return dense_spectrum(combine(t, weights, opts), ds[0].target, rank, summed_bias(ds, weights))


def merge(
    deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str, **steps: Callable
) -> LowRank:
    """The pruned-and-combined delta truncated to the rank budget: a LowRank of scale 1."""
    return spectrum(deltas, weights, opts, module, **steps).delta(opts)


def make(name: str, prune: Prune, combine: Combine, doc: str, reads: tuple[str, ...] = ()) -> Strategy:
    """The Strategy that prunes with ``prune`` and combines with ``combine``."""
    steps = {"name": name, "prune": prune, "combine": combine}
    return Strategy(
        name=name, fn=partial(merge, **steps), space="dW", exact="never", handles="additive", doc=doc,
        ranked=True, reads=reads, spectrum=partial(spectrum, **steps),
    )  # fmt: skip
