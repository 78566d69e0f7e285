"""DoRA merged as PEFT stacks it, in any order, embeddings included: checked against PEFT's own forward."""

from __future__ import annotations

import peft
import pytest
import torch

from merging.core.adapter import weighted
from merging.errors import UnsupportedError
from merging.export.bake import bake
from merging.formats import peft as peft_format
from merging.merge.pipeline import merge
from merging.merge.result import write_result
from merging.runtime.fold import merge_into
from merging.runtime.stacked import stacked
from tests.support.helpers import peft_stacked, rel_err, state_hash

pytestmark = pytest.mark.model
IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _adapter(folder, seed, targets, dora):
    """A LoRA/DoRA written by PEFT, factors and magnitudes moved off their init by a seeded amount."""
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=dora, init_lora_weights=False)
    model = peft.get_peft_model(_base(), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                factor = 0.3 if "magnitude" in name else 1.0
                p.mul_(1 + factor * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def _peft_stacked(folders):
    with torch.no_grad():
        return peft_stacked(_base(), folders)(IDS).logits


def _weights():
    return {n: m.weight.detach() for n, m in _base().named_modules() if hasattr(m, "weight")}


ATTN, EMB = ["q_proj", "v_proj"], ["embed_tokens", "q_proj"]
ORDERS = {
    "dora_then_lora": [(1, ATTN, True), (2, ATTN, False)],
    "lora_then_dora": [(2, ATTN, False), (1, ATTN, True)],
    "dora_dora": [(1, ATTN, True), (3, ["q_proj", "o_proj"], True)],
    "embedding_dora": [(4, EMB, True), (5, EMB, False)],
    "lora_then_embedding_dora": [(5, EMB, False), (4, EMB, True), (1, ATTN, True)],
}


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_cat_with_dora_reloads_as_peft_stacks(tmp_path, order):
    folders = [_adapter(tmp_path / f"in{i}", *spec) for i, spec in enumerate(ORDERS[order])]
    ref = _peft_stacked(folders)
    with torch.no_grad():
        bare = _base()(IDS).logits
    pairs = weighted([peft_format.read(f) for f in folders])
    out = write_result(merge(pairs, "cat", base_weights=_weights().__getitem__), tmp_path / "m", {})
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(_base(), out)(IDS).logits
    assert rel_err(got - bare, ref - bare) < 1e-4
    with stacked(_base(), pairs) as model, torch.no_grad():  # our runtime, as verify's fallback judge
        assert rel_err(model(IDS).logits - bare, ref - bare) < 1e-4
    _base().save_pretrained(tmp_path / "base")
    bake(tmp_path / "base", pairs, tmp_path / "baked")
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        baked = AutoModelForCausalLM.from_pretrained(tmp_path / "baked")(IDS).logits
    assert rel_err(baked - bare, ref - bare) < 1e-4


def test_svd_of_dora_stack_approximates_the_peft_stack(tmp_path):
    folders = [_adapter(tmp_path / f"in{i}", *spec) for i, spec in enumerate(ORDERS["lora_then_dora"])]
    ref = _peft_stacked(folders)
    with torch.no_grad():
        bare = _base()(IDS).logits
    pairs = weighted([peft_format.read(f) for f in folders])
    from merging.strategies import Options

    result = merge(pairs, "svd", Options(rank=32), base_weights=_weights().__getitem__)
    out = write_result(result, tmp_path / "m", {})
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(_base(), out)(IDS).logits
    assert rel_err(got - bare, ref - bare) < 1e-4  # full rank (32): the in-context contributions sum exactly


def test_weighted_dora_is_refused(tmp_path):
    f = _adapter(tmp_path / "d", 1, ATTN, True)
    with pytest.raises(UnsupportedError, match="weight 0.5"):
        merge(weighted([peft_format.read(f)], [0.5]), "cat", base_weights=_weights().__getitem__)


@pytest.mark.parametrize(("model", "as_file"), [("conv2d", True), ("emb_conv1d", False), ("mlp", True)])
def test_dora_on_a_base_given_as_its_weights(tmp_path, model, as_file):
    """`merging merge --base model.safetensors` (or a folder of safetensors without config.json): a custom
    model's DoRA pair, Conv2d, GPT-2 Conv1D (fan_in_fan_out) and Embedding included, cat = PEFT's stack."""
    from click.testing import CliRunner
    from merging_cli.main import cli
    from safetensors.torch import save_file

    from tests.support import peft_matrix as pm

    targets = {"conv2d": ["body", "lin0"], "emb_conv1d": ["emb", "body"], "mlp": ["lin0", "lin1"]}[model]
    row = (f"{model} dora", model, "lora", {"target_modules": targets, "use_dora": True})
    a, b = pm.make_adapter(row, tmp_path / "a", 1), pm.make_adapter(row, tmp_path / "b", 2)
    (tmp_path / "base").mkdir()
    state = {k: v.contiguous() for k, v in pm.build(model).state_dict().items()}
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    base = tmp_path / "base" / "model.safetensors" if as_file else tmp_path / "base"
    r = CliRunner().invoke(
        cli, ["merge", str(a), str(b), "-s", "cat", "--base", str(base), "-o", str(tmp_path / "m")]
    )
    assert r.exit_code == 0, r.output
    x = pm.inputs(model)
    with torch.no_grad():
        bare = pm.build(model)(x)
        ref = peft_stacked(pm.build(model), [a, b])(x)
        got = peft.PeftModel.from_pretrained(pm.build(model), tmp_path / "m")(x)
    assert rel_err(ref, bare) > 1e-3
    assert rel_err(got - bare, ref - bare) < 1e-6


@pytest.mark.parametrize("model", ["conv1d_groups", "conv2d_groups", "conv2d_groups2"])
def test_dora_beside_a_grouped_conv_is_peft_s(tmp_path, model):
    """PEFT's DoRA on a conv of g groups runs a full conv's LoRA beside the layer, but divides by the norm of
    W plus its factors' product read back in the grouped weight's shape (lora_B viewed (out/g, r)): our
    runtime, cat and svd (full rank) of a pair, reloaded by PEFT, equal PEFT's stacked forward; that norm
    is not ‖W + ΔW‖ of the full conv (so the check can fail); folding it into the
    weights (bake) is refused in one line: no grouped weight holds it, and PEFT's merge refuses too."""
    from merging.base.layout import BaseLayout
    from merging.core import dora
    from merging.core.target import ungroup
    from merging.strategies import Options
    from tests.support import peft_matrix as pm

    row = (f"{model} dora", model, "lora", {"target_modules": ["body"], "r": 4, "use_dora": True})
    folders = [pm.make_adapter(row, tmp_path / n, s) for n, s in (("a", 1), ("b", 2))]
    base = pm.build(model)
    layout = BaseLayout.from_model(base)
    weights = {n.removesuffix(".weight"): p.detach() for n, p in base.named_parameters()}
    pairs = weighted([peft_format.read(f).refine_targets(layout.modules) for f in folders])
    bare, ref, mine = pm.runtime_and_peft(model, pairs, folders)
    assert rel_err(ref, bare) > 1e-3
    assert rel_err(mine - bare, ref - bare) < 1e-6  # DoRA norms in float32
    d, w = pairs[0][0].deltas["body"], base.body.weight.detach()
    naive = (ungroup(w, base.body.groups).flatten(1) + d.scale * d.b @ d.a).norm(dim=1)
    assert rel_err(dora.weight_norm(d, d.target.to_matrix(w)), naive) > 1e-3
    for strategy, opts in (("cat", Options()), ("svd", Options(rank=64))):
        result = merge(pairs, strategy, opts, base_weights=weights.__getitem__)
        out = write_result(result, tmp_path / strategy, {}, base=layout)
        with torch.no_grad():
            got = peft.PeftModel.from_pretrained(pm.build(model), out)(pm.inputs(model))
        assert rel_err(got - bare, ref - bare) < 1e-5, strategy
    merged = weighted([peft_format.read(tmp_path / "cat").refine_targets(layout.modules)])
    before = state_hash(base)
    with pytest.raises(UnsupportedError, match="no grouped weight holds it") as e:
        merge_into(base, merged)  # what bake folds (a model folder's bake refuses the same way)
    assert "\n" not in str(e.value) and state_hash(base) == before
