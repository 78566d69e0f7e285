"""core: Core Space merging, the inner merge run on (Σr × Σr) cores in shared bases. Space: ΔW (factored).

Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025,
https://arxiv.org/abs/2509.17786 (code: https://github.com/apanariello4/core-space-merging).

U_B: left singular vectors of [c_1B_1 | … | c_TB_T]; V_A: right singular vectors of [A_1; …; A_T];
M_i = U_Bᵀ(c_iB_i)A_iV_A; the result is α·U_B·inner(M_1..M_T)·V_Aᵀ, a LoRA of rank ≤ Σ r_i. Both SVDs
are QR of the stacked factors plus the SVD of a small R. ``--inner linear`` with α = 1 is exact: U_B and
V_A span every input's columns and rows, so U_B(ΣM_i)V_Aᵀ = ΣΔW_i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core.deltas import Delta, LowRank
from merging.strategies.base import Options, Strategy
from merging.strategies.inner import merge_inner
from merging.strategies.spectral import result, task_factors


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    """α·U_B·inner(M_1, …, M_T)·V_Aᵀ with M_i the inputs' cores in the shared bases."""
    fs, target = task_factors(deltas, weights, "core", module)
    qb, rb = torch.linalg.qr(torch.cat([b for b, _ in fs], dim=1))  # (out, m1), (m1, R)
    ub = qb @ torch.linalg.svd(rb, full_matrices=False)[0]  # (out, m1)
    qa, ra = torch.linalg.qr(torch.cat([a for _, a in fs], dim=0).T)  # (in, m2), (m2, R)
    va = qa @ torch.linalg.svd(ra.T, full_matrices=False)[2].T  # (in, m2)
    cores = torch.stack([(ub.T @ b) @ (a @ va) for b, a in fs])  # (T, m1, m2)
    merged = merge_inner(cores, opts, module)  # (m1, m2)
    return result(opts.alpha * (ub @ merged), va.T, target)


def _exact(opts: Options) -> bool:
    return opts.inner == "linear" and opts.alpha == 1


STRATEGY = Strategy(name="core", fn=merge, space="factors", exact="never", handles="additive",
                    doc="Core Space: inner merge of Σr×Σr cores (--inner, --alpha)",
                    exact_when=_exact)  # fmt: skip
