"""vLLM's rank list, and a uniform-rank folder llama.cpp's converter reads right."""

from __future__ import annotations

import json

import peft
import torch
from click.testing import CliRunner
from merging_cli.main import cli
from safetensors.torch import load_file

from merging.core.adapter import weighted
from merging.formats import peft as peft_format
from merging.merge import serving
from merging.merge.pipeline import merge
from merging.merge.result import write_result


def _llama_cpp_deltas(folder) -> dict[str, torch.Tensor]:
    """ΔW per module as llama.cpp applies a converted PEFT folder: the global lora_alpha over each tensor's
    rank (convert_lora_to_gguf.py keeps only lora_alpha; llama-adapter.cpp scales by alpha / lora_a rows)."""
    alpha = json.loads((folder / "adapter_config.json").read_text())["lora_alpha"]
    tensors = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = alpha / a.shape[0] * (b @ a)
    return out


def _peft_deltas(fx, folder) -> dict[str, torch.Tensor]:
    """ΔW per module as PEFT computes it for the folder (its own get_delta_weight)."""
    model = peft.PeftModel.from_pretrained(fx.load_base("llama"), folder)
    return {
        name.removeprefix("base_model.model."): m.get_delta_weight("default")
        for name, m in model.named_modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})
    }  # fmt: skip


def test_uniform_folder_reads_right_in_llama_cpp_semantics(fx, tmp_path):
    ads = [peft_format.read(fx.adapter("llama", n)) for n in ("lora", "lora_r8", "lora_patterns")]
    result = merge(weighted(ads), "cat")
    plain = write_result(result, tmp_path / "plain", {})
    info = serving.of(result.adapters)
    assert not info.uniform and any("--uniform-rank" in line for line in info.lines())
    ours, theirs = _llama_cpp_deltas(plain), _peft_deltas(fx, plain)
    wrong = [m for m in theirs if not torch.allclose(ours[m], theirs[m], rtol=1e-4, atol=1e-6)]
    assert wrong  # the per-module folder is misread by a global-alpha loader: hence the flag

    (lora,) = result.adapters
    uniform = serving.uniform(lora)
    assert serving.of([uniform]).uniform
    folder = peft_format.write(uniform, tmp_path / "uniform")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    assert config["lora_alpha"] == config["r"]
    ours, theirs = _llama_cpp_deltas(folder), _peft_deltas(fx, folder)
    before = _peft_deltas(fx, plain)
    for m in theirs:
        torch.testing.assert_close(ours[m], theirs[m], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(theirs[m], before[m], rtol=1e-5, atol=1e-7)  # padding changes nothing


def test_vllm_rank_is_the_smallest_accepted():
    got = [serving.vllm_rank(r) for r in (1, 2, 8, 9, 72, 300, 512, 513)]
    assert got == [1, 8, 8, 16, 128, 320, 512, None]


def test_merge_says_what_serving_needs(fx, tmp_path):
    run = CliRunner(env={"COLUMNS": "200"})
    args = ["merge", fx.adapter("llama", "lora"), fx.adapter("llama", "lora_r8"), "-s", "cat", "-o"]
    plain = run.invoke(cli, [str(a) for a in [*args, tmp_path / "a"]])
    assert plain.exit_code == 0, plain.output
    assert "vLLM: pass --max-lora-rank 16" in plain.output and "--uniform-rank" in plain.output
    padded = run.invoke(cli, [str(a) for a in [*args, tmp_path / "b", "--serve", "vllm"]])
    assert padded.exit_code == 0, padded.output
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (16, 16, {})
    ia3_args = ["merge", fx.adapter("llama", "ia3"), "-s", "geometric", "-o", tmp_path / "c"]
    ia3 = run.invoke(cli, [str(a) for a in ia3_args])
    assert ia3.exit_code == 0 and "not servable as a LoRA" in ia3.output
