"""Property tests of the factored algebra against dense math."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merging.core import linalg
from merging.core.deltas import Hadamard, Kronecker, LowRank, Target
from tests.support.helpers import assert_close

dims = st.integers(1, 9)
seeds = st.integers(0, 2**31 - 1)


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(out=dims, inf=dims, r1=dims, r2=dims, seed=seeds)
def test_khatri_rao_identity(out, inf, r1, r2, seed):
    b1, a1 = _rand(seed, out, r1), _rand(seed + 1, r1, inf)
    b2, a2 = _rand(seed + 2, out, r2), _rand(seed + 3, r2, inf)
    lhs = (b1 @ a1) * (b2 @ a2)
    rhs = linalg.khatri_rao_rows(b1, b2) @ linalg.khatri_rao_cols(a1, a2)
    assert_close(rhs, lhs, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(m=dims, n=dims, p=dims, q=dims, r1=dims, r2=dims, seed=seeds)
def test_kronecker_mixed_product(m, n, p, q, r1, r2, seed):
    b1, a1 = _rand(seed, m, r1), _rand(seed + 1, r1, n)
    b2, a2 = _rand(seed + 2, p, r2), _rand(seed + 3, r2, q)
    lhs = torch.kron(b1 @ a1, b2 @ a2)
    assert_close(linalg.kron(b1, b2) @ linalg.kron(a1, a2), lhs, rtol=1e-12)
    assert_close(linalg.kron(b1 @ a1, b2 @ a2), lhs, rtol=0)


@settings(max_examples=60, deadline=None)
@given(out=dims, inf=dims, r=dims, seed=seeds)
def test_gram_norm_equals_dense_norm(out, inf, r, seed):
    b, a = _rand(seed, out, r), _rand(seed + 1, r, inf)
    assert abs(float(linalg.gram_norm_sq(b, a)) - float((b @ a).norm() ** 2)) <= 1e-10 * float(
        (b @ a).norm() ** 2
    )


@settings(max_examples=60, deadline=None)
@given(out=dims, inf=dims, r=dims, seed=seeds)
def test_factored_svd_matches_dense_svd(out, inf, r, seed):
    b, a = _rand(seed, out, r).float(), _rand(seed + 1, r, inf).float()
    u, s, vh = linalg.factored_svd(b, a)
    dense_s = torch.linalg.svdvals((b @ a).double())
    k = min(s.numel(), dense_s.numel())
    assert torch.allclose(s[:k].double(), dense_s[:k], rtol=1e-4, atol=1e-5 * float(dense_s.max()))
    assert_close(u @ torch.diag(s) @ vh, b @ a, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(m=dims, n=dims, p=dims, q=dims, r=st.integers(1, 4), seed=seeds)
def test_deltas_low_rank_dense_norm_agree(m, n, p, q, r, seed):
    """Hadamard and Kronecker: low_rank() and norm() agree with the dense product."""
    t = Target("linear", (m * p, n * q))
    k = Kronecker(
        0.5,
        t,
        w1=_rand(seed, m, n).float(),
        w2a=_rand(seed + 1, p, r).float(),
        w2b=_rand(seed + 2, r, q).float(),
    )
    dense = 0.5 * torch.kron(_rand(seed, m, n), _rand(seed + 1, p, r) @ _rand(seed + 2, r, q))
    assert_close(k.dense().double(), dense, rtol=1e-5)
    assert_close(k.low_rank().dense().double(), dense, rtol=1e-5)
    assert abs(k.norm() - float(dense.norm())) <= 1e-4 * float(dense.norm()) + 1e-12
    h = Hadamard(
        *(_rand(seed + i, *s).float() for i, s in enumerate([(m, r), (r, n), (m, r), (r, n)])),
        2.0,
        Target("linear", (m, n)),
    )
    assert_close(h.low_rank().dense(), h.dense(), rtol=1e-5)
    lr = LowRank(_rand(seed, m, r).float(), _rand(seed + 5, r, n).float(), 1.5, Target("linear", (m, n)))
    x = _rand(seed + 6, 3, n).float()
    assert_close(lr.apply(x), x @ lr.dense().T, rtol=1e-5)


@pytest.mark.parametrize("shape", [(48, 130), (130, 48), (64, 64)])
def test_gram_svd_gives_lapacks_spectrum_and_best_low_rank_approximations(shape):
    g = torch.Generator().manual_seed(sum(shape))
    out, inn = shape
    # a decaying spectrum with a gap after 8, and a null space (rank 40): what a TIES delta looks like
    left = torch.linalg.qr(torch.randn(out, 40, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(inn, 40, generator=g, dtype=torch.float64))[0]
    sv = torch.cat([torch.linspace(10, 5, 8), torch.logspace(0, -3, 32)]).double()
    d = ((left * sv) @ right.T).float()
    u, s, vh = linalg.gram_svd(d)
    m = min(shape)
    assert (u.shape, s.shape, vh.shape) == ((out, m), (m,), (m, inn))
    ref_u, ref_s, ref_vh = torch.linalg.svd(d.double(), full_matrices=False)  # float64 LAPACK
    k = linalg.numerical_rank(s, shape)
    assert k == linalg.numerical_rank(ref_s, shape) == 40
    assert (s.double() - ref_s).abs().max() <= 1e-6 * float(ref_s[0])
    assert bool((s[:-1] >= s[1:]).all())  # descending
    for r in (8, 40):  # at a spectral gap: the best rank-r approximation is unique (Eckart–Young)
        best = (ref_u[:, :r] * ref_s[:r]) @ ref_vh[:r]
        got = (u[:, :r].double() * s[:r].double()) @ vh[:r].double()
        assert float((got - best).norm() / best.norm()) < 1e-6
    eye = torch.eye(k, dtype=torch.float64)
    assert torch.allclose(u[:, :k].double().T @ u[:, :k].double(), eye, atol=1e-4)
    assert torch.allclose(vh[:k].double() @ vh[:k].double().T, eye, atol=1e-4)
