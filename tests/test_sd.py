"""Stable Diffusion adapters: kohya/LyCORIS files on tiny seeded SD1.5/SDXL-shaped parts.

Every input is written by lycoris-lora itself (its kohya entry point, as sd-scripts runs it) or by hand in
sd-scripts' layout (alpha ≠ rank); every reference is LyCORIS or diffusers stacking the inputs, and every
merged output is loaded by diffusers and LyCORIS: ‖merged − stacked‖ / ‖stacked − base‖ on the UNet's noise
prediction (or the text encoder's hidden states) ≤ 1e-5.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.base.layout import BaseLayout
from merging.core.adapter import weighted
from merging.errors import UnsupportedError
from merging.formats import kohya
from merging.merge.pipeline import merge
from merging.runtime.stacked import stacked as stacked_runtime
from tests.support import sdparts as sp

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_thread")]
logging.getLogger("LyCORIS").setLevel(logging.ERROR)
TOL = 1e-5



def _layout(**components) -> BaseLayout:
    return BaseLayout.from_components(components)


def _merge_to_kohya(files, out, layout, strategy="cat"):
    ads = [kohya.read(f, base=layout).refine_targets(layout.modules) for f in files]
    result = merge(weighted(ads), strategy)
    assert len(result.adapters) == 1
    return kohya.write(result.adapters[0], out, base=layout)


def _judge(merged_file, stacked, base_noise, *, diffusers=True):
    """The merged kohya LoRA loaded by diffusers and by LyCORIS, each against the stacked reference."""
    errors = {}
    if diffusers:
        m = {"unet": sp.unet()}
        sp.diffusers_load(m, {"merged": merged_file})
        errors["diffusers"] = sp.effect_error(sp.noise(m["unet"]), stacked, base_noise)
    m = {"unet": sp.unet()}
    sp.lycoris_load_kohya_lora(m, merged_file)
    errors["lycoris"] = sp.effect_error(sp.noise(m["unet"]), stacked, base_noise)
    assert max(errors.values()) <= TOL, errors


def _sd_scripts_lora(path, like, rank=3, alpha=5.0, seed=7, scale=0.1):
    """A LoRA/LoCon file by hand in sd-scripts' layout on the modules another kohya file adapts."""
    names = {k.split(".")[0] for k in load_file(str(like))}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for mod, m in sp.unet().named_modules():
        name = "lora_unet_" + mod.replace(".", "_")
        if name not in names:
            continue
        w = m.weight
        kernel = tuple(w.shape[2:])
        ones = (1,) * len(kernel)
        tensors[f"{name}.lora_down.weight"] = scale * torch.randn(rank, w.shape[1], *kernel, generator=g)
        tensors[f"{name}.lora_up.weight"] = scale * torch.randn(w.shape[0], rank, *ones, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)}
    save_file(tensors, str(path), metadata=meta)
    return path


def _conv_downs(file) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(str(file)).items() if k.endswith("lora_down.weight")}


@pytest.mark.parametrize("order", ["loha_first", "lora_first"])
def test_loha_and_locon_without_base_keep_conv_kernels_in_any_order(tmp_path, base_noise, order):
    """A LoHa read without its base knows only (out, in·k·k); the LoCon input gives the kernel, any order."""
    m = {"unet": sp.unet()}
    loha = sp.lycoris_file(tmp_path / "loha.safetensors", m, "loha", seed=1, scale=0.2)
    lora = _sd_scripts_lora(tmp_path / "lora.safetensors", loha)
    sp.lycoris_load_kohya_lora(m, lora)
    stacked = sp.noise(m["unet"])
    files = [loha, lora] if order == "loha_first" else [lora, loha]
    result = merge(weighted([kohya.read(f) for f in files]), "cat")  # no base
    out = kohya.write(result.adapters[0], tmp_path / "merged.safetensors")
    downs = _conv_downs(out)
    assert downs["lora_unet_conv_in.lora_down.weight"] == (16 + 3, 4, 3, 3)
    assert downs["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"][2:] == (3, 3)
    _judge(out, stacked, base_noise)


def test_loha_alone_without_base_is_refused_in_one_line_and_exact_with_it(tmp_path, base_noise):
    m = {"unet": sp.unet()}
    loha = sp.lycoris_file(tmp_path / "loha.safetensors", m, "loha", seed=1, scale=0.2)
    stacked = sp.noise(m["unet"])
    result = merge(weighted([kohya.read(loha)]), "cat")
    with pytest.raises(UnsupportedError, match=r"lora_unet_conv_in: layer kind unknown .* pass --base") as e:
        kohya.write(result.adapters[0], tmp_path / "x.safetensors")
    assert "\n" not in str(e.value) and not (tmp_path / "x.safetensors").exists()
    out = _merge_to_kohya([loha], tmp_path / "merged.safetensors", _layout(unet=sp.unet()))
    assert _conv_downs(out)["lora_unet_conv_in.lora_down.weight"] == (16, 4, 3, 3)
    _judge(out, stacked, base_noise)


LOCON = ("locon", {}, 0.1)
TUCKER_BOTH_RS = {"factor": 2, "use_tucker": True, "decompose_both": True, "rs_lora": True}
LYCORIS = {  # two inputs each: (algo, LyCORIS options, weight scale)
    "locon": [LOCON, LOCON],
    "locon_tucker_rs": [("locon", {"use_tucker": True, "rs_lora": True}, 0.1)] * 2,  # lora_mid; α·√r stored
    "loha": [("loha", {}, 0.2)] * 2,
    "loha_tucker": [("loha", {"use_tucker": True}, 0.2)] * 2,
    "lokr": [("lokr", {"factor": 4}, 0.1)] * 2,
    "lokr_tucker": [("lokr", {"factor": 2, "use_tucker": True}, 0.2)] * 2,
    "lokr_tucker_both_rs": [("lokr", TUCKER_BOTH_RS, 0.2)] * 2,
    "lokr_both": [("lokr", {"factor": 2, "decompose_both": True}, 0.1)] * 2,
    "lokr_full": [("lokr", {"full_matrix": True}, 0.05)] * 2,
    # LyCORIS cannot stack a full network: it deletes the layer's weight (a network applied after it fails)
    # and replaces the layer's forward (a network applied before it is silently dropped). One input.
    "full": [("full", {}, 0.002)],
}


@pytest.mark.parametrize("case", list(LYCORIS))
def test_two_lycoris_files_merged_with_cat_reproduce_lycoris_stacking_them(tmp_path, base_noise, case):
    """Every LyCORIS type and scale rule (LoKr: α / lora_dim, Tucker included; 1 with both factors full)."""
    files, m = [], {"unet": sp.unet()}
    for i, (algo, kw, scale) in enumerate(LYCORIS[case], 1):
        file = tmp_path / f"{i}.safetensors"
        files.append(sp.lycoris_file(file, {"unet": sp.unet()}, algo, i, scale, **kw))
        sp.lycoris_load(m, files[-1], algo, **kw)
    stacked = sp.noise(m["unet"])
    if case == "full":  # diff_b: a bias delta, which a kohya LoRA cannot hold; our runtime matches LyCORIS's
        with pytest.raises(UnsupportedError, match="module unet.conv_in: kohya LoRA has no bias delta"):
            _merge_to_kohya(files, tmp_path / "merged.safetensors", _layout(unet=sp.unet()))
        pipe = torch.nn.ModuleDict({"unet": sp.unet()})
        layout = _layout(unet=pipe["unet"])
        with stacked_runtime(pipe, weighted([kohya.read(f, base=layout) for f in files])):
            assert sp.effect_error(sp.noise(pipe["unet"]), stacked, base_noise) <= TOL
        return
    out = _merge_to_kohya(files, tmp_path / "merged.safetensors", _layout(unet=sp.unet()))
    assert all(len(s) in (2, 4) for s in _conv_downs(out).values())
    _judge(out, stacked, base_noise)


def test_lokr_tucker_scale_is_alpha_over_lora_dim(tmp_path):
    """LyCORIS: scale = α / lora_dim (conv α 6, dim 4: 1.5), not α / the factor size lokr_w2_a holds."""
    m = {"unet": sp.unet()}
    f = sp.lycoris_file(tmp_path / "t.safetensors", m, "lokr", seed=1, factor=2, use_tucker=True)
    tensors = load_file(str(f))
    ad = kohya.read(f)
    tucker = [k.split(".")[0] for k in tensors if k.endswith("lokr_t2")]
    assert tucker and all(ad.deltas[n].scale == 1.5 for n in tucker)


def test_lycoris_ia3_networks_add_and_merge_exactly(tmp_path, base_noise):
    """Two LyCORIS IA³ networks add w ⊙ W each (bias untouched); cat gives one IA³ with w1 + w2."""
    files = [sp.lycoris_file(tmp_path / f"{i}.safetensors", {"unet": sp.unet()}, "ia3", seed=i, scale=0.3)
             for i in (1, 2)]  # fmt: skip
    m = {"unet": sp.unet()}
    for f in files:
        sp.lycoris_load(m, f, "ia3")
    stacked = sp.noise(m["unet"])
    ads = [kohya.read(f) for f in files]
    pipe = torch.nn.ModuleDict({"unet": sp.unet()})  # our runtime (the verify reference) against LyCORIS
    layout = _layout(unet=pipe["unet"])
    with stacked_runtime(pipe, weighted([kohya.read(f, base=layout) for f in files])):
        assert sp.effect_error(sp.noise(pipe["unet"]), stacked, base_noise) <= TOL
    result = merge(weighted(ads), "cat")
    out = kohya.write(result.adapters[0], tmp_path / "merged.safetensors")
    m = {"unet": sp.unet()}
    sp.lycoris_load(m, out, "ia3")
    assert sp.effect_error(sp.noise(m["unet"]), stacked, base_noise) <= TOL
    # PEFT's product (1 + w1)(1 + w2) − 1 in the same file is far off: the semantics are LyCORIS's
    w1, w2 = (load_file(str(f)) for f in files)
    product = {k: (1 + v) * (1 + w2[k]) - 1 if k.endswith(".weight") else v for k, v in w1.items()}
    save_file(product, str(tmp_path / "product.safetensors"))
    m = {"unet": sp.unet()}
    sp.lycoris_load(m, tmp_path / "product.safetensors", "ia3")
    assert sp.effect_error(sp.noise(m["unet"]), stacked, base_noise) > 1e-2
    with pytest.raises(UnsupportedError, match="LyCORIS IA³ networks add w ⊙ W each; multiplicative"):
        merge(weighted(ads), "multiplicative")


def test_lycoris_ia3_with_lora_on_one_module_needs_the_base_weights(tmp_path, base_noise):
    m = {"unet": sp.unet()}
    ia3 = sp.lycoris_file(tmp_path / "ia3.safetensors", m, "ia3", seed=1, scale=0.3)
    lora = sp.lycoris_file(tmp_path / "lora.safetensors", m, "locon", seed=2)
    stacked = sp.noise(m["unet"])
    layout = _layout(unet=sp.unet())
    ads = [kohya.read(f, base=layout).refine_targets(layout.modules) for f in (ia3, lora)]
    with pytest.raises(UnsupportedError, match="stacked with other adapter kinds needs the base weights"):
        merge(weighted(ads), "cat")
    weights = {f"unet.{k}": v for k, v in sp.unet().named_parameters()}
    result = merge(weighted(ads), "cat", base_weights=lambda mod: weights[mod + ".weight"])
    out = kohya.write(result.adapters[0], tmp_path / "merged.safetensors", base=layout)
    _judge(out, stacked, base_noise)


def _keys(file) -> set[str]:
    return set(load_file(str(file)))


def test_sd15_names_both_ways_from_the_pipeline_base(tmp_path):
    """lora_unet_* / lora_te_text_model_* (sd-scripts' names; LyCORIS under transformers 5 drops text_model_,
    read too) map to the pipeline's modules and back; diffusers and LyCORIS load the rewrite alike."""
    m = {"unet": sp.unet(), "text_encoder": sp.text_encoder()}
    f = sp.lycoris_file(tmp_path / "a.safetensors", m, "locon", seed=1)
    ref_noise, ref_hidden = sp.noise(m["unet"]), sp.hidden(m["text_encoder"])
    base = {"unet": sp.unet(), "text_encoder": sp.text_encoder()}
    base_noise, base_hidden = sp.noise(base["unet"]), sp.hidden(base["text_encoder"])
    layout = _layout(**base)
    legacy = sp.legacy_te_names(f, tmp_path / "legacy.safetensors")
    ads = [kohya.read(x, base=layout) for x in (f, legacy)]
    assert set(ads[0].deltas) == set(ads[1].deltas)
    assert {mod.partition(".")[0] for mod in ads[0].deltas} == {"unet", "text_encoder"}
    assert "text_encoder.encoder.layers.0.mlp.fc1" in ads[0].deltas  # transformers 5's module path
    out = kohya.write(ads[0], tmp_path / "b.safetensors", base=layout)
    assert _keys(out) == _keys(legacy) and "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in _keys(out)
    assert set(kohya.read(out, base=layout).deltas) == set(ads[0].deltas)
    m = {"unet": sp.unet(), "text_encoder": sp.text_encoder()}
    sp.diffusers_load(m, {"b": out})
    assert sp.effect_error(sp.noise(m["unet"]), ref_noise, base_noise) <= TOL
    assert sp.effect_error(sp.hidden(m["text_encoder"]), ref_hidden, base_hidden) <= TOL
    m = {"unet": sp.unet()}  # LyCORIS under transformers 5 cannot match lora_te_text_model_*: the UNet
    sp.lycoris_load_kohya_lora(m, out)
    assert sp.effect_error(sp.noise(m["unet"]), ref_noise, base_noise) <= TOL


def test_sdxl_names_te1_te2_both_ways(tmp_path):
    """SDXL: LyCORIS names the two text encoders lora_te1_ / lora_te2_; text_encoder_2 maps to lora_te2."""
    tes = [sp.text_encoder(1), sp.text_encoder(2, 16, projection=True)]
    f = sp.lycoris_file(tmp_path / "a.safetensors", {"unet": sp.unet(), "text_encoder": tes}, "locon", seed=1)
    ref = sp.hidden(tes[1])
    assert {k[:9] for k in _keys(f)} == {"lora_unet", "lora_te1_", "lora_te2_"}
    layout = _layout(unet=sp.unet(), text_encoder=sp.text_encoder(1),
                     text_encoder_2=sp.text_encoder(2, 16, projection=True))  # fmt: skip
    ad = kohya.read(f, base=layout)
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj" in ad.deltas
    assert "text_encoder.encoder.layers.1.self_attn.q_proj" in ad.deltas
    out = kohya.write(ad, tmp_path / "b.safetensors", base=layout)
    assert _keys(out) == _keys(sp.legacy_te_names(f, tmp_path / "legacy.safetensors", "lora_te1_"))
    te2 = sp.text_encoder(2, 16, projection=True)
    sp.lycoris_load_kohya_lora({"unet": sp.unet(), "text_encoder": [sp.text_encoder(1), te2]},
                               sp.legacy_te_names(out, tmp_path / "c.safetensors", "lora_te1_", undo=True))
    assert sp.effect_error(sp.hidden(te2), ref, sp.hidden(sp.text_encoder(2, 16, projection=True))) <= TOL


def test_dit_transformer_names_lora_transformer(tmp_path):
    """A DiT pipeline's transformer is lora_transformer_*: LyCORIS with that prefix is the judge."""
    import lycoris

    cls = lycoris.LycorisNetwork
    saved = (cls.LORA_PREFIX, cls.TARGET_REPLACE_MODULE, cls.TARGET_REPLACE_NAME)
    try:
        cls.apply_preset({"lora_prefix": "lora_transformer", "target_module": ["Linear", "Conv2d"]})
        dit = sp.transformer()
        net = lycoris.create_lycoris(dit, 1.0, linear_dim=4, linear_alpha=2, algo="lora")
        net.apply_to()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, p in net.named_parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        ref = sp.dit_noise(dit)
        net.save_weights(str(tmp_path / "a.safetensors"), torch.float32, {})
    finally:
        cls.LORA_PREFIX, cls.TARGET_REPLACE_MODULE, cls.TARGET_REPLACE_NAME = saved
    layout = _layout(transformer=sp.transformer())
    ad = kohya.read(tmp_path / "a.safetensors", base=layout).refine_targets(layout.modules)
    assert "transformer.transformer_blocks.0.attn.add_q_proj" in ad.deltas
    out = kohya.write(ad, tmp_path / "b.safetensors", base=layout)
    assert _keys(out) == _keys(tmp_path / "a.safetensors")
    pipe = torch.nn.ModuleDict({"transformer": sp.transformer()})
    with stacked_runtime(pipe, weighted([ad])):
        got = sp.dit_noise(pipe["transformer"])
    assert sp.effect_error(got, ref, sp.dit_noise(sp.transformer())) <= TOL


def test_kohya_to_peft_needs_the_base_and_round_trips_through_peft(tmp_path):
    """Without a base the names are kohya's, which PEFT cannot target: one line. With the text encoder as
    the base, PEFT loads the folder with LyCORIS's outputs, and back to kohya LyCORIS loads it alike."""
    from peft import PeftModel

    from merging.formats import WriteOptions
    from merging.formats import peft as fp

    m = {"unet": sp.unet(), "text_encoder": sp.text_encoder()}
    both = sp.lycoris_file(tmp_path / "both.safetensors", m, "locon", seed=1)
    ref, base = sp.hidden(m["text_encoder"]), sp.hidden(sp.text_encoder())
    te_file = tmp_path / "te.safetensors"  # the text encoder's part, in sd-scripts' names
    save_file({k: v for k, v in load_file(str(both)).items() if k.startswith("lora_te_")}, str(te_file))
    te_file = sp.legacy_te_names(te_file, te_file)
    why = r"module lora_te_text_model_encoder_layers_0_mlp_fc1 is a kohya lora_name, which PEFT cannot target"
    with pytest.raises(UnsupportedError, match=why + "; pass --base") as e:
        fp.write(kohya.read(te_file), tmp_path / "peft_nobase")
    assert "\n" not in str(e.value) and not (tmp_path / "peft_nobase").exists()
    layout = BaseLayout.from_model(sp.text_encoder())
    fp.write(kohya.read(te_file, base=layout), tmp_path / "peft")
    got = sp.hidden(PeftModel.from_pretrained(sp.text_encoder(), str(tmp_path / "peft")).eval())
    assert sp.effect_error(got, ref, base) <= TOL
    back = kohya.write(fp.read(tmp_path / "peft"), tmp_path / "back.safetensors", base=layout,
                       options=WriteOptions(prefix="lora_te"))  # fmt: skip
    assert _keys(back) == _keys(te_file)
    m = {"unet": sp.unet(), "text_encoder": sp.text_encoder()}
    sp.diffusers_load(m, {"back": back})
    assert sp.effect_error(sp.hidden(m["text_encoder"]), ref, base) <= TOL
