"""The merge recipe and the verification report: typed, and byte-for-byte the JSON they were read from."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from merging.core.adapter import weighted
from merging.errors import MergingError
from merging.eval.results import Report, Row
from merging.formats import sources
from merging.merge.pipeline import merge
from merging.merge.recipe import RECIPE_FILE, Recipe
from merging.merge.result import recipe, write_result
from merging.strategies import Options


@pytest.mark.parametrize(("names", "strategy"), [(["lora", "lokr"], "svd"), (["lora", "ia3"], "cat")])
def test_recipe_round_trip_on_a_real_merge(fx, tmp_path, names, strategy):
    ads = [sources.load(fx.adapter("llama", n))[0] for n in names]
    result = merge(weighted(ads, [1.0, 0.5]), strategy, Options(rank=3 if strategy == "svd" else None))
    made = recipe(result, ads)
    write_result(result, tmp_path / "m", made.to_dict())
    data = json.loads((tmp_path / "m" / RECIPE_FILE).read_text())
    assert Recipe.from_dict(data).to_dict() == data == json.loads(json.dumps(made.to_dict()))
    read = Recipe.read(tmp_path / "m")
    assert read == made and read.weights == [1.0, 0.5] and read.options.rank == made.options.rank
    assert read.outputs == tuple(a.name for a in result.adapters)
    assert [i.kinds for i in read.inputs] == [tuple(sorted(a.kinds)) for a in ads]


def test_no_recipe_is_none_and_a_malformed_one_names_the_file(tmp_path):
    assert Recipe.read(tmp_path) is None
    (tmp_path / RECIPE_FILE).write_text('{"inputs": [], "strategy": "cat"}')
    with pytest.raises(MergingError, match=rf"{RECIPE_FILE}: recipe: malformed .*additive_strategy"):
        Recipe.read(tmp_path)
    (tmp_path / RECIPE_FILE).write_text("{oops")
    with pytest.raises(MergingError, match="invalid JSON"):
        Recipe.read(tmp_path)


def test_row_verdict_and_report_json_round_trip():
    def row(name, exact, passed):
        return Row(name, "cat", exact, 1e-6, 1e-6, None, None, None, 0.0, 0.0, passed, {"m": 0.0})

    report = Report("base", "cpu", "float32", ["p"], 1e-4, [row("a", True, True), row("b", True, False)])
    report = replace(report, rows=[*report.rows, row("c", False, None)])
    assert [r.verdict for r in report.rows] == ["PASS", "FAIL", "approx."] and report.failed
    assert Report.from_json(report.to_json()) == report
    with pytest.raises(MergingError, match="verification row: malformed"):
        Report.from_dict(report.to_dict() | {"rows": [{"name": "x"}]})


def test_a_dare_merge_with_a_seed_is_remade_from_its_recipe_byte_for_byte(fx, tmp_path):
    """The recipe records DARE's seed; a TOML recipe with the recorded options remakes the file exactly,
    and another seed draws other masks."""
    from click.testing import CliRunner
    from merging_cli.main import cli

    a, b = fx.adapter("llama", "lora"), fx.adapter("llama", "lora_r8")
    runner = CliRunner()

    def merged(out, *args) -> bytes:
        result = runner.invoke(cli, ["merge", *args, "-o", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        return (tmp_path / out / "adapter_model.safetensors").read_bytes()

    made = merged("flags", str(a), str(b), "-s", "dare_ties", "--seed", "7", "--density", "0.4")
    options = Recipe.read(tmp_path / "flags").options
    assert (options.seed, options.density) == (7, 0.4)
    toml = tmp_path / "r.toml"
    toml.write_text(f'inputs = ["{a}", "{b}"]\nstrategy = "dare_ties"\n'
                    f"seed = {options.seed}\ndensity = {options.density}\n")  # fmt: skip
    assert merged("recipe", "--recipe", str(toml)) == made
    assert merged("other", "--recipe", str(toml), "--seed", "8") != made
