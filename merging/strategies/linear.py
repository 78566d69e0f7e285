"""linear: PEFT's factor-space linear merge for LoRA, and the weighted vector sum for IA³.

LoRA: A = Σ sign(c_i)·√|c_i|·A_i, B = Σ √|c_i|·B_i with c_i = w_i·s_i (equal ranks). The product has
cross terms B_i A_j (i ≠ j), so it is NOT the sum of the deltas: kept for parity with PEFT's
``add_weighted_adapter(combination_type="linear")``. IA³: l = Σ w_i l_i, which is not the stacked
product either. Not exact. LoHa, LoKr (PEFT gives them no add_weighted_adapter) and DoRA (its magnitude has
no average) are refused, naming cat (exact) and svd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from merging.core.deltas import Delta, Dense, Hadamard, Kronecker, LowRank, Scale
from merging.errors import UnsupportedError
from merging.strategies.base import Options, Strategy, additive, scales, summed_bias


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> Delta:
    """Weighted sum of LoRA factors (or of IA³ vectors)."""
    if all(isinstance(d, Scale) for d in deltas):
        ls = scales(deltas, "linear", module)
        l = torch.stack([w * d.l.float() for d, w in zip(ls, weights, strict=True)]).sum(0)
        return Scale(l.to(ls[0].l.dtype), ls[0].side, ls[0].layer)
    ds = additive(deltas, "linear", module)
    if other := next((d for d in ds if type(d) is not LowRank), None):
        raise refuse_kind(other, module)
    if len({d.rank for d in ds}) > 1:
        raise UnsupportedError(f"linear needs equal ranks; module {module} has ranks {[d.rank for d in ds]}")
    b = torch.zeros_like(ds[0].b, dtype=torch.float32)
    a = torch.zeros_like(ds[0].a, dtype=torch.float32)
    for d, w in zip(ds, weights, strict=True):
        c = w * d.scale
        a += math.copysign(math.sqrt(abs(c)), c) * d.a.float()
        b += math.sqrt(abs(c)) * d.b.float()
    return LowRank(b, a, 1.0, ds[0].target, bias=summed_bias(ds, weights))


_KINDS = {Hadamard: "LoHa", Kronecker: "LoKr", Dense: "a dense delta (LyCORIS full, a replaced module)"}
_WHY = {
    Hadamard: "whose factors multiply elementwise (PEFT has no linear merge for LoHa)",
    Kronecker: "whose factors multiply as a Kronecker product (PEFT has no linear merge for LoKr)",
}


def refuse_kind(d: Delta, module: str) -> UnsupportedError:
    """The one-line refusal for an input that is not a LoRA (LoHa, LoKr, dense): it has no LoRA factors."""
    kind, why = _KINDS.get(type(d), type(d).__name__), _WHY.get(type(d), "no LoRA factors")
    return UnsupportedError(
        f"linear averages LoRA factors as PEFT's add_weighted_adapter does; module {module} is {kind}, "
        f"{why}: use cat (exact) or svd (rank-k approximation)"
    )


def refuse_dora(module: str) -> UnsupportedError:
    """The one-line refusal for a DoRA input: its magnitude vector has no factor average."""
    return UnsupportedError(
        f"linear averages LoRA factors as PEFT's add_weighted_adapter does; module {module} is DoRA, whose "
        "magnitude vector has no linear merge (PEFT's keeps a fresh one): use cat (exact) or svd"
    )


STRATEGY = Strategy(name="linear", fn=merge, space="factors", exact="never", handles="both",
                    doc="PEFT's factor-space linear (cross terms)", reads=())  # fmt: skip
