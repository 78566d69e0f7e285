"""merging.tune on a tiny Llama: the split, the search improving its objective, and tuned = weighted cat."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from merging.core.adapter import Adapter, layer_of, weighted
from merging.core.deltas import LowRank, Target
from merging.errors import MergingError
from merging.eval import objective, per_layer, search, tune
from merging.merge import pipeline as merge_lib
from merging.runtime.stacked import stacked
from tests.support.tiny_models import build

TARGETS = ("q_proj", "v_proj", "down_proj")


class CharTokenizer:
    """One token per printable character (ids 3..97); 0 pads, 2 ends: enough for answer_batch."""

    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) - 29 for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 29) for i in ids)


def _adapter(model, name: str, seed: int, scale: float) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for mod, m in model.named_modules():
        if mod.endswith(TARGETS):
            out, inp = m.weight.shape
            b, a = torch.randn(out, 2, generator=g), torch.randn(2, inp, generator=g)
            deltas[mod] = LowRank(b * scale, a * 0.6, 1.0, Target("linear", (out, inp)))
    return Adapter(name, deltas)


@torch.no_grad()
def _skill(model, tok: CharTokenizer, adapter: Adapter, seed: int, n: int = 8) -> list[tuple[str, str]]:
    """Prompts, and the two tokens the adapter alone answers greedily: a skill only it has."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    with stacked(model, [(adapter, 1.0)]):
        for _ in range(n):
            prompt = tok.decode(torch.randint(36, 62, (6,), generator=g).tolist())
            ids = tok(prompt)["input_ids"]
            for _ in range(2):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1, 36:62]
                ids.append(int(logits.argmax()) + 36)
            pairs.append((prompt, tok.decode(ids[6:])))
    return pairs


@pytest.fixture(scope="module")
def setting(one_thread):
    model, tok = build("llama"), CharTokenizer()
    ads = [_adapter(model, "a", 1, 0.5), _adapter(model, "b", 2, 1.0)]  # b drowns a's skill when stacked
    evals = {ad.name: _skill(model, tok, ad, 10 + i) for i, ad in enumerate(ads)}
    return model, tok, ads, evals


def test_split_is_seeded_disjoint_and_complete():
    evals = {"x": [(str(i), "y") for i in range(10)], "z": [(str(i), "w") for i in range(5)]}
    split = objective.split_evals
    one, again, other = split(evals), split(evals), split(evals, seed=1)
    assert one == again and one != other
    for name, pairs in evals.items():
        assert sorted(one.tune[name] + one.report[name]) == sorted(pairs)
        assert not set(one.tune[name]) & set(one.report[name])
    assert (len(one.tune["x"]), len(one.tune["z"])) == (5, 2)
    with pytest.raises(MergingError):
        objective.split_evals({"x": [("a", "b")]})


def test_layer_of():
    assert layer_of("model.layers.3.self_attn.q_proj") == "model.layers.3"
    assert layer_of("lm_head") == "lm_head"


def test_score():
    assert objective.score([0.5, -1.0, 1.0], "worst") == -1.0
    assert objective.score([0.5, -1.0, 1.0], "mean") == pytest.approx(1 / 6)
    assert objective.score([0.5, -1.0, 1.0], 0.5) == pytest.approx(0.5 * -1.0 + 0.5 / 6)
    with pytest.raises(MergingError):
        objective.check_objective("best")


def test_tune_improves_its_objective_and_is_the_weighted_cat(setting):
    model, tok, ads, evals = setting
    inputs = weighted(ads)
    settings = search.Settings(steps=8, lr=0.3, batch=0)
    found = tune.tune(model, tok, inputs, evals, settings=settings)
    assert found.end.objective > found.start.objective + 0.1  # the search really lifted the worst skill
    a, b = found.weights.inputs
    assert b < 0.7 < a  # by turning the drowning adapter down
    again = tune.tune(model, tok, inputs, evals, settings=settings)
    assert again.weights == found.weights and again.trace == found.trace  # seeded, deterministic
    # what was tuned (tensor weights through the stacked runtime) is what the weighted cat merge writes
    result = merge_lib.merge(weighted(ads, found.weights.inputs), "cat")
    measured = tune.held_out(model, tok, inputs, weighted(result.adapters), evals)
    assert min(measured["after"].values()) == pytest.approx(found.end.objective, abs=2e-3)
    assert min(measured["before"].values()) == pytest.approx(found.start.objective, abs=1e-4)


def test_per_layer_weights_stack_as_the_merge_writes_them(setting):
    model, _, ads, _ = setting
    groups = per_layer.layers(ads)
    assert groups == ["model.layers.0", "model.layers.1"]
    w = torch.tensor([[0.3, 1.7], [-0.5, 0.9]])  # (layer, input)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), stacked(model, per_layer.pairs_for(ads, w, groups)):
        tuned = model(input_ids=ids).logits
    layer_w = {g: tuple(float(v) for v in row) for g, row in zip(groups, w, strict=True)}
    result = merge_lib.merge(weighted(ads), "cat", layer_weights=layer_w)
    with torch.no_grad(), stacked(model, weighted(result.adapters)):
        merged = model(input_ids=ids).logits
    with torch.no_grad(), stacked(model, weighted(ads, [0.3, 1.7])):
        first_layer_only = model(input_ids=ids).logits
    assert torch.allclose(tuned, merged, atol=1e-5)
    assert not torch.allclose(tuned, first_layer_only, atol=1e-3)  # the second layer's weights did count
    assert result.layer_weights == layer_w
    with pytest.raises(MergingError, match="layer model.layers.0 has 1 weights"):
        merge_lib.merge(weighted(ads), "cat", layer_weights={"model.layers.0": [1.0]})


def test_gradient_free_search_for_svd(setting):
    model, tok, ads, evals = setting
    settings = search.Settings(evaluations=8, lr=0.3)
    found = tune.tune(model, tok, weighted(ads), evals, settings=settings, strategy="svd",
                      options=merge_lib.Options(rank=2))  # fmt: skip
    assert found.trace == sorted(found.trace)  # the best so far never gets worse
    assert len(found.steps) == 8 and found.knobs == {}
    assert found.chosen.objective >= found.start.objective
    together = tune.tune(model, tok, weighted(ads), evals, strategy="svd", options=merge_lib.Options(rank=2),
                         settings=dataclasses.replace(settings, group=3))  # the first simplex in one forward
    assert together.weights == found.weights and together.evaluations == found.evaluations


@pytest.mark.parametrize("strategy, knob", [("ties", "density"), ("iso_cts", "common_fraction")])
def test_tuning_a_non_differentiable_strategy_improves_its_objective(setting, strategy, knob):
    """scipy's Nelder-Mead over the weights and the strategy's own knob lifts the worst skill; what it
    measured is what the merge at the returned weights and knob gives."""
    model, tok, ads, evals = setting
    options = merge_lib.Options(rank=4)
    settings = search.Settings(evaluations=30, patience=12, lr=0.4)
    found = tune.tune(model, tok, weighted(ads), evals, settings=settings, strategy=strategy, options=options)
    assert found.end.objective > found.start.objective + 0.05
    assert found.trace == sorted(found.trace)  # the best so far never gets worse
    assert len(found.steps) <= 30 and set(found.knobs) == {knob}
    again = tune.tune(model, tok, weighted(ads), evals, settings=settings, strategy=strategy, options=options)
    assert (again.weights, again.knobs) == (found.weights, found.knobs)  # deterministic
    chosen = dataclasses.replace(options, **found.knobs)
    result = merge_lib.merge(weighted(ads, found.weights.inputs), strategy, chosen)
    measured = tune.held_out(model, tok, weighted(ads), weighted(result.adapters), evals)
    assert min(measured["after"].values()) == pytest.approx(found.end.objective, abs=1e-4)


def test_patience_stops_the_search_early(setting):
    model, tok, ads, evals = setting
    settings = search.Settings(evaluations=200, patience=3)
    found = tune.tune(model, tok, weighted(ads), evals, settings=settings, strategy="svd",
                      options=merge_lib.Options(rank=2))  # fmt: skip
    assert len(found.steps) < 200
    trace = found.trace
    last_gain = max(i for i in range(len(trace)) if i == 0 or trace[i] > trace[i - 1])
    assert len(trace) - 1 - last_gain == 3  # stopped 3 evaluations after the last improvement
    with pytest.raises(MergingError, match="iso_c does not read density"):
        tune.tune(model, tok, weighted(ads), evals, settings=search.Settings(knobs=("density",)),
                  strategy="iso_c")  # fmt: skip


def test_per_layer_weights_stay_within_the_per_input_interval_on_the_reporting_half(one_thread):
    """Per-layer weights tuned on 8 examples per skill overfit without regularisation (the reporting half's
    retention falls below the per-input solution's 95% interval); pulled toward that solution, they keep
    every skill within its interval or better."""
    model, tok = build("llama"), CharTokenizer()
    ads = [_adapter(model, "a", 1, 0.5), _adapter(model, "b", 2, 1.0)]
    evals = {ad.name: _skill(model, tok, ad, 30 + i, n=16) for i, ad in enumerate(ads)}
    split = objective.split_evals(evals, seed=0)
    runs = {}
    for name, granularity, strength in (("per input", "adapter", 0.0), ("free", "layer", 0.0),
                                        ("kept", "layer", search.Settings().regularisation)):  # fmt: skip
        settings = search.Settings(granularity, steps=8, lr=0.3, batch=0, regularisation=strength)
        found = tune.tune(model, tok, weighted(ads), split.tune, settings=settings)
        pairs, layer_w = per_layer.merge_inputs(ads, found.weights)
        result = merge_lib.merge(pairs, "cat", layer_weights=layer_w)
        runs[name] = found, tune.held_out(model, tok, weighted(ads), weighted(result.adapters), split.report)
    lows = {s: low for s, (low, _) in runs["per input"][1]["intervals"]["after"].items()}
    assert runs["free"][0].end.objective > runs["per input"][0].end.objective  # fits the tuning half better
    assert any(runs["free"][1]["after"][s] < lows[s] for s in lows)  # ... and loses a skill on the other
    assert all(runs["kept"][1]["after"][s] >= lows[s] for s in lows)


def test_candidates_measured_together_are_each_the_models_own_loss_with_its_dense_delta(setting):
    """Three weightings of the inputs measured in one grouped forward (each on its own copy of the texts,
    packed or padded) give, per skill, transformers' own loss on a model whose weights hold W + ΣwΔW."""
    from merging.eval.batched import candidate_losses
    from merging.eval.data import answer_batch, plain_head, skill_batch

    model, tok, ads, evals = setting
    weightings = [(1.0, 1.0), (0.4, 1.3), (1.2, -0.5)]
    names = tuple(evals)
    for packed in (False, plain_head(model)):
        batch = skill_batch(tok, evals, "cpu", names, packed=packed)
        got, trusted = candidate_losses(model, batch, [weighted(ads, list(w)) for w in weightings])
        assert trusted and got.shape == (3, 2)
        for row, ws in zip(got, weightings, strict=True):
            saved = {}
            with torch.no_grad():
                for mod in ads[0].deltas:
                    p = model.get_submodule(mod).weight
                    saved[mod] = p.detach().clone()
                    p += sum(w * ad.deltas[mod].b @ ad.deltas[mod].a for ad, w in zip(ads, ws, strict=True))
                own = [float(model(**answer_batch(tok, evals[n])).loss) for n in names]
                for mod, w0 in saved.items():
                    model.get_submodule(mod).weight.copy_(w0)
            assert row.tolist() == pytest.approx(own, rel=1e-5)


def test_packing_check_on_the_first_texts_holds_and_a_soft_capped_head_fails_it(setting):
    """tune's packing check (each skill's first texts, packed in one row, against transformers' own loss)
    holds on the Llama, whose packed losses then equal its own on every text; a soft-capped head fails it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from merging.eval.data import answer_batch, packed_losses, skill_batch

    model, tok, _, evals = setting
    assert tune._packing_holds(model, tok, evals)
    full = skill_batch(tok, evals, "cpu", tuple(evals), packed=True)
    with torch.no_grad():
        got = {n: float(v) for n, v in packed_losses(model, full.packed).items()}
        own = {n: float(model(**answer_batch(tok, evals[n])).loss) for n in evals}
    assert got == pytest.approx(own, rel=1e-5)
    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, final_logit_softcapping=0.5,
    )  # fmt: skip
    assert not tune._packing_holds(Gemma2ForCausalLM(cfg).eval(), tok, evals)


BF16_OBJECTIVE = 2e-3  # the objective (a retention), bfloat16 search against float32 (here ≤ 2.2e-4 apart)


def test_search_in_bfloat16_is_near_float32_and_still_improves_the_float32_objective(setting):
    """The search's losses in bfloat16 (autocast, float32 accumulation; the references too) give an
    objective within ``BF16_OBJECTIVE`` of float32's at the same weights, and the weights it chooses lift
    the worst skill as float32 measures it (``held_out``) on the merge they make."""
    model, tok, ads, evals = setting
    options = merge_lib.Options(rank=4)
    settings = search.Settings(evaluations=16, patience=0, lr=0.4, dtype="bfloat16")
    low = tune.tune(model, tok, weighted(ads), evals, settings=settings, strategy="iso_c", options=options)
    in_f32 = dataclasses.replace(settings, dtype="float32")
    exact = tune.tune(model, tok, weighted(ads), evals, settings=in_f32, strategy="iso_c", options=options)
    assert (low.dtype, exact.dtype) == ("bfloat16", "float32")
    assert low.start.objective == pytest.approx(exact.start.objective, abs=BF16_OBJECTIVE)
    assert low.start.objective != pytest.approx(exact.start.objective, abs=1e-6)  # really in bfloat16
    assert low.end.objective > low.start.objective + 0.05
    result = merge_lib.merge(weighted(ads, low.weights.inputs), "iso_c", options)
    measured = tune.held_out(model, tok, weighted(ads), weighted(result.adapters), evals)
    after = min(measured["after"].values())  # float32, the model's own loss
    assert after == pytest.approx(low.end.objective, abs=BF16_OBJECTIVE)
    assert after > exact.start.objective + 0.05
    adam = search.Settings(steps=8, batch=0, dtype="bfloat16")  # Adam steps through the autocast runtime too
    cat = tune.tune(model, tok, weighted(ads), evals, settings=adam)
    assert cat.dtype == "bfloat16" and cat.end.objective > cat.start.objective + 0.1


def test_auto_searches_in_bfloat16_only_where_the_cpu_flags_say_so(setting, tmp_path, monkeypatch):
    from merging.eval import data

    model, tok, ads, evals = setting
    for flags, want in (("fpu sse2 avx2 avx512f", "float32"), ("fpu avx512f avx512_bf16", "bfloat16")):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(data, "CPUINFO", tmp_path / "cpuinfo")
        auto = search.Settings(evaluations=1, dtype="auto")
        found = tune.tune(model, tok, weighted(ads), evals, settings=auto, strategy="svd",
                          options=merge_lib.Options(rank=2))  # fmt: skip
        assert found.dtype == want
    with pytest.raises(MergingError, match="tune_dtype"):
        search.Settings(dtype="float16")
