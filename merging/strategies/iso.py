"""iso_c, iso_cts: isotropic merging, a flattened spectrum on the sum's (and the tasks') subspaces.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
ICML 2025, https://arxiv.org/abs/2502.04959 (code: https://github.com/danielm1405/iso-merging).

iso_c: M = ΣΔW_i with numerical rank ρ (σ > 1e-9·σ₁); the result is α·mean(σ_1..σ_ρ)·U_ρV_ρᵀ.
iso_cts: with p = ρ, c0 = ⌊p·f⌋ (f = ``common_fraction``), ts = round((p − c0)/T)·T (Python's round, as
the authors), c = p − ts common directions (at least 0) and d = ⌊(p − c)/T⌋ per input: the top c
triplets of M, and for each input the top min(d, rank) triplets of ΔW_i − U_cU_cᵀΔW_i; the result is
α·mean(kept σ)·polar(U_cat)·polar(V_cat)ᵀ. Both work on the numerical rank, not min(out, in) as the
authors' dense code does (on a sum of LoRAs that picks up arbitrary null-space directions). Every SVD
is factored (QR of stacked factors, SVD of a small core). Space: ΔW. Not exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core import linalg
from merging.core.deltas import Delta, LowRank
from merging.strategies.base import Options, Strategy
from merging.strategies.spectral import Factors, numerical_rank, result, task_factors


def _sum_svd(fs: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The SVD of M = ΣΔW_i from the stacked factors, and its numerical rank (at least 1)."""
    u, s, vh = linalg.factored_svd64(torch.cat([b for b, _ in fs], 1), torch.cat([a for _, a in fs], 0))
    return u, s, vh, max(1, numerical_rank(s, float(s[0])))


def merge_c(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    """Iso-C: α·mean(σ_1..σ_ρ)·U_ρV_ρᵀ of the sum."""
    fs, target = task_factors(deltas, weights, "iso_c", module)
    u, s, vh, rho = _sum_svd(fs)
    return result((opts.alpha * s[:rho].mean()) * u[:, :rho], vh[:rho], target)


def split(p: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(c, d): common directions and directions per task for rank p, T tasks and common fraction f."""
    c0 = int(p * fraction)
    c = max(p - round((p - c0) / tasks) * tasks, 0)
    d = (p - c) // tasks
    return (p, 0) if d == 0 else (c, d)  # no room for task directions: all of p is common


def merge_cts(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    """Iso-CTS: common subspace of the sum plus each input's own top directions outside it, isotropic."""
    fs, target = task_factors(deltas, weights, "iso_cts", module)
    u, s, vh, p = _sum_svd(fs)
    c, d = split(p, len(fs), opts.common_fraction)
    uc = u[:, :c]  # (out, c)
    us, ss, vhs = [uc], [s[:c]], [vh[:c]]
    for b, a in fs:
        ui, si, vhi = linalg.factored_svd64(b - uc @ (uc.T @ b), a)  # W_i = ΔW_i − U_cU_cᵀΔW_i
        n = min(d, numerical_rank(si, float(s[0])))
        us.append(ui[:, :n])
        ss.append(si[:n])
        vhs.append(vhi[:n])
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0).T  # (out, K), (K,), (in, K)
    scale = opts.alpha * s_cat.mean()
    return result(scale * linalg.polar(u_cat), linalg.polar(v_cat).T, target)


STRATEGY_C = Strategy(name="iso_c", fn=merge_c, space="dW", exact="never", handles="additive",
                      doc="Iso-C: the sum's subspace with a flat spectrum (--alpha)")  # fmt: skip
STRATEGY_CTS = Strategy(name="iso_cts", fn=merge_cts, space="dW", exact="never", handles="additive",
                        doc="Iso-CTS: common + task subspaces, flat spectrum")  # fmt: skip
