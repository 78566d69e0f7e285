"""The stacked-active runtime equals PEFT's own multi-adapter outputs and leaves the model untouched."""

from __future__ import annotations

import pytest

from merging.core.adapter import weighted
from merging.runtime.fold import merge_into
from merging.runtime.stacked import stacked
from tests.support.fixtures import example_input, run
from tests.support.helpers import assert_close, read_adapters, state_hash


def _peft_mixed(fx, kind, names):
    from peft import PeftMixedModel

    model = PeftMixedModel.from_pretrained(
        fx.load_base(kind), str(fx.adapter(kind, names[0])), adapter_name=names[0]
    )
    for n in names[1:]:
        model.load_adapter(str(fx.adapter(kind, n)), adapter_name=n)
    model.set_adapter(names)
    return model.eval()


def _peft_ia3(fx, kind, names):
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        fx.load_base(kind), str(fx.adapter(kind, names[0])), adapter_name=names[0]
    )
    for n in names[1:]:
        model.load_adapter(str(fx.adapter(kind, n)), adapter_name=n)
    model.base_model.set_adapter(names)
    return model.eval()



CASES = [
    ("llama", ["lora", "loha", "lokr"]),
    ("llama", ["lora", "lora_b", "lokr_both", "lora_rslora", "lora_patterns"]),
    ("llama", ["lora_embed", "lokr_full"]),
    ("gpt2", ["lora"]),
    ("conv", ["lora", "loha", "lokr"]),
    ("conv", ["loha_tucker", "lokr_tucker", "lora_bias"]),
]


@pytest.mark.parametrize(("kind", "names"), CASES, ids=[f"{k}-{'+'.join(n)}" for k, n in CASES])
def test_stacked_equals_peft_mixed_model(fx, kind, names):
    x = example_input(kind)
    expected = run(_peft_mixed(fx, kind, names), kind, x)
    model = fx.load_base(kind)
    before = state_hash(model)
    with stacked(model, weighted(read_adapters(fx, kind, names))):
        ours = run(model, kind, x)
    assert (ours - expected).abs().max() <= 1e-5
    assert state_hash(model) == before
    assert (ours - run(model, kind, x)).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("kind", "names"), [("llama", ["ia3", "ia3_b"]), ("gpt2", ["ia3"]), ("conv", ["ia3"])]
)
def test_stacked_ia3_equals_peft_multi_adapter(fx, kind, names):
    x = example_input(kind)
    expected = run(_peft_ia3(fx, kind, names), kind, x)
    model = fx.load_base(kind)
    with stacked(model, weighted(read_adapters(fx, kind, names))):
        ours = run(model, kind, x)
    assert (ours - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["lora_mts", "lora_tokens", "lora_tied"])
def test_stacked_auxiliary_and_tied_equal_peft(fx, name):
    from peft import PeftModel

    kind = "llama_tied" if name == "lora_tied" else "llama"
    x = example_input(kind)
    expected = run(PeftModel.from_pretrained(fx.load_base(kind), str(fx.adapter(kind, name))).eval(), kind, x)
    model = fx.load_base(kind)
    with stacked(model, weighted(read_adapters(fx, kind, [name]))):
        ours = run(model, kind, x)
    assert (ours - expected).abs().max() <= 1e-5


def test_two_adapters_replacing_one_module_is_an_error(fx):
    from merging.errors import IncompatibleAdapters

    model = fx.load_base("llama")
    ad = read_adapters(fx, "llama", ["lora_mts"])[0]
    with pytest.raises(IncompatibleAdapters, match="lm_head"), stacked(model, [(ad, 1.0), (ad, 1.0)]):
        pass


@pytest.mark.parametrize(
    ("kind", "names"), [("llama", ["lora", "ia3", "loha", "ia3_b"]), ("conv", ["lora_bias", "ia3"])]
)
def test_merge_into_equals_stacked_and_undoes_exactly(fx, kind, names):
    ads = read_adapters(fx, kind, names)
    x = example_input(kind)
    model = fx.load_base(kind)
    before = state_hash(model)
    with stacked(model, weighted(ads)):
        expected = run(model, kind, x)
    undo = merge_into(model, weighted(ads))
    assert_close(run(model, kind, x), expected, rtol=1e-5)
    undo()
    assert state_hash(model) == before


def test_weighted_stack(fx):
    """Weights scale additive deltas and raise IA³ vectors to a power."""
    ads = read_adapters(fx, "llama", ["lora", "ia3"])
    x = example_input("llama")
    model = fx.load_base("llama")
    with stacked(model, [(ads[0], 0.0), (ads[1], 0.0)]):
        assert_close(run(model, "llama", x), run(fx.load_base("llama"), "llama", x), rtol=1e-6)
    with stacked(model, [(ads[0], 2.0)]):
        two = run(model, "llama", x)
    with stacked(model, [(ads[0], 1.0), (ads[0], 1.0)]):
        assert_close(run(model, "llama", x), two, rtol=1e-5)
