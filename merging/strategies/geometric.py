"""geometric: weighted geometric mean of IA³ vectors, exp(Σ w̃_i log l_i) with w̃ = w / Σ w. Not exact.

Non-positive entries are an error unless ``signed``: then the magnitude is the geometric mean of |l_i|
and the sign is that of Σ w̃_i sign(l_i) (positive on a tie).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core.deltas import Delta, Scale
from merging.errors import MergingError, UnsupportedError
from merging.strategies.base import Options, Strategy, scales


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> Scale:
    """Normalised-weight geometric mean of the IA³ vectors."""
    ls = scales(deltas, "geometric", module)
    total = float(sum(weights))
    if total == 0:
        raise MergingError("geometric needs weights that do not sum to zero")
    wn = [w / total for w in weights]
    stack = torch.stack([d.l.double() for d in ls])  # (n, features)
    if not opts.signed and bool((stack <= 0).any()):
        raise UnsupportedError(f"module {module}: IA³ entries ≤ 0 have no logarithm (pass `signed`)")
    w = torch.tensor(wn, dtype=torch.float64)[:, None]
    mag = torch.exp((w * stack.abs().clamp_min(1e-300).log()).sum(0))
    sign = torch.where((w * stack.sign()).sum(0) >= 0, 1.0, -1.0)
    return Scale((sign * mag).to(ls[0].l.dtype), ls[0].side, ls[0].layer)


STRATEGY = Strategy(name="geometric", fn=merge, space="ia3", exact="never", handles="ia3",
                    doc="weighted geometric mean of IA³ vectors", reads=("signed",))  # fmt: skip
