"""Stable Diffusion from the command line: inspect, merge/convert with a pipeline folder as --base, verify.

References as in test_sd.py: LyCORIS and diffusers, never our own code.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli
from safetensors.torch import load_file, save_file

from merging.base.layout import BaseLayout
from merging.base.weights import weights as base_weights
from merging.core.adapter import weighted
from merging.formats import kohya
from merging.merge.pipeline import merge
from tests.support import sdparts as sp

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_thread")]
logging.getLogger("LyCORIS").setLevel(logging.ERROR)
TOL = 1e-5



def _keys(file) -> set[str]:
    return set(load_file(str(file)))


def test_inspect_shows_lycoris_ia3_and_whole_kohya_names_at_80_columns(tmp_path):
    f = sp.lycoris_file(tmp_path / "ia3.safetensors", {"unet": sp.unet()}, "ia3", seed=1)
    result = CliRunner(env={"COLUMNS": "80"}).invoke(cli, ["inspect", str(f), "--modules"])
    assert result.exit_code == 0, result.output
    assert "ia3 lycoris" in result.output
    first_column = [re.split(r"\s{2,}", line.strip())[0] for line in result.output.splitlines()]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in first_column


def test_cli_merge_and_convert_with_a_pipeline_folder_as_base(tmp_path, base_noise):
    """--base takes a diffusers pipeline folder: names (lora_unet_/lora_te_), shapes and base weights (a
    LyCORIS IA³ stacked with a LoCon on one module is resolved against them): diffusers loads the merge."""

    m = {"unet": sp.unet(), "text_encoder": sp.text_encoder()}
    ia3 = sp.lycoris_file(tmp_path / "ia3.safetensors", {"unet": m["unet"]}, "ia3", seed=1, scale=0.3)
    lora = sp.lycoris_file(tmp_path / "lora.safetensors", m, "locon", seed=2)
    ref_noise, ref_hidden = sp.noise(m["unet"]), sp.hidden(m["text_encoder"])
    pipe = sp.pipeline_folder(tmp_path / "pipe", {"unet": sp.unet(), "text_encoder": sp.text_encoder()})
    assert BaseLayout.from_folder(pipe).components == ("unet", "text_encoder")
    sp.text_encoder(2, 16, projection=True).save_pretrained(str(tmp_path / "te2"))
    te2 = BaseLayout.from_folder(tmp_path / "te2").modules  # SDXL's: not the CLIPTextModel AutoModel builds
    assert "text_projection" in te2 and "text_model.encoder.layers.0.mlp.fc1" in te2
    fc1 = base_weights(pipe).module_weight("text_encoder.encoder.layers.0.mlp.fc1")  # saved as text_model.*
    assert torch.equal(fc1, sp.text_encoder().encoder.layers[0].mlp.fc1.weight)
    run = CliRunner(env={"COLUMNS": "200"})
    out = tmp_path / "merged.safetensors"
    args = ["merge", str(ia3), str(lora), "--strategy", "cat", "--format", "kohya", "-o", str(out)]
    result = run.invoke(cli, args)
    assert result.exit_code == 2 and "needs the base weights: pass --base" in result.output
    result = run.invoke(cli, [*args, "--base", str(pipe)])
    assert result.exit_code == 0, result.output
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in _keys(out)
    got = {"unet": sp.unet(), "text_encoder": sp.text_encoder()}
    sp.diffusers_load(got, {"merged": out})
    assert sp.effect_error(sp.noise(got["unet"]), ref_noise, base_noise) <= TOL
    assert sp.effect_error(sp.hidden(got["text_encoder"]), ref_hidden, sp.hidden(sp.text_encoder())) <= TOL
    peft_args = ["merge", str(ia3), str(lora), "-s", "cat", "--base", str(pipe), "-o", str(tmp_path / "p")]
    result = run.invoke(cli, peft_args)  # --format peft
    assert result.exit_code == 2 and "a PEFT folder adapts one model, the base is a pipeline" in result.output
    conv = tmp_path / "unet_only.safetensors"
    args = ["convert", str(lora), "--to", "kohya", "--base", str(pipe / "unet"), "-o", str(conv)]
    result = run.invoke(cli, args)
    assert result.exit_code == 2 and "lora_te_encoder_layers_0_mlp_fc1 matches no module" in result.output


def test_verify_runs_on_a_pipeline_folder_and_fails_a_wrong_merge(tmp_path):
    """verify --base <pipeline>: diffusers stacks the LoRA inputs; cat passes on UNet and text encoder, a
    merged file with one input's weight doubled fails (exit 1)."""
    pipe = sp.pipeline_folder(tmp_path / "pipe", {"unet": sp.unet(), "text_encoder": sp.text_encoder()})
    files = [
        sp.lycoris_file(tmp_path / f"{i}.safetensors", {"unet": sp.unet(), "text_encoder": sp.text_encoder()},
                        "locon", seed=i)
        for i in (1, 2)
    ]  # fmt: skip
    run = CliRunner(env={"COLUMNS": "200"})
    args = ["verify", *map(str, files), "--base", str(pipe)]
    result = run.invoke(cli, [*args, "-s", "cat", "-s", "svd", "--rank", "2"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "diffusers (set_adapters)" in result.output
    wrong = tmp_path / "wrong.safetensors"
    tensors = load_file(str(files[0]))
    save_file({k: 2 * v if k.endswith("lora_up.weight") else v for k, v in tensors.items()}, str(wrong))
    layout = BaseLayout.from_folder(pipe)
    merged = merge(weighted([kohya.read(f, base=layout) for f in (wrong, files[1])]), "cat")
    recipe = {"strategy": "cat"}
    out = kohya.write(merged.adapters[0], tmp_path / "merged.safetensors", base=layout, provenance=recipe)
    result = run.invoke(cli, [*args, "--merged", str(out)])
    assert result.exit_code == 1 and "FAIL" in result.output, result.output


def test_verify_on_an_sdxl_shaped_pipeline(tmp_path):
    """SDXL: two text encoders (lora_te1_/lora_te2_) and a UNet with added time/text embeddings."""

    def parts():
        return {"unet": sp.unet(config=sp.SDXL_UNET), "text_encoder": sp.text_encoder(1),
                "text_encoder_2": sp.text_encoder(2, 16, projection=True)}  # fmt: skip

    pipe = sp.pipeline_folder(tmp_path / "pipe", parts())
    files = []
    for i in (1, 2):
        p = parts()
        m = {"unet": p["unet"], "text_encoder": [p["text_encoder"], p["text_encoder_2"]]}
        files.append(sp.lycoris_file(tmp_path / f"{i}.safetensors", m, "locon", seed=i))
    args = ["verify", *map(str, files), "--base", str(pipe), "-s", "cat"]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, args)
    assert result.exit_code == 0 and "PASS" in result.output, result.output
