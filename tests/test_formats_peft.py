"""PEFT folders: our deltas equal PEFT's own merge, round trips are exact, bad folders fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from merging.core.adapter import Adapter, base_shapes
from merging.core.deltas import AdditiveDelta, LowRank, ModuleReplacement, Scale, Target, TokenRows
from merging.errors import FormatError, MergingError, NonFiniteError, ShapeMismatch
from merging.formats import peft as fp
from tests.support.fixtures import ADAPTERS, example_input, run
from tests.support.helpers import assert_close, rewrite_tensors

IDS = [f"{k}-{n}" for k, n in ADAPTERS]


def _peft_merged(fx, kind, name) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(fx.load_base(kind), str(fx.adapter(kind, name)))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def _expected_weight(d, w0: torch.Tensor, target_layer: str, base_w: torch.Tensor) -> torch.Tensor:
    """What our delta says the merged stored weight is."""
    if isinstance(d, Scale):
        m = base_w.T if target_layer == "gpt2_conv1d" else base_w.reshape(base_w.shape[0], -1)
        folded = d.fold(m.float())
        return folded.T if target_layer == "gpt2_conv1d" else folded.reshape(base_w.shape)
    if isinstance(d, LowRank) and d.magnitude is not None:
        return w0 + d.target.to_stored(d.dora_dense(w0))
    return w0 + d.dense_stored()


@pytest.mark.parametrize(("kind", "name"), ADAPTERS, ids=IDS)
def test_dense_equals_peft_merge(fx, kind, name):
    """For every fixture and module: our ΔW (or merged weight) equals PEFT's merge_and_unload."""
    if kind == "llama_tied":
        pytest.skip(
            "PEFT's merge adds a tied delta twice to the shared weight; see test_tied_delta_applies_to_both"
        )
    base = fx.load_base(kind)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    shapes = base_shapes(base)
    after = _peft_merged(fx, kind, name)
    ad = fp.read(fx.adapter(kind, name)).refine_targets(shapes)
    assert ad.deltas
    modules = dict(ad.deltas) | {m: ad.deltas[src] for m, src in ad.tied.items()}
    for mod, d in modules.items():
        w0 = before[f"{mod}.weight"]
        layer = shapes[mod][0]
        expected = _expected_weight(d, w0, layer, w0)
        assert_close(expected, after[f"{mod}.weight"], what=f"{kind}/{name} {mod}")
        assert (expected - w0).abs().max() > 1e-6, f"{mod}: delta is zero"
        if isinstance(d, LowRank) and d.bias is not None:
            assert_close(before[f"{mod}.bias"] + d.scale * d.bias, after[f"{mod}.bias"], what=f"{mod} bias")
        if isinstance(d, Scale) and d.side == "out" and f"{mod}.bias" in before:
            assert_close(before[f"{mod}.bias"] * d.l, after[f"{mod}.bias"], what=f"{mod} bias")
    for mod, a in ad.aux.items():
        if isinstance(a, ModuleReplacement):
            for k, v in a.tensors.items():
                assert torch.equal(after[f"{mod}.{k}"], v)
        elif isinstance(a, TokenRows):
            w = after[f"{mod}.weight"]
            assert torch.equal(w[list(a.indices)], a.rows)


def test_tied_delta_applies_to_both(fx):
    """A tied embedding/lm_head LoRA is one delta, applied once on each side (PEFT's unmerged forward)."""
    from peft import PeftModel

    ad = fp.read(fx.adapter("llama_tied", "lora_tied"))
    assert dict(ad.tied) == {"lm_head": "model.embed_tokens"}
    x = example_input("llama_tied")
    peft_out = run(
        PeftModel.from_pretrained(fx.load_base("llama_tied"), str(fx.adapter("llama_tied", "lora_tied"))),
        "llama_tied",
        x,
    )
    model = fx.load_base("llama_tied")
    model.lm_head.weight = torch.nn.Parameter(
        model.lm_head.weight.detach().clone()
    )  # untie, then add once each
    ad = ad.refine_targets(base_shapes(model))
    with torch.no_grad():
        for mod, d in list(ad.deltas.items()) + [(m, ad.deltas[s]) for m, s in ad.tied.items()]:
            model.get_submodule(mod).weight += d.dense_stored()
    assert_close(run(model, "llama_tied", x), peft_out, rtol=1e-5, what="tied")


@pytest.mark.parametrize(("kind", "name"), ADAPTERS, ids=IDS)
def test_low_rank_and_apply_are_exact(fx, kind, name):
    ad = fp.read(fx.adapter(kind, name)).refine_targets(base_shapes(fx.load_base(kind)))
    for mod, d in ad.deltas.items():
        if not isinstance(d, AdditiveDelta) or (isinstance(d, LowRank) and d.magnitude is not None):
            continue
        dense = d.dense()
        lr = d.low_rank()
        assert_close(lr.dense(), dense, what=f"{mod} low_rank")
        assert abs(d.norm() - float(dense.double().norm())) <= 1e-5 * float(dense.norm())
        if d.target.layer == "embedding":
            ids = torch.tensor([[1, 3, 5], [7, 0, 127]])
            assert_close(d.apply(ids), dense[ids], what=f"{mod} apply")
        else:
            x = torch.randn(3, dense.shape[1])
            assert_close(d.apply(x), x @ dense.T, what=f"{mod} apply")


def test_low_rank_ranks_meet_the_bounds(fx):
    loha = fp.read(fx.adapter("llama", "loha"))
    for d in loha.deltas.values():
        r1, r2 = d.w1a.shape[1], d.w2a.shape[1]
        assert d.low_rank().rank == r1 * r2
        assert torch.linalg.matrix_rank(d.dense().double(), rtol=1e-5) == r1 * r2
    lokr = fp.read(fx.adapter("llama", "lokr"))
    for d in lokr.deltas.values():
        r1 = int(torch.linalg.matrix_rank(d.matrix1().double(), rtol=1e-5))
        w2 = d.raw2()
        r2 = int(torch.linalg.matrix_rank(w2.reshape(w2.shape[0], -1).double(), rtol=1e-5))
        assert d.low_rank().rank == r1 * r2


def test_scales_follow_peft(fx):
    """rslora α/√r, patterns override per module (PEFT's (.*\\.)?key$ match)."""
    rs = fp.read(fx.adapter("llama", "lora_rslora"))
    assert all(d.scale == pytest.approx(8 / 2) for d in rs.deltas.values())
    pat = fp.read(fx.adapter("llama", "lora_patterns")).deltas
    assert pat["model.layers.0.self_attn.q_proj"].rank == 2
    assert pat["model.layers.0.self_attn.q_proj"].scale == pytest.approx(8 / 2)
    assert pat["model.layers.1.self_attn.v_proj"].rank == 6
    assert pat["model.layers.1.self_attn.v_proj"].scale == pytest.approx(3 / 6)
    assert pat["model.layers.0.self_attn.v_proj"].scale == pytest.approx(3 / 4)
    assert pat["model.layers.0.mlp.gate_proj"].scale == pytest.approx(16 / 4)


@pytest.mark.parametrize(("kind", "name"), ADAPTERS, ids=IDS)
def test_round_trip_read_write_read(fx, kind, name, tmp_path):
    ad = fp.read(fx.adapter(kind, name))
    fp.write(ad, tmp_path / "out")
    again = fp.read(tmp_path / "out")
    assert set(again.deltas) == set(ad.deltas) and dict(again.tied) == dict(ad.tied)
    for mod, d in ad.deltas.items():
        e = again.deltas[mod]
        assert type(e) is type(d)
        if isinstance(d, Scale):
            assert torch.equal(d.l, e.l) and d.side == e.side
            continue
        assert e.scale == pytest.approx(d.scale, rel=1e-12)
        assert e.target == d.target
        assert torch.equal(d.low_rank().b, e.low_rank().b) and torch.equal(d.low_rank().a, e.low_rank().a)
    assert set(again.aux) == set(ad.aux)


@pytest.mark.parametrize(("kind", "name"), ADAPTERS, ids=IDS)
def test_written_folder_loads_in_peft_with_same_outputs(fx, kind, name, tmp_path):
    from peft import PeftModel

    fp.write(fp.read(fx.adapter(kind, name)), tmp_path / "out")
    x = example_input(kind)
    original = run(PeftModel.from_pretrained(fx.load_base(kind), str(fx.adapter(kind, name))).eval(), kind, x)
    ours = run(PeftModel.from_pretrained(fx.load_base(kind), str(tmp_path / "out")).eval(), kind, x)
    assert_close(ours, original, what=f"{kind}/{name}")


def test_mixed_ranks_written_by_us_reload_in_peft(fx, tmp_path):
    """A LoRA whose modules have different ranks and scales (as svd/cat produce) reloads exactly."""
    from peft import PeftModel

    base = fx.load_base("llama")
    shapes = base_shapes(base)
    g = torch.Generator().manual_seed(3)
    deltas = {}
    for i, mod in enumerate(["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]):
        out, inf = shapes[mod][1]
        r = 3 + 4 * i
        b, a = 0.1 * torch.randn(out, r, generator=g), 0.1 * torch.randn(r, inf, generator=g)
        deltas[mod] = LowRank(b, a, 0.7 + i, Target("linear", (out, inf)))
    ad = Adapter("mixed", deltas)
    fp.write(ad, tmp_path / "mixed")
    model = PeftModel.from_pretrained(fx.load_base("llama"), str(tmp_path / "mixed")).merge_and_unload()
    after = model.state_dict()
    before = base.state_dict()
    for mod, d in deltas.items():
        assert_close(after[f"{mod}.weight"] - before[f"{mod}.weight"], d.dense(), rtol=1e-5, what=mod)


def test_lora_bin_loads_weights_only(fx):
    ad = fp.read(fx.adapter("llama", "lora_bin"))
    assert ad.kinds == {"lora"} and len(ad.deltas) == 2


# ------------------------------------------------------------------------------ bad folders


def _copy(fx, tmp_path, kind="llama", name="lora"):
    dst = tmp_path / name
    shutil.copytree(fx.adapter(kind, name), dst)
    return dst


def test_missing_config(fx, tmp_path):
    d = _copy(fx, tmp_path)
    (d / "adapter_config.json").unlink()
    with pytest.raises(FormatError, match=r"no adapter_config.json"):
        fp.read(d)


def test_unknown_peft_type(fx, tmp_path):
    d = _copy(fx, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "VERA"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"adapter_config.json: unknown peft_type 'VERA'"):
        fp.read(d)


def test_truncated_safetensors(fx, tmp_path):
    d = _copy(fx, tmp_path)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(FormatError, match=str(f)):
        fp.read(d)


def test_wrong_shape_names_file_and_module(fx, tmp_path):
    d = _copy(fx, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    f = rewrite_tensors(d, lambda t: t.__setitem__(key, torch.zeros(64, 3)))
    with pytest.raises(ShapeMismatch) as e:
        fp.read(d)
    assert str(f) in str(e.value) and "model.layers.0.self_attn.q_proj" in str(e.value)


def test_delta_that_does_not_fit_the_base(fx, tmp_path):
    d = _copy(fx, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    rewrite_tensors(d, lambda t: t.__setitem__(key, torch.zeros(60, 4)))
    with pytest.raises(
        ShapeMismatch, match=r"module model.layers.0.self_attn.q_proj: .*\(60, 64\).*\(64, 64\)"
    ):
        fp.read(d).refine_targets(base_shapes(fx.load_base("llama")))


def test_unknown_key(fx, tmp_path):
    d = _copy(fx, tmp_path)
    rewrite_tensors(
        d, lambda t: t.__setitem__("base_model.model.model.layers.0.mystery.lora_C", torch.zeros(2))
    )
    with pytest.raises(FormatError, match=r"unknown key 'base_model.model.model.layers.0.mystery.lora_C'"):
        fp.read(d)


def test_nonfinite_refused_unless_allowed(fx, tmp_path):
    d = _copy(fx, tmp_path)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"

    def poison(t):
        t[key][0, 0] = float("nan")

    rewrite_tensors(d, poison)
    with pytest.raises(NonFiniteError, match="up_proj.lora_A"):
        fp.read(d)
    assert fp.read(d, allow_nonfinite=True).deltas


def test_shape_mismatch_against_base(fx):
    ad = fp.read(fx.adapter("llama", "lora"))
    with pytest.raises(ShapeMismatch, match="not in the base model"):
        ad.refine_targets(base_shapes(fx.load_base("gpt2")))


def test_write_refuses_existing_output(fx, tmp_path):
    ad = fp.read(fx.adapter("llama", "lora"))
    fp.write(ad, tmp_path / "o")
    with pytest.raises(MergingError, match="already exists"):
        fp.write(ad, tmp_path / "o")
    fp.write(ad, tmp_path / "o", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.parametrize(
    "ff", [["4h_to_h"], ["down_proj"], ["mlp.fc2"], ["fc2"], r"gpt_neox\.layers\.\d+\.mlp\.dense_4h_to_h", []]
)
def test_ia3_feedforward_matching_is_peft_s(ff):
    """IA³'s input side is decided by PEFT's own rule (plain suffixes, or a full-name regex)."""
    from peft import IA3Config
    from peft.tuners.ia3 import IA3Model

    from merging.formats.peft.config import is_feedforward

    config = IA3Config(target_modules=ff or ["x"], feedforward_modules=ff)
    keys = ["gpt_neox.layers.0.mlp.dense_4h_to_h", "gpt_neox.layers.0.mlp.dense_h_to_4h",
            "model.layers.3.mlp.down_proj", "model.decoder.layers.1.fc2",
            "model.decoder.layers.1.mlp.fc2"]  # fmt: skip
    for key in keys:
        assert is_feedforward({"feedforward_modules": ff}, key) == IA3Model._check_target_module_feedforward(
            config, key
        ), key


def test_same_base_folder_however_written(tmp_path):
    from merging.core.adapter import Adapter, align

    (tmp_path / "base").mkdir()
    d = LowRank(torch.ones(2, 1), torch.ones(1, 3), 1.0, Target("linear", (2, 3)))
    a = Adapter("a", {"m": d}, base_model=str(tmp_path / "base"))
    b = Adapter("b", {"m": d}, base_model=str(tmp_path / "base") + "/")
    c = Adapter("c", {"m": d}, base_model=str(tmp_path / "other"))
    assert align([a, b]) == ["m"]
    with pytest.raises(MergingError, match="different base models"):
        align([a, c])


def test_one_hub_id_at_two_revisions_is_two_bases():
    from merging.core.adapter import Adapter, align

    d = LowRank(torch.ones(2, 1), torch.ones(1, 3), 1.0, Target("linear", (2, 3)))
    a = Adapter("a", {"m": d}, base_model="org/model", revision="abc123")
    b = Adapter("b", {"m": d}, base_model="org/model", revision="def456")
    c = Adapter("c", {"m": d}, base_model="org/model")  # no revision given: not a conflict
    assert align([a, c]) == ["m"]
    with pytest.raises(MergingError, match="different revisions"):
        align([a, b])


def test_writer_checks_each_tensor_against_what_peft_builds(tmp_path):
    """Before any file is written: with the base, a LoRA of unknown layer kind takes the module's (a conv's
    kernel), and a delta or IA³ vector that does not fit the module is refused in one line naming both."""
    from merging.base.layout import BaseLayout

    layout = BaseLayout({"conv": ("conv2d", (4, 2, 3, 3)), "lin": ("linear", (4, 5))})
    unknown = LowRank(torch.ones(4, 1), torch.ones(1, 18), 1.0, Target("unknown", (4, 18)))
    out = fp.write(
        Adapter("mine", {"conv": unknown}), tmp_path / "o", base=layout
    )  # the base gives the kernel
    saved = fp.read(out).deltas["conv"]
    assert saved.target == Target("conv2d", (4, 2, 3, 3)) and torch.equal(saved.a, unknown.a)
    wrong = LowRank(torch.ones(4, 1), torch.ones(1, 6), 1.0, Target("linear", (4, 6)))
    with pytest.raises(ShapeMismatch, match=r"module lin: .*\(4, 6\).*\(4, 5\); PEFT would not load it"):
        fp.write(Adapter("mine", {"lin": wrong}), tmp_path / "w", base=layout)
    ia3 = Scale(torch.ones(3), "out", "linear")
    with pytest.raises(ShapeMismatch, match=r"module lin: an IA³ vector of 3 values, .* 4 \(output side\)"):
        fp.write(Adapter("mine", {"lin": ia3}), tmp_path / "w", base=layout)
    assert not (tmp_path / "w").exists()


def test_conv_layouts_are_peft_s():
    """Conv3d LoRA factors and IA³ vectors in the shapes PEFT's layers hold (Conv3d: (1, n, 1, 1, 1))."""
    from merging.formats.peft.write import _ia3_tensors, _lora_tensors

    d = LowRank(torch.ones(10, 2), torch.ones(2, 5 * 27), 1.0, Target("conv3d", (10, 5, 3, 3, 3)))
    shapes = {k.rsplit(".", 2)[-2]: tuple(v.shape) for k, v in _lora_tensors("m", d).items()}
    assert shapes == {"lora_A": (2, 5, 3, 3, 3), "lora_B": (10, 2, 1, 1, 1)}
    for side in ("in", "out"):
        (v,) = _ia3_tensors("m", Scale(torch.ones(10), side, "conv3d")).values()
        assert tuple(v.shape) == (1, 10, 1, 1, 1)
    grouped = _lora_tensors("m", LowRank(torch.ones(8, 2), torch.ones(2, 4 * 9), 1.0,
                                         Target("conv2d", (8, 4, 3, 3))), groups=2)  # fmt: skip
    a = grouped["base_model.model.m.lora_A.weight"]
    assert tuple(a.shape) == (4, 8, 3, 3)  # groups·r rows over all input channels, PEFT's lora_A
    assert a[:2, 4:].abs().sum() == 0 and a[2:, :4].abs().sum() == 0  # group j's rows read group j only


def test_issue_36_messages_are_one_line_saying_what_works(fx, tmp_path):
    from merging_cli.inspect import config_text

    from merging.base.layout import BaseLayout
    from merging.formats.sources import load_inputs

    (tmp_path / "a").mkdir()  # adapter weights without their config
    shutil.copy(fx.adapter("llama", "lora") / fp.WEIGHTS, tmp_path / "a")
    with pytest.raises(MergingError, match="not an adapter: its weights but no adapter_config.json") as e:
        load_inputs([str(tmp_path / "a")])
    (tmp_path / "b").mkdir()  # a model_type transformers does not know
    (tmp_path / "b" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(
        MergingError, match=r"not a transformers model folder .* --base model.safetensors"
    ) as f:
        BaseLayout.from_folder(tmp_path / "b")
    assert "\n" not in str(e.value) + str(f.value)
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(40) for p in ("q_proj", "v_proj")]
    assert config_text(modules) == "80 entries (q_proj, v_proj)"
    assert (
        config_text(dict.fromkeys(modules[:60], 4) | {modules[-1]: 16})
        == "61 modules (q_proj, v_proj), values 4–16"
    )
    assert config_text(modules, full=True).count("q_proj") == 40 and config_text(["q_proj"]) == "q_proj"


def test_a_saved_head_of_another_size_than_the_base_is_one_line(tmp_path):
    """A SEQ_CLS adapter trained with num_labels=5 saves its classifier whole; on a base with 3 labels PEFT
    cannot load it, and verify/merge say so in one line naming the head (not a shape error of our runtime)."""
    import peft
    import transformers
    from click.testing import CliRunner
    from merging_cli.main import cli

    from tests.support import tiny_models as tm

    base = tm.save_base("bert", tmp_path / "base")  # num_labels=3
    cfg = tm.config("bert")
    cfg.num_labels = 5
    head5 = transformers.BertForSequenceClassification(cfg).eval()
    wrapped = peft.get_peft_model(head5, tm.peft_config("bert"))
    tm.randomise(wrapped, 1)
    wrapped.save_pretrained(tmp_path / "a")
    with pytest.raises(RuntimeError, match=r"size mismatch for base_model.model.classifier\."):
        peft.PeftModel.from_pretrained(transformers.AutoModelForSequenceClassification.from_pretrained(base),
                                       tmp_path / "a")  # fmt: skip
    for args in (["verify", "-s", "cat"], ["merge", "-s", "cat", "-o", str(tmp_path / "m")]):
        r = CliRunner().invoke(cli, [*args, "--base", str(base), str(tmp_path / "a")])
        assert r.exit_code == 2, r.output
        assert "module classifier is saved whole with a (5, 32) weight, the base's is (3, 32)" in r.output
        assert "num_labels" in r.output and len(r.output.strip().splitlines()) == 1, r.output
