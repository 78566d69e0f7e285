"""The strategy registry: every strategy is one small module (or one composition); this list is all of it."""

from __future__ import annotations

from merging.core.registry import Registry
from merging.strategies import cat, core, geometric, iso, knots, linear, multiplicative, svd, tsv
from merging.strategies.base import Options, Strategy
from merging.strategies.pruned import dare, make, sign_elect_mean, top_magnitude, weighted_sum

_REGISTRY: Registry[Strategy] = Registry("strategy")


def register(strategy: Strategy) -> None:
    """Add a strategy; a duplicate or malformed name is an error."""
    _REGISTRY.register(strategy.name, strategy)


for _strategy in (
    cat.STRATEGY,
    svd.STRATEGY,
    linear.STRATEGY,
    make("ties", top_magnitude, sign_elect_mean, "trim, elect sign, disjoint mean; then svd",
         reads=("density", "majority_sign")),
    make("dare_linear", dare, weighted_sum, "random drop + rescale, weighted sum; then svd",
         reads=("density", "seed")),
    make("dare_ties", dare, sign_elect_mean, "random drop + rescale, TIES sign; then svd",
         reads=("density", "seed", "majority_sign")),
    make("magnitude_prune", top_magnitude, weighted_sum, "top-magnitude entries, weighted sum; then svd",
         reads=("density",)),
    multiplicative.STRATEGY,
    geometric.STRATEGY,
    knots.STRATEGY,
    core.STRATEGY,
    tsv.STRATEGY,
    iso.STRATEGY_C,
    iso.STRATEGY_CTS,
):  # fmt: skip
    register(_strategy)


get = _REGISTRY.get  # the strategy called name; a miss lists the valid names
names = _REGISTRY.names


__all__ = ["Options", "Strategy", "get", "names", "register"]
