"""What every strategy shares: the options, the Strategy record, and input checks."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from merging.core import linalg
from merging.core.deltas import AdditiveDelta, Delta, LowRank, Scale, Target
from merging.errors import MergingError, UnsupportedError

INNER = ("linear", "ties", "dare_ties")  # the merges knots and core run in their shared basis


@dataclass(frozen=True)
class Options:
    """Strategy options; each strategy reads the ones it needs.

    rank/energy: the svd rank budget (rank k, or the smallest k keeping fraction ``energy`` of ‖ΔW‖²_F);
    budget: svd's one global parameter budget, ranks allocated across modules (``merging.budget``);
    clamp: PEFT's quantile clamp of the svd factors; density/majority_sign/seed: TIES and DARE;
    signed: let geometric accept non-positive IA³ entries; inner: the merge knots/core run in their shared
    basis (linear, ties, dare_ties); alpha: the literature methods' global scale; common_fraction: Iso-CTS's
    share of the rank given to the common subspace.
    """

    rank: int | None = None
    energy: float | None = None
    clamp: float | None = None
    density: float = 0.5
    majority_sign: Literal["total", "frequency"] = "total"
    seed: int = 0
    signed: bool = False
    inner: Literal["linear", "ties", "dare_ties"] = "ties"
    alpha: float = 1.0
    common_fraction: float = 0.8
    budget: int | None = None

    def __post_init__(self) -> None:
        number = (int, float)
        types = {"rank": (int,), "seed": (int,), "budget": (int,), "energy": number, "clamp": number,
                 "density": number, "alpha": number, "common_fraction": number}  # fmt: skip
        for name, kinds in (types | {"signed": (bool,)}).items():
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))
            ):
                raise MergingError(
                    f"option `{name}` must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}"
                )
        if self.rank is not None and self.rank < 1:
            raise MergingError(f"`rank` must be at least 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise MergingError(f"`energy` must be in (0, 1], got {self.energy}")
        if self.rank is not None and self.energy is not None:
            raise MergingError("give `rank` or `energy`, not both")
        if self.budget is not None and (self.budget < 1 or self.rank is not None or self.energy is not None):
            raise MergingError("`budget` is a positive parameter count, given without `rank` or `energy`")
        if self.clamp is not None and not 0 < self.clamp <= 1:
            raise MergingError(f"`clamp` must be a quantile in (0, 1], got {self.clamp}")
        if not 0 < self.density <= 1:
            raise MergingError(f"`density` must be in (0, 1], got {self.density}")
        if self.majority_sign not in ("total", "frequency"):
            raise MergingError(f"`majority_sign` must be total or frequency, got {self.majority_sign!r}")
        if self.inner not in INNER:
            raise MergingError(f"`inner` must be linear, ties or dare_ties, got {self.inner!r}")
        if not math.isfinite(self.alpha):
            raise MergingError(f"`alpha` must be a finite number, got {self.alpha}")
        if not 0 < self.common_fraction <= 1:
            raise MergingError(f"`common_fraction` must be in (0, 1], got {self.common_fraction}")

    def generator(self, module: str) -> torch.Generator:
        """A generator seeded from ``seed`` and the module name: reproducible, different per module."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(module.encode()))


MergeFn = Callable[[Sequence[Delta], Sequence[float], Options, str], Delta]
SpectrumFn = Callable[[Sequence[Delta], Sequence[float], Options, str], "Spectrum"]
Exactness = Literal["always", "full_rank", "never"]


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """A named per-module merge function and what it promises.

    exact: whether a merged module reproduces the stacked outputs: "always", "never", or "full_rank"
    (when the kept rank covers the rank of the sum, min(Σ r_i, out, in_flat)); see ``exact_for``.
    """

    name: str
    fn: MergeFn
    space: Literal["dW", "factors", "ia3"]
    exact: Exactness
    handles: Literal["additive", "ia3", "both"]
    doc: str
    ranked: bool = False  # takes a rank budget (`rank` / `energy`)
    exact_when: Callable[[Options], bool] | None = None  # exact under these options ("never" otherwise)
    reads: tuple[str, ...] | None = None  # the Options fields it reads besides the rank budget (None: unsaid)
    # a ranked strategy whose rank-k merge is the top k of one spectrum: fn(...) == spectrum(...).delta(opts),
    # so merges that differ only in rank can share it (``merge.Spectra``)
    spectrum: SpectrumFn | None = None
    moves_memory: bool = False  # its merge only copies factors (cat): a streamed merge runs it on one thread

    @property
    def options_read(self) -> tuple[str, ...] | None:
        """Every Options field this strategy reads (None when it does not say)."""
        if self.reads is None:
            return None
        return (*self.reads, *(("rank", "energy", "clamp") if self.ranked else ()))

    def exact_for(self, merged: Delta, inputs: Sequence[Delta], opts: Options | None = None) -> bool:
        """Whether ``merged``, this strategy's merge of one module's ``inputs``, reproduces their stack.

        Args:
            merged: the merged delta of the module.
            inputs: the module's input deltas (IA³ vectors among them do not count towards the rank).
            opts: the options it was merged with (``exact_when`` needs them; without them, not exact).

        Returns:
            True for an "always" strategy; for "full_rank", when the merged rank reaches the rank bound
            of the sum, min(Σ r_i, out, in_flat); with ``exact_when``, what it says of ``opts``.
        """
        if self.exact_when is not None:
            return opts is not None and self.exact_when(opts)
        if self.exact != "full_rank" or not isinstance(merged, AdditiveDelta):
            return self.exact == "always"
        bound = sum(d.rank for d in inputs if isinstance(d, AdditiveDelta))
        return merged.rank >= min(bound, *merged.target.matrix_shape)


def additive(deltas: Sequence[Delta], strategy: str, module: str) -> list[AdditiveDelta]:
    """The deltas as additive ones, or a clear error naming the strategy and module."""
    out = []
    for d in deltas:
        if not isinstance(d, AdditiveDelta):
            raise UnsupportedError(f"{strategy} merges additive deltas; module {module} has an IA³ vector")
        if isinstance(d, LowRank) and d.magnitude is not None:
            raise UnsupportedError(
                f"module {module}: a DoRA delta needs its base weights; pass `base_weights` to resolve it"
            )
        out.append(d)
    return out


def scales(deltas: Sequence[Delta], strategy: str, module: str) -> list[Scale]:
    """The deltas as IA³ vectors on one side, or a clear error."""
    if not all(isinstance(d, Scale) for d in deltas):
        raise UnsupportedError(f"{strategy} merges IA³ vectors; module {module} has an additive delta")
    if len({d.side for d in deltas}) > 1:
        raise UnsupportedError(
            f"module {module}: IA³ vectors scale both input and output; cannot be one IA³ module"
        )
    if len({d.l.numel() for d in deltas}) > 1:
        raise UnsupportedError(f"module {module}: IA³ vectors have different lengths")
    return list(deltas)


def summed_bias(deltas: Sequence[AdditiveDelta], weights: Sequence[float]) -> torch.Tensor | None:
    """Σ w_i s_i bias_i over the LoRA bias deltas (None when no input has one)."""
    biases = [
        (w * d.scale) * d.bias.float()
        for d, w in zip(deltas, weights, strict=True)
        if getattr(d, "bias", None) is not None
    ]
    return torch.stack(biases).sum(0) if biases else None


@dataclass(frozen=True, eq=False)
class Spectrum:
    """One module's merged ΔW as singular triplets, before the rank budget: a rank-k merge keeps the top k.

    ``u`` and ``vh`` may hold only the leading triplets (``top``); ``s`` is always whole, since the energy
    rule and the numerical rank read every singular value.
    """

    u: torch.Tensor  # (out, m)
    s: torch.Tensor  # (n,), n ≥ m, descending
    vh: torch.Tensor  # (m, in_flat)
    target: Target
    default_rank: int  # the rank kept when the options name none (the largest input rank, as PEFT)
    bias: torch.Tensor | None = None  # the summed LoRA biases (out,)

    def rank(self, opts: Options) -> int:
        """The number of triplets a merge with ``opts`` keeps: rank, or energy's k; never a null direction."""
        if opts.energy is not None:
            frac = torch.cumsum(self.s.double() ** 2, 0) / max(float((self.s.double() ** 2).sum()), 1e-300)
            k = int((frac < opts.energy - 1e-12).sum()) + 1
        else:
            k = opts.rank or self.default_rank
        return max(1, min(k, linalg.numerical_rank(self.s, (self.u.shape[0], self.vh.shape[1])) or 1))

    def covers(self, opts: Options) -> bool:
        """Whether the triplets held are enough for a merge with ``opts``."""
        return self.rank(opts) <= self.u.shape[1]

    def top(self, k: int) -> Spectrum:
        """The same spectrum holding only its leading ``k`` triplets (copies, so the rest can be freed)."""
        return replace(self, u=self.u[:, :k].clone(), vh=self.vh[:k].clone())

    def delta(self, opts: Options) -> LowRank:
        """The merged LowRank (scale 1) under ``opts``: top-k triplets, s folded into B, clamped as PEFT."""
        k = self.rank(opts)
        if k > self.u.shape[1]:
            raise MergingError(f"a spectrum holding {self.u.shape[1]} triplets cannot give rank {k}")
        bk, ak = self.u[:, :k] * self.s[:k], self.vh[:k]  # (out, k), (k, in_flat)
        if opts.clamp is not None:
            hi = torch.quantile(torch.cat([bk.flatten(), ak.flatten()]), opts.clamp)
            bk, ak = bk.clamp(-hi, hi), ak.clamp(-hi, hi)
        return LowRank(bk.contiguous(), ak.contiguous(), 1.0, self.target, bias=self.bias)


def factored_spectrum(
    b: torch.Tensor, a: torch.Tensor, target: Target, default_rank: int, bias: torch.Tensor | None = None
) -> Spectrum:
    """The spectrum of b @ a (b (out, R), a (R, in_flat)) by factored QR+SVD: no dense matrix."""
    return Spectrum(*linalg.factored_svd(b, a), target, default_rank, bias)


def dense_spectrum(
    d: torch.Tensor, target: Target, default_rank: int, bias: torch.Tensor | None = None
) -> Spectrum:
    """The spectrum of a dense (out, in_flat) matrix (TIES/DARE results) from its Gram matrix
    (``linalg.gram_svd``: float32 accuracy at about half LAPACK's SVD time)."""
    return Spectrum(*linalg.gram_svd(d), target, default_rank, bias)
