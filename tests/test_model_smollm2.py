"""Oracle checks on the real example base model (SmolLM2-135M-Instruct) with PEFT-made adapters."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli

from merging.core.adapter import base_shapes, weighted
from merging.formats import sources
from merging.runtime.stacked import stacked
from tests.support.fixtures import _randomise

pytestmark = pytest.mark.model

SPECS = {
    "lora": lambda P: P.LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    ),
    "lora2": lambda P: P.LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False
    ),
    "loha": lambda P: P.LoHaConfig(r=2, alpha=2, target_modules=["k_proj", "up_proj"], init_weights=False),
    "lokr": lambda P: P.LoKrConfig(r=2, alpha=2, target_modules=["v_proj", "down_proj"], init_weights=False),
    "ia3": lambda P: P.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    ),  # fmt: skip
    "ia3b": lambda P: P.IA3Config(
        target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    ),  # fmt: skip
}


@pytest.fixture(scope="session")
def smol(example_base, tmp_path_factory):
    """PEFT adapters of every type on SmolLM2, with small random weights."""
    import peft
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("smol")
    for i, (name, spec) in enumerate(SPECS.items()):
        model = AutoModelForCausalLM.from_pretrained(example_base, dtype=torch.float32)
        pm = peft.get_peft_model(model, spec(peft))
        _randomise(pm, 100 + i)
        with torch.no_grad():  # keep the effect moderate on a real model
            for n, p in pm.named_parameters():
                if p.requires_grad and "ia3_l" not in n:
                    p.mul_(0.3)
                elif p.requires_grad:
                    p.copy_(1 + 0.3 * (p - 1))
        pm.save_pretrained(root / name)
    return root


def _load(example_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(example_base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(example_base)
    return model, tok


def _logits(model, tok):
    batch = tok(["The capital of France is", "def add(a, b):"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_stacked_runtime_equals_peft_mixed_on_smollm2(example_base, smol):
    from peft import PeftMixedModel

    names = ["lora", "loha", "lokr"]
    model, tok = _load(example_base)
    mixed = PeftMixedModel.from_pretrained(model, str(smol / names[0]), adapter_name=names[0])
    for n in names[1:]:
        mixed.load_adapter(str(smol / n), adapter_name=n)
    mixed.set_adapter(names)
    expected = _logits(mixed.eval(), tok)
    base, _ = _load(example_base)
    ads = [sources.load(smol / n)[0].refine_targets(base_shapes(base)) for n in names]
    with stacked(base, weighted(ads)):
        ours = _logits(base, tok)
    assert (ours - expected).abs().max() <= 1e-4
    assert (ours - _logits(base, tok)).abs().max() > 1e-2


def test_stacked_ia3_equals_peft_on_smollm2(example_base, smol):
    from peft import PeftModel

    model, tok = _load(example_base)
    pm = PeftModel.from_pretrained(model, str(smol / "ia3"), adapter_name="ia3")
    pm.load_adapter(str(smol / "ia3b"), adapter_name="ia3b")
    pm.base_model.set_adapter(["ia3", "ia3b"])
    expected = _logits(pm.eval(), tok)
    base, _ = _load(example_base)
    ads = [sources.load(smol / n)[0] for n in ("ia3", "ia3b")]
    with stacked(base, weighted(ads)):
        ours = _logits(base, tok)
    assert (ours - expected).abs().max() <= 1e-4


def _verify(example_base, smol, names, *args):
    r = CliRunner().invoke(
        cli, ["verify", "--base", str(example_base), *(str(smol / n) for n in names), *args, "--json"]
    )
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.output)["rows"]


def test_verify_on_smollm2(example_base, smol):
    code, rows = _verify(
        example_base, smol, ["lora", "loha", "lokr", "ia3"], "-s", "cat", "--max-new-tokens", "6"
    )
    assert code == 0 and rows[0]["passed"] is True and rows[0]["effect_rel_error"] <= 1e-4
    assert rows[0]["greedy_agreement"] == 1.0 and rows[0]["top1_agreement"] == 1.0
    code, rows = _verify(example_base, smol, ["ia3", "ia3b"], "-s", "multiplicative")
    assert code == 0 and rows[0]["passed"] is True
    errors = []
    for rank in (1, 3, 6):
        _, rows = _verify(example_base, smol, ["lora", "loha", "lokr"], "-s", "svd", "--rank", str(rank))
        errors.append(rows[0]["effect_rel_error"])
        assert rows[0]["passed"] is None
    assert errors[0] > errors[1] > errors[2] > 1e-4
    _, rows = _verify(example_base, smol, ["lora", "lora2"], "-s", "linear", "--max-new-tokens", "0")
    assert rows[0]["effect_rel_error"] > 1e-3 and rows[0]["weight_error_max"] > 1e-3


def test_gguf_adapter_matches_llama_cpp_layout_and_peft(example_base, smol, tmp_path):
    """Our GGUF LoRA for SmolLM2 names and shapes its tensors as the base GGUF does, our q/k permutation is
    llama.cpp's, and the adapter read back on the GGUF base gives the PEFT original's logits."""
    import gguf
    import numpy as np
    from peft import PeftModel

    from merging.base.example_model import example_gguf
    from merging.base.layout import BaseLayout
    from merging.base.load import load_base
    from merging.formats import gguf as fg

    base_file = example_gguf()
    reader = gguf.GGUFReader(str(base_file))
    base_tensors = {t.name: t for t in reader.tensors}
    layout = BaseLayout.from_folder(example_base)
    info = fg.BaseInfo.from_layout(layout)
    hf, tok = _load(example_base)
    raw_q = gguf.quants.dequantize(
        base_tensors["blk.3.attn_q.weight"].data, base_tensors["blk.3.attn_q.weight"].tensor_type
    )
    ours_q = fg.permute_rows(hf.model.layers[3].self_attn.q_proj.weight.detach(), info.n_head)
    assert np.array_equal(np.asarray(raw_q, dtype=np.float32).reshape(ours_q.shape), ours_q.numpy())
    raw_k = gguf.quants.dequantize(
        base_tensors["blk.3.attn_k.weight"].data, base_tensors["blk.3.attn_k.weight"].tensor_type
    )
    ours_k = fg.permute_rows(hf.model.layers[3].self_attn.k_proj.weight.detach(), info.n_head_kv)
    assert np.array_equal(np.asarray(raw_k, dtype=np.float32).reshape(ours_k.shape), ours_k.numpy())

    ad = sources.load(smol / "lora")[0].refine_targets(base_shapes(hf))
    fg.write(ad, tmp_path / "lora.gguf", base=layout)
    lora = gguf.GGUFReader(str(tmp_path / "lora.gguf"))
    for t in lora.tensors:
        stem, part = t.name.rsplit(".", 1)
        base_ne = [int(s) for s in base_tensors[stem].shape]
        ne = [int(s) for s in t.shape]
        assert ne == ([base_ne[0], 4] if part == "lora_a" else [4, base_ne[1]]), t.name

    expected = _logits(PeftModel.from_pretrained(_load(example_base)[0], str(smol / "lora")).eval(), tok)
    model, _ = load_base(base_file, "cpu")
    back = sources.load(tmp_path / "lora.gguf", base=model)
    with stacked(model, weighted(back)):
        ours = _logits(model, tok)
    assert (ours - expected).abs().max() <= 1e-4
