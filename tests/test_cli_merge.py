"""`merging merge` end to end on fixture adapters."""

from __future__ import annotations

import json

from click.testing import CliRunner
from merging_cli.main import cli

from merging.formats import sources
from tests.support.fixtures import example_input, run
from tests.support.helpers import assert_close


def _invoke(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, [str(a) for a in args])


def test_merge_writes_a_folder_peft_loads_deterministically(fx, tmp_path):
    from peft import PeftModel

    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "lokr")
    for out in ("m1", "m2"):
        result = _invoke(
            "merge", a, b, "-o", tmp_path / out, "--strategy", "svd", "--rank", "6", "-w", "1,0.5"
        )
        assert result.exit_code == 0, result.output
    one = (tmp_path / "m1" / "adapter_model.safetensors").read_bytes()
    assert one == (tmp_path / "m2" / "adapter_model.safetensors").read_bytes()
    recipe = json.loads((tmp_path / "m1" / "merge_recipe.json").read_text())
    assert recipe["strategy"] == "svd" and recipe["options"]["rank"] == 6
    assert [i["weight"] for i in recipe["inputs"]] == [1.0, 0.5]
    assert all(len(h) == 64 for i in recipe["inputs"] for h in i["sha256"].values())
    model = PeftModel.from_pretrained(fx.load_base("llama"), str(tmp_path / "m1")).eval()
    out = run(model, "llama", example_input("llama"))
    assert (out - run(fx.load_base("llama"), "llama", example_input("llama"))).abs().max() > 1e-3
    assert "svd" in result.output and "lora" in result.output


def test_dare_output_is_byte_identical_with_the_same_seed(fx, tmp_path):
    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "lora_b")
    for out, seed in (("s1", 3), ("s2", 3), ("s3", 4)):
        r = _invoke(
            "merge", a, b, "-o", tmp_path / out, "-s", "dare_ties", "--density", "0.5", "--seed", seed
        )
        assert r.exit_code == 0, r.output
    data = [(tmp_path / s / "adapter_model.safetensors").read_bytes() for s in ("s1", "s2", "s3")]
    assert data[0] == data[1] != data[2]


def test_ia3_with_lora_writes_a_stack_read_back_as_one_set(fx, tmp_path):
    r = _invoke(
        "merge", fx.adapter("llama", "lora"), fx.adapter("llama", "ia3"), "-o", tmp_path / "pair", "-s", "cat"
    )
    assert r.exit_code == 0, r.output
    stack = sources.load(tmp_path / "pair")
    assert [ad.kinds for ad in stack] == [{"ia3"}, {"lora"}]


def test_existing_output_and_unknown_strategy_are_one_line_errors(fx, tmp_path):
    a = fx.adapter("llama", "lora")
    assert _invoke("merge", a, "-o", tmp_path / "o", "-s", "cat").exit_code == 0
    again = _invoke("merge", a, "-o", tmp_path / "o", "-s", "cat")
    assert again.exit_code == 2 and "already exists" in again.output and "Traceback" not in again.output
    assert _invoke("merge", a, "-o", tmp_path / "o", "-s", "cat", "--force").exit_code == 0
    bad = _invoke("merge", a, "-o", tmp_path / "p", "-s", "slerp")
    assert bad.exit_code == 2 and "unknown strategy 'slerp'" in bad.output and "ties" in bad.output
    assert not (tmp_path / "p").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_recipe_file_gives_the_same_result(fx, tmp_path):
    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "loha")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'inputs = ["{a}", "{b}"]\nstrategy = "svd"\nrank = 5\nweights = [1.0, -1.0]\n')
    base = fx.base("llama")  # a LoHa's flat factors do not say the layer kind; the adapters name no base
    assert _invoke("merge", "--recipe", recipe, "--base", base, "-o", tmp_path / "from_recipe").exit_code == 0
    r = _invoke("merge", a, b, "-s", "svd", "--rank", "5", "-w", "1,-1", "--base", base, "-o",
                tmp_path / "flags")  # fmt: skip
    assert r.exit_code == 0, r.output
    x = (tmp_path / "from_recipe" / "adapter_model.safetensors").read_bytes()
    assert x == (tmp_path / "flags" / "adapter_model.safetensors").read_bytes()


def test_named_inputs_and_weights_count(fx, tmp_path):
    a = fx.adapter("llama", "lora")
    r = _invoke("merge", f"math={a}", "-o", tmp_path / "o", "-s", "cat", "-w", "1,2")
    assert r.exit_code == 2 and "2 weights for 1 input" in r.output
    r = _invoke("merge", f"math={a}", "-o", tmp_path / "o", "-s", "cat")
    assert r.exit_code == 0
    recipe = json.loads((tmp_path / "o" / "merge_recipe.json").read_text())
    assert recipe["inputs"][0]["name"] == "math"


def test_merged_matches_stacked_through_peft_for_additive(fx, tmp_path):
    """LoRA + LoHa + LoKr stacked in PEFT's mixed model equal our cat merge loaded in PEFT."""
    from peft import PeftMixedModel, PeftModel

    names = ["lora", "loha", "lokr"]
    inputs = (fx.adapter("llama", n) for n in names)  # LoHa/LoKr factors do not say the layer kind: --base
    r = _invoke("merge", *inputs, "--base", fx.base("llama"), "-o", tmp_path / "cat", "-s", "cat")
    assert r.exit_code == 0, r.output
    mixed = PeftMixedModel.from_pretrained(
        fx.load_base("llama"), str(fx.adapter("llama", "lora")), adapter_name="lora"
    )
    for n in names[1:]:
        mixed.load_adapter(str(fx.adapter("llama", n)), adapter_name=n)
    mixed.set_adapter(names)
    x = example_input("llama")
    stacked = run(mixed.eval(), "llama", x)
    merged = run(PeftModel.from_pretrained(fx.load_base("llama"), str(tmp_path / "cat")).eval(), "llama", x)
    assert_close(merged, stacked, rtol=1e-5)


import pytest  # noqa: E402


@pytest.mark.parametrize("strategy", ["cat", "svd", "linear", "ties", "dare_linear", "magnitude_prune"])
def test_written_merge_loads_in_peft_like_our_runtime(fx, tmp_path, strategy):
    from peft import PeftModel

    from merging.core.adapter import base_shapes, weighted
    from merging.runtime.stacked import stacked

    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "lora_b")
    r = _invoke("merge", a, b, "-o", tmp_path / "m", "-s", strategy, "-w", "1,0.5")
    assert r.exit_code == 0, r.output
    x = example_input("llama")
    theirs = run(PeftModel.from_pretrained(fx.load_base("llama"), str(tmp_path / "m")).eval(), "llama", x)
    model = fx.load_base("llama")
    merged = [ad.refine_targets(base_shapes(model)) for ad in sources.load(tmp_path / "m")]
    with stacked(model, weighted(merged)):
        ours = run(model, "llama", x)
    assert (ours - theirs).abs().max() <= 1e-5


def test_convert_and_merge_formats_round_trip(fx, tmp_path):
    from merging.base.layout import BaseLayout
    from merging.formats import gguf as fg
    from merging.formats import kohya

    base = fx.base("llama")
    a = fx.adapter("llama", "lora")
    assert _invoke("convert", a, "-o", tmp_path / "a.safetensors", "--to", "kohya").exit_code == 0
    assert (
        _invoke(
            "convert", tmp_path / "a.safetensors", "-o", tmp_path / "p", "--to", "peft", "--base", base
        ).exit_code
        == 0
    )
    assert _invoke("convert", a, "-o", tmp_path / "a.gguf", "--to", "gguf").exit_code == 2  # needs --base
    r = _invoke(
        "merge",
        a,
        fx.adapter("llama", "lokr"),
        "-s",
        "cat",
        "--format",
        "gguf",
        "--base",
        base,
        "-o",
        tmp_path / "m.gguf",
    )
    assert r.exit_code == 0, r.output
    merged = fg.read(tmp_path / "m.gguf", base=BaseLayout.from_folder(base))
    assert len(merged.deltas) == 8  # q, v, up, down in both layers
    r = _invoke(
        "merge",
        a,
        fx.adapter("llama", "loha"),
        "-s",
        "svd",
        "--rank",
        "3",
        "--format",
        "kohya",
        "-o",
        tmp_path / "m.safetensors",
    )
    # a LoHa knows only (out, in·k·k) without its base: a kohya LoRA needs the layer kind (conv or not)
    assert r.exit_code == 2 and "layer kind unknown" in r.output and "pass --base" in r.output
    r = _invoke("merge", a, fx.adapter("llama", "loha"), "-s", "svd", "--rank", "3", "--format", "kohya",
                "--base", base, "-o", tmp_path / "m.safetensors")  # fmt: skip
    assert r.exit_code == 0, r.output
    meta = kohya.read(tmp_path / "m.safetensors").config["metadata"]
    assert json.loads(meta["merging.recipe"])["strategy"] == "svd"
    original = sources.load(a)[0]
    back = sources.load(tmp_path / "p", base=base)[0]
    for mod, d in original.deltas.items():
        assert_close(back.deltas[mod].dense(), d.dense(), rtol=1e-6)


def test_recipe_with_an_unknown_key_or_a_wrong_type_is_one_line(fx, tmp_path):
    a = fx.adapter("llama", "lora")
    bad = tmp_path / "bad.toml"
    bad.write_text(f'inputs = ["{a}"]\nstrategy = "svd"\nrnak = 4\n')
    r = _invoke("merge", "--recipe", bad, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "unknown recipe key 'rnak'" in r.output and str(bad) in r.output
    bad.write_text(f'inputs = ["{a}"]\nstrategy = "svd"\nrank = "four"\n')
    r = _invoke("merge", "--recipe", bad, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "option --rank must be int" in r.output
    assert not (tmp_path / "o").exists()
