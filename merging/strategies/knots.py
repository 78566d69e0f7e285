"""knots: KnOTS, merging LoRAs in the joint SVD basis of their concatenated updates. Space: ΔW (factored).

Stoica et al., "Model merging with SVD to tie the Knots", ICLR 2025, https://arxiv.org/abs/2410.19735
(code: https://github.com/gstoica27/KnOTS).

X = [ΔW_1 | … | ΔW_T] (inputs side by side along the input axis) = U S Vᵀ, singular values above 1e-5
kept; V_i is the block of Vᵀ for input i and G_i = S·V_i (S applied before the merge, as the KnOTS
repository does); the result is α·U·inner(G_1..G_T), a LoRA of rank ≤ Σ r_i. Factored: X = B·diag(A_i),
so the SVD is QR of the stacked B's and of each A_iᵀ plus the SVD of a (Σr × Σr) core. Not exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core.deltas import Delta, LowRank
from merging.strategies.base import Options, Strategy
from merging.strategies.inner import merge_inner
from merging.strategies.spectral import result, task_factors

KEEP_ABOVE = 1e-5  # the KnOTS repository's cut on the singular values of X


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    """α·U·inner(S·V_1, …, S·V_T) from the joint SVD of the inputs' concatenated updates."""
    fs, target = task_factors(deltas, weights, "knots", module)
    qb, rb = torch.linalg.qr(torch.cat([b for b, _ in fs], dim=1))  # (out, m), (m, R)
    qas, blocks, col = [], [], 0
    for b, a in fs:
        qa, ra = torch.linalg.qr(a.T)  # (in, m_i), (m_i, r_i)
        blocks.append(rb[:, col : col + b.shape[1]] @ ra.T)  # (m, m_i)
        qas.append(qa)
        col += b.shape[1]
    uc, s, vch = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)  # core (m, Σ m_i)
    keep = s > KEEP_ABOVE
    u = qb @ uc[:, keep]  # (out, k)
    g, col = [], 0
    for qa in qas:
        g.append(s[keep, None] * (vch[keep, col : col + qa.shape[1]] @ qa.T))  # G_i = S·V_i (k, in)
        col += qa.shape[1]
    merged = merge_inner(torch.stack(g), opts, module)  # (k, in)
    return result(opts.alpha * u, merged, target)


STRATEGY = Strategy(name="knots", fn=merge, space="factors", exact="never", handles="additive",
                    doc="KnOTS: inner merge in the joint SVD basis (--inner, --alpha)")  # fmt: skip
