"""multiplicative: l = Π l_i^{w_i} over IA³ vectors. Space: IA³ vectors.

Exact against stacked IA³ adapters when every weight is 1 (PEFT multiplies active IA³ vectors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core.deltas import Delta, Scale
from merging.errors import UnsupportedError
from merging.strategies.base import Options, Strategy, scales


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> Scale:
    """Weighted product of the IA³ vectors (powers must be integers where an entry is non-positive)."""
    ls = scales(deltas, "multiplicative", module)
    out = torch.ones_like(ls[0].l, dtype=torch.float64)
    for d, w in zip(ls, weights, strict=True):
        l = d.l.double()
        if w != int(w) and bool((l <= 0).any()):
            raise UnsupportedError(
                f"module {module}: a non-positive IA³ entry cannot be raised to the power {w}"
            )
        out *= l**w
    return Scale(out.to(ls[0].l.dtype), ls[0].side, ls[0].layer)


STRATEGY = Strategy(name="multiplicative", fn=merge, space="ia3", exact="always", handles="ia3",
                    doc="product of IA³ vectors (exact stacked IA³)", reads=())  # fmt: skip
