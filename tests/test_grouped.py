"""Grouped evaluation (several candidates on one batch, each on its own slice) equals stacking each alone,
and verify's approximate rows measured that way equal the same candidates loaded by PEFT."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from merging.core.adapter import Adapter, weighted
from merging.core.deltas import LowRank, Target
from merging.errors import UnsupportedError
from merging.eval import judge
from merging.eval.verify import GROUPED, Candidate, _greedy, _grouped_outputs, _outputs, verify
from merging.merge.pipeline import merge
from merging.runtime.grouped import grouped
from merging.runtime.stacked import stacked
from merging.strategies import Options
from tests.support.fixtures import example_input, run
from tests.support.helpers import assert_close, read_adapters, state_hash


@pytest.mark.parametrize(
    ("kind", "groups"),
    [
        ("llama", [["lora", "ia3"], ["loha"], [], ["lokr", "lora_dora"], ["lora_mts", "lora_b"]]),
        ("conv", [["lora_bias", "ia3"], ["loha"]]),
    ],
)
def test_each_group_sees_its_own_stack(fx, kind, groups):
    model = fx.load_base(kind)
    stacks = [weighted(read_adapters(fx, kind, names)) for names in groups]
    x = example_input(kind)
    before, y_base = state_hash(model), run(model, kind, x)
    expected = []
    for pairs in stacks:
        with stacked(model, pairs):
            expected.append(run(model, kind, x))
    with grouped(model, stacks):
        got = run(model, kind, torch.cat([x] * len(stacks))).chunk(len(stacks))
    assert state_hash(model) == before
    assert not any(type(m).__name__ == "GroupedLayer" for m in model.modules())  # restored
    for names, y, want in zip(groups, got, expected, strict=True):
        assert_close(y, want, rtol=1e-5, what=str(names))
        if names:  # the check can fail: each stack moved the output its own way
            assert float((want - y_base).norm()) > 1e-3 * float(y_base.norm())
    assert float((expected[0] - expected[1]).norm()) > 1e-3 * float(expected[0].norm())


def test_a_batch_that_does_not_split_is_refused(fx):
    model = fx.load_base("llama")
    pairs = weighted(read_adapters(fx, "llama", ["lora"]))
    with grouped(model, [pairs, pairs]), pytest.raises(UnsupportedError, match="equal groups"):
        run(model, "llama", example_input("llama", batch=3))


def test_greedy_of_a_group_equals_greedy_alone(fx):
    model = fx.load_base("llama")
    pairs = weighted(read_adapters(fx, "llama", ["lora", "loha", "lokr"]))
    cands = [merge(pairs, "svd", Options(rank=r)).adapters for r in (1, 2, 4)]
    ids = torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    y_base = _outputs(model, batch)
    runs = _grouped_outputs(model, batch, cands, 6, 0, y_base)
    for ads, (_, g) in zip(cands, runs, strict=True):
        with stacked(model, weighted(ads)):
            assert torch.equal(g, _greedy(model, batch, 6, 0))


def test_verify_groups_approximate_candidates(fx):
    pairs = weighted(read_adapters(fx, "llama", ["lora", "loha", "lokr"]))
    cands = [Candidate("cat", merge(pairs, "cat").adapters, "cat", True)]
    cands += [Candidate(f"svd{r}", merge(pairs, "svd", Options(rank=r)).adapters, "svd") for r in (1, 3)]
    model = fx.load_base("llama")
    before = state_hash(model)
    plain = verify(model, None, pairs, cands, max_new_tokens=0)
    fast = verify(model, None, pairs, cands, max_new_tokens=0, fold_approximate=True)
    assert state_hash(model) == before
    assert [r.loaded_by for r in fast.rows] == [judge.PEFT, GROUPED, GROUPED]
    assert fast.rows[0] == plain.rows[0]
    for a, b in zip(plain.rows[1:], fast.rows[1:], strict=True):
        assert a.effect_rel_error > 1e-3  # approximate: a real error to measure
        assert b.effect_rel_error == pytest.approx(a.effect_rel_error, rel=1e-5)
        assert (b.top1_agreement, b.module_errors) == (a.top1_agreement, a.module_errors)
    assert fast.rows[1].effect_rel_error != pytest.approx(fast.rows[2].effect_rel_error, rel=1e-3)


class _Routed(torch.nn.Module):
    """A model whose adapted layer sees the batch's rows in another order (as routing experts do)."""

    def __init__(self, flip: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.proj = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 50)
        self.flip = flip

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        h = self.proj(h.flip(0)).flip(0) if self.flip else self.proj(h)
        return SimpleNamespace(logits=self.head(h))


@pytest.mark.parametrize("flip", [False, True])
def test_a_model_that_mixes_rows_is_not_grouped(flip):
    target = Target("linear", (8, 8))
    g = torch.Generator().manual_seed(1)
    def lora() -> LowRank:
        return LowRank(torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g), 1.0, target)

    cands = [[Adapter(f"c{i}", {"proj": lora()})] for i in range(2)]
    model = _Routed(flip).eval()
    ids = torch.randint(0, 50, (2, 5), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    runs = _grouped_outputs(model, batch, cands, 0, None, _outputs(model, batch))
    if flip:  # the slices got each other's deltas: caught by running the last one alone
        assert runs == [None, None]
        return
    for ads, (y, _) in zip(cands, runs, strict=True):
        with stacked(model, weighted(ads)):
            assert_close(y, _outputs(model, batch), rtol=1e-6)



@pytest.mark.parametrize(
    "groups",
    [
        [["lora"], ["loha", "lora_b"], [], ["lokr", "lora_r8"]],  # additive deltas
        [["lora", "ia3"], ["ia3", "loha"], ["lora_b"], []],  # IA³ vectors on either side too
        [["lora", "ia3"], ["loha"], ["lora_dora"], ["lora_b"]],  # a DoRA among them
    ],
)
def test_groups_of_every_kind_equal_each_group_alone_in_float64(fx, groups):
    model = fx.load_base("llama").double()
    stacks = [weighted(read_adapters(fx, "llama", names)) for names in groups]
    x = example_input("llama")
    expected = []
    for pairs in stacks:
        with stacked(model, pairs):
            expected.append(run(model, "llama", x))
    with grouped(model, stacks):
        got = run(model, "llama", torch.cat([x] * len(stacks))).chunk(len(stacks))
    for names, y, want in zip(groups, got, expected, strict=True):
        assert_close(y, want, rtol=1e-12, what=str(names))
    assert float((expected[0] - expected[1]).norm()) > 1e-3 * float(expected[0].norm())
