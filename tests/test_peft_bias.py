"""Trained base biases (PEFT bias="lora_only" / "all"): read, merged and written as PEFT reloads them."""

from __future__ import annotations

import peft
import pytest
import torch

from merging.core.adapter import weighted
from merging.core.replacements import BaseTensors
from merging.errors import IncompatibleAdapters
from merging.formats import peft as peft_format
from merging.merge.pipeline import merge
from merging.merge.result import write_result
from merging.runtime.stacked import stacked
from tests.support.helpers import peft_stacked, rel_err

pytestmark = pytest.mark.model


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _adapter(folder, seed, bias, targets, shift=0.3):
    """A LoRA written by PEFT whose trainable biases were trained (moved by a seeded amount)."""
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, bias=bias, init_lora_weights=False)
    base = _base()
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(shift * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def _peft_stacked(folders, ids):
    with torch.no_grad():
        return peft_stacked(_base(), folders)(ids).logits


IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_cat_of_trained_biases_reloads_as_peft_stacks(tmp_path, bias):
    a = _adapter(tmp_path / "a", 1, bias, ["q_proj", "up_proj"])
    b = _adapter(tmp_path / "b", 2, "none", ["q_proj", "v_proj"])
    ref = _peft_stacked([a, b], IDS)
    with torch.no_grad():
        bare = _base()(IDS).logits
    ads = [peft_format.read(a), peft_format.read(b)]
    assert isinstance(ads[0].aux["model.layers.0.self_attn.q_proj"], BaseTensors)
    out = write_result(merge(weighted(ads), "cat"), tmp_path / "m", {})
    loaded = peft.PeftModel.from_pretrained(_base(), out)
    with torch.no_grad():
        got = loaded(IDS).logits
    assert rel_err(got - bare, ref - bare) < 1e-5
    assert rel_err(ref, bare) > 1e-2  # the biases matter: dropping them would fail above
    with stacked(_base(), weighted(ads)) as model, torch.no_grad():
        assert rel_err(model(IDS).logits - bare, ref - bare) < 1e-5  # our runtime sees them too


def test_two_different_trained_biases_are_refused(tmp_path):
    a = _adapter(tmp_path / "a", 1, "lora_only", ["q_proj"])
    b = _adapter(tmp_path / "b", 2, "lora_only", ["q_proj"])
    with pytest.raises(IncompatibleAdapters, match="keeps only the last") as e:
        merge(weighted([peft_format.read(a), peft_format.read(b)]), "cat")
    assert "\n" not in str(e.value)


def test_bake_carries_trained_biases_as_peft_does(tmp_path):
    from transformers import AutoModelForCausalLM

    from merging.export.bake import bake

    a = _adapter(tmp_path / "a", 1, "all", ["q_proj", "up_proj"])
    b = _adapter(tmp_path / "b", 2, "none", ["v_proj"])
    ref = _peft_stacked([a, b], IDS)
    _base().save_pretrained(tmp_path / "base")
    bake(tmp_path / "base", weighted([peft_format.read(a), peft_format.read(b)]), tmp_path / "baked")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "baked")(IDS).logits
    assert rel_err(got, ref) < 1e-5
