"""The common delta representation and its exact algebra.

Every loader turns what it reads into these objects; every strategy and writer works on them.
A target module has weight W of shape (out, in); a conv weight (out, in, k...) is flattened to
(out, in·k...) for the algebra, an embedding (num, dim) is W itself, a GPT-2 Conv1D stores Wᵀ.
The "matrix form" of a delta is always (out, in_flat) in that convention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from merging.core import linalg
from merging.core.replacements import Auxiliary, BaseTensors, ModuleReplacement, TokenRows  # noqa: F401 (re-exported)
from merging.core.target import CONV_DIMS, Layer, Side, Target  # noqa: F401 (re-exported)
from merging.errors import ShapeMismatch, UnsupportedError


class AdditiveDelta:
    """Shared behaviour of the additive deltas: ΔW in matrix form, exact factors, norms."""

    target: Target
    scale: float

    def low_rank(self) -> LowRank:  # pragma: no cover - abstract
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """ΔW in matrix form (out, in_flat), float32."""
        lr = self.low_rank()
        return (lr.scale * lr.b.float()) @ lr.a.float()

    def dense_stored(self) -> torch.Tensor:
        """ΔW in the base weight's stored layout."""
        return self.target.to_stored(self.dense())

    @property
    def rank(self) -> int:
        return self.low_rank().b.shape[1]

    def norm(self) -> float:
        """Frobenius norm of ΔW from Gram matrices (no dense matrix)."""
        lr = self.low_rank()
        return abs(lr.scale) * math.sqrt(max(float(linalg.gram_norm_sq(lr.b.float(), lr.a.float())), 0.0))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW applied to activations in factored form: scale·B(A x); x (..., in_flat) → (..., out).

        For an embedding, x holds token ids and the result is the delta rows (..., dim).
        """
        lr = self.low_rank()
        if self.target.layer == "embedding":
            return lr.scale * (F.embedding(x, lr.b.to(torch.float32)) @ lr.a.float())
        return lr.scale * ((x.float() @ lr.a.float().T) @ lr.b.float().T)

@dataclass(frozen=True, eq=False)
class LowRank(AdditiveDelta):
    """ΔW = scale·B·A (LoRA, LoCon, and the output of cat/svd).

    ``bias`` is a LoRA bias delta (added as scale·bias); ``magnitude`` marks DoRA, whose weight depends on
    the base: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row, so ``dense()`` needs ``dora_dense(base)``.
    """

    b: torch.Tensor  # (out, r)
    a: torch.Tensor  # (r, in_flat)
    scale: float
    target: Target
    bias: torch.Tensor | None = None  # (out,)
    magnitude: torch.Tensor | None = None  # (out,)

    def __post_init__(self) -> None:
        out, inf = self.target.matrix_shape
        if self.b.dim() != 2 or self.a.dim() != 2 or self.b.shape[1] != self.a.shape[0]:
            b, a = tuple(self.b.shape), tuple(self.a.shape)
            raise ShapeMismatch(f"LoRA factors B {b} and A {a} do not chain")
        if self.b.shape[0] != out or self.a.shape[1] != inf:
            got = (self.b.shape[0], self.a.shape[1])
            raise ShapeMismatch(f"LoRA factors give {got}, the module is {(out, inf)}")
        # DoRA normalises per output row, per embedding dimension for an embedding
        mag = inf if self.target.layer == "embedding" else out
        for name, v, n in (("bias", self.bias, out), ("magnitude", self.magnitude, mag)):
            if v is not None and v.shape != (n,):
                raise ShapeMismatch(f"LoRA {name} has shape {tuple(v.shape)}, expected ({n},)")

    def low_rank(self) -> LowRank:
        return self

    def dense(self) -> torch.Tensor:
        if self.magnitude is not None:
            raise UnsupportedError("a DoRA delta depends on the base weight: use dora_dense(base_weight)")
        return (self.scale * self.b.float()) @ self.a.float()  # scale the small factor: one (out, in) alloc

    def dora_dense(self, base: torch.Tensor) -> torch.Tensor:
        """W' − W in matrix form for a DoRA delta, given the base weight in stored layout."""
        w = self.target.to_matrix(base.float())
        w_new = w + self.scale * (self.b.float() @ self.a.float())
        if self.magnitude is None:
            return w_new - w
        if self.target.layer == "embedding":  # per embedding dimension
            return w_new * (self.magnitude.float() / w_new.norm(dim=0))[None, :] - w
        return (self.magnitude.float() / w_new.norm(dim=1))[:, None] * w_new - w  # per output row

    @property
    def numel(self) -> int:
        extra = sum(v.numel() for v in (self.bias, self.magnitude) if v is not None)
        return self.b.numel() + self.a.numel() + extra

@dataclass(frozen=True, eq=False)
class Hadamard(AdditiveDelta):
    """ΔW = scale·(B1A1) ⊙ (B2A2) (LoHa), stored as PEFT and LyCORIS store it.

    Plain: w1a (out, r), w1b (r, in_flat). Tucker conv (t1/t2 present): w1a (r, out), w1b (r, in),
    t1 (r, r, kh, kw). Exact low-rank form: row/column Khatri-Rao products, rank r1·r2.
    """

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    scale: float
    target: Target
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    def __post_init__(self) -> None:
        (b1, a1), (b2, a2) = self.factors()
        shape = self.target.matrix_shape
        for b, a in ((b1, a1), (b2, a2)):
            if (b.shape[0], a.shape[1]) != shape or b.shape[1] != a.shape[0]:
                raise ShapeMismatch(f"LoHa factors give ({b.shape[0]}, {a.shape[1]}), the module is {shape}")

    def factors(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((B1, A1), (B2, A2)) in matrix form."""
        if self.t1 is not None and self.t2 is not None:
            t = linalg.tucker_factors
            return t(self.t1, self.w1a, self.w1b), t(self.t2, self.w2a, self.w2b)
        return (self.w1a.float(), self.w1b.float()), (self.w2a.float(), self.w2b.float())

    def dense(self) -> torch.Tensor:
        (b1, a1), (b2, a2) = self.factors()
        return self.scale * ((b1 @ a1) * (b2 @ a2))

    def low_rank(self) -> LowRank:
        (b1, a1), (b2, a2) = self.factors()
        b = linalg.khatri_rao_rows(b1, b2)  # (out, r1·r2)
        a = linalg.khatri_rao_cols(a1, a2)  # (r1·r2, in_flat)
        return LowRank(b, a, self.scale, self.target)

    @property
    def numel(self) -> int:
        parts = (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2)
        return sum(t.numel() for t in parts if t is not None)

@dataclass(frozen=True, eq=False)
class Kronecker(AdditiveDelta):
    """ΔW = scale·W1 ⊗ W2 (LoKr), each factor full or decomposed, stored as PEFT/LyCORIS store it.

    W1 is ``w1`` (a, c) or ``w1a @ w1b``; W2 is ``w2`` (b, d[, k...]), ``w2a @ w2b``, or the Tucker
    form from ``t2`` (r, r, kh, kw), ``w2a`` (r, b), ``w2b`` (r, d). The matrix form is kron(W1, W2 flat).
    """

    scale: float
    target: Target
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.w1 is None) == (self.w1a is None or self.w1b is None):
            raise ShapeMismatch("LoKr needs either lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if (self.w2 is None) == (self.w2a is None or self.w2b is None):
            raise ShapeMismatch("LoKr needs either lokr_w2 or both lokr_w2_a and lokr_w2_b")
        (a, c), w2 = self.matrix1().shape, self.raw2()
        b, d = w2.shape[0], math.prod(w2.shape[1:])
        if (a * b, c * d) != self.target.matrix_shape:
            raise ShapeMismatch(
                f"LoKr factors give ({a * b}, {c * d}), the module is {self.target.matrix_shape}"
            )

    def matrix1(self) -> torch.Tensor:
        """W1 as a small dense matrix (a, c)."""
        if self.w1 is not None:
            return self.w1.float()
        return self.w1a.float() @ self.w1b.float()

    def raw2(self) -> torch.Tensor:
        """W2 as a small dense tensor in its stored shape (b, d[, k...])."""
        if self.w2 is not None:
            return self.w2.float()
        if self.t2 is not None:
            b, a = linalg.tucker_factors(self.t2, self.w2a, self.w2b)
            return (b @ a).reshape(b.shape[0], self.w2b.shape[1], *self.t2.shape[2:])
        return self.w2a.float() @ self.w2b.float()

    def _factors(self, w: torch.Tensor | None, wa: torch.Tensor | None, wb: torch.Tensor | None):
        if w is not None:
            return linalg.exact_factors(w.float().reshape(w.shape[0], -1))
        return wa.float(), wb.float()

    def _conv1d_quirk(self) -> bool:
        # PEFT builds a Conv1d LoKr as kron(W1, W2 3-D) reshaped to the weight: not a matrix Kronecker.
        return self.raw2().dim() == 3

    def dense(self) -> torch.Tensor:
        if self._conv1d_quirk():
            full = torch.kron(self.matrix1(), self.raw2()).reshape(self.target.shape)
            return self.scale * self.target.to_matrix(full)
        w2 = self.raw2()
        return self.scale * linalg.kron(self.matrix1(), w2.reshape(w2.shape[0], -1))

    def low_rank(self) -> LowRank:
        if self._conv1d_quirk():
            b, a = linalg.exact_factors(self.dense())
            return LowRank(b, a, 1.0, self.target)
        b1, a1 = self._factors(self.w1, self.w1a, self.w1b)
        if self.t2 is not None:
            b2, a2 = linalg.tucker_factors(self.t2, self.w2a, self.w2b)
        else:
            b2, a2 = self._factors(self.w2, self.w2a, self.w2b)
        kb = linalg.kron(b1, b2)  # (a·b, r1·r2)
        ka = linalg.kron(a1, a2)  # (r1·r2, c·d)
        return LowRank(kb, ka, self.scale, self.target)

    @property
    def numel(self) -> int:
        parts = (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2)
        return sum(t.numel() for t in parts if t is not None)

@dataclass(frozen=True, eq=False)
class Dense(AdditiveDelta):
    """ΔW = D (LyCORIS full/diff, DoRA resolved against its base, a replaced module as new − base)."""

    d: torch.Tensor  # (out, in_flat)
    target: Target
    scale: float = 1.0
    bias: torch.Tensor | None = None  # (out,), added as scale·bias

    def __post_init__(self) -> None:
        out, inf = self.target.matrix_shape
        if tuple(self.d.shape) != (out, inf):
            raise ShapeMismatch(f"dense delta has shape {tuple(self.d.shape)}, the module is {(out, inf)}")
        if self.bias is not None and tuple(self.bias.shape) != (out,):
            raise ShapeMismatch(f"dense bias has shape {tuple(self.bias.shape)}, expected ({out},)")

    def dense(self) -> torch.Tensor:
        return self.scale * self.d.float()

    def low_rank(self) -> LowRank:
        u, s, vh = torch.linalg.svd(self.d.double(), full_matrices=False)
        k = linalg.numerical_rank(s, self.target.matrix_shape)
        return LowRank((u[:, :k] * s[:k]).float(), vh[:k].float(), self.scale, self.target, bias=self.bias)

    def norm(self) -> float:
        return abs(self.scale) * float(self.d.double().norm())

    @property
    def numel(self) -> int:
        return self.d.numel()

@dataclass(frozen=True, eq=False)
class Scale:
    """IA³: side=out gives y = l ⊙ (Wx + b); side=in gives y = W(l ⊙ x) + b. Multiplicative, not additive."""

    l: torch.Tensor  # (n,)
    side: Side
    layer: Layer = "unknown"

    def __post_init__(self) -> None:
        if self.l.dim() != 1:
            raise ShapeMismatch(f"IA³ vector must be 1-D, got shape {tuple(self.l.shape)}")
        if self.side not in ("in", "out"):
            raise ShapeMismatch(f"IA³ side must be 'in' or 'out', got {self.side!r}")

    @property
    def numel(self) -> int:
        return self.l.numel()

    def fold(self, w: torch.Tensor) -> torch.Tensor:
        """The weight in matrix form (out, in_flat) with this scaling folded in (bias not included)."""
        l = self.l.float()
        if self.side == "out":
            return l[:, None] * w
        return w * l.repeat_interleave(w.shape[1] // l.numel())[None, :]

Delta = LowRank | Hadamard | Kronecker | Dense | Scale

def stacked_factors(items: Sequence[tuple[AdditiveDelta, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w_i ΔW_i as one pair of stacked factors, scales and weights folded into B.

    Args:
        items: (delta, weight) pairs of one module.

    Returns:
        (B (out, R), A (R, in_flat)) with R = Σ r_i and B @ A = Σ w_i ΔW_i.
    """
    bs, as_ = [], []
    for d, w in items:
        lr = d.low_rank()
        c = w * lr.scale
        bs.append(lr.b.float() if c == 1.0 else c * lr.b.float())  # cat copies it anyway
        as_.append(lr.a.float())
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)

def sum_factors(ref: Sequence[tuple[AdditiveDelta, float]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Σ ref as stacked factors (B, A) and ‖Σ ref‖_F²: ``sum_error``'s reference side, reusable."""
    b_ref, a_ref = stacked_factors(ref)
    return b_ref, a_ref, float(linalg.gram_norm_sq(b_ref, a_ref))


def sum_error(
    ref: Sequence[tuple[AdditiveDelta, float]],
    got: Sequence[tuple[AdditiveDelta, float]],
    ref_factors: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> float:
    """‖Σ got − Σ ref‖_F / ‖Σ ref‖_F from the stacked factors (no dense matrix); absolute when Σ ref = 0.

    ``ref_factors``: ``sum_factors(ref)`` computed once when one reference is compared with many results.
    """
    if not ref:
        return math.inf if got else 0.0
    b_ref, a_ref, denom = ref_factors or sum_factors(ref)
    if not got:
        return 1.0 if denom > 0 else 0.0
    b_got, a_got = stacked_factors(got)
    diff = max(float(linalg.gram_norm_sq(torch.cat([b_got, -b_ref], 1), torch.cat([a_got, a_ref], 0))), 0.0)
    return math.sqrt(diff / denom) if denom > 0 else math.sqrt(diff)

