"""svd --budget: the global rank allocation against brute force, and against uniform rank at equal size."""

from __future__ import annotations

import itertools

import pytest
import torch

from merging.core.adapter import Adapter, weighted
from merging.core.deltas import LowRank, Target
from merging.errors import MergingError, UnsupportedError
from merging.merge import budget
from merging.merge import pipeline as merge_lib
from merging.merge.result import MergeResult
from merging.strategies import Options


def _spectrum(values: list[float], cost: int) -> budget.Spectrum:
    return budget.Spectrum(torch.tensor(values, dtype=torch.float64), cost)


def test_greedy_equals_brute_force_on_modules_of_one_shape():
    g = torch.Generator().manual_seed(0)
    spectra = {f"m{i}": _spectrum(sorted(torch.rand(4, generator=g).tolist(), reverse=True), 10)
               for i in range(3)}  # fmt: skip
    for total in (10, 30, 55, 120):
        ranks = budget.allocate(spectra, total)
        best = max(
            (dict(zip(spectra, ks, strict=True)) for ks in itertools.product(range(5), repeat=3)
             if budget.cost(spectra, dict(zip(spectra, ks, strict=True))) <= total),
            key=lambda r: budget.kept(spectra, r),
        )  # fmt: skip
        assert budget.kept(spectra, ranks) == pytest.approx(budget.kept(spectra, best))
        assert budget.cost(spectra, ranks) <= total


def test_greedy_prefers_energy_per_parameter_and_breaks_ties_by_name():
    spectra = {"wide": _spectrum([3.0, 1.0], 100), "narrow": _spectrum([2.0, 2.0], 20)}
    # σ²/cost: wide 0.09 then 0.01; narrow 0.2, 0.2: narrow first, then wide's first
    assert budget.allocate(spectra, 40) == {"wide": 0, "narrow": 2}
    assert budget.allocate(spectra, 140) == {"wide": 1, "narrow": 2}
    tie = {"b": _spectrum([1.0], 10), "a": _spectrum([1.0], 10)}
    assert budget.allocate(tie, 10) == {"b": 0, "a": 1}
    with pytest.raises(MergingError):
        budget.allocate(spectra, 0)


def _adapters() -> list[Adapter]:
    """Two LoRAs whose modules differ in shape and in how much of their energy sits in few directions."""
    g = torch.Generator().manual_seed(3)
    shapes = {"m.layers.0.q": (48, 32), "m.layers.0.up": (96, 32), "m.layers.1.q": (48, 32)}
    out = []
    for i in range(2):
        deltas = {}
        for j, (mod, (o, n)) in enumerate(shapes.items()):
            decay = torch.tensor([(1.0, 0.5, 0.05)[j] ** k for k in range(6)])  # flat, then steeper spectra
            b, a = torch.randn(o, 6, generator=g) * decay, torch.randn(6, n, generator=g)
            deltas[mod] = LowRank(b, a, 1.0 + i, Target("linear", (o, n)))
        out.append(Adapter(f"ad{i}", deltas))
    return out


def _total_error(result: MergeResult, pairs) -> float:
    """‖ΔW_merged − Σ w ΔW‖ / ‖Σ w ΔW‖ over all modules at once, from dense matrices (small here)."""
    num = den = 0.0
    for mod in {m for ad, _ in pairs for m in ad.deltas}:
        ref = sum(w * ad.deltas[mod].dense() for ad, w in pairs)
        got = result.adapters[0].deltas[mod].dense() if mod in result.adapters[0].deltas else 0 * ref
        num += float((got - ref).norm() ** 2)
        den += float(ref.norm() ** 2)
    return (num / den) ** 0.5


def test_budgeted_svd_beats_uniform_rank_at_equal_parameters():
    pairs = weighted(_adapters())
    for rank in (2, 4):
        uniform = merge_lib.merge(pairs, "svd", Options(rank=rank))
        params = sum(r.numel for r in uniform.modules)
        budgeted = merge_lib.merge(pairs, "svd", Options(budget=params))
        assert sum(r.numel for r in budgeted.modules) <= params
        assert len({r.rank for r in budgeted.modules}) > 1  # not uniform
        assert _total_error(budgeted, pairs) < _total_error(uniform, pairs)
        for r in budgeted.modules:  # the per-module report says what it kept
            alone = _total_error(_only(budgeted, r.module), _only_pairs(pairs, r.module))
            assert r.error == pytest.approx(alone, abs=1e-4)


def _only(result: MergeResult, mod: str) -> MergeResult:
    ad = result.adapters[0]
    return MergeResult([ad.with_deltas({m: d for m, d in ad.deltas.items() if m == mod})], [],
                                 result.strategy, None, None, result.options)  # fmt: skip


def _only_pairs(pairs, mod: str):
    return [(ad.with_deltas({mod: ad.deltas[mod]}), w) for ad, w in pairs]


def test_budget_is_for_svd_alone_and_not_with_rank():
    pairs = weighted(_adapters())
    with pytest.raises(UnsupportedError, match="budget"):
        merge_lib.merge(pairs, "ties", Options(budget=1000))
    with pytest.raises(MergingError, match="budget"):
        Options(budget=1000, rank=2)


def test_a_budget_smaller_than_any_rank_leaves_modules_out():
    pairs = weighted(_adapters())
    result = merge_lib.merge(pairs, "svd", Options(budget=100))  # one rank of m.layers.0.q costs 80
    kept = [r for r in result.modules if r.rank > 0]
    assert [r.module for r in kept] == ["m.layers.0.q"] or [r.module for r in kept] == ["m.layers.1.q"]
    assert set(result.adapters[0].deltas) == {kept[0].module}
    assert not result.exact and all(r.error == 1.0 for r in result.modules if r.rank == 0)


def test_a_module_the_budget_leaves_out_is_not_written_and_peft_loads_the_truncated_sum(fx, tmp_path):
    """A streamed svd --budget merge written as PEFT: a module at rank 0 is left out of the folder (PEFT
    has no LoRA layer of rank 0) and every kept module is the rank-k truncation of Σ ΔW, as PEFT gives it."""
    import peft

    from merging.merge.result import write_result
    from tests.support.helpers import read_adapters

    pairs = weighted(read_adapters(fx, "llama", ["lora", "lora_b"]))
    result = merge_lib.merge(pairs, "svd", Options(budget=600), stream=True)
    out = write_result(result, tmp_path / "out", {})
    ranks = {r.module: r.rank for r in result.modules}
    assert 0 in ranks.values() and any(ranks.values())
    first = fx.adapter("llama", "lora")
    inputs = peft.PeftModel.from_pretrained(fx.load_base("llama"), first, adapter_name="a")
    inputs.load_adapter(str(fx.adapter("llama", "lora_b")), adapter_name="b")
    merged = peft.PeftModel.from_pretrained(fx.load_base("llama"), out)
    layers = dict(merged.base_model.model.named_modules())
    for mod, k in ranks.items():
        layer = dict(inputs.base_model.model.named_modules())[mod]
        total = sum(layer.get_delta_weight(n).double() for n in ("a", "b") if n in layer.lora_A)
        u, s, vh = torch.linalg.svd(total)
        if k == 0:
            assert not hasattr(layers[mod], "lora_A"), mod  # left out, not a rank-0 layer
            continue
        ref = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        got = layers[mod].get_delta_weight("default").double()
        assert torch.allclose(got, ref, atol=1e-5 * float(s[0])), mod
