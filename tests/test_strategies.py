"""Strategies: exactness against dense math, parity with PEFT, reference implementations, the registry."""

from __future__ import annotations

import pytest
import torch

from merging import strategies
from merging.core.adapter import Adapter, weighted
from merging.core.deltas import LowRank, Scale, Target
from merging.errors import IncompatibleAdapters, MergingError, UnsupportedError
from merging.formats import peft as fp
from merging.merge.pipeline import merge, weight_space_error
from merging.strategies import Options, sparsify
from tests.support.helpers import assert_close, forbid_dense, read_adapters

COMBOS = {
    "lora+loha+lokr": ["lora", "loha", "lokr"],
    "lora+lora_b": ["lora", "lora_b"],
    "mixed ranks": ["lora", "lora_r8", "lora_patterns", "lokr_both", "lokr_full"],
}


def _exact_sum(adapters, weights, mod):
    return sum(
        w * ad.deltas[mod].dense() for ad, w in zip(adapters, weights, strict=True) if mod in ad.deltas
    )


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("strategy", ["cat", "svd_full"])
@pytest.mark.parametrize("weights", [None, [1.0, -0.5, 2.0, 0.25, -1.0]])
def test_exact_strategies_reproduce_the_sum(fx, combo, strategy, weights):
    ads = read_adapters(fx, "llama", COMBOS[combo])
    ws = weights[: len(ads)] if weights else [1.0] * len(ads)
    opts = Options(rank=10_000) if strategy == "svd_full" else Options()
    result = merge(weighted(ads, ws), strategy.removesuffix("_full"), opts)
    (out,) = result.adapters
    for mod, d in out.deltas.items():
        assert_close(d.dense(), _exact_sum(ads, ws, mod), what=f"{combo} {mod}")
    assert all(r.error is None or r.error < 1e-5 for r in result.modules)
    if strategy == "cat":
        for mod, d in out.deltas.items():
            assert d.rank == sum(ad.deltas[mod].low_rank().rank for ad in ads if mod in ad.deltas)


def test_merge_without_errors_is_the_same_merge(fx):
    """``errors=False`` (tune's search) leaves the merge bit for bit as it is and only skips the per-module
    weight-space error, which is otherwise ‖ΔW_merged − ΣΔW_i‖ / ‖ΣΔW_i‖ by dense math."""
    ads = read_adapters(fx, "llama", ["lora", "loha", "lokr"])
    measured = merge(weighted(ads), "iso_c")
    skipped = merge(weighted(ads), "iso_c", errors=False)
    (got,), (plain,) = measured.adapters, skipped.adapters
    assert got.deltas.keys() == plain.deltas.keys()
    for mod, d in got.deltas.items():
        assert torch.equal(d.b, plain.deltas[mod].b) and torch.equal(d.a, plain.deltas[mod].a)
    assert all(r.error is None for r in skipped.modules)
    for r in measured.modules:
        exact = _exact_sum(ads, [1.0] * len(ads), r.module)
        want = float((got.deltas[r.module].dense() - exact).norm() / exact.norm())
        assert r.error == pytest.approx(want, rel=1e-4)


def test_multiplicative_is_the_product(fx):
    ads = read_adapters(fx, "llama", ["ia3", "ia3_b"])
    (out,) = merge(weighted(ads), "multiplicative").adapters
    for mod, d in out.deltas.items():
        expected = torch.ones_like(d.l)
        for ad in ads:
            if mod in ad.deltas:
                expected = expected * ad.deltas[mod].l
        assert_close(d.l, expected, what=mod)
        assert d.side == next(ad.deltas[mod].side for ad in ads if mod in ad.deltas)
    (half,) = merge(weighted(ads, [0.5, 2.0]), "multiplicative").adapters
    mod = "model.layers.0.mlp.down_proj"
    assert_close(half.deltas[mod].l, ads[0].deltas[mod].l ** 0.5 * ads[1].deltas[mod].l ** 2)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_svd_rank_k_equals_dense_truncated_svd(fx, k):
    ads = read_adapters(fx, "llama", ["lora", "loha", "lokr"])
    (out,) = merge(weighted(ads, [1.0, 0.7, -1.3]), "svd", Options(rank=k)).adapters
    for mod, d in out.deltas.items():
        total = _exact_sum(ads, [1.0, 0.7, -1.3], mod).double()
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert d.rank == min(k, total.shape[0], total.shape[1])
        assert_close(d.dense().double(), best, rtol=1e-4, what=mod)


def test_svd_energy_picks_the_smallest_rank(fx):
    ads = read_adapters(fx, "llama", ["lora", "lora_b", "lora_r8"])
    result = merge(weighted(ads), "svd", options=Options(energy=0.9))
    for mod, d in result.adapters[0].deltas.items():
        s = torch.linalg.svdvals(_exact_sum(ads, [1, 1, 1], mod).double())
        frac = torch.cumsum(s**2, 0) / (s**2).sum()
        assert d.rank == int((frac < 0.9).sum()) + 1, mod


def test_svd_clamp_follows_peft(fx):
    ads = read_adapters(fx, "llama", ["lora", "lora_b"])
    plain = merge(weighted(ads), "svd", options=Options(rank=4)).adapters[0]
    clamped = merge(weighted(ads), "svd", options=Options(rank=4, clamp=0.5)).adapters[0]
    mod = "model.layers.0.self_attn.q_proj"
    b, a = plain.deltas[mod].b, plain.deltas[mod].a
    hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.5)
    assert torch.allclose(clamped.deltas[mod].b, b.clamp(-hi, hi))
    assert torch.allclose(clamped.deltas[mod].a, a.clamp(-hi, hi))


def test_svd_never_builds_a_dense_matrix(monkeypatch):
    """Four rank-16 inputs on a 2048×2048 module: the factored path never materialises ΔW."""
    g = torch.Generator().manual_seed(0)
    t = Target("linear", (2048, 2048))
    deltas = [
        LowRank(torch.randn(2048, 16, generator=g), torch.randn(16, 2048, generator=g), 0.5, t)
        for _ in range(4)
    ]

    forbid_dense(monkeypatch, max_svd=64)
    out = strategies.get("svd").fn(deltas, [1.0, 1.0, -1.0, 0.5], Options(rank=16), "m")
    assert out.rank == 16 and out.b.shape == (2048, 16)
    full = strategies.get("svd").fn(deltas, [1.0, 1.0, -1.0, 0.5], Options(rank=64), "m")
    assert weight_space_error(full, deltas, [1.0, 1.0, -1.0, 0.5]) < 1e-5
    assert 0.1 < weight_space_error(out, deltas, [1.0, 1.0, -1.0, 0.5]) < 1.0


# ---------------------------------------------------------------- TIES / DARE against PEFT's merge_utils


def _random_deltas(n=3, out=24, inf=20, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = Target("linear", (out, inf))
    return [
        LowRank(torch.randn(out, r, generator=g), torch.randn(r, inf, generator=g), 0.5, t) for _ in range(n)
    ]


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_matches_peft_reference(method):
    from peft.utils import merge_utils

    ds, ws = _random_deltas(), [1.0, 0.6, -0.8]
    ours = strategies.get("ties").fn(ds, ws, Options(density=0.4, majority_sign=method, rank=20), "m")
    ref = merge_utils.ties([d.dense() for d in ds], torch.tensor(ws), 0.4, method)
    assert_close(ours.dense(), ref, rtol=1e-4)


def test_magnitude_prune_matches_peft_reference():
    from peft.utils import merge_utils

    ds, ws = _random_deltas(seed=1), [1.0, 0.5, 2.0]
    ours = strategies.get("magnitude_prune").fn(ds, ws, Options(density=0.3, rank=20), "m")
    ref = merge_utils.magnitude_prune([d.dense() for d in ds], torch.tensor(ws), 0.3)
    assert_close(ours.dense(), ref, rtol=1e-4)


@pytest.mark.parametrize("density", [0.5, 0.3, 1e-3])
def test_prune_magnitude_keeps_peft_s_entries(density):
    """The selection-based trim keeps exactly the entries PEFT's topk keeps (no ties: one answer)."""
    from peft.utils import merge_utils

    t = torch.randn(4, 96, 80, generator=torch.Generator().manual_seed(5))
    ours = sparsify.prune_magnitude(t, density)
    for i in range(t.shape[0]):
        assert torch.equal(ours[i], merge_utils.magnitude_based_pruning(t[i], density))


def test_prune_magnitude_with_tied_magnitudes_keeps_k_of_the_largest():
    """Ties at the k-th magnitude (values on a coarse grid, signs mixed): k entries kept, every one strictly
    above the k-th magnitude among them, and the kept magnitudes are the k largest."""
    g = torch.Generator().manual_seed(6)
    t = torch.randint(-4, 5, (3, 40, 30), generator=g).float()
    k = int(0.5 * 40 * 30)
    kept = sparsify.prune_magnitude(t, 0.5).reshape(3, -1)
    flat = t.reshape(3, -1)
    for i in range(3):
        on = kept[i] != 0
        kth = flat[i].abs().sort(descending=True).values[k - 1]
        assert int(on.sum()) == k and int((flat[i].abs() > kth).sum()) < k  # a tie at the k-th really exists
        assert bool(((flat[i].abs() > kth) <= on).all())  # everything above the k-th is kept
        assert torch.equal(kept[i][on], flat[i][on])
        assert torch.equal(kept[i][on].abs().sort().values, flat[i].abs().sort().values[-k:])


def test_dare_is_reproducible_and_unbiased():
    ds, ws = _random_deltas(seed=2), [1.0, 1.0, 1.0]
    a = strategies.get("dare_linear").fn(ds, ws, Options(density=0.5, seed=7, rank=20), "m")
    b = strategies.get("dare_linear").fn(ds, ws, Options(density=0.5, seed=7, rank=20), "m")
    c = strategies.get("dare_linear").fn(ds, ws, Options(density=0.5, seed=8, rank=20), "m")
    assert torch.equal(a.b, b.b) and torch.equal(a.a, b.a)
    assert not torch.allclose(a.dense(), c.dense())
    full = strategies.get("dare_linear").fn(ds, ws, Options(density=1.0, rank=20), "m")
    assert_close(full.dense(), sum(d.dense() for d in ds), rtol=1e-5)
    t = sparsify.task_stack(ds)
    kept = sparsify.prune_random(t, 0.25, torch.Generator().manual_seed(0))
    frac = float((kept != 0).float().mean())
    assert 0.2 < frac < 0.3
    assert_close(kept[kept != 0], 4 * t[kept != 0])


def test_dare_ties_with_density_one_is_ties_without_trim():
    from peft.utils import merge_utils

    ds, ws = _random_deltas(seed=3), [1.0, -0.5, 0.8]
    ours = strategies.get("dare_ties").fn(ds, ws, Options(density=1.0, rank=20), "m")
    ref = merge_utils.ties([d.dense() for d in ds], torch.tensor(ws), 1.0, "total")
    assert_close(ours.dense(), ref, rtol=1e-4)


# ---------------------------------------------------------------- IA³ strategies and mixed inputs


def test_geometric_and_linear_ia3():
    t = torch.tensor([1.0, 4.0, 0.25])
    u = torch.tensor([4.0, 1.0, 4.0])
    ds = [Scale(t, "out"), Scale(u, "out")]
    geo = strategies.get("geometric").fn(ds, [1.0, 1.0], Options(), "m")
    assert_close(geo.l, torch.sqrt(t * u))
    lin = strategies.get("linear").fn(ds, [1.0, 0.5], Options(), "m")
    assert_close(lin.l, t + 0.5 * u)
    neg = [Scale(torch.tensor([-1.0, 2.0]), "in"), Scale(torch.tensor([4.0, 2.0]), "in")]
    with pytest.raises(UnsupportedError, match="`signed`"):
        strategies.get("geometric").fn(neg, [1.0, 1.0], Options(), "m")
    signed = strategies.get("geometric").fn(neg, [1.0, 3.0], Options(signed=True), "m")
    assert_close(signed.l, torch.tensor([4.0**0.75, 2.0]))


def _effective_weight(stack, w0):
    """Dense ground truth for one linear module: the stacked forward written as a weight matrix."""
    w = w0.clone()
    for d, wt in stack:
        if isinstance(d, Scale):
            l = d.l.double() ** wt
            w = l[:, None] * w if d.side == "out" else w * l[None, :]
        else:
            w = w + wt * d.dense().double()
    return w


@pytest.mark.parametrize(
    "order",
    [["lora", "ia3"], ["ia3", "lora"], ["lora", "ia3", "loha", "ia3_b"], ["lokr", "ia3_b", "lora_b"]],
)
@pytest.mark.parametrize("strategy", ["cat", "svd_full"])
def test_ia3_with_additive_composes_exactly(fx, order, strategy):
    ads = read_adapters(fx, "llama", order)
    ws = [1.0, 0.5, -1.0, 1.0][: len(ads)]
    opts = Options(rank=10_000) if strategy == "svd_full" else Options()
    result = merge(weighted(ads, ws), strategy.removesuffix("_full"), opts)
    ia3, lora = result.adapters
    assert ia3.kinds == {"ia3"} and lora.kinds == {"lora"}
    base = fx.load_base("llama")
    for mod in set(ia3.deltas) | set(lora.deltas):
        w0 = base.get_submodule(mod).weight.detach().double()
        stack = [(ad.deltas[mod], w) for ad, w in zip(ads, ws, strict=True) if mod in ad.deltas]
        merged = [(ia3.deltas[mod], 1.0)] if mod in ia3.deltas else []
        merged += [(lora.deltas[mod], 1.0)] if mod in lora.deltas else []
        assert_close(_effective_weight(merged, w0), _effective_weight(stack, w0), rtol=1e-5, what=mod)


def test_ia3_on_both_sides_of_one_module_is_refused():
    t = Target("linear", (4, 4))
    a = Adapter("a", {"m": Scale(torch.ones(4), "in")})
    b = Adapter("b", {"m": Scale(torch.ones(4), "out")})
    c = Adapter("c", {"m": LowRank(torch.ones(4, 1), torch.ones(1, 4), 1.0, t)})
    with pytest.raises(UnsupportedError, match="both the input and the output"):
        merge(weighted([a, c, b]), "cat")


# ---------------------------------------------------------------- registry, options, auxiliary modules


def test_registry_lists_names_on_a_miss():
    with pytest.raises(UnsupportedError) as e:
        strategies.get("slerp")
    for name in ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "geometric"):
        assert name in str(e.value)
    with pytest.raises(MergingError, match="already registered"):
        strategies.register(strategies.get("cat"))


def test_options_are_validated():
    with pytest.raises(MergingError, match="`density`"):
        Options(density=1.5)
    with pytest.raises(MergingError, match="not both"):
        Options(rank=4, energy=0.9)


def test_linear_refuses_unequal_ranks_loha_lokr_and_dora_naming_why(fx):
    """PEFT's linear is add_weighted_adapter's: equal LoRA ranks; LoHa/LoKr models have no such method, and on
    DoRA it keeps a freshly initialised magnitude; each refusal is one line naming the kind, cat and svd."""
    import peft

    with pytest.raises(UnsupportedError, match="equal ranks"):
        merge(weighted(read_adapters(fx, "llama", ["lora", "lora_r8"])), "linear")
    for kind, name in (("loha", "LoHa"), ("lokr", "LoKr")):
        with pytest.raises(UnsupportedError, match=rf"is {name}, .*use cat \(exact\) or svd"):
            merge(weighted(read_adapters(fx, "llama", ["lora", kind])), "linear")
        assert not hasattr(peft.PeftModel.from_pretrained(fx.load_base("llama"), fx.adapter("llama", kind)),
                           "add_weighted_adapter")  # fmt: skip
    base = fx.load_base("llama")
    weights = {n: m.weight.detach() for n, m in base.named_modules() if hasattr(m, "weight")}
    with pytest.raises(UnsupportedError, match=r"is DoRA, whose magnitude .*\(exact\) or svd$") as e:
        pairs = weighted(read_adapters(fx, "llama", ["lora_dora", "lora"]))
        merge(pairs, "linear", base_weights=weights.__getitem__)
    assert "\n" not in str(e.value)


def test_dora_needs_base_weights(fx):
    ads = read_adapters(fx, "llama", ["lora_dora", "lora"])
    with pytest.raises(UnsupportedError, match="DoRA"):
        merge(weighted(ads), "cat")
    base = fx.load_base("llama")
    weights = {n: m.weight.detach() for n, m in base.named_modules() if hasattr(m, "weight")}
    (out,) = merge(weighted(ads), "cat", base_weights=weights.__getitem__).adapters
    mod = "model.layers.0.self_attn.q_proj"
    expected = ads[0].deltas[mod].dora_dense(weights[mod]) + ads[1].deltas[mod].dense()  # DoRA innermost
    assert_close(out.deltas[mod].dora_dense(weights[mod]), expected, rtol=1e-5)


def test_auxiliary_modules(fx):
    mts, tokens, lora = read_adapters(fx, "llama", ["lora_mts", "lora_tokens", "lora"])
    (out,) = merge(weighted([mts, tokens, lora]), "cat").adapters
    assert set(out.aux) == {"lm_head", "model.embed_tokens"}
    with pytest.raises(IncompatibleAdapters, match="pass `aux`=sum"):
        merge(weighted([mts, mts]), "cat")
    base = fx.load_base("llama")
    w = base.lm_head.weight.detach()
    (summed,) = merge(weighted([mts, mts]), "cat", aux="sum", base_weights=lambda m: w).adapters
    new = summed.aux["lm_head"].tensors["weight"]
    assert_close(new, w + 2 * (mts.aux["lm_head"].tensors["weight"] - w), rtol=1e-6)


# ---------------------------------------------------------------- parity with PEFT's add_weighted_adapter


@pytest.mark.parametrize("combination", ["cat", "linear", "svd"])
def test_parity_with_peft_add_weighted_adapter(fx, tmp_path, combination):
    from peft import PeftModel

    from tests.support.fixtures import example_input, run

    names, ws = ["lora", "lora_b"], [1.0, -0.6]
    model = PeftModel.from_pretrained(
        fx.load_base("llama"), str(fx.adapter("llama", "lora")), adapter_name="lora"
    )
    model.load_adapter(str(fx.adapter("llama", "lora_b")), adapter_name="lora_b")
    model.add_weighted_adapter(names, ws, "merged", combination_type=combination, svd_full_matrices=False)
    model.set_adapter("merged")
    x = example_input("llama")
    theirs = run(model.eval(), "llama", x)
    (ours,) = merge(weighted(read_adapters(fx, "llama", names), ws), combination).adapters
    fp.write(ours, tmp_path / "ours")
    mine = run(PeftModel.from_pretrained(fx.load_base("llama"), str(tmp_path / "ours")).eval(), "llama", x)
    base = run(fx.load_base("llama"), "llama", x)
    assert (theirs - base).norm() > 1e-3 * base.norm()
    assert_close(mine, theirs, rtol=1e-4, what=combination)


# ---------------------------------------------------------------- exactness from the strategies' metadata


def test_exactness_rule_lives_on_the_strategy():
    t = Target("linear", (4, 6))
    g = torch.Generator().manual_seed(0)

    def lr(r):
        return LowRank(torch.randn(4, r, generator=g), torch.randn(r, 6, generator=g), 1.0, t)

    inputs = [lr(2), lr(3), Scale(torch.ones(4), "out")]  # the bound is min(2 + 3, 4, 6) = 4
    svd = strategies.get("svd")
    assert svd.exact_for(lr(4), inputs) and not svd.exact_for(lr(3), inputs)
    assert svd.exact_for(lr(5), inputs[:2]) and not svd.exact_for(lr(1), inputs[:2])
    assert strategies.get("cat").exact_for(lr(1), inputs)
    assert strategies.get("multiplicative").exact_for(inputs[2], inputs[2:])
    for name in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "geometric"):
        assert strategies.get(name).exact == "never" and not strategies.get(name).exact_for(lr(4), inputs)


@pytest.mark.parametrize(
    ("strategy", "rank", "exact"),
    [("cat", None, True), ("svd", 10_000, True), ("svd", 1, False), ("ties", 10_000, False),
     ("linear", None, False), ("multiplicative", None, True)],
)  # fmt: skip
def test_merge_result_carries_exactness(fx, strategy, rank, exact):
    names = ["ia3", "ia3_b"] if strategy == "multiplicative" else ["lora", "lora_b"]
    result = merge(weighted(read_adapters(fx, "llama", names)), strategy, options=Options(rank=rank))
    assert result.exact is exact
    assert all((r.error is None) == (strategy == "cat") for r in result.modules if "lora" in r.kind)


def test_svd_with_ia3_is_exact_at_full_rank(fx):
    ads = read_adapters(fx, "llama", ["lora", "ia3", "loha"])
    assert merge(weighted(ads), "svd", options=Options(rank=10_000)).exact
    assert not merge(weighted(ads), "svd", options=Options(rank=1)).exact


SPECTRAL = [n for n in strategies.names() if strategies.get(n).spectrum is not None]


def test_spectral_strategies_are_the_ranked_ones_that_truncate():
    assert set(SPECTRAL) == {"svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
    assert all(strategies.get(n).ranked for n in SPECTRAL)


@pytest.mark.parametrize("strategy", SPECTRAL)
def test_merges_sharing_spectra_equal_merges_alone(fx, strategy):
    """compare's rank variants share each module's SVD (merge.Spectra): bit for bit what each makes alone."""
    from merging.merge.spectra import Spectra

    pairs = weighted(read_adapters(fx, "llama", COMBOS["lora+loha+lokr"]), [1.0, -0.5, 2.0])
    shared = Spectra(keep=6)
    for opts in (Options(rank=6), Options(rank=2), Options(rank=5, clamp=0.9), Options(energy=0.5),
                 Options(rank=40)):  # fmt: skip  (rank 40 needs more than the 6 triplets kept)
        alone, together = merge(pairs, strategy, opts), merge(pairs, strategy, opts, spectra=shared)
        assert alone.modules == together.modules
        for mod, d in alone.adapters[0].deltas.items():
            got = together.adapters[0].deltas[mod]
            assert torch.equal(d.b, got.b) and torch.equal(d.a, got.a), (strategy, opts, mod)
    assert shared.by_module and all(s.u.shape[1] <= 6 for s in shared.by_module.values())
    assert shared.seconds > 0
    with pytest.raises(MergingError, match="same inputs and options"):
        merge(pairs, strategy, Options(rank=2, density=0.3, seed=1), spectra=shared)
    with pytest.raises(MergingError, match="same inputs and options"):
        merge(weighted([a for a, _ in pairs]), strategy, Options(rank=2), spectra=shared)
