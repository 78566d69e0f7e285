"""cat: Σ w_i ΔW_i as one LoRA of rank Σ r_i, factors concatenated. Space: ΔW. Exact.

LoHa, LoKr and dense inputs enter through their exact low-rank forms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core.deltas import AdditiveDelta, Delta, LowRank
from merging.storage import buffers
from merging.strategies.base import Options, Strategy, additive, summed_bias


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    """Concatenate the weighted factors: B = [w_1 s_1 B_1, ...], A = [A_1; ...], scale 1.

    Scales and weights go into B, so A is the inputs' A blocks end to end: the bytes each input was read
    into once (and hashed from, ``storage.hasher``), copied into place and written from there.

    Args:
        deltas: additive deltas of one module, aligned on one base weight shape.
        weights: one weight per delta.

    Returns:
        A LowRank of rank Σ r_i whose product is exactly Σ w_i ΔW_i.
    """
    ds = additive(deltas, "cat", module)
    b, a = stacked(ds, weights)  # (out, R), (R, in_flat)
    return LowRank(b, a, 1.0, ds[0].target, bias=summed_bias(ds, weights))


@torch.no_grad()  # a merge is data: a factor that requires grad (a base parameter) is copied, not traced
def stacked(ds: Sequence[AdditiveDelta], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors side by side in float32, each B scaled by w_i s_i as it is copied into place (one pass
    over B's bytes: ``core.deltas.stacked_factors`` scales a copy, then concatenates it).

    Args:
        ds: additive deltas of one module.
        weights: one weight per delta.

    Returns:
        (B (out, R), A (R, in_flat)), float32, with B @ A = Σ w_i s_i B_i A_i.
    """
    lrs = [d.low_rank() for d in ds]
    out, rank, inp = lrs[0].b.shape[0], sum(lr.b.shape[1] for lr in lrs), lrs[0].a.shape[1]
    b = _float32(out, rank)
    at = 0
    for lr, w in zip(lrs, weights, strict=True):
        c, part = w * lr.scale, b[:, at : at + lr.b.shape[1]]  # (out, r_i) view
        if c == 1.0:
            part.copy_(lr.b)
        else:
            torch.mul(lr.b.float(), c, out=part)
        at += lr.b.shape[1]
    return b, torch.cat([lr.a.float() for lr in lrs], dim=0, out=_float32(rank, inp))


def _float32(rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) float32 tensor in reused memory (``storage.buffers``: no fresh pages to fault in)."""
    return buffers.take(rows * cols * 4).view(torch.float32).view(rows, cols)


STRATEGY = Strategy(name="cat", fn=merge, space="dW", exact="always", handles="additive",
                    doc="exact sum as one LoRA of rank Σ r_i", reads=(), moves_memory=True)  # fmt: skip
