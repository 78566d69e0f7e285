"""kohya/LyCORIS files and llama.cpp GGUF LoRA: round trips, LyCORIS itself, llama.cpp's layout."""

from __future__ import annotations

import pytest
import torch

from merging.base.layout import BaseLayout
from merging.core.adapter import base_shapes
from merging.formats import WriteOptions, kohya
from merging.formats import gguf as fg
from merging.formats import peft as fp
from merging.runtime.stacked import stacked
from tests.support.fixtures import build_base, example_input, run
from tests.support.helpers import assert_close

KOHYA_CASES = [
    ("llama", "lora"), ("llama", "lora_rslora"), ("llama", "lora_patterns"), ("llama", "lora_dora"),
    ("llama", "loha"), ("llama", "lokr"), ("llama", "lokr_full"), ("llama", "lokr_both"), ("llama", "ia3"),
    ("conv", "lora"), ("conv", "loha"), ("conv", "loha_tucker"), ("conv", "lokr"), ("conv", "lokr_tucker"),
    ("conv", "ia3"),
]  # fmt: skip


def _dense(d, base_w):
    if hasattr(d, "magnitude") and d.magnitude is not None:
        return d.dora_dense(base_w)
    if hasattr(d, "side"):
        return d.l if hasattr(d, "l") else 1 + d.w
    return d.dense()


@pytest.mark.parametrize(("kind", "name"), KOHYA_CASES, ids=[f"{k}-{n}" for k, n in KOHYA_CASES])
def test_peft_to_kohya_to_peft_keeps_every_delta(fx, tmp_path, kind, name):
    base = fx.load_base(kind)
    shapes = base_shapes(base)
    ad = fp.read(fx.adapter(kind, name)).refine_targets(shapes)
    layout = BaseLayout.from_model(base)  # tells a PEFT IA³ on a biased output from one LyCORIS can hold
    if (kind, name) == ("conv", "ia3"):  # conv1 has a bias: PEFT scales it, LyCORIS would not
        from merging.errors import UnsupportedError

        with pytest.raises(UnsupportedError, match="conv1: PEFT's IA³ on the output scales the bias too"):
            kohya.write(ad, tmp_path / "a.safetensors", base=layout)
        return
    kohya.write(ad, tmp_path / "a.safetensors", base=layout)
    back = kohya.read(tmp_path / "a.safetensors", base=layout).refine_targets(shapes)
    assert set(back.deltas) == set(ad.deltas)
    for mod, d in ad.deltas.items():
        w = base.get_submodule(mod).weight.detach()
        assert_close(_dense(back.deltas[mod], w), _dense(d, w), rtol=1e-6, what=mod)
    fp.write(back, tmp_path / "peft", base=layout)
    x = example_input(kind)
    from peft import PeftModel

    original = run(PeftModel.from_pretrained(fx.load_base(kind), str(fx.adapter(kind, name))).eval(), kind, x)
    again = run(PeftModel.from_pretrained(fx.load_base(kind), str(tmp_path / "peft")).eval(), kind, x)
    assert_close(again, original, rtol=1e-5)


def test_kohya_names_are_kept_verbatim_without_a_base_and_metadata_round_trips(fx, tmp_path):
    ad = fp.read(fx.adapter("llama", "lora"))
    kohya.write(ad, tmp_path / "a.safetensors", options=WriteOptions(prefix="lora_te"))
    raw = kohya.read(tmp_path / "a.safetensors")
    assert "lora_te_model_layers_0_self_attn_q_proj" in raw.deltas
    raw2 = type(raw)(raw.name, raw.deltas, config={"format": "kohya", "metadata": {"ss_network_dim": "4"}})
    kohya.write(raw2, tmp_path / "b.safetensors")
    again = kohya.read(tmp_path / "b.safetensors")
    assert set(again.deltas) == set(raw.deltas) and again.config["metadata"]["ss_network_dim"] == "4"


def test_kohya_scales_follow_lycoris(tmp_path):
    """Missing alpha means α = r; LoKr with both factors full uses scale 1; IA³ stores w = l − 1."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    t = {
        "lora_unet_a.lora_down.weight": torch.randn(4, 6, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(5, 4, generator=g),
        "lora_unet_b.lora_down.weight": torch.randn(2, 6, generator=g),
        "lora_unet_b.lora_up.weight": torch.randn(5, 2, generator=g),
        "lora_unet_b.alpha": torch.tensor(0.0),
        "lora_unet_c.lokr_w1": torch.randn(2, 2, generator=g),
        "lora_unet_c.lokr_w2": torch.randn(3, 3, generator=g),
        "lora_unet_c.alpha": torch.tensor(7.0),
        "lora_unet_d.weight": torch.tensor([0.5, -0.25]),
        "lora_unet_d.on_input": torch.tensor(1),
    }
    save_file(t, str(tmp_path / "x.safetensors"))
    ad = kohya.read(tmp_path / "x.safetensors")
    assert ad.deltas["lora_unet_a"].scale == 1.0 and ad.deltas["lora_unet_b"].scale == 1.0
    assert ad.deltas["lora_unet_c"].scale == 1.0
    assert_close(
        ad.deltas["lora_unet_c"].dense(), torch.kron(t["lora_unet_c.lokr_w1"], t["lora_unet_c.lokr_w2"])
    )
    assert torch.equal(ad.deltas["lora_unet_d"].w, torch.tensor([0.5, -0.25]))
    assert ad.deltas["lora_unet_d"].side == "in"


def test_kohya_mixed_or_unknown_families_are_refused(tmp_path):
    from safetensors.torch import save_file

    from merging.errors import FormatError

    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 3), "lora_unet_a.hada_w1_a": torch.zeros(3, 2)},
              str(tmp_path / "mixed.safetensors"))  # fmt: skip
    with pytest.raises(FormatError, match="mixed.safetensors: lora_unet_a: unknown or mixed key families"):
        kohya.read(tmp_path / "mixed.safetensors")
    save_file({"lora_unet_a.oft_blocks": torch.zeros(2, 3)}, str(tmp_path / "oft.safetensors"))
    with pytest.raises(FormatError, match="unknown or mixed key families"):
        kohya.read(tmp_path / "oft.safetensors")


LYCORIS = [("lora", {}), ("loha", {}), ("lokr", {}), ("lokr", {"factor": 4, "full_matrix": True}),
           ("lokr", {"factor": 4, "decompose_both": True}), ("ia3", {}), ("full", {})]  # fmt: skip


@pytest.mark.parametrize(
    ("algo", "kw"), LYCORIS, ids=[f"{a}{'-' + '-'.join(k) if k else ''}" for a, k in LYCORIS]
)
def test_files_written_by_lycoris_load_with_lycoris_delta(tmp_path, algo, kw):
    """LyCORIS's own network forward equals our runtime on the file LyCORIS saved."""
    import lycoris
    lycoris.LycorisNetwork.apply_preset({"target_name": [".*q_proj", ".*v_proj", ".*up_proj", ".*down_proj"]})
    model = build_base("llama")
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo=algo, **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.copy_((0.005 if algo == "full" else 0.1) * torch.randn(p.shape, generator=g))
    x = example_input("llama")
    theirs = run(model, "llama", x)
    net.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {"ss_network_module": "lycoris.kohya"})
    fresh = build_base("llama")
    shapes = base_shapes(fresh)
    ad = kohya.read(tmp_path / "l.safetensors", base=BaseLayout(shapes)).refine_targets(shapes)
    base_out = run(fresh, "llama", x)
    with stacked(fresh, [(ad, 1.0)]):
        ours = run(fresh, "llama", x)
    assert (theirs - base_out).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(theirs.abs().max()))


# ---------------------------------------------------------------- GGUF


@pytest.mark.parametrize("name", ["lora", "lora_patterns", "loha", "lokr", "lora_rslora"])
@pytest.mark.parametrize(("out_type", "tol"), [("f32", 1e-6), ("f16", 1e-3), ("bf16", 1e-2)])
def test_peft_to_gguf_to_peft(fx, tmp_path, name, out_type, tol):
    layout = BaseLayout.from_folder(fx.base("llama"))
    ad = fp.read(fx.adapter("llama", name)).refine_targets(base_shapes(fx.load_base("llama")))
    fg.write(ad, tmp_path / "a.gguf", base=layout, options=WriteOptions(out_type=out_type))
    back = fg.read(tmp_path / "a.gguf", base=layout)
    for mod, d in ad.deltas.items():
        assert_close(back.deltas[mod].dense(), d.dense(), rtol=tol, what=f"{mod} {out_type}")


def test_gguf_metadata_and_layout(fx, tmp_path):
    import gguf

    layout = BaseLayout.from_folder(fx.base("llama"))
    ad = fp.read(fx.adapter("llama", "lora_patterns")).refine_targets(base_shapes(fx.load_base("llama")))
    fg.write(ad, tmp_path / "a.gguf", base=layout)
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 0.0  # mixed ranks
    shapes = {t.name: [int(s) for s in t.shape] for t in reader.tensors}
    assert shapes["blk.1.attn_v.weight.lora_a"] == [64, 6]  # ne [in, r]
    assert shapes["blk.1.attn_v.weight.lora_b"] == [6, 32]  # ne [r, out]


def test_gguf_without_base_refuses_permuted_modules(fx, tmp_path):
    from merging.errors import UnsupportedError

    layout = BaseLayout.from_folder(fx.base("llama"))
    fg.write(fp.read(fx.adapter("llama", "lora")), tmp_path / "a.gguf", base=layout)
    with pytest.raises(UnsupportedError, match="permuted by llama.cpp"):
        fg.read(tmp_path / "a.gguf")


def test_gguf_wrong_architecture_or_type(fx, tmp_path):
    from merging.errors import FormatError

    layout = BaseLayout.from_folder(fx.base("llama"))
    fg.write(fp.read(fx.adapter("llama", "lora")), tmp_path / "a.gguf", base=layout)
    other = BaseLayout({}, {"model_type": "qwen2", "num_attention_heads": 4, "num_key_value_heads": 2})
    with pytest.raises(FormatError, match="architecture 'llama', the base model is 'qwen2'"):
        fg.read(tmp_path / "a.gguf", base=other)


def test_lokr_w2_b_with_kernel_axes_reads_as_lycoris_builds_it():
    """lokr_w2_b (r, d, kh, kw), as LyCORIS's weight_gen makes it: the kernel is kept (conv2d)."""
    import lycoris.functional.lokr as lycoris_lokr

    from merging.formats import lycoris

    g = torch.Generator().manual_seed(0)
    w1, w2a = torch.randn(2, 2, generator=g), torch.randn(8, 3, generator=g)
    w2b = torch.randn(3, 4, 3, 3, generator=g)  # (r, d, kh, kw)
    ref = lycoris_lokr.diff_weight(w1, None, None, None, w2a, w2b, None, gamma=torch.tensor(1.0))  # × 1 / r
    d = lycoris.lokr_delta({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, 1 / 3)
    assert d.target.layer == "conv2d" and d.target.shape == (16, 8, 3, 3)
    assert_close(d.dense_stored(), ref)
