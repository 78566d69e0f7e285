"""The public API: `import merging` is cheap, the CLI goes through nothing else, and the API's merge,
save and inspect are what the commands write and print."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from merging_cli.main import cli

import merging
from merging.formats import stack_folder
from tests.support.fixtures import example_input, run
from tests.support.helpers import assert_close

ROOT = Path(__file__).resolve().parents[1]


def _invoke(*args):
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.system
def test_import_merging_loads_no_torch_until_a_function_is_used():
    code = ("import sys, merging; assert 'torch' not in sys.modules, 'torch on import'; "
            "merging.MergingError; merging.__version__; assert 'torch' not in sys.modules; "
            "merging.strategy_names(); assert 'torch' in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_public_name_resolves_and_merge_stays_the_function():
    import merging.merge.pipeline  # noqa: F401  (the subpackage merging/merge/, bound by the import system)

    for name in merging.__all__:
        assert getattr(merging, name) is not None, name
    assert callable(merging.merge) and merging.merge.__module__ == "merging.api.adapters"
    assert set(merging.__all__) <= set(dir(merging))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        merging.nothing  # noqa: B018


def test_the_cli_imports_nothing_of_the_library_but_merging_itself():
    public = set(merging.__all__)
    for file in sorted((ROOT / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.startswith("merging.")]
                assert not bad, f"{file.name}: import {bad}"
            elif isinstance(node, ast.ImportFrom) and not node.level and "merging" in (node.module or ""):
                assert node.module == "merging", f"{file.name}: from {node.module} import ..."
                names = {a.name for a in node.names}
                assert names <= public, f"{file.name}: {names - public} is not public"


def test_merge_then_save_writes_what_the_merge_command_writes(fx, tmp_path):
    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "lokr")
    _invoke("merge", a, b, "-o", tmp_path / "cli", "-s", "svd", "--rank", "6", "-w", "1,0.5")
    result = merging.merge(merging.load_inputs([a, b]), weights=[1, 0.5], strategy="svd", rank=6)
    saved = result.save(tmp_path / "api")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    made = json.loads((tmp_path / "api" / "merge_recipe.json").read_text())
    assert made == json.loads((tmp_path / "cli" / "merge_recipe.json").read_text())
    assert made["strategy"] == "svd" and [i["weight"] for i in made["inputs"]] == [1.0, 0.5]
    doc = merging.merge_summary(saved, tmp_path / "api", 0.0)
    assert doc["adapters"][0]["max_rank"] == 6 and doc["exact"] is False


def test_save_for_vllm_pads_to_its_rank_and_peft_gives_the_same_outputs(fx, tmp_path):
    from peft import PeftModel

    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "lokr")
    result = merging.merge([merging.load(a), merging.load(b)], strategy="svd", rank=6)
    result.save(tmp_path / "plain")
    padded = result.save(tmp_path / "vllm", serve="vllm", base_model="someone/llama-tiny")
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8 and not config.get("rank_pattern")
    assert config["base_model_name_or_path"] == "someone/llama-tiny"
    assert {d.rank for d in padded.adapters[0].deltas.values()} == {8}
    x = example_input("llama")
    outs = [run(PeftModel.from_pretrained(fx.load_base("llama"), str(tmp_path / f)).eval(), "llama", x)
            for f in ("plain", "vllm")]  # fmt: skip
    assert (outs[0] - run(fx.load_base("llama"), "llama", x)).abs().max() > 1e-3  # the merge changes them
    assert_close(outs[1], outs[0], what="vLLM-padded against the merge as made")


def test_an_ia3_lora_merge_saves_a_stack_folder_load_refuses_and_load_inputs_reads(fx, tmp_path):
    pairs = merging.load_inputs([fx.adapter("llama", "lora"), fx.adapter("llama", "ia3")])
    result = merging.merge(pairs, strategy="cat")
    result.save(tmp_path / "pair")
    assert stack_folder.read(tmp_path / "pair") == ["ia3", "lora"]
    assert stack_folder.members(tmp_path / "pair" / stack_folder.STACK_FILE) == ["ia3", "lora"]
    with pytest.raises(merging.MergingError, match="holds 2 adapters"):
        merging.load(tmp_path / "pair")
    back = merging.load_inputs([tmp_path / "pair"])
    assert [ad.kinds for ad, _ in back] == [{"ia3"}, {"lora"}]
    assert merging.load(tmp_path / "pair" / "lora").kinds == {"lora"}


def test_inspect_is_what_inspect_json_prints(fx):
    folder = fx.adapter("llama", "lora")
    printed = json.loads(_invoke("inspect", folder, "--json", "--modules", "*q_proj").output)
    doc = merging.inspect(str(folder), modules="*q_proj")
    assert printed == {"schema": "merging.inspect/1", **json.loads(json.dumps(doc, default=str))}
    (ad,) = doc["adapters"]
    assert ad["modules"] == len(merging.load(folder).deltas) and ad["module_rows"]
    assert all(r["module"].endswith("q_proj") for r in ad["module_rows"])


def test_merge_refuses_an_unknown_option_and_wrong_weights(fx):
    ads = [merging.load(fx.adapter("llama", "lora"))]
    with pytest.raises(merging.MergingError, match="unknown option 'rnak'"):
        merging.merge(ads, strategy="svd", rnak=4)
    with pytest.raises(merging.MergingError, match="2 weights for 1 input"):
        merging.merge(ads, weights=[1, 2])


@pytest.mark.parametrize(("option", "value", "said"), [
    ("loss_dtype", "fp8", "`loss_dtype` must be one of auto, float32, bfloat16, got 'fp8'"),
    ("budgets", ["r4", "4k"], "`budget` '4k': a parameter count or rN"),
])  # fmt: skip
def test_compare_refuses_a_bad_option_in_one_line_before_the_base_loads(fx, tmp_path, option, value, said):
    """The library checks compare's options (the CLI passes them through): a base that does not exist is
    not reached, and nothing is written."""
    out = tmp_path / "report"
    with pytest.raises(merging.MergingError) as refused:
        merging.compare([fx.adapter("llama", "lora")], tmp_path / "no-base", out, **{option: value})
    assert str(refused.value) == said
    assert not out.exists()
