"""QLoRA bases: the base loaded through bitsandbytes (CPU), PEFT stacking the adapter on it as the judge.

bitsandbytes' 4-bit CPU path needs in_features ≥ its block of 64, so the tiny Llama here is 64 wide.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merging.core.adapter import weighted
from merging.formats import sources
from tests.support.helpers import peft_stacked, rel_err
from tests.support.tiny_models import randomise

WIDE = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
IDS = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def qlora(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny float Llama base folder, a LoRA made by PEFT on it)."""
    import peft
    import transformers

    root = tmp_path_factory.mktemp("qlora")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**WIDE)).eval().save_pretrained(root / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    targets = ["q_proj", "v_proj", "down_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    model = peft.get_peft_model(model, cfg)
    randomise(model, 5)
    model.save_pretrained(root / "a")
    return root / "base", root / "a"


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_requantising_gives_the_bytes_transformers_stores(qlora, quant):
    """Our quantiser settings are the loader's: the base a user loads with transformers' BitsAndBytesConfig
    stores the 4-bit bytes our quantiser gives for the float weight, and what our loader stores."""
    import bitsandbytes.functional as F
    import transformers

    from merging.base import quantized

    base, _ = qlora
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant)  # as a user's
    users = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=config)
    stored = users.model.layers[1].mlp.down_proj.weight
    w = transformers.AutoModelForCausalLM.from_pretrained(base).model.layers[1].mlp.down_proj.weight.detach()
    q, _ = F.quantize_4bit(w, blocksize=quantized.BLOCKSIZE, quant_type=quant)
    assert torch.equal(q, stored.data)
    assert torch.equal(quantized.roundtrip(w, quant), F.dequantize_4bit(stored.data, stored.quant_state))
    layer = quantized.load_quantized(base, quant).model.layers[1].mlp.down_proj
    assert torch.equal(layer.weight.data, stored.data)
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0))
    assert rel_err(layer(x), x @ F.dequantize_4bit(stored.data, stored.quant_state).T) <= 1e-6  # float32


def test_bake_table_dequantized_is_what_peft_runs_on_nf4(qlora):
    from merging.export.qlora import bake_table

    base, a = qlora
    rows = {r.into: r for r in bake_table(base, weighted(sources.load(a)), "nf4", ids=IDS)}
    assert list(rows) == ["original", "dequantized", "requantized"]
    assert rows["dequantized"].effect_rel_error <= 1e-5  # float noise: the weights the adapter saw
    assert rows["dequantized"].top1_agreement == 1.0
    assert rows["original"].effect_rel_error > 1e3 * rows["dequantized"].effect_rel_error
    assert rows["requantized"].effect_rel_error > 1e3 * rows["dequantized"].effect_rel_error


def test_dequantized_bake_loads_with_peft_nf4_outputs(qlora, tmp_path):
    import transformers

    from merging.base import quantized
    from merging.export.bake import bake

    base, a = qlora
    qmodel = quantized.load_quantized(base, "nf4")
    y0 = logits(qmodel)
    y_ref = logits(peft_stacked(qmodel, [str(a)]))
    out = bake(base, weighted(sources.load(a)), tmp_path / "baked", base_quant="nf4", into="dequantized")
    y = logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval())
    assert rel_err(y - y0, y_ref - y0) <= 1e-4
    y_orig = logits(transformers.AutoModelForCausalLM.from_pretrained(
        bake(base, weighted(sources.load(a)), tmp_path / "orig")).eval())  # fmt: skip
    assert rel_err(y_orig - y0, y_ref - y0) > 1e-2  # into the float weights: not what the adapter saw


def test_cli_bake_and_verify_take_base_quant(qlora, tmp_path):
    import json

    from click.testing import CliRunner
    from merging_cli.main import cli

    base, a = qlora
    res = CliRunner().invoke(cli, ["bake", str(a), "--base", str(base), "--base-quant", "nf4", "-o",
                                   str(tmp_path / "baked"), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["into"] == "dequantized"
    assert [b["into"] for b in doc["bakes"]] == ["original", "dequantized", "requantized"]
    assert doc["bakes"][1]["effect_rel_error"] <= 1e-5
    # the bake reuses the table's dequantised weights: its outputs are PEFT's on the nf4 base
    import transformers

    from merging.base import quantized

    qmodel = quantized.load_quantized(base, "nf4")
    y0, y_ref = logits(qmodel), logits(peft_stacked(qmodel, [str(a)]))
    y = logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "baked").eval())
    assert rel_err(y - y0, y_ref - y0) <= 1e-4
    res = CliRunner().invoke(cli, ["verify", str(a), "--base", str(base), "--base-quant", "nf4", "-s", "cat",
                                   "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.output)["rows"]
    assert row["passed"] and row["reference"] == "peft" and row["loaded_by"] == "peft"
    res = CliRunner().invoke(cli, ["bake", str(a), "--base", str(base), "--into", "dequantized", "-o",
                                   str(tmp_path / "x")])  # fmt: skip
    assert res.exit_code == 2 and "--base-quant" in res.output


def _char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer of the tiny model's 128 ids, saved beside it (compare needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(33, 127)]  # 94 printable characters, then ids for the specials
    vocab = {c: i for i, c in enumerate(chars)} | {"<unk>": 94, "<pad>": 95}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"unk_token": "<unk>", "pad_token": "<pad>", "eos_token": "<pad>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.save_pretrained(folder)


def test_compare_judges_every_row_against_peft_on_the_quantised_base(qlora, tmp_path):
    """`compare --base-quant nf4`: the reference is PEFT stacking on the nf4 base; an approximate row's
    figure is what PEFT itself gives loading that merge on the nf4 base."""
    import json
    import shutil

    from click.testing import CliRunner
    from merging_cli.main import cli
    from peft import PeftModel
    from transformers import AutoTokenizer

    import merging
    from merging.base import quantized

    base, a = qlora
    folder = tmp_path / "base"
    shutil.copytree(base, folder)
    _char_tokenizer(folder)
    res = CliRunner().invoke(cli, ["compare", str(a), "--base", str(folder), "--base-quant", "nf4",
                                   "-s", "cat,svd", "--ranks", "1", "-o", str(tmp_path / "r"),
                                   "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    rows = {v["label"]: v for v in doc["variants"]}
    assert rows["cat"]["passed"] and rows["cat"]["reference"] == "peft" and rows["cat"]["loaded_by"] == "peft"
    assert rows["cat"]["effect_rel_error"] <= 1e-4
    assert "nf4" in doc["base"]
    # the svd r=1 row, measured by PEFT alone on the nf4 base with the report's prompts
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    batch = tok(list(doc["prompts"]), return_tensors="pt", padding=True)
    qmodel = quantized.load_quantized(folder, "nf4")
    with torch.no_grad():
        y0 = qmodel(**batch).logits.float()
        y_ref = peft_stacked(qmodel, [str(a)])(**batch).logits.float()
    merging.merge([merging.load(a)], strategy="svd", rank=1).save(tmp_path / "svd")
    qmodel = quantized.load_quantized(folder, "nf4")
    with torch.no_grad():
        y_svd = PeftModel.from_pretrained(qmodel, str(tmp_path / "svd"))(**batch).logits.float()
    keep = batch["attention_mask"].bool()  # the report measures the prompts' tokens, not the padding
    want = rel_err((y_svd - y0)[keep], (y_ref - y0)[keep])
    assert want > 1e-2  # rank 1 of a rank-4 adapter: visibly approximate
    assert abs(rows["svd r=1"]["effect_rel_error"] - want) <= 1e-3 * want


def test_compare_refuses_held_out_losses_on_a_quantised_base_in_one_line(qlora, tmp_path):
    from click.testing import CliRunner
    from merging_cli.main import cli

    base, a = qlora
    data = Path(__file__).resolve().parent.parent / "examples" / "data" / "add.jsonl"
    res = CliRunner().invoke(cli, ["compare", f"add={a}", "--base", str(base), "--base-quant", "nf4",
                                   "--eval", f"add={data}", "-o", str(tmp_path / "r")])  # fmt: skip
    assert res.exit_code == 2 and "bitsandbytes" in res.output and res.output.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()
