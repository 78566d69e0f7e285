"""SD3 / SD3.5: LoRAs in Stability's MMDiT names (sd-scripts' lora_unet_joint_blocks_0_x_block_attn_qkv ...)
and in diffusers' names, on a tiny seeded SD3 transformer (dual attention in its first block, a
context_pre_only last block) with CLIP-L, CLIP-G and T5.

diffusers 0.42's SD3 loader reads diffusers-named files only (an MMDiT-named file loads as nothing), so an
MMDiT-named file's reference is the base with each ΔW = α/r·up·down added to its fused weight, computed here
from the raw tensors (the last block's context adaLN and the final layer's swapped to diffusers' (scale,
shift), as its single-file converter does).
"""

from __future__ import annotations

import logging

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli
from safetensors.torch import load_file

from merging.base.layout import BaseLayout
from merging.core.adapter import weighted
from merging.eval import verify_dit
from merging.formats import diffusers_lora, kohya
from merging.merge.pipeline import merge
from tests.support import sdparts as sp

pytestmark = [pytest.mark.usefixtures("one_thread")]
logging.getLogger("diffusers").setLevel(logging.ERROR)
TOL = 1e-4
B0, B1 = "transformer.transformer_blocks.0", "transformer.transformer_blocks.1"
MMDIT = {  # MMDiT name → the diffusers modules fused in it (rows in order); swapped: (shift, scale) halves
    "lora_unet_joint_blocks_0_x_block_attn_qkv": [f"{B0}.attn.to_{x}" for x in "qkv"],
    "lora_unet_joint_blocks_0_context_block_attn_qkv": [f"{B0}.attn.add_{x}_proj" for x in "qkv"],
    "lora_unet_joint_blocks_0_x_block_attn2_qkv": [f"{B0}.attn2.to_{x}" for x in "qkv"],
    "lora_unet_joint_blocks_0_x_block_mlp_fc1": [f"{B0}.ff.net.0.proj"],
    "lora_unet_joint_blocks_0_context_block_attn_proj": [f"{B0}.attn.to_add_out"],
    "lora_unet_joint_blocks_1_x_block_adaLN_modulation_1": [f"{B1}.norm1.linear"],
    "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1": [f"{B1}.norm1_context.linear"],  # swapped
    "lora_unet_context_embedder": ["transformer.context_embedder"],
    "lora_unet_t_embedder_mlp_0": ["transformer.time_text_embed.timestep_embedder.linear_1"],
    "lora_unet_final_layer_adaLN_modulation_1": ["transformer.norm_out.linear"],  # swapped
}  # fmt: skip
SWAPPED = ("joint_blocks_1_context_block_adaLN_modulation_1", "final_layer_adaLN_modulation_1")


def mmdit_file(path, seed, rank=4, alpha=2.0, scale=0.3):
    """A kohya SD3 LoRA by hand in sd-scripts' layout: fused qkv, alpha ≠ rank."""
    return sp.fused_file(path, sp.sd3_parts(), MMDIT, seed, "networks.lora_sd3", rank, alpha, scale)


def diffusers_file(path, modules, seed, rank=3, scale=0.3):
    return sp.diffusers_named_file(path, sp.sd3_parts(), modules, seed, rank, scale)


def added_by_hand(file) -> dict:
    """SD3 parts with the MMDiT file's ΔW added to each fused weight (swapped halves where MMDiT swaps)."""
    return sp.added_by_hand(sp.sd3_parts(), [(file, MMDIT)], SWAPPED)


def _noise(parts) -> torch.Tensor:
    return verify_dit.noise(parts, torch.Generator().manual_seed(0))


DIF = [f"{B0}.attn.to_q", f"{B0}.attn2.to_v", f"{B1}.ff.net.2", "transformer.proj_out"]


def test_mmdit_and_diffusers_named_loras_merged_with_cat_match_the_inputs_stacked(tmp_path):
    """The done test for SD3: the MMDiT file as ΔW added (diffusers cannot read it), the diffusers-named one
    stacked on top by diffusers' own SD3 loader; the cat merge, written in diffusers names, loaded by it
    alone."""
    from diffusers.loaders import SD3LoraLoaderMixin as Loader

    mm, dif = mmdit_file(tmp_path / "mm.safetensors", 1), diffusers_file(tmp_path / "d.safetensors", DIF, 2)
    alone = torch.nn.ModuleDict({"transformer": sp.sd3()})
    Loader.load_lora_into_transformer(Loader.lora_state_dict(str(mm)), alone["transformer"], adapter_name="x")
    assert verify_dit.injected(alone, "x") == set()  # silently nothing
    base = _noise(sp.sd3_parts())
    ref_parts = added_by_hand(mm)
    Loader.load_lora_into_transformer(Loader.lora_state_dict(str(dif)), ref_parts["transformer"],
                                      adapter_name="d")  # fmt: skip
    assert verify_dit.injected(ref_parts, "d") == set(DIF)  # diffusers read this one
    ref = _noise(ref_parts)
    layout = BaseLayout.from_components(sp.sd3_parts())
    ads = [kohya.read(f, base=layout).refine_targets(layout.modules) for f in (mm, dif)]
    merged = merge(weighted(ads), "cat").adapters[0]
    out = diffusers_lora.write(merged.deltas, tmp_path / "merged.safetensors", layout)
    got = sp.sd3_parts()
    Loader.load_lora_into_transformer(Loader.lora_state_dict(str(out)), got["transformer"], adapter_name="m")
    assert sp.effect_error(_noise(got), ref, base) <= TOL
    back = kohya.write(merged, tmp_path / "merged_mmdit.safetensors", base=layout)  # sd-scripts' names
    names = {k.split(".")[0] for k in load_file(str(back))}
    assert names == set(MMDIT) | {"lora_unet_joint_blocks_1_x_block_mlp_fc2", "lora_unet_final_layer_linear"}


def test_mmdit_names_round_trip_exactly(tmp_path):
    src = mmdit_file(tmp_path / "a.safetensors", 3)
    layout = BaseLayout.from_components(sp.sd3_parts())
    out = kohya.write(kohya.read(src, base=layout).refine_targets(layout.modules), tmp_path / "b.safetensors",
                      base=layout)  # fmt: skip
    a, b = load_file(str(src)), load_file(str(out))
    assert set(a) == set(b)
    for name in MMDIT:
        torch.testing.assert_close(sp.kohya_dw(b, name), sp.kohya_dw(a, name), rtol=1e-5, atol=1e-7)


def test_verify_on_an_sd3_pipeline(tmp_path):
    """verify --base <SD3 pipeline>: CLIP-L/G penultimate states and T5 feed the transformer; diffusers stacks
    diffusers-named inputs (both CLIPs through the SD3 loader, T5 through PEFT); cat passes."""
    pipe = sp.pipeline_folder(tmp_path / "pipe", sp.sd3_parts(), "StableDiffusion3Pipeline")
    te = ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
          "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj",
          "text_encoder_3.encoder.block.0.layer.0.SelfAttention.k"]  # fmt: skip
    files = [diffusers_file(tmp_path / f"{i}.safetensors", (DIF + te)[i - 1 :], seed=i) for i in (1, 2)]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["verify", *map(str, files), "--base", str(pipe),
                                                            "-s", "cat"])  # fmt: skip
    assert result.exit_code == 0 and "PASS" in result.output, result.output
    assert "diffusers (set_adapters)" in result.output


def test_single_file_bake_of_sd3_loads_with_from_single_file_and_equals_diffusers_fusing_the_lora(tmp_path):
    """bake --single-file on SD3: the transformer in MMDiT's checkpoint names (qkv fused, the last block's
    context adaLN and the final layer's swapped back), which SD3Transformer2DModel.from_single_file reads
    (config: the pipeline folder, offline) equal to diffusers' load_lora_into_transformer + fuse_lora; a
    file that adapts a text encoder too is refused in one line."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders import SD3LoraLoaderMixin as Loader

    pipe = sp.pipeline_folder(tmp_path / "pipe", sp.sd3_parts(), "StableDiffusion3Pipeline")
    mods = [*DIF, f"{B0}.attn.to_k", f"{B1}.norm1_context.linear", "transformer.norm_out.linear",
            "transformer.context_embedder"]  # fmt: skip
    files = [diffusers_file(tmp_path / f"{i}.safetensors", mods[i - 1 :], seed=i) for i in (1, 2)]
    out = tmp_path / "sd3.safetensors"
    args = ["--base", str(pipe), "--single-file", "-o"]
    result = CliRunner().invoke(cli, ["bake", *map(str, files), *args, str(out)])
    assert result.exit_code == 0, result.output
    got = SD3Transformer2DModel.from_single_file(str(out), config=str(pipe), subfolder="transformer",
                                                 local_files_only=True).state_dict()  # fmt: skip
    ref = sp.sd3()
    for i, f in enumerate(files):
        Loader.load_lora_into_transformer(Loader.lora_state_dict(str(f)), ref, adapter_name=f"a{i}")
    ref.fuse_lora(adapter_names=["a0", "a1"])
    ref.unload_lora()
    want, was = ref.state_dict(), sp.sd3().state_dict()
    assert got.keys() == want.keys()
    err = sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5
    moved = sum(float((want[k] - was[k]).norm() ** 2) for k in want) ** 0.5
    assert moved > 0 and err <= 1e-5 * moved, (err, moved)
    q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    te = diffusers_file(tmp_path / "te.safetensors", [q], 3)
    refused = CliRunner().invoke(cli, ["bake", str(te), *args, str(tmp_path / "x")])
    assert refused.exit_code != 0, refused.output
    assert f"module {q}: not in an SD3 single file; bake a folder" in refused.output
    assert not (tmp_path / "x").exists()
