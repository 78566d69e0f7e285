"""One global parameter budget for svd: ranks allocated across modules to keep the most ‖ΔW‖² per parameter.

Each module's exact sum Σ w_i ΔW_i has singular values σ_1 ≥ σ_2 ≥ … (from the factored QR+SVD, no dense
matrix). Keeping rank k costs k·(out + in_flat) parameters and keeps Σ_{j≤k} σ_j² of ‖ΔW‖²_F; the error
left is the rest. Greedy by σ² gained per parameter, over every module at once, is optimal when modules
share a shape (each module's gains only shrink, so the greedy order is the sorted order) and within one
rank step of optimal otherwise. Ties go to the module whose name sorts first.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merging.core import linalg
from merging.errors import MergingError


@dataclass(frozen=True)
class Spectrum:
    """One module's singular values (descending, null directions dropped) and the cost of one rank."""

    s: torch.Tensor  # (k,)
    cost: int  # out + in_flat parameters per rank


def spectrum(b: torch.Tensor, a: torch.Tensor) -> Spectrum:
    """The spectrum of b @ a (b (out, R), a (R, in_flat)) from its factors."""
    _, s, _ = linalg.factored_svd(b, a)
    k = linalg.numerical_rank(s, (b.shape[0], a.shape[1]))
    return Spectrum(s[:k].double(), b.shape[0] + a.shape[1])


def allocate(spectra: Mapping[str, Spectrum], budget: int) -> dict[str, int]:
    """Ranks per module whose total cost Σ k_m·cost_m stays within ``budget``, by σ² per parameter.

    Returns:
        module → rank (0 for a module that gets nothing), every module of ``spectra`` present.
    """
    if budget < 1:
        raise MergingError(f"`budget` must be a positive number of parameters, got {budget}")
    ranks = dict.fromkeys(spectra, 0)
    heap = [(-(float(sp.s[0]) ** 2) / sp.cost, mod) for mod, sp in spectra.items() if sp.s.numel()]
    heapq.heapify(heap)
    left = budget
    while heap:
        _, mod = heapq.heappop(heap)
        sp = spectra[mod]
        if sp.cost > left:  # every later step of this module costs as much: it is done
            continue
        left -= sp.cost
        ranks[mod] += 1
        k = ranks[mod]
        if k < sp.s.numel():
            heapq.heappush(heap, (-(float(sp.s[k]) ** 2) / sp.cost, mod))
    return ranks


def kept(spectra: Mapping[str, Spectrum], ranks: Mapping[str, int]) -> float:
    """Σ over modules of the ‖ΔW‖² the ranks keep."""
    return sum(float((sp.s[: ranks[m]] ** 2).sum()) for m, sp in spectra.items())


def cost(spectra: Mapping[str, Spectrum], ranks: Mapping[str, int]) -> int:
    """The parameters the ranks take (factors only)."""
    return sum(ranks[m] * sp.cost for m, sp in spectra.items())
