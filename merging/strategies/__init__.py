"""The strategy registry: every strategy is one small module (or one composition); this list is all of it."""

from __future__ import annotations

from merging.errors import MergingError, UnsupportedError
from merging.strategies import cat, geometric, linear, multiplicative, svd
from merging.strategies.base import Options, Strategy
from merging.strategies.pruned import dare, make, sign_elect_mean, top_magnitude, weighted_sum

_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> None:
    """Add a strategy; a duplicate or malformed name is an error."""
    if not strategy.name.isidentifier() or strategy.name != strategy.name.lower():
        raise MergingError(f"strategy name {strategy.name!r} must be a lower-case identifier")
    if strategy.name in _REGISTRY:
        raise MergingError(f"strategy {strategy.name!r} is already registered")
    _REGISTRY[strategy.name] = strategy


for _strategy in (
    cat.STRATEGY,
    svd.STRATEGY,
    linear.STRATEGY,
    make("ties", top_magnitude, sign_elect_mean, "trim, elect sign, disjoint mean; then svd"),
    make("dare_linear", dare, weighted_sum, "random drop + rescale, weighted sum; then svd"),
    make("dare_ties", dare, sign_elect_mean, "random drop + rescale, TIES sign; then svd"),
    make("magnitude_prune", top_magnitude, weighted_sum, "top-magnitude entries, weighted sum; then svd"),
    multiplicative.STRATEGY,
    geometric.STRATEGY,
):  # fmt: skip
    register(_strategy)


def get(name: str) -> Strategy:
    """The strategy called ``name``; a miss lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedError(f"unknown strategy {name!r}; choose one of: {', '.join(names())}") from None


def names() -> list[str]:
    return list(_REGISTRY)


__all__ = ["Options", "Strategy", "get", "names", "register"]
