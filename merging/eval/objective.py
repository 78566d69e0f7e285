"""What tuning optimises: the eval sets split into a tuning and a reporting part, and the objective over
the skills' retentions (the worst, the mean, or a mix), with a smooth stand-in for gradients."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from merging.errors import MergingError
from merging.eval.data import EvalSets, Examples

Objective = Literal["worst", "mean"] | float  # a float λ: λ·worst + (1 − λ)·mean
TEMPERATURE = 0.05  # softmin temperature of the worst-skill objective's gradient


@dataclass(frozen=True)
class Split:
    """Each eval set in two disjoint parts: ``tune`` (searched on) and ``report`` (quoted)."""

    tune: dict[str, Examples]
    report: dict[str, Examples]


def split_evals(evals: EvalSets, *, seed: int = 0, fraction: float = 0.5) -> Split:
    """Split every eval set by a seeded permutation (per skill name); each part keeps the file's order."""
    if not 0 < fraction < 1:
        raise MergingError(f"`tune_fraction` must be in (0, 1), got {fraction}")
    tune, report = {}, {}
    for name, pairs in evals.items():
        if len(pairs) < 2:
            raise MergingError(f"eval set {name!r} has {len(pairs)} example: tuning needs at least 2")
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        k = min(len(pairs) - 1, max(1, round(len(pairs) * fraction)))
        chosen = set(torch.randperm(len(pairs), generator=g)[:k].tolist())
        tune[name] = [p for i, p in enumerate(pairs) if i in chosen]
        report[name] = [p for i, p in enumerate(pairs) if i not in chosen]
    return Split(tune, report)


@dataclass(frozen=True)
class Step:
    """One point of the search: the objective and each skill's retention at some weights.

    ``on`` says what was measured: "tune" (the whole tuning split) or "batch" (the step's minibatch).
    """

    step: int
    objective: float
    retention: dict[str, float]
    on: str = "tune"


def score(values: Sequence[float], how: Objective) -> float:
    """The objective of per-skill retentions: the worst, the mean, or λ·worst + (1 − λ)·mean."""
    if how == "worst":
        return min(values)
    if how == "mean":
        return sum(values) / len(values)
    lam = float(how)
    return lam * min(values) + (1 - lam) * sum(values) / len(values)


def smooth(r: torch.Tensor, how: Objective) -> torch.Tensor:
    """A differentiable stand-in for ``score``: the worst skill as a softmin."""
    worst = -TEMPERATURE * torch.logsumexp(-r / TEMPERATURE, 0)
    if how == "worst":
        return worst
    if how == "mean":
        return r.mean()
    return float(how) * worst + (1 - float(how)) * r.mean()


def check_objective(how: str | float) -> Objective:
    """``worst``, ``mean`` or a number λ in [0, 1] (λ·worst + (1 − λ)·mean)."""
    if how in ("worst", "mean"):
        return how  # type: ignore[return-value]
    try:
        lam = float(how)
    except ValueError:
        raise MergingError(f"`objective` must be worst, mean or a number in [0, 1], got {how!r}") from None
    if not 0 <= lam <= 1:
        raise MergingError(f"`objective` λ must be in [0, 1], got {lam}")
    return lam
