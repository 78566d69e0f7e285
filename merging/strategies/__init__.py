"""The strategy registry: every strategy is one small module; this list is the whole registry."""

from __future__ import annotations

from merging.errors import MergingError, UnsupportedError
from merging.strategies import (
    cat,
    dare_linear,
    dare_ties,
    geometric,
    linear,
    magnitude_prune,
    multiplicative,
    svd,
    ties,
)
from merging.strategies.base import Options, Strategy

_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> None:
    """Add a strategy; a duplicate or malformed name is an error."""
    if not strategy.name.isidentifier() or strategy.name != strategy.name.lower():
        raise MergingError(f"strategy name {strategy.name!r} must be a lower-case identifier")
    if strategy.name in _REGISTRY:
        raise MergingError(f"strategy {strategy.name!r} is already registered")
    _REGISTRY[strategy.name] = strategy


for _module in (cat, svd, linear, ties, dare_linear, dare_ties, magnitude_prune, multiplicative, geometric):
    register(_module.STRATEGY)


def get(name: str) -> Strategy:
    """The strategy called ``name``; a miss lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedError(f"unknown strategy {name!r}; choose one of: {', '.join(names())}") from None


def names() -> list[str]:
    return list(_REGISTRY)


__all__ = ["Options", "Strategy", "get", "names", "register"]
