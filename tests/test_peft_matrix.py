"""PEFT's custom-model matrix (tests/support/peft_matrix.py) through inspect, cat (one, two adapters), linear,
every output reloaded by PEFT: no output PEFT cannot load, no wrong number, no crash, and every refusal one
line from the list below, each naming why. A row per layer kind and adapter type runs in ``make test``; the
whole matrix is marked ``slow`` (``pytest -m slow tests/test_peft_matrix.py``; ``python -m
tests.support.peft_matrix`` prints every row's outcome and the totals).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.support import peft_matrix as pm

pytestmark = pytest.mark.model  # a few seconds of PEFT model building per row

# Refusals the matrix may give, each for a reason outside this tool (pattern → why it is right).
EXPECTED_REFUSALS = {
    r"peft refuses": "PEFT itself cannot build the row or stack the pair",
    r"replaced by several inputs": "two adapters save the same module whole; PEFT refuses to stack them too",
    r"linear averages LoRA factors.* is (LoHa|LoKr|DoRA), .*use cat \(exact\)": "PEFT has no linear for them",
    r"(KaSA|VeLoRA|MonteCLoRA|block-diagonal)": "see merging/formats/peft/fields.py",
}

# The rows in `make test`: one per layer kind and adapter type; the rest run under the slow marker.
QUICK = {
    "mlp lora", "mlp dora", "emb+conv1D lora", "conv1D dora", "mlp ia3 ff", "conv1D ia3", "mlp loha",
    "mlp lokr", "mlp adalora", "conv2d lora", "conv2d loha", "conv2d lokr", "conv2d dora", "conv3d lora",
    "conv3d ia3 ff", "conv1d loha", "conv1d lokr effective", "conv2d_groups loha", "conv2d_groups lokr",
    "conv2d_groups lora", "conv2d adalora", "mlp kasa", "mlp velora", "mlp monteclora", "mlp bdlora",
    "mha lora", "conv1d loha effective", "conv2d_groups dora",
}  # fmt: skip

PARAMS = [pytest.param(row, id=row[0], marks=() if row[0] in QUICK else pytest.mark.slow) for row in pm.ROWS]


@pytest.mark.parametrize("row", PARAMS)
def test_matrix_row(tmp_path, row):
    res = pm.outcome(row, tmp_path)
    for step, got in res.steps.items():
        kind = got.split(":")[0]
        assert kind in ("exact", "refused", "peft refuses"), f"{step}: {got}"
        if kind != "exact":
            assert any(re.search(p, got) for p in EXPECTED_REFUSALS), f"{step}: unexpected refusal {got}"


def test_quick_rows_exist():
    assert QUICK <= set(pm.ROW_NAMES)


@pytest.mark.parametrize(
    "name",
    ["conv3d lora", "conv3d ia3 ff", "conv1d lora bias", "conv2d_1x1 loha", "conv2d_groups lora",
     "conv1d_groups loha", "conv2d_groups2 lokr", "conv2d_groups ia3", "conv2d_groups dora"],
)  # fmt: skip
def test_our_runtime_stacks_these_layers_as_peft(tmp_path, name):
    """verify's own runtime (stacked layers) on Conv1d/2d/3d, grouped ones included (PEFT's LoRA as a full
    conv beside the layer, LoHa/LoKr/IA³ on its grouped weight), gives PEFT's stacked forward of the pair."""
    import peft  # noqa: F401 - the reference below

    from merging.base.layout import BaseLayout
    from merging.core.adapter import weighted
    from merging.formats import peft as peft_format
    from tests.support.helpers import rel_err

    row = next(r for r in pm.ROWS if r[0] == name)
    folders = [pm.make_adapter(row, tmp_path / n, s) for n, s in (("a", 1), ("b", 2))]
    model = row[1]
    layout = BaseLayout.from_model(pm.build(model))
    pairs = weighted([peft_format.read(f).refine_targets(layout.modules) for f in folders])
    bare, ref, got = pm.runtime_and_peft(model, pairs, folders)
    assert rel_err(ref, bare) > 1e-4
    assert rel_err(got - bare, ref - bare) < 1e-6  # float64


def test_verify_merges_with_the_strategy_options(fx):
    """`verify -s core --inner linear --alpha 1` merges with those options and judges the result exact."""
    from click.testing import CliRunner
    from merging_cli.main import cli

    ads = [str(fx.adapter("llama", n)) for n in ("lora", "lora_b")]
    args = ["verify", "--base", str(fx.base("llama")), *ads, "-s", "core", "--json"]
    r = CliRunner().invoke(cli, [*args, "--inner", "linear", "--alpha", "1"])
    assert r.exit_code == 0, r.output
    (row,) = [row for row in json.loads(r.output)["rows"] if row["strategy"] == "core"]
    assert row["exact"] is True and row["passed"] is True and row["effect_rel_error"] < 1e-5
    r = CliRunner().invoke(cli, args)  # the default inner merge (ties) promises nothing
    (row,) = [row for row in json.loads(r.output)["rows"] if row["strategy"] == "core"]
    assert row["exact"] is False and row["effect_rel_error"] > 1e-3


@pytest.mark.parametrize("name", ["conv2d lokr", "conv2d_groups lokr", "conv1d loha effective"])
def test_a_conv_known_only_from_loha_lokr_factors_needs_the_base(tmp_path, name):
    """A LoKr/Tucker-LoHa kernel shows a conv but not its groups (nor a Conv1d from a (k, 1) Conv2d): written
    without the base, or with a state dict that does not record groups, it is refused in one line asking for
    the base, where a conv-shaped LoRA might not load (grouped: it does not); with the model, exact."""
    from safetensors.torch import save_file

    from merging.core.adapter import weighted
    from merging.errors import MergingError
    from merging.formats import peft as peft_format
    from merging.merge.pipeline import merge
    from merging.merge.result import write_result

    row = next(r for r in pm.ROWS if r[0] == name)
    folders = [pm.make_adapter(row, tmp_path / n, s) for n, s in (("a", 1), ("b", 2))]
    result = merge(weighted([peft_format.read(f) for f in folders]), "cat")
    with pytest.raises(MergingError, match=r"do not say the conv's groups .*: pass --base$") as e:
        write_result(result, tmp_path / "out", {})
    save_file(dict(pm.build(row[1]).state_dict()), tmp_path / "model.safetensors")
    with pytest.raises(MergingError, match=r"groups a state dict does not record") as f:
        write_result(result, tmp_path / "out", {}, base=tmp_path / "model.safetensors")
    assert "\n" not in str(e.value) + str(f.value) and not (tmp_path / "out").exists()
    assert pm.outcome(row, tmp_path / "row").steps["cat 2"] == "exact"  # the model as base: PEFT's forward


def test_multihead_attention_halves_of_unequal_rank_load_in_peft_as_merged(tmp_path):
    """PEFT's LoRA on nn.MultiheadAttention adapts in_proj_weight and out_proj with one r and lora_alpha: an
    svd merge whose energy keeps different ranks in the two halves is written at the larger, zero-padded,
    and PEFT's layers then hold exactly the merged deltas (and its forward the merged weights')."""
    import peft

    from merging.base.layout import BaseLayout
    from merging.core.adapter import weighted
    from merging.formats import peft as peft_format
    from merging.merge.pipeline import merge
    from merging.merge.result import write_result
    from merging.strategies import Options

    row = next(r for r in pm.ROWS if r[0] == "mha lora")
    folders = [pm.make_adapter(row, tmp_path / n, s) for n, s in (("a", 1), ("b", 2))]
    layout = BaseLayout.from_model(pm.build("mha"))
    ads = [peft_format.read(f).refine_targets(layout.modules) for f in folders]
    for budget in (200, 300, 400, 500):  # a rank of in_proj costs 40 parameters, of out_proj 20
        result = merge(weighted(ads), "svd", Options(budget=budget))
        ranks = {r.module: r.rank for r in result.modules}
        if 0 < ranks["body"] != ranks["body.base_layer.out_proj"] > 0:
            break  # the case under test
    assert 0 < ranks["body"] != ranks["body.base_layer.out_proj"] > 0
    merged = result.adapters[0].deltas
    out = write_result(result, tmp_path / "out", {}, base=layout)
    loaded = peft.PeftModel.from_pretrained(pm.build("mha"), out)
    attention = loaded.base_model.model.body
    ref = peft.PeftModel.from_pretrained(pm.build("mha"), folders[0], adapter_name="a")
    ref.load_adapter(folders[1], adapter_name="b")  # PEFT's own deltas of the two inputs
    theirs = ref.base_model.model.body
    for mod, layer, inputs in (("body", attention, theirs),
                               ("body.base_layer.out_proj", attention.base_layer.out_proj,
                                theirs.base_layer.out_proj)):  # fmt: skip
        got = layer.get_delta_weight("default").double()
        assert torch.allclose(got, merged[mod].dense().double(), atol=1e-6), mod
        total = sum(inputs.get_delta_weight(n).double() for n in ("a", "b"))
        u, sv, vh = torch.linalg.svd(total)
        k = ranks[mod]
        want = (u[:, :k] * sv[:k]) @ vh[:k]  # the best rank-k approximation of PEFT's summed deltas
        assert torch.allclose(got, want, atol=1e-6 * float(total.norm())), mod


@pytest.mark.parametrize("strategy", ["cat", "svd"])
def test_lora_beside_a_grouped_conv_is_written_as_peft_builds_it(tmp_path, strategy):
    """PEFT's LoRA on a grouped conv reads all input channels (lora_A) and writes each group's outputs from
    its own rank block (grouped lora_B): a full conv's delta beside the layer. cat keeps the blocks (rank
    Σ r); svd mixes them, and each group then reads all of A (rank groups·k): both load in PEFT and give its
    stacked forward of the pair (svd at full rank), without the base too."""
    import peft

    from merging.core.adapter import weighted
    from merging.formats import peft as peft_format
    from merging.merge.pipeline import merge
    from merging.merge.result import write_result
    from merging.strategies import Options
    from tests.support.helpers import peft_stacked, rel_err

    row = next(r for r in pm.ROWS if r[0] == "conv2d_groups lora")  # groups 4, r 4
    folders = [pm.make_adapter(row, tmp_path / n, s) for n, s in (("a", 1), ("b", 2))]
    opts = Options(rank=8) if strategy == "svd" else Options()
    result = merge(weighted([peft_format.read(f) for f in folders]), strategy, opts)
    out = write_result(result, tmp_path / "out", {})  # the groups are in the factors: no base needed
    with torch.no_grad():
        x, bare = pm.inputs("conv2d_groups"), pm.build("conv2d_groups")(pm.inputs("conv2d_groups"))
        ref = peft_stacked(pm.build("conv2d_groups"), folders)(x)
        got = peft.PeftModel.from_pretrained(pm.build("conv2d_groups"), out)(x)
    assert rel_err(got - bare, ref - bare) < 1e-6
    rank = json.loads((out / "adapter_config.json").read_text())["r"]
    assert rank == (8 if strategy == "cat" else 4 * 8)


@pytest.mark.parametrize("name", ["mlp loha", "conv2d loha", "conv1d_groups loha", "conv2d adalora"])
def test_a_flat_factor_learns_its_kind_from_the_base_the_adapter_names(tmp_path, monkeypatch, name):
    """A flat LoHa/AdaLoRA factor (r, in·k) does not say its module is a Linear or a conv: merged without
    --base, the base the adapter_config names is found where it already is (a local folder, the local
    Hugging Face cache) and read by its headers. A 2-D weight: a Linear's LoRA, which PEFT loads and gives
    its stacked forward. A conv: the headers do not record its groups (nor does a LoHa factor, sized
    in/groups), so it is refused in one line, nothing written (grouped, the file PEFT would get cannot
    load). With no reachable base (and no task_type: not a transformers text model): refused, asking for
    --base."""
    import peft
    from click.testing import CliRunner
    from huggingface_hub import constants
    from merging_cli.main import cli
    from safetensors.torch import save_file

    from tests.support.helpers import peft_stacked, rel_err

    row = next(r for r in pm.ROWS if r[0] == name)
    folders = [pm.make_adapter(row, tmp_path / n, s) for n, s in (("a", 1), ("b", 2))]
    weights = {k: v.contiguous() for k, v in pm.build(row[1]).state_dict().items()}
    snapshot = tmp_path / "hub/models--someone--tiny-conv/snapshots/0123abcd"
    for folder in (tmp_path / "base", snapshot):
        folder.mkdir(parents=True)
        save_file(weights, str(folder / "model.safetensors"))
    (tmp_path / "hub/models--someone--tiny-conv/refs").mkdir()
    (tmp_path / "hub/models--someone--tiny-conv/refs/main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    x = pm.inputs(row[1])
    with torch.no_grad():
        bare, ref = pm.build(row[1])(x), peft_stacked(pm.build(row[1]), folders)(x)

    def merged(base_name: str | None, out: str):
        for f in folders:
            cfg = json.loads((f / "adapter_config.json").read_text())
            (f / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": base_name}))
        args = ["merge", *map(str, folders), "-s", "cat", "-o", str(tmp_path / out)]
        return CliRunner().invoke(cli, args)

    def refused(r, out: str, ends: str) -> None:
        assert r.exit_code == 2 and re.search(r"module (body|lin0):", r.output), r.output
        assert r.output.rstrip().endswith(ends), r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / out).exists(), r.output

    for base_name, out in ((str(tmp_path / "base"), "local"), ("someone/tiny-conv", "cached")):
        r = merged(base_name, out)
        if name != "mlp loha":
            refused(r, out, "as --base (Python: BaseLayout.from_model(model))")
            continue
        assert r.exit_code == 0, r.output
        with torch.no_grad():
            got = peft.PeftModel.from_pretrained(pm.build(row[1]), tmp_path / out)(x)
        assert rel_err(ref, bare) > 1e-4 and rel_err(got - bare, ref - bare) < 1e-6, base_name
    for base_name in ("someone/not-cached", None):
        refused(merged(base_name, "refused"), "refused", "pass --base")


@pytest.mark.parametrize("name", ["mha lora", "mha+lin lora"])
def test_our_runtime_stacks_multihead_attention_as_peft(tmp_path, name):
    """verify's own runtime on nn.MultiheadAttention: its in_proj and out_proj LoRA on the weights, as PEFT's
    layer merges them for each forward. PEFT 0.21.2's forward adds out_proj's delta twice (its merge adds it
    by hand, then calls out_proj.merge; huggingface/peft#3774), so the pair is judged against PEFT's forward
    with the out_proj LoRA zeroed, and in full against torch's attention on W + PEFT's own delta weights."""
    import peft

    from merging.base.layout import BaseLayout
    from merging.core.adapter import weighted
    from merging.formats import peft as peft_format
    from merging.runtime.stacked import stacked
    from tests.support.helpers import peft_stacked, rel_err, rewrite_tensors

    row = next(r for r in pm.ROWS if r[0] == name)
    folders = [pm.make_adapter(row, tmp_path / n, s) for n, s in (("a", 1), ("b", 2))]
    layout = BaseLayout.from_model(pm.build("mha"))
    x = pm.inputs("mha")

    def ours(fs):
        pairs = weighted([peft_format.read(f).refine_targets(layout.modules) for f in fs])
        with torch.no_grad(), stacked(pm.build("mha"), pairs) as model:
            return model(x)

    ref = peft.PeftModel.from_pretrained(pm.build("mha"), folders[0], adapter_name="a")
    ref.load_adapter(folders[1], adapter_name="b")
    dense = pm.build("mha")
    with torch.no_grad():
        bare = pm.build("mha")(x)
        peft_layers = {"body.in_proj_weight": "body", "body.out_proj.weight": "body.base_layer.out_proj",
                       "lin0.weight": "lin0"}  # fmt: skip
        for path, p in dense.named_parameters():
            layer = ref.base_model.model.get_submodule(peft_layers.get(path, "body.base_layer"))
            if hasattr(layer, "get_delta_weight") and "a" in getattr(layer, "lora_A", {}):
                p += sum(layer.get_delta_weight(n) for n in ("a", "b"))
        want = dense(x)
    assert rel_err(want, bare) > 1e-3
    assert rel_err(ours(folders) - bare, want - bare) < 1e-5  # the effective weights are summed in float32
    for f in folders:
        rewrite_tensors(f, lambda t: t.update({k: 0 * v for k, v in t.items() if "out_proj.lora_B" in k}))
    with torch.no_grad():
        theirs = peft_stacked(pm.build("mha"), folders)(x)
    assert rel_err(theirs, bare) > 1e-3
    assert rel_err(ours(folders) - bare, theirs - bare) < 1e-5
