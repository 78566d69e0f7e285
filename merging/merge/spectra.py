"""Spectra shared by merges of the same inputs that differ only in rank (``compare``'s rank variants)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from merging.core.adapter import Adapter
from merging.errors import MergingError
from merging.strategies import Options


@dataclass(eq=False)
class Spectra:
    """Each module's spectrum, shared by merges of the same inputs that differ only in rank.

    For a strategy with a ``spectrum`` (svd, TIES, DARE, magnitude pruning) the rank-k merge of a module is
    the top k of one SVD, so ``compare``'s rank variants compute it once per module: the first merge fills
    this, the others read it (bit for bit the merges they would make alone). It holds the leading ``keep``
    triplets of each module; a merge that needs more computes its own. A merge with other inputs, weights
    or options than the first is refused.
    """

    keep: int
    by_module: dict[str, Any] = field(default_factory=dict)  # module → strategies.base.Spectrum
    seconds: float = 0.0  # spent computing them (what each sharing merge would have spent alone)
    _key: tuple | None = None
    _held: list = field(default_factory=list)  # the first merge's inputs, kept alive: their ids key it

    def check(
        self, strategy: str, options: Options, weights: Sequence[float], adapters: Sequence[Adapter],
        layer_weights: Mapping[str, Sequence[float]],
    ) -> None:  # fmt: skip
        """Bind to the first merge's inputs and options; refuse another's."""
        opts = replace(options, rank=None, energy=None, clamp=None)
        key = (strategy, opts, tuple(weights), tuple(map(id, adapters)),
               tuple(sorted((k, tuple(v)) for k, v in layer_weights.items())))  # fmt: skip
        if self._key is None:
            self._key, self._held = key, list(adapters)
        elif key != self._key:
            raise MergingError("`spectra` are shared by merges of the same inputs and options; got others")
