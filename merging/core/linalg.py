"""Factored linear algebra: Khatri-Rao products, Gram-based norms, QR+SVD of B·A.

Pure typed functions over tensors. None of them builds a dense (out, in) matrix from factors.
Work happens in float32, small cores (r × r) in float64.
"""

from __future__ import annotations

import torch


def khatri_rao_rows(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri-Rao product: row i is kron(b1[i], b2[i]).

    Args:
        b1: (out, r1).
        b2: (out, r2).

    Returns:
        (out, r1·r2), so that (b1 a1) ⊙ (b2 a2) = khatri_rao_rows(b1, b2) @ khatri_rao_cols(a1, a2).
    """
    return (b1[:, :, None] * b2[:, None, :]).reshape(b1.shape[0], -1)


def khatri_rao_cols(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Column-wise Khatri-Rao product: column j is kron(a1[:, j], a2[:, j]).

    Args:
        a1: (r1, in).
        a2: (r2, in).

    Returns:
        (r1·r2, in).
    """
    return (a1[:, None, :] * a2[None, :, :]).reshape(-1, a1.shape[1])


def gram_norm_sq(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖b @ a‖_F² from the Gram matrices: tr((bᵀb)(a aᵀ)), in float64.

    Args:
        b: (out, r).
        a: (r, in).

    Returns:
        A float64 scalar.
    """
    b, a = b.double(), a.double()
    return ((b.T @ b) * (a @ a.T)).sum()


def factored_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of b @ a without forming it: QR of b and aᵀ, then SVD of the small core.

    Cost O((out + in)·r²) instead of O(out·in·min(out, in)).

    Args:
        b: (out, r).
        a: (r, in).

    Returns:
        (u, s, vh) with u (out, k), s (k,) descending, vh (k, in), k = min(r, out, in), and
        u @ diag(s) @ vh == b @ a up to rounding.
    """
    u, s, vh = factored_svd64(b, a)
    return u.float(), s.float(), vh.float()


def factored_svd64(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``factored_svd``, everything in float64 (for the literature's methods, which need the small σ).

    Args:
        b: (out, r).
        a: (r, in).

    Returns:
        (u (out, k), s (k,), vh (k, in)) in float64, k = min(r, out, in).
    """
    qb, rb = torch.linalg.qr(b.double())  # (out, k1), (k1, r)
    qa, ra = torch.linalg.qr(a.double().T)  # (in, k2), (k2, r)
    uc, s, vch = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core (k1, k2)
    return qb @ uc, s, vch @ qa.T  # (out, k), (k,), (k, in)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P·Qᵀ of a tall x = P Σ Qᵀ, from its QR and the SVD of the small R.

    Args:
        x: (n, k), n ≥ k.

    Returns:
        (n, k) with orthonormal columns, the same dtype as x.
    """
    q, r = torch.linalg.qr(x)  # (n, k), (k, k)
    p, _, qh = torch.linalg.svd(r, full_matrices=False)
    return q @ (p @ qh)


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], rtol: float | None = None) -> int:
    """Number of singular values above the usual float32 threshold max(s)·max(shape)·eps."""
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0
    tol = rtol if rtol is not None else max(shape) * torch.finfo(torch.float32).eps
    return int((s > s.max() * tol).sum())


def gram_svd(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of a dense matrix from the eigenvectors of its smaller Gram matrix, in float64.

    On the wide (out, in) shapes of LLM layers this is up to 1.75× faster than LAPACK's SVD of the float32
    matrix (2 threads, quiet: 576×1536 55 ms against 89, 192×576 4 against 7; square alike), and as accurate:
    each eigenvalue is s_i² within ~m·eps64·s_1², so every singular value above ``numerical_rank``'s float32
    threshold comes out within ~1e-6 of its own size, and so do its vectors. Triplets below that threshold
    (null directions) have unreliable vectors; ``numerical_rank`` never keeps them.

    Args:
        d: (out, in).

    Returns:
        u (out, m), s (m,) descending, vh (m, in) in float32, m = min(out, in), with u·diag(s)·vh ≈ d.
    """
    x = d.double()
    wide = x.shape[0] <= x.shape[1]
    g = x @ x.T if wide else x.T @ x  # (m, m)
    ev, vec = torch.linalg.eigh(g)  # ascending
    s, vec = ev.flip(0).clamp(min=0).sqrt(), vec.flip(1)
    inv = torch.where(s > 0, 1 / s.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(s))
    if wide:
        u, vh = vec, (vec.T @ x) * inv[:, None]  # (out, m), (m, in)
    else:
        u, vh = (x @ vec) * inv, vec.T  # (out, m), (m, in)
    return u.float(), s.float(), vh.float()


def exact_factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact low-rank factors of a small full matrix via its SVD, dropping null directions.

    Args:
        w: (m, n), small (a LoKr factor or a Tucker-expanded factor).

    Returns:
        (b, a) with b (m, k), a (k, n), k the numerical rank, b @ a == w up to rounding.
    """
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = numerical_rank(s, tuple(w.shape))
    return (u[:, :k] * s[:k]).float(), vh[:k].float()


def tucker_factors(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank matrix factors of a Tucker (CP-style) conv weight, as PEFT and LyCORIS build it.

    The weight is W[p, q, k, l] = Σ_ij t[i, j, k, l]·wa[i, p]·wb[j, q]; flattened to (p, q·k·l) it
    equals waᵀ @ M with M[i, (q, k, l)] = Σ_j t[i, j, k, l]·wb[j, q].

    Args:
        t: (r, r, kh, kw) core.
        wa: (r, out).
        wb: (r, in).

    Returns:
        (b, a): b (out, r), a (r, in·kh·kw).
    """
    m = torch.einsum("ijkl,jq->iqkl", t.float(), wb.float())  # (r, in, kh, kw)
    return wa.float().T.contiguous(), m.reshape(m.shape[0], -1)


def kron(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kronecker product of two matrices (torch.kron fails on some strided inputs).

    Args:
        x: (m, n).
        y: (p, q).

    Returns:
        (m·p, n·q) with out[i·p + k, j·q + l] = x[i, j]·y[k, l].
    """
    m, n = x.shape
    p, q = y.shape
    return (x[:, None, :, None] * y[None, :, None, :]).reshape(m * p, n * q)
