"""verify and bake judged by PEFT on tiny models of every family it serves (tests/support/tiny_models.py).

Every reference here is PEFT's own forward: the ORIGINAL input folders loaded by PEFT (PeftMixedModel or
set_adapter([...])) onto a fresh base; merged folders are loaded by ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli

from merging.base.load import load_base
from merging.core.adapter import base_shapes, weighted
from merging.eval import judge
from merging.eval.verify import Candidate, verify
from merging.formats import peft as fp
from merging.merge.pipeline import merge
from merging.runtime.stacked import stacked
from tests.support.helpers import rewrite_tensors
from tests.support.tiny_models import FAMILIES, build, inputs, make_adapter, output, save_base

pytestmark = pytest.mark.model
JUDGED = ["llama", "gemma", "qwen2", "bert", "modernbert", "t5", "mixtral"]
TOL = 1e-4


def _invoke(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, [str(a) for a in args])


def _inputs(family: str, folder: Path) -> tuple[Path, Path]:
    """A LoRA (with the input embedding on tied models) and a LoHa without a head, made by PEFT."""
    fam = FAMILIES[family]
    targets = [*fam.targets, fam.embed] if fam.tied and family != "t5" else list(fam.targets)
    a = make_adapter(family, folder / "a", "lora", seed=1, target_modules=targets)
    b = make_adapter(family, folder / "b", "loha", seed=2, task_type=None)
    return a, b


def _effect_error(y: torch.Tensor, ref: torch.Tensor, y_base: torch.Tensor) -> float:
    return float((y - ref).double().norm() / (ref - y_base).double().norm())


def _peft_stacked(family: str, folders) -> tuple[torch.Tensor, torch.Tensor]:
    """(base output, PEFT's stacked output) on a fresh base: PEFT's own forward, the judge's judge."""
    model, x = build(family), inputs(family)
    y_base = output(model, x)
    mode = "multi" if len(folders) == 1 else "mixed"
    with judge.peft_stacked(model, judge.Stacker(judge.PEFT, mode, tuple(folders))):
        return y_base, output(model, x)


def _wrong(merged: Path, out: Path) -> Path:
    """The merged folder with the first input's part of every B halved (cat puts it first)."""
    shutil.copytree(merged, out)

    def halve(t):
        for k, v in t.items():
            if k.endswith(("lora_B.weight", "lora_embedding_B")):
                v[:, :4] *= 0.5

    rewrite_tensors(out, halve)
    return out


@pytest.mark.parametrize("family", JUDGED)
def test_verify_and_bake_match_peft_and_a_wrong_merge_fails(family, tmp_path):
    base = save_base(family, tmp_path / "base")
    a, b = _inputs(family, tmp_path)
    assert _invoke("merge", a, b, "-s", "cat", "-o", tmp_path / "m").exit_code == 0
    r = _invoke("verify", "--base", base, a, b, "--merged", tmp_path / "m", "--json", "--max-new-tokens", 2)
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)["rows"]
    assert (row["reference"], row["loaded_by"], row["passed"]) == (judge.PEFT, judge.PEFT, True)
    assert row["effect_rel_error"] <= TOL

    wrong = _wrong(tmp_path / "m", tmp_path / "wrong")
    r = _invoke("verify", "--base", base, a, b, "--merged", wrong, "--max-new-tokens", 0)
    assert r.exit_code == 1 and "FAIL" in r.output, r.output

    r = _invoke("bake", "--base", base, a, b, "-o", tmp_path / "baked")
    assert r.exit_code == 0, r.output
    baked, _ = load_base(tmp_path / "baked", "cpu", task_type=FAMILIES[family].task_type)
    y_base, y_peft = _peft_stacked(family, [a, b])
    assert _effect_error(output(baked, inputs(family)), y_peft, y_base) <= TOL
    config = json.loads((tmp_path / "baked" / "config.json").read_text())
    if FAMILIES[family].tied and family != "t5":  # the embedding LoRA reaches embed_tokens, not lm_head
        assert config["tie_word_embeddings"] is False
        assert not torch.equal(baked.get_output_embeddings().weight, baked.get_input_embeddings().weight)


@pytest.mark.parametrize("family", JUDGED)
def test_runtime_reference_is_peft_where_peft_stacks_the_parts(family, tmp_path):
    """IA³ with additive inputs: our runtime is the reference, and it equals PEFT on each part."""
    model = build(family)
    a, b = _inputs(family, tmp_path)
    c = make_adapter(family, tmp_path / "c", "ia3", seed=3, task_type=None)
    ads = [fp.read(f).refine_targets(base_shapes(model)) for f in (c, a, b)]
    pairs = weighted(ads)
    result = merge(pairs, "cat")
    cand = Candidate("cat", result.adapters, "cat", result.exact)
    report = verify(model, None, pairs, [cand], max_new_tokens=0)
    assert "IA³" in report.reference_reason
    assert set(report.reference_checks) == {"ia3 inputs", "additive inputs"}
    assert max(report.reference_checks.values()) <= TOL, report.reference_checks
    assert report.rows[0].verdict == "PASS"


@pytest.mark.parametrize("family", ["gemma", "qwen2"])
@pytest.mark.parametrize("case", ["embedding_lora", "tokens"])
def test_runtime_follows_peft_on_scaled_and_tied_embeddings(family, case, tmp_path):
    """Gemma scales an embedding LoRA's rows by embed_scale; token rows on a tied embedding reach lm_head."""
    kw = (
        {"target_modules": ["embed_tokens", "q_proj"]}
        if case == "embedding_lora"
        else {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [3, 5, 7]}}
    )
    folder = make_adapter(family, tmp_path / "a", "lora", seed=4, **kw)
    model, x = build(family), inputs(family)
    pairs = weighted([fp.read(folder).refine_targets(base_shapes(model))])
    y_base, y_peft = _peft_stacked(family, [folder])
    with stacked(model, pairs):
        assert _effect_error(output(model, x), y_peft, y_base) <= TOL
    base = save_base(family, tmp_path / "base")
    assert _invoke("bake", "--base", base, folder, "-o", tmp_path / "baked").exit_code == 0
    config = json.loads((tmp_path / "baked" / "config.json").read_text())
    assert config["tie_word_embeddings"] is (case == "tokens")  # rows stay tied, as PEFT ties them
    baked, _ = load_base(tmp_path / "baked", "cpu")
    assert _effect_error(output(baked, x), y_peft, y_base) <= TOL


@pytest.mark.parametrize("family", ["bert_token", "bert_qa", "bert_features"])
def test_every_task_type_loads_its_head(family, tmp_path):
    base = save_base(family, tmp_path / "base")
    a = make_adapter(family, tmp_path / "a", "lora", seed=5)
    b = make_adapter(family, tmp_path / "b", "lokr", seed=6, task_type=None)
    assert _invoke("merge", a, b, "-s", "cat", "-o", tmp_path / "m").exit_code == 0
    r = _invoke("verify", "--base", base, a, b, "--merged", tmp_path / "m", "--json")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)["rows"]
    assert (row["reference"], row["passed"]) == (judge.PEFT, True) and row["effect_rel_error"] <= TOL
    wrong = _wrong(tmp_path / "m", tmp_path / "wrong")
    assert _invoke("verify", "--base", base, a, b, "--merged", wrong).exit_code == 1
    if FAMILIES[family].heads:  # the head itself is compared: a wrong head alone fails
        shutil.copytree(tmp_path / "m", tmp_path / "wrong_head")
        halve_head = lambda t: [v.mul_(0.5) for k, v in t.items() if "lora_" not in k]  # noqa: E731
        rewrite_tensors(tmp_path / "wrong_head", halve_head)
        assert _invoke("verify", "--base", base, a, b, "--merged", tmp_path / "wrong_head").exit_code == 1
    model, _ = load_base(base, "cpu", task_type=FAMILIES[family].task_type)
    assert type(model).__name__ == FAMILIES[family].model_class


def test_a_tie_transformers_cannot_undo_is_refused_in_one_line(tmp_path):
    """T5 in transformers 5 always ties its embeddings: a LoRA on `shared` alone cannot be baked."""
    base = save_base("t5", tmp_path / "base")
    a = make_adapter("t5", tmp_path / "a", "lora", seed=7, target_modules=["shared", "q"])
    r = _invoke("bake", "--base", base, a, "-o", tmp_path / "baked")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "shares its weight with shared" in r.output and not (tmp_path / "baked").exists()


def test_inputs_for_different_task_types_are_one_line(tmp_path):
    base = save_base("bert", tmp_path / "base")
    a = make_adapter("bert", tmp_path / "a", "lora", seed=1)
    b = make_adapter("bert", tmp_path / "b", "lora", seed=2, task_type="TOKEN_CLS", modules_to_save=None)
    r = _invoke("verify", "--base", base, a, b, "-s", "cat")
    assert r.exit_code == 2 and "different task types" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("dora_first", [True, False])
def test_dora_with_the_base_is_peft_s_dora(dora_first, tmp_path):
    """A DoRA input scales the base and whatever PEFT stacks inside it (norm of the base weight alone)."""
    base = save_base("qwen2", tmp_path / "base")  # attention biases: DoRA keeps the bias out of its scaling
    dora = make_adapter("qwen2", tmp_path / "dora", "dora", seed=8)
    lora = make_adapter("qwen2", tmp_path / "lora", "lora", seed=9)
    order = [dora, lora] if dora_first else [lora, dora]
    r = _invoke("verify", "--base", base, *order, "-s", "cat", "--json", "--max-new-tokens", 2)
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)["rows"]
    assert (row["reference"], row["passed"]) == (judge.PEFT, True) and row["effect_rel_error"] <= TOL
    assert _invoke("bake", "--base", base, *order, "-o", tmp_path / "baked").exit_code == 0
    baked, _ = load_base(tmp_path / "baked", "cpu")
    y_base, y_peft = _peft_stacked("qwen2", order)
    assert _effect_error(output(baked, inputs("qwen2")), y_peft, y_base) <= TOL
    model = build("qwen2")
    with stacked(model, weighted([fp.read(f).refine_targets(base_shapes(model)) for f in order])):
        assert _effect_error(output(model, inputs("qwen2")), y_peft, y_base) <= TOL


@pytest.mark.parametrize("case", ["weight", "ia3_inside"])
def test_dora_where_peft_semantics_cannot_be_kept_is_one_line(case, tmp_path):
    base = save_base("llama", tmp_path / "base")
    dora = make_adapter("llama", tmp_path / "dora", "dora", seed=8)
    ia3 = make_adapter("llama", tmp_path / "ia3", "ia3", seed=10)
    args = [dora, "-w", "0.5"] if case == "weight" else [ia3, dora]
    for verb in ("verify", "bake"):
        tail = ["-s", "cat"] if verb == "verify" else ["-o", tmp_path / verb]
        r = _invoke(verb, "--base", base, *args, *tail)
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert ("no stacked meaning at weight 0.5" if case == "weight" else "put DoRA first") in r.output


def test_an_unknown_task_type_is_one_line(tmp_path):
    base = save_base("llama", tmp_path / "base")
    a = make_adapter("llama", tmp_path / "a", "lora", seed=1)
    cfg = json.loads((a / "adapter_config.json").read_text()) | {"task_type": "NO_SUCH_TASK"}
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    r = _invoke("verify", "--base", base, a, "-s", "cat")
    assert r.exit_code == 2 and "NO_SUCH_TASK" in r.output and str(a) in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
