"""SDXL LoRAs in Stability's (SGM) UNet names (``lora_unet_input_blocks_4_1_proj_in``), as sd-scripts writes
them, on a tiny seeded SDXL-shaped UNet with its two CLIP text encoders.

The input is written by LyCORIS itself (diffusers names); the judges are LyCORIS running it and diffusers'
own SGM mapping (``lora_state_dict(..., unet_config=...)``, what ``load_lora_weights`` does) loading the
SGM-named files we write.
"""

from __future__ import annotations

import logging

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli
from safetensors.torch import load_file, save_file

from merging.base.layout import BaseLayout
from merging.core.adapter import weighted
from merging.formats import WriteOptions, kohya
from merging.formats.kohya_names import to_kohya
from merging.merge.pipeline import merge
from tests.support import sdparts as sp

pytestmark = [pytest.mark.usefixtures("one_thread")]
logging.getLogger("LyCORIS").setLevel(logging.ERROR)
TOL = 1e-5
SGM = WriteOptions(unet_names="sgm")
UNET = sp.SDXL_UNET | {  # SDXL's block kinds: no attention in the first down and the last up block
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}  # fmt: skip


def _unet():
    return sp.unet(config=UNET)


def _parts() -> dict:
    return {"unet": _unet(), "text_encoder": sp.text_encoder(1),
            "text_encoder_2": sp.text_encoder(2, 16, projection=True)}  # fmt: skip


@torch.no_grad()
def _noise(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 48, generator=g)
    extra = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    return unet(x, torch.tensor([10, 500]), encoder_hidden_states=states, added_cond_kwargs=extra).sample


def _lycoris(tmp_path, seed):
    """A LoCon file by LyCORIS on every UNet layer kind (conv_in/out, resnets, samplers, attention, time)."""
    p = _parts()
    m = {"unet": p["unet"], "text_encoder": [p["text_encoder"], p["text_encoder_2"]]}
    return sp.lycoris_file(tmp_path / f"{seed}.safetensors", m, "locon", seed=seed), p


def _diffusers_noise(file) -> torch.Tensor:
    """The file loaded as StableDiffusionXLPipeline.load_lora_weights does (SGM names mapped by diffusers)."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as Loader

    unet = _unet()
    sd, alphas = Loader.lora_state_dict(str(file), unet_config=unet.config)
    Loader.load_lora_into_unet(sd, alphas, unet, adapter_name="x")
    return _noise(unet)


def test_sgm_names_written_from_the_base_load_in_diffusers_like_lycoris_runs_the_input(tmp_path):
    f, p = _lycoris(tmp_path, 1)
    ref, base = _noise(p["unet"]), _noise(_unet())
    layout = BaseLayout.from_components(_parts())
    ad = kohya.read(f, base=layout).refine_targets(layout.modules)
    out = kohya.write(ad, tmp_path / "sgm.safetensors", base=layout, options=SGM)
    names = {k.split(".")[0] for k in load_file(str(out))}
    for n in ("input_blocks_0_0", "input_blocks_2_0_op", "input_blocks_3_0_skip_connection",
              "input_blocks_3_1_proj_in", "middle_block_1_transformer_blocks_0_attn2_to_k",
              "output_blocks_1_2_conv", "output_blocks_1_1_proj_out", "output_blocks_3_0_in_layers_2",
              "out_2", "time_embed_0"):  # fmt: skip
        assert f"lora_unet_{n}" in names, n
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1" in names
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)
    assert sp.effect_error(_diffusers_noise(out), ref, base) <= TOL
    back = kohya.read(out, base=layout)
    assert set(back.deltas) == set(ad.deltas) and back.config["unet_names"] == "sgm"
    again = kohya.write(back.refine_targets(layout.modules), tmp_path / "again.safetensors", base=layout)
    assert set(load_file(str(again))) == set(load_file(str(out)))  # kept in SGM names


def test_sgm_and_diffusers_named_sdxl_files_merged_with_cat_match_lycoris_stacking_them(tmp_path):
    """One input in SGM names, one in diffusers names: cat, written in SGM names, loaded by diffusers."""
    f1, p = _lycoris(tmp_path, 1)
    f2 = sp.lycoris_file(tmp_path / "2.safetensors", {"unet": p["unet"]}, "locon", seed=2)  # stacked on p
    ref, base = _noise(p["unet"]), _noise(_unet())
    layout = BaseLayout.from_components(_parts())
    ad1 = kohya.read(f1, base=layout).refine_targets(layout.modules)
    sgm1 = kohya.write(ad1, tmp_path / "s1.safetensors", base=layout, options=SGM)
    ads = [kohya.read(f, base=layout).refine_targets(layout.modules) for f in (sgm1, f2)]
    result = merge(weighted(ads), "cat")
    out = kohya.write(result.adapters[0], tmp_path / "merged.safetensors", base=layout, options=SGM)
    assert sp.effect_error(_diffusers_noise(out), ref, base) <= TOL


def test_verify_on_sdxl_with_an_sgm_named_input(tmp_path):
    """verify maps SGM names through diffusers' loader with the UNet's config, as load_lora_weights does."""
    pipe = sp.pipeline_folder(tmp_path / "pipe", _parts(), "StableDiffusionXLPipeline")
    layout = BaseLayout.from_folder(pipe)
    files = []
    for i in (1, 2):
        f, _ = _lycoris(tmp_path, i)
        ad = kohya.read(f, base=layout).refine_targets(layout.modules)
        files.append(kohya.write(ad, tmp_path / f"sgm{i}.safetensors", base=layout, options=SGM))
    args = ["verify", *map(str, files), "--base", str(pipe), "-s", "cat"]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, args)
    assert result.exit_code == 0 and "PASS" in result.output, result.output
    assert "diffusers (set_adapters)" in result.output


def test_an_up_block_without_attention_keeps_ldm_slot_1_for_its_upsampler():
    """LDM puts Upsample right after the resnet when a block has no attention (output_blocks.n.1.conv);
    diffusers' SGM mapping assumes SDXL (attention in every upsampling block) and sends it to attentions.1."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers as sgm_to_diffusers

    layout = BaseLayout.from_components({"unet": sp.unet(config=sp.SDXL_UNET)})  # UpBlock2D first
    names = to_kohya(layout.modules, layout.components, layout.saved, sgm=True)
    assert names["unet.up_blocks.0.upsamplers.0.conv"] == "lora_unet_output_blocks_1_1_conv"
    key = "lora_unet_output_blocks_1_1_conv.lora_down.weight"
    assert list(sgm_to_diffusers({key: 0}, sp.unet(config=sp.SDXL_UNET).config)) == [
        "lora_unet_output_blocks_0_attentions_1_conv.lora_down.weight"  # up_blocks.0.attentions.1: none
    ]


def test_every_unet_parameter_has_an_sgm_name_that_diffusers_single_file_loader_reads_back(tmp_path):
    """Judged by diffusers' LDM converter (from_single_file): the whole UNet renamed by sgm_names loads back
    to the same weights, so the mapping is the checkpoints' (norms, samplers, label_emb, out included)."""
    from diffusers import UNet2DConditionModel

    from merging.formats.sgm_names import to_sgm

    u = _unet()
    u.save_pretrained(str(tmp_path / "unet"))
    names = to_sgm([n for n, _ in u.named_modules()])
    sd = {f"model.diffusion_model.{names[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": v
          for k, v in u.state_dict().items()}  # fmt: skip
    save_file(sd, str(tmp_path / "one.safetensors"))
    one, cfg = str(tmp_path / "one.safetensors"), str(tmp_path / "unet")
    back = UNet2DConditionModel.from_single_file(one, config=cfg, local_files_only=True).state_dict()
    assert back.keys() == u.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in u.state_dict().items())


def _loaded(pipe, parts: dict) -> dict:
    """The pipeline folder's components, loaded afresh with from_pretrained."""
    return {c: type(m).from_pretrained(str(pipe / c)).eval() for c, m in parts.items()}


def _fused(parts: dict, lora) -> dict:
    """The components with ``lora`` loaded by diffusers' pipeline loader and fused into them."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    xl = "text_encoder_2" in parts
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra = {"tokenizer_2": None} if xl else {"safety_checker": None, "feature_extractor": None}
    ref = cls(**parts, tokenizer=None, scheduler=None, **extra)
    ref.load_lora_weights(str(lora))
    ref.fuse_lora(components=[c for c in ("unet", "text_encoder", "text_encoder_2") if c in parts])
    ref.unload_lora_weights()
    return {c: getattr(ref, c) for c in parts}


@pytest.mark.parametrize("xl", [True, False], ids=["sdxl", "sd15"])
def test_single_file_bake_loads_with_from_single_file_and_equals_diffusers_fusing_the_lora(tmp_path, xl):
    """bake --single-file: UNet, VAE and text encoders in the original (LDM/SGM, OpenCLIP) layout; the
    pipeline's from_single_file (config: the base folder, offline) reads components equal to diffusers'
    load_lora_weights + fuse_lora of the same file, the VAE unchanged."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = (_parts() if xl else {"unet": sp.unet(), "text_encoder": sp.text_encoder(1)}) | {"vae": sp.vae()}
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipe = sp.pipeline_folder(tmp_path / "pipe", parts, cls.__name__)
    live = _loaded(pipe, parts)
    te = [live[c] for c in live if c.startswith("text_encoder")]
    m = {"unet": live["unet"], "text_encoder": te if xl else te[0]}
    f = sp.lycoris_file(tmp_path / "a.safetensors", m, "locon", seed=1)  # adapts UNet and text encoders
    out = tmp_path / "baked.safetensors"
    result = CliRunner().invoke(cli, ["bake", str(f), "--base", str(pipe), "-o", str(out), "--single-file"])
    assert result.exit_code == 0, result.output
    skip = {"tokenizer": None, "scheduler": None} | ({"tokenizer_2": None} if xl else {})
    got = cls.from_single_file(str(out), config=str(pipe), local_files_only=True, **skip)
    ref = _fused(_loaded(pipe, parts), f)  # diffusers reads the trainer's file itself: no reader of ours
    for c, model in ref.items():
        want, have, was = model.state_dict(), getattr(got, c).state_dict(), parts[c].state_dict()
        assert have.keys() == want.keys(), c
        err = sum(float((have[k] - want[k]).norm() ** 2) for k in want) ** 0.5
        moved = sum(float((want[k] - was[k]).norm() ** 2) for k in want) ** 0.5
        assert (err == moved == 0) if c == "vae" else (moved > 0 and err <= 1e-5 * moved), (c, err, moved)
