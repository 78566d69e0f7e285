"""Folded evaluation (runtime.evaluated) equals the stacked runtime, restores the model bit for bit, and is
used by verify and the held-out losses for approximate candidates only."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from merging.core.adapter import content_digest, weighted
from merging.errors import UnsupportedError
from merging.eval import data, judge, skills
from merging.eval.verify import Candidate, module_errors, verify
from merging.merge.pipeline import merge
from merging.runtime.fold import FOLDED, evaluated, merge_into
from merging.runtime.stacked import stacked
from merging.strategies import Options
from tests.support.fixtures import example_input, run
from tests.support.helpers import assert_close, read_adapters, state_hash, svd_held_out_case


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("llama", ["lora", "ia3", "loha", "ia3_b"]),
        ("llama", ["lokr", "lora_dora"]),
        ("conv", ["lora_bias", "ia3"]),
    ],
)
def test_evaluated_folds_like_stacked_and_restores_every_bit(fx, kind, names):
    pairs = weighted(read_adapters(fx, kind, names))
    model, x = fx.load_base(kind), example_input(kind)
    before, y_base = _params(model), run(model, kind, x)
    with stacked(model, pairs):
        expected = run(model, kind, x)
    with evaluated(model, pairs) as how:
        assert how == FOLDED
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # really folded
        got = run(model, kind, x)
    assert_close(got, expected, rtol=1e-5)
    assert float((expected - y_base).norm()) > 1e-3 * float(y_base.norm())  # the adapters did something
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_evaluated_stacks_below_float32(fx):
    pairs = weighted(read_adapters(fx, "llama", ["lora", "ia3"]))
    model = fx.load_base("llama").to(torch.bfloat16)
    before, x = state_hash(model), example_input("llama")
    with stacked(model, pairs):
        expected = run(model, "llama", x)
    with evaluated(model, pairs) as how:
        assert how == "merging.runtime"
        assert torch.equal(run(model, "llama", x), expected)  # the stacked runtime itself, not a fold
    assert state_hash(model) == before


def test_merge_into_refused_half_way_leaves_the_model_as_it_was(fx):
    # lora_b's o_proj folds first, then q_proj meets a DoRA at weight 2 (no stacked meaning): refused
    read = read_adapters(fx, "llama", ["lora_b", "lora_dora"])
    pairs = [(a, w) for a, w in zip(read, [1.0, 2.0], strict=True)]
    model = fx.load_base("llama")
    before = state_hash(model)
    with pytest.raises(UnsupportedError, match="DoRA"):
        merge_into(model, pairs)
    assert state_hash(model) == before


def test_verify_folds_approximate_candidates_only(fx):
    pairs = weighted(read_adapters(fx, "llama", ["lora", "loha", "lokr"]))
    cands = []
    for name, rank in (("cat", None), ("svd", 2)):
        res = merge(pairs, name, Options(rank=rank))
        cands.append(Candidate(f"{name}{rank or ''}", res.adapters, name, res.exact))
    model = fx.load_base("llama")
    before = state_hash(model)
    plain = verify(model, None, pairs, cands)
    folded = verify(model, None, pairs, cands, fold_approximate=True)
    assert state_hash(model) == before
    assert [r.loaded_by for r in plain.rows] == [judge.PEFT, judge.PEFT]
    assert [r.loaded_by for r in folded.rows] == [judge.PEFT, FOLDED]  # the exact row is judged as before
    assert folded.rows[0] == plain.rows[0]
    a, b = plain.rows[1], folded.rows[1]
    assert a.effect_rel_error > 1e-3  # approximate: a real error to measure
    assert b.effect_rel_error == pytest.approx(a.effect_rel_error, rel=1e-5)
    assert b.kl == pytest.approx(a.kl, rel=1e-4, abs=1e-9)
    assert (b.top1_agreement, b.greedy_agreement, b.module_errors) == (
        a.top1_agreement, a.greedy_agreement, a.module_errors,
    )  # fmt: skip


def test_held_out_losses_folded_equal_stacked(fx):
    pairs, res, batches = svd_held_out_case(fx)
    model = fx.load_base("llama")
    before = state_hash(model)
    as_folded = Candidate("svd", res.adapters, "svd", exact=False)
    as_stacked = Candidate("svd stacked", res.adapters, "svd", exact=True)
    measured = skills.held_out(model, batches, pairs, [as_folded, as_stacked])
    refs, merged = measured.skills, measured.merged
    assert state_hash(model) == before
    checked = 0
    for s in batches:
        got, want = merged["svd"][s], merged["svd stacked"][s]
        assert got.loss == pytest.approx(want.loss, rel=1e-5)
        assert abs(want.loss - refs.base[s]) > 1e-3  # the merge moved the loss: the check can fail
        if want.retention is not None:  # the interval from the packed per-example sums, as from the padded
            assert got.interval.low == pytest.approx(want.interval.low, rel=1e-3, abs=1e-4)
            assert got.interval.low <= got.retention <= got.interval.high
            checked += 1
    assert checked  # some skill has a retention: the interval comparison ran


def test_module_errors_reuse_the_reference_side_unchanged(fx):
    pairs = weighted(read_adapters(fx, "llama", ["lora", "ia3", "loha"]))
    model = fx.load_base("llama")
    cache: dict = {}
    for rank in (1, 2):
        merged = merge(pairs, "svd", Options(rank=rank)).adapters
        assert module_errors(model, pairs, merged, cache) == module_errors(model, pairs, merged)
    kinds = {k[0] for k in cache if isinstance(k, tuple)}
    assert kinds == {"factors", "dense"}  # both branches were kept and reused


def test_identical_candidates_are_measured_once_and_digests_see_one_changed_value(fx):
    pairs = weighted(read_adapters(fx, "llama", ["lora", "loha"]))
    res = merge(pairs, "cat")
    twin = merge(pairs, "cat").adapters  # merged again: other tensors, same values
    assert content_digest(res.adapters) == content_digest(twin)
    (ad,) = twin
    mod, d = next(iter(ad.deltas.items()))
    changed = d.b.clone()
    changed[0, 0] += 1e-6
    other = dataclasses.replace(ad, deltas={**ad.deltas, mod: dataclasses.replace(d, b=changed)})
    assert content_digest([other]) != content_digest(twin)
    cands = [Candidate("cat", res.adapters, "cat", True), Candidate("again", twin, "geometric", False)]
    first, again = verify(fx.load_base("llama"), None, pairs, cands, fold_approximate=True).rows
    assert first.loaded_by == judge.PEFT and first.passed is True
    assert (again.name, again.strategy, again.exact, again.passed) == ("again", "geometric", False, None)
    assert dataclasses.replace(again, name="cat", strategy="cat", exact=True, passed=True) == first


def _labelled(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # one right-padded row
    labels = ids.clone()
    labels[:, :4] = -100  # prompts
    labels[mask == 0] = -100
    return {"s": {"input_ids": ids, "attention_mask": mask, "labels": labels}}


def test_per_example_sums_are_the_models_own_loss_at_a_real_vocabulary_size():
    """At SmolLM2's 49,152 tokens each example's answer cross-entropy, summed, is the model's own mean loss
    (torch's cross_entropy over a (n, V, t) layout was 1e-4 off there; the bootstrap intervals use these)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits spread as a trained model's are
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (8, 16), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    means, sums = data.losses_by_example(model, {"s": batch})
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()  # (n, t - 1, V) float64 reference
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # (n, t - 1)
    ref = (nll * (labels[:, 1:] != -100)).sum(1)
    assert sums["s"].double() == pytest.approx(ref, rel=1e-6)
    assert float(sums["s"].sum()) / int((labels[:, 1:] != -100).sum()) == pytest.approx(means["s"], rel=1e-6)


def test_answer_losses_equal_the_models_own_and_a_soft_capped_head_keeps_its_own(fx):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    batches = _labelled(4) | {"t": _labelled(5)["s"]}
    model = fx.load_base("llama")
    own = data.losses(model, batches)
    packed = data.pack(batches, row=20)  # 6 texts of 9 or 6 tokens: several share a row
    assert packed.input_ids.shape[0] < 6
    got = data.answer_losses(model, packed)
    assert got == pytest.approx(own, rel=1e-6)
    means, sums = data.losses_by_example(model, batches)
    packed_means, packed_sums = data.answer_losses_by_example(model, packed)
    assert (means, packed_means) == (own, got)  # the same figures, with each example's sum besides
    for skill, batch in batches.items():  # each example's answer-token sum, the same from both layouts
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        assert float(sums[skill].sum()) / tokens == pytest.approx(own[skill], rel=1e-5)
        assert packed_sums[skill] == pytest.approx(sums[skill], rel=1e-5)
    assert abs(own["s"] - own["t"]) > 1e-3  # two skills told apart
    assert data.packed_agrees(model, packed, own)
    # positions that do not restart per text: one sequence per row, so each text sees the ones before it
    along = torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids)
    run_on = data.Packed(packed.input_ids, along, packed.target, packed.group, packed.names)
    assert not data.packed_agrees(model, run_on, own)
    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, final_logit_softcapping=0.5,
    )  # fmt: skip
    capped = Gemma2ForCausalLM(cfg).eval()
    assert not data.packed_agrees(capped, packed, data.losses(capped, batches))


def test_packing_skips_the_tokens_after_the_last_scored_one():
    ids = torch.tensor([[5, 6, 7, 8, 2, 0], [9, 7, 2, 0, 0, 0]])  # prompt, answer, EOS (2), padding (0)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 2, -100], [-100, 7, 2, -100, -100, -100]])
    packed = data.pack({"s": {"input_ids": ids, "attention_mask": mask, "labels": labels}}, row=16)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 7]]  # each text but its EOS, which predicts nothing
    assert packed.target.tolist() == [[-100, 7, 8, 2, 7, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1]]
    assert packed.example.tolist() == [[-1, 0, 0, 0, 1, 1]]
