"""IA³ as LyCORIS computes it: each network adds its base weight scaled per channel.

A LyCORIS IA³ module stores w = l − 1 and (outside bypass mode) computes y = inner(x) + (w ⊙ W) x with
W the ORIGINAL base weight, scaled by rows (side=out) or columns (side=in): additive per network, the
bias untouched. PEFT's IA³ multiplies instead (y = l ⊙ inner(x), the bias scaled too). So two LyCORIS IA³
networks stacked add (w1 + w2) ⊙ W, not PEFT's (1 + w1)(1 + w2). A lone adapter means the same in both
runtimes when it scales the input, or the output of a layer without bias; ``to_peft`` / ``from_peft``
convert exactly then and refuse otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.core.deltas import Dense, Layer, Scale, Side, Target
from merging.errors import ShapeMismatch, UnsupportedError


@dataclass(frozen=True, eq=False)
class AddedScale:
    """LyCORIS IA³: ΔW = diag(w)·W (side=out) or W·diag(w) (side=in), W the base weight; additive."""

    w: torch.Tensor  # (n,), LyCORIS's stored weight l − 1
    side: Side
    layer: Layer = "unknown"

    def __post_init__(self) -> None:
        if self.w.dim() != 1:
            raise ShapeMismatch(f"IA³ vector must be 1-D, got shape {tuple(self.w.shape)}")
        if self.side not in ("in", "out"):
            raise ShapeMismatch(f"IA³ side must be 'in' or 'out', got {self.side!r}")

    @property
    def numel(self) -> int:
        return self.w.numel()

    def dense(self, base: torch.Tensor) -> torch.Tensor:
        """ΔW in matrix form (out, in_flat), float32, from the base weight in matrix form."""
        w, m = self.w.float(), base.float()
        if self.side == "out":
            return w[:, None] * m
        return m * w.repeat_interleave(m.shape[1] // w.numel())[None, :]

    def resolve(self, base: torch.Tensor, layer: Layer) -> Dense:
        """The exact Dense delta given the base weight in its stored layout."""
        target = Target(layer, tuple(base.shape))
        return Dense(self.dense(target.to_matrix(base.float())), target)


def summed(deltas: Sequence[AddedScale], weights: Sequence[float], module: str) -> AddedScale:
    """Σ c_i ΔW_i of LyCORIS IA³ networks on one module: one network with w = Σ c_i w_i (exact)."""
    if len({d.side for d in deltas}) > 1:
        raise UnsupportedError(f"module {module}: LyCORIS IA³ networks scale both its input and output")
    if len({d.w.numel() for d in deltas}) > 1:
        raise UnsupportedError(f"module {module}: LyCORIS IA³ vectors have different lengths")
    w = torch.stack([c * d.w.double() for d, c in zip(deltas, weights, strict=True)]).sum(0)
    return AddedScale(w.to(deltas[0].w.dtype), deltas[0].side, deltas[0].layer)


def _same(side: Side, biased: bool | None) -> bool:
    """Whether PEFT's and LyCORIS's IA³ agree on a lone adapter: input side, or no bias on the layer."""
    return side == "in" or biased is False


def to_peft(d: AddedScale, biased: bool | None) -> Scale:
    """The PEFT IA³ vector of a lone LyCORIS IA³ module, where both mean the same; else one-line refusal."""
    if not _same(d.side, biased):
        why = "its base layer has a bias" if biased else "give the base model to show its layer has no bias"
        raise UnsupportedError(
            "a LyCORIS IA³ on the output leaves the bias unscaled, PEFT's IA³ scales it "
            f"({why}); keep it as a kohya/LyCORIS file"
        )
    return Scale((1 + d.w.double()).to(d.w.dtype), d.side, d.layer)


def from_peft(d: Scale, biased: bool | None) -> AddedScale:
    """The LyCORIS IA³ of a lone PEFT IA³ module, where both mean the same; else one-line refusal."""
    if not _same(d.side, biased):
        why = "its base layer has a bias" if biased else "pass the base model to show its layer has no bias"
        raise UnsupportedError(
            "PEFT's IA³ on the output scales the bias too, a LyCORIS IA³ does not "
            f"({why}); keep it as a PEFT folder"
        )
    return AddedScale((d.l.double() - 1).to(d.l.dtype), d.side, d.layer)
