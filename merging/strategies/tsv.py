"""tsv: TSV-M, Task Singular Vectors merging (per-input top triplets, orthogonalised). Space: ΔW (factored).

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025,
https://arxiv.org/abs/2412.00081 (code: https://github.com/AntoAndGar/task_singular_vectors).

Per input, the top k = ⌊min(out, in)/T⌋ singular triplets of ΔW_i, capped at its numerical rank;
the kept U columns, singular values and V rows concatenated; U_cat and V_cat replaced by their polar
factors; the result is α·polar(U_cat)·diag(s_cat)·polar(V_cat)ᵀ, a LoRA of rank ≤ Σ r_i. Each SVD is the
factored one of B_i A_i and each polar factor a QR plus a small SVD. Not exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core import linalg
from merging.core.deltas import Delta, LowRank
from merging.errors import UnsupportedError
from merging.strategies.base import Options, Strategy
from merging.strategies.spectral import numerical_rank, result, task_factors


def merge(deltas: Sequence[Delta], weights: Sequence[float], opts: Options, module: str) -> LowRank:
    """α·polar(U_cat)·diag(s_cat)·polar(V_cat)ᵀ over the inputs' top singular triplets."""
    fs, target = task_factors(deltas, weights, "tsv", module)
    k = min(target.matrix_shape) // len(fs)
    if k == 0:
        raise UnsupportedError(f"tsv: module {module} has fewer dimensions than inputs; merge it with svd")
    us, ss, vhs = [], [], []
    for b, a in fs:
        u, s, vh = linalg.factored_svd64(b, a)  # (out, r), (r,), (r, in)
        n = min(k, numerical_rank(s, float(s[0]) if s.numel() else 0.0))
        us.append(u[:, :n])
        ss.append(s[:n])
        vhs.append(vh[:n])
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0).T  # (out, K), (K,), (in, K)
    if s_cat.numel() == 0:
        return result(u_cat, v_cat.T, target)
    return result(opts.alpha * linalg.polar(u_cat) * s_cat, linalg.polar(v_cat).T, target)


STRATEGY = Strategy(name="tsv", fn=merge, space="dW", exact="never", handles="additive",
                    doc="TSV-M: per-input top singular triplets, orthogonalised (--alpha)")  # fmt: skip
