"""aLoRA (alora_invocation_tokens): merged gated as PEFT gates it, mixing refused, never folded or dropped."""

from __future__ import annotations

import peft
import pytest
import torch

from merging.core.adapter import weighted
from merging.core.alora import invocation_mask
from merging.errors import IncompatibleAdapters, UnsupportedError
from merging.formats import kohya
from merging.formats import peft as peft_format
from merging.merge.pipeline import merge
from merging.merge.result import write_result
from merging.runtime.fold import merge_into
from merging.runtime.stacked import stacked
from tests.support.helpers import rel_err

pytestmark = pytest.mark.model
INV = [5, 6]
IDS = torch.tensor([[1, 2, 3, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2], [5, 6, 1, 5, 6, 2, 3, 4]])


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _adapter(folder, seed, inv=INV, targets=("q_proj", "v_proj")):
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=list(targets), init_lora_weights=False, alora_invocation_tokens=inv,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = peft.get_peft_model(_base(), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(1 + torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def test_invocation_mask_follows_peft():
    from peft.tuners.lora.variants import calculate_alora_offsets

    cfg = {"a": peft.LoraConfig(alora_invocation_tokens=INV, task_type="CAUSAL_LM")}
    offsets = calculate_alora_offsets(cfg, "a", IDS)
    t = IDS.shape[1]
    expected = torch.stack([torch.arange(t) >= t - (o or 0) for o in offsets])
    assert torch.equal(invocation_mask(IDS, INV), expected)
    assert invocation_mask(IDS, INV)[2].tolist() == [False] * 3 + [True] * 5  # the last occurrence counts


def test_cat_of_alora_inputs_gates_as_peft(tmp_path):
    a, b = _adapter(tmp_path / "a", 1), _adapter(tmp_path / "b", 2, targets=("q_proj", "o_proj"))
    model = peft.PeftModel.from_pretrained(_base(), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        ref, bare = model(IDS).logits, _base()(IDS).logits
    pairs = weighted([peft_format.read(a), peft_format.read(b)])
    out = write_result(merge(pairs, "cat"), tmp_path / "m", {})
    merged = peft.PeftModel.from_pretrained(_base(), out)
    assert merged.peft_config["default"].alora_invocation_tokens == INV
    with torch.no_grad():
        got = merged(IDS).logits
    assert rel_err(got - bare, ref - bare) < 1e-5
    assert torch.equal(got[0, :3], bare[0, :3]) and torch.equal(got[1], bare[1])  # gated rows untouched
    with stacked(_base(), pairs) as ours, torch.no_grad():
        assert rel_err(ours(IDS).logits - bare, ref - bare) < 1e-5


def test_mixed_gating_is_refused(tmp_path):
    a = peft_format.read(_adapter(tmp_path / "a", 1))
    c = peft_format.read(_adapter(tmp_path / "c", 3, inv=[7, 8]))
    with pytest.raises(IncompatibleAdapters, match="invocation tokens"):
        merge(weighted([a, c]), "cat")
    model = peft.get_peft_model(_base(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(IncompatibleAdapters, match="every token"):
        merge(weighted([a, peft_format.read(tmp_path / "plain")]), "cat")


def test_alora_is_never_folded_or_written_without_its_gate(tmp_path):
    a = peft_format.read(_adapter(tmp_path / "a", 1))
    with pytest.raises(UnsupportedError, match="cannot fold"):
        merge_into(_base(), weighted([a]))
    with pytest.raises(UnsupportedError, match="no kohya form"):
        kohya.write(a, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
