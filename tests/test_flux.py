"""Flux: LoRAs in BFL's names (sd-scripts' lora_unet_double_blocks_0_img_attn_qkv ...) and in diffusers'
names, on a tiny seeded Flux transformer with its CLIP-L and T5 text encoders.

Files are made by hand the way the trainers write them (sd-scripts' Flux layout: fused qkv / linear1, alpha;
diffusers' ``transformer.<path>.lora_A.weight``). The reference is diffusers stacking the inputs
(``lora_state_dict`` + ``load_lora_into_*`` + ``set_adapters``) wherever diffusers reads a file right; where
it does not (linear1 split at the full Flux widths, the top-level layers losing ``transformer.``, CLIP's
attention renamed to attention-processor keys and T5's lora_te3 dropped), the reference is the base with
each file's ΔW = α/r·up·down added to the fused weight, computed here from the raw tensors.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.base.layout import BaseLayout
from merging.core.adapter import weighted
from merging.errors import UnsupportedError
from merging.formats import diffusers_lora, kohya
from merging.merge.pipeline import merge
from tests.support import sdparts as sp

pytestmark = [pytest.mark.usefixtures("one_thread")]
logging.getLogger("diffusers").setLevel(logging.ERROR)
TOL = 1e-4
DOUBLE = "transformer.transformer_blocks.0"
SINGLE = "transformer.single_transformer_blocks.0"
CLIP, T5 = "text_encoder.text_model.encoder.layers.0", "text_encoder_2.encoder.block.0.layer.0"
# BFL name → the diffusers modules whose weights it fuses (rows in this order), for the reference
FUSED = {
    "lora_unet_double_blocks_0_img_attn_qkv": [f"{DOUBLE}.attn.to_{x}" for x in "qkv"],
    "lora_unet_double_blocks_0_txt_attn_qkv": [f"{DOUBLE}.attn.add_{x}_proj" for x in "qkv"],
    "lora_unet_double_blocks_0_img_attn_proj": [f"{DOUBLE}.attn.to_out.0"],
    "lora_unet_double_blocks_0_img_mlp_0": [f"{DOUBLE}.ff.net.0.proj"],
    "lora_unet_double_blocks_0_txt_mod_lin": [f"{DOUBLE}.norm1_context.linear"],
    "lora_unet_single_blocks_0_linear2": [f"{SINGLE}.proj_out"],
    "lora_unet_single_blocks_0_modulation_lin": [f"{SINGLE}.norm.linear"],
    "lora_te1_text_model_encoder_layers_1_mlp_fc2": ["text_encoder.text_model.encoder.layers.1.mlp.fc2"],
}  # fmt: skip
WRONG_IN_DIFFUSERS = {  # what diffusers 0.42 cannot load from a kohya Flux file on this base
    "lora_unet_single_blocks_0_linear1": [f"{SINGLE}.attn.to_{x}" for x in "qkv"] + [f"{SINGLE}.proj_mlp"],
    "lora_unet_img_in": ["transformer.x_embedder"],
    "lora_unet_time_in_in_layer": ["transformer.time_text_embed.timestep_embedder.linear_1"],
    "lora_unet_final_layer_adaLN_modulation_1": ["transformer.norm_out.linear"],  # (shift, scale) in BFL
    # CLIP attention: diffusers renames it to_q_lora (attention-processor names): unexpected keys, dropped
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": [f"{CLIP}.self_attn.q_proj"],
    "lora_te3_encoder_block_0_layer_0_SelfAttention_q": [f"{T5}.SelfAttention.q"],
}  # fmt: skip


def bfl_file(path, table, seed, rank=4, alpha=2.0, scale=0.3):
    """A kohya Flux LoRA by hand in sd-scripts' layout: one LoRA per BFL module, fused rows, alpha ≠ rank."""
    return sp.fused_file(path, sp.flux_parts(), table, seed, "networks.lora_flux", rank, alpha, scale)


def diffusers_file(path, modules, seed, rank=3, scale=0.3):
    """A LoRA in diffusers' names (as save_lora_weights / ai-toolkit write it), no alpha (scale 1)."""
    return sp.diffusers_named_file(path, sp.flux_parts(), modules, seed, rank, scale)


def added_by_hand(files_tables) -> dict:
    """Flux parts with each BFL file's ΔW = α/r·up·down added to its fused weight (the weight-space truth);
    BFL's final adaLN holds (shift, scale), diffusers' (scale, shift)."""
    return sp.added_by_hand(sp.flux_parts(), files_tables, ("adaLN_modulation_1",))


def _error(parts, ref, base) -> float:
    return sp.effect_error(sp.flux_noise(parts), ref, base)


@pytest.fixture(scope="module")
def flux_base():
    return sp.flux_noise(sp.flux_parts())


@pytest.fixture(scope="module")
def layout():
    return BaseLayout.from_components(sp.flux_parts())


def _merged(files, layout, strategy="cat"):
    ads = [kohya.read(f, base=layout).refine_targets(layout.modules) for f in files]
    result = merge(weighted(ads), strategy)
    assert len(result.adapters) == 1
    return result.adapters[0]


def test_bfl_and_diffusers_named_loras_merged_with_cat_match_diffusers_stacking_them(tmp_path, layout, flux_base):  # noqa: E501
    """The done test: a kohya/BFL file (fused qkv, CLIP lora_te1_) and a diffusers-named one, merged with
    cat, written in BFL names and in diffusers names: diffusers loads each like the two inputs it stacks."""
    bfl = bfl_file(tmp_path / "bfl.safetensors", FUSED, seed=1)
    mods = [f"{DOUBLE}.attn.to_q", f"{DOUBLE}.attn.add_v_proj", f"{DOUBLE}.ff.net.2", f"{SINGLE}.proj_out"]
    dif = diffusers_file(tmp_path / "dif.safetensors", mods, seed=2)
    ref = sp.flux_parts()
    sp.diffusers_flux_load(ref, {"bfl": bfl, "dif": dif})
    stacked = sp.flux_noise(ref)
    assert _error(added_by_hand([(bfl, FUSED)]), sp.flux_noise(_only(bfl)), flux_base) <= TOL  # read right
    merged = _merged([bfl, dif], layout)
    assert merged.deltas[f"{DOUBLE}.attn.to_k"].b.shape == (16, 4)  # B's row block, A shared
    out = kohya.write(merged, tmp_path / "merged.safetensors", base=layout)
    keys = {k.split(".")[0] for k in load_file(str(out))}
    assert keys == set(FUSED) | {"lora_unet_double_blocks_0_img_mlp_2"}
    down = load_file(str(out))["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert down.shape == (4 + 3, 16)  # the bfl A that q, k, v share written once, the dif rows of q added
    for file in (out, diffusers_lora.write(merged.deltas, tmp_path / "merged_d.safetensors", layout)):
        got = sp.flux_parts()
        sp.diffusers_flux_load(got, {"merged": file})
        assert _error(got, stacked, flux_base) <= TOL, file.name


def _only(file):
    parts = sp.flux_parts()
    sp.diffusers_flux_load(parts, {"x": file})
    return parts


def test_linear1_top_level_layers_and_t5_where_diffusers_is_wrong(tmp_path, layout, flux_base):
    """diffusers 0.42 splits linear1 at the full Flux widths (an AssertionError here), drops the top-level
    layers (its keys lose ``transformer.``), CLIP's attention (renamed to_q_lora) and T5's lora_te3_. The
    reference is the base with ΔW added; our reading, merged and written in diffusers names, loads in
    diffusers and matches it."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers as convert

    table = FUSED | WRONG_IN_DIFFUSERS
    files = [bfl_file(tmp_path / f"{i}.safetensors", table, seed=i, rank=2 + i, alpha=3.0) for i in (1, 2)]
    with pytest.raises(AssertionError):
        convert(load_file(str(files[0])))
    top = {k: v for k, v in load_file(str(files[0])).items() if "img_in" in k or "te1" in k}
    assert "x_embedder.lora_A.weight" in convert(top)  # not transformer.x_embedder: never injected
    ref = sp.flux_noise(added_by_hand([(f, table) for f in files]))
    merged = _merged(files, layout)
    out = diffusers_lora.write(merged.deltas, tmp_path / "merged.safetensors", layout)
    got = sp.flux_parts()
    sp.diffusers_flux_load(got, {"merged": out})  # diffusers loads text_encoder (CLIP) only: T5 by hand
    te3 = {m: d for m, d in merged.deltas.items() if m.startswith("text_encoder_2.")}
    assert set(te3) == {"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"}
    with torch.no_grad():
        for m, d in te3.items():
            got["text_encoder_2"].get_submodule(m.partition(".")[2]).weight += d.dense()
    assert _error(got, ref, flux_base) <= TOL


@pytest.mark.parametrize("strategy", [None, "cat"])
def test_bfl_names_round_trip_exactly_with_the_shared_a_written_once(tmp_path, layout, flux_base, strategy):
    """Read splits qkv / linear1 into LoRAs sharing one A; written back (as read, or merged alone with cat)
    the shared A is stacked once: the same keys, ranks and ΔW per BFL module, and diffusers loads the
    written file (on the modules it reads right) to the same forward as the input."""
    table = FUSED | WRONG_IN_DIFFUSERS
    src = bfl_file(tmp_path / "a.safetensors", table, seed=3)
    ad = kohya.read(src, base=layout).refine_targets(layout.modules)
    ad = _merged([src], layout, strategy) if strategy else ad
    out = kohya.write(ad, tmp_path / "b.safetensors", base=layout)
    a, b = load_file(str(src)), load_file(str(out))
    assert set(a) == set(b)
    for name in table:
        assert b[f"{name}.lora_down.weight"].shape == a[f"{name}.lora_down.weight"].shape, name  # rank 4
        torch.testing.assert_close(sp.kohya_dw(b, name), sp.kohya_dw(a, name), rtol=1e-5, atol=1e-7)
    read_right = [tmp_path / "a_ok.safetensors", tmp_path / "b_ok.safetensors"]
    for f, t in zip(read_right, (a, b), strict=True):
        save_file({k: v for k, v in t.items() if k.split(".")[0] in FUSED}, str(f))
    assert _error(_only(read_right[1]), sp.flux_noise(_only(read_right[0])), flux_base) <= 1e-5


def test_split_loras_with_different_a_fuse_block_diagonally(tmp_path, layout):
    """q, k, v with their own A's (a diffusers-named file) written in BFL names: one qkv LoRA whose rank is
    the sum (B block-diagonal), the same ΔW per row block."""
    mods = [f"{DOUBLE}.attn.to_{x}" for x in "qkv"]
    dif = diffusers_file(tmp_path / "d.safetensors", mods, seed=4)
    out = kohya.write(kohya.read(dif, base=layout), tmp_path / "bfl.safetensors", base=layout)
    t, d = load_file(str(out)), load_file(str(dif))
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert t[f"{name}.lora_down.weight"].shape == (3 * 3, 16)
    want = torch.cat([d[f"{m}.lora_B.weight"] @ d[f"{m}.lora_A.weight"] for m in mods])
    torch.testing.assert_close(sp.kohya_dw(t, name), want, rtol=1e-5, atol=1e-7)


def _lokr_file(path, w1_rows):
    """A LyCORIS-style LoKr on the fused img_attn_qkv (48 rows): W1 (w1_rows, 2), W2 (48 / w1_rows, 8)."""
    g = torch.Generator().manual_seed(5)
    b = 48 // w1_rows
    save_file({
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": 0.3 * torch.randn(w1_rows, 2, generator=g),
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": 0.3 * torch.randn(b, 8, generator=g),
    }, str(path))  # fmt: skip
    return path


def test_lokr_on_fused_qkv_splits_where_exact_and_refuses_in_one_line_elsewhere(tmp_path, layout):
    ok = _lokr_file(tmp_path / "ok.safetensors", 6)  # W2 has 8 rows: q/k/v are 2 of W1's rows each
    t = load_file(str(ok))
    full = torch.kron(*(t[f"lora_unet_double_blocks_0_img_attn_qkv.lokr_w{i}"] for i in (1, 2)))  # (48, 16)
    ad = kohya.read(ok, base=layout)
    for i, x in enumerate("qkv"):
        torch.testing.assert_close(ad.deltas[f"{DOUBLE}.attn.to_{x}"].dense(), full[16 * i : 16 * (i + 1)])
    bad = _lokr_file(tmp_path / "bad.safetensors", 4)  # W2 has 12 rows: 16 is not whole blocks
    why = r"lora_unet_double_blocks_0_img_attn_qkv: a LoKr whose W2 has 12 rows does not split at the fused"
    with pytest.raises(UnsupportedError, match=why + r" rows \[\(0, 16\)\]") as e:
        kohya.read(bad, base=layout)
    assert "\n" not in str(e.value)


def test_loha_on_fused_linear1_splits_exactly(tmp_path, layout):
    g = torch.Generator().manual_seed(6)
    name = "lora_unet_single_blocks_0_linear1"
    parts = {"hada_w1_a": (112, 2), "hada_w1_b": (2, 16), "hada_w2_a": (112, 2), "hada_w2_b": (2, 16)}
    t = {f"{name}.{k}": 0.3 * torch.randn(*s, generator=g) for k, s in parts.items()}
    t[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(t, str(tmp_path / "loha.safetensors"))
    w1, w2 = (t[f"{name}.hada_w{i}_a"] @ t[f"{name}.hada_w{i}_b"] for i in (1, 2))
    full = 0.5 * w1 * w2  # α / r = 1 / 2
    ad = kohya.read(tmp_path / "loha.safetensors", base=layout)
    torch.testing.assert_close(ad.deltas[f"{SINGLE}.proj_mlp"].dense(), full[48:])
    torch.testing.assert_close(ad.deltas[f"{SINGLE}.attn.to_v"].dense(), full[32:48])
    out = kohya.write(ad.refine_targets(layout.modules), tmp_path / "back.safetensors", base=layout)
    b = load_file(str(out))  # fused back as one LoRA (each part's exact Khatri-Rao form): the same ΔW
    back = float(b[f"{name}.alpha"]) / b[f"{name}.lora_down.weight"].shape[0]
    torch.testing.assert_close(back * b[f"{name}.lora_up.weight"] @ b[f"{name}.lora_down.weight"], full)


def _cli(*args):
    from click.testing import CliRunner
    from merging_cli.main import cli

    return CliRunner(env={"COLUMNS": "250"}).invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    return sp.pipeline_folder(tmp_path_factory.mktemp("flux") / "pipe", sp.flux_parts(), "FluxPipeline")


def test_verify_on_a_flux_pipeline_with_diffusers_stacking_the_inputs(tmp_path, flux_pipe):
    """verify --base <Flux pipeline>: noise prediction fed by the adapted CLIP and T5; diffusers stacks the
    two diffusers-named inputs (T5 through PEFT, as under diffusers); cat passes, a wrong merge fails."""
    mods = [f"{DOUBLE}.attn.to_q", f"{SINGLE}.proj_mlp", "transformer.x_embedder", f"{CLIP}.self_attn.v_proj",
            f"{T5}.SelfAttention.q"]  # fmt: skip
    files = [diffusers_file(tmp_path / f"{i}.safetensors", mods[i - 1 :], seed=i) for i in (1, 2)]
    result = _cli("verify", *files, "--base", flux_pipe, "-s", "cat", "-s", "svd", "--rank", "2")
    assert result.exit_code == 0, result.output
    assert "diffusers (set_adapters)" in result.output and "diffusers (diffusers-named file)" in result.output
    assert result.output.count("PASS") == 1 and "info" in result.output
    shown = _cli("inspect", files[0], "--modules")  # without a base: diffusers' names kept as module paths
    assert shown.exit_code == 0 and "transformer.x_embedder" in shown.output, shown.output
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: 2 * v if "lora_B" in k else v for k, v in load_file(str(files[0])).items()}, str(wrong))
    layout = BaseLayout.from_folder(flux_pipe)
    merged = merge(weighted([kohya.read(f, base=layout) for f in (wrong, files[1])]), "cat")
    out = kohya.write(merged.adapters[0], tmp_path / "merged.safetensors", base=layout,
                      provenance={"strategy": "cat"})  # fmt: skip
    result = _cli("verify", *files, "--base", flux_pipe, "--merged", out)
    assert result.exit_code == 1 and "FAIL" in result.output, result.output


def test_verify_on_flux_with_a_bfl_file_diffusers_cannot_load_names_the_reason(tmp_path, flux_pipe):
    """diffusers fails on linear1 (the reason is the row's reference) or silently drops img_in (found by
    comparing the modules it injected with the modules we read): ΔW added is the reference then."""
    table = FUSED | WRONG_IN_DIFFUSERS
    files = [bfl_file(tmp_path / f"{i}.safetensors", table, seed=i) for i in (1, 2)]
    result = _cli("verify", *files, "--base", flux_pipe, "-s", "cat")
    assert result.exit_code == 0 and "PASS" in result.output, result.output
    assert "merging.runtime (ΔW added; diffusers cannot load these files: AssertionError" in result.output
    top = FUSED | {"lora_unet_img_in": ["transformer.x_embedder"]}
    files = [bfl_file(tmp_path / f"t{i}.safetensors", top, seed=i) for i in (1, 2)]
    result = _cli("verify", *files, "--base", flux_pipe, "-s", "cat")
    assert result.exit_code == 0 and "PASS" in result.output, result.output
    assert "diffusers drops 1 modules of t1.safetensors, e.g. transformer.x_embedder" in result.output


def test_bake_a_flux_pipeline_loads_with_from_pretrained_and_equals_diffusers_fusing_the_loras(tmp_path, flux_pipe):  # noqa: E501
    """bake --base <pipeline>: the transformer and CLIP get the two inputs folded in, T5 (untouched) and
    model_index.json are hard-linked; each baked component loads with from_pretrained and the noise equals
    diffusers' fuse_lora of the same files (the transformer; CLIP keeps PEFT's layers, which have no fuse)."""
    import os

    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    mods = [f"{DOUBLE}.attn.to_q", f"{SINGLE}.proj_mlp", "transformer.norm_out.linear",
            f"{CLIP}.self_attn.v_proj"]  # fmt: skip
    files = [diffusers_file(tmp_path / f"{i}.safetensors", mods[i - 1 :], seed=i) for i in (1, 2)]
    out = tmp_path / "baked"
    result = _cli("bake", *files, "--base", flux_pipe, "-o", out)
    assert result.exit_code == 0, result.output
    t5 = "text_encoder_2/model.safetensors"
    assert os.path.samefile(out / t5, flux_pipe / t5)
    assert os.path.samefile(out / "model_index.json", flux_pipe / "model_index.json")
    classes = {"transformer": FluxTransformer2DModel, "text_encoder": CLIPTextModel,
               "text_encoder_2": T5EncoderModel}  # fmt: skip
    baked = {c: cls.from_pretrained(str(out / c)).eval() for c, cls in classes.items()}
    ref = sp.flux_parts()
    sp.diffusers_flux_load(ref, {"a": files[0], "b": files[1]})
    for m in ref.values():
        if hasattr(m, "fuse_lora"):
            m.fuse_lora()
    assert sp.effect_error(sp.flux_noise(baked), sp.flux_noise(ref), sp.flux_noise(sp.flux_parts())) <= TOL
    again = _cli("bake", *files, "--base", flux_pipe, "-o", out)
    assert again.exit_code == 2 and "--force" in again.output
    one = _cli("bake", *files, "--base", flux_pipe, "-o", tmp_path / "one.safetensors", "--single-file")
    assert one.exit_code != 0 and "writes SD1.5/SDXL/SD3 files" in one.output, one.output
    assert "bake a folder" in one.output
    assert not (tmp_path / "one.safetensors").exists()


def test_compare_on_a_flux_pipeline_writes_a_report_with_fidelity_per_component(tmp_path, flux_pipe):
    """compare --base <pipeline>: cat exact (cosine 1) on the transformer and both text encoders, svd at
    rank 1 < the sum's rank measurably off; report.json/.md and the LLM report's plots per component."""
    import json

    mods = [f"{DOUBLE}.attn.to_q", f"{SINGLE}.proj_mlp", f"{CLIP}.self_attn.v_proj", f"{T5}.SelfAttention.q"]
    files = [diffusers_file(tmp_path / f"{i}.safetensors", mods[i - 1 :], seed=i) for i in (1, 2)]
    out = tmp_path / "report"
    result = _cli("compare", *files, "--base", flux_pipe, "-s", "cat,svd", "--ranks", "1,6", "-o", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    rows = {r["label"]: r for r in doc["rows"]}
    assert set(rows) == {"cat", "svd r=1", "svd r=6"} and doc["reference"] == "diffusers (set_adapters)"
    assert set(rows["cat"]["errors"]) == {"transformer", "text_encoder", "text_encoder_2"}
    assert rows["cat"]["effect_rel_error"] <= TOL and min(rows["cat"]["cosines"].values()) > 1 - 1e-8
    assert rows["svd r=6"]["effect_rel_error"] <= TOL  # rank 6 = the sum's rank on every module
    assert rows["svd r=1"]["effect_rel_error"] > 1e-2
    assert (out / "report.md").is_file()
    comps = ("transformer", "text_encoder", "text_encoder_2")
    kinds = ("fidelity_vs_rank", "size_vs_fidelity", "per_layer_error")
    drawn = {f"{p}_{c}.png" for p in kinds for c in comps}
    assert set(doc["plots"]) == drawn and all((out / p).is_file() for p in drawn)
    assert rows["svd r=1"]["module_errors"][f"{DOUBLE}.attn.to_q"] > 1e-2  # rank 6 → 1 on to_q
