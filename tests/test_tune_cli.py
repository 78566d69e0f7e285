"""`merging tune` on the bundled example: its recipe remakes the tuned merge byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from merging_cli.main import cli

from merging.eval.data import native_bf16

ROOT = Path(__file__).resolve().parents[1]


def _small_evals(tmp: Path, skills: list[str], n: int = 4) -> list[str]:
    args = []
    for s in skills:
        lines = (ROOT / "examples/data" / f"{s}.jsonl").read_text().splitlines()[:n]
        (tmp / f"{s}.jsonl").write_text("\n".join(lines) + "\n")
        args += ["--eval", f"{s}={tmp / f'{s}.jsonl'}"]
    return args


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.model
def test_tune_recipe_remakes_the_merge_byte_for_byte(example_base, tmp_path):
    skills = ["add", "sentiment"]  # a LoRA and an IA³: the result is a LoRA + IA³ stack folder
    out = tmp_path / "tuned"
    args = ["tune", *(f"{s}={ROOT / 'examples/adapters' / s}" for s in skills), "--base", str(example_base)]
    args += _small_evals(tmp_path, skills) + ["--granularity", "layer", "--steps", "1", "--batch", "1"]
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(cli, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "tune.json").read_text())
    assert record["split"] == {"add": {"tune": 2, "report": 2}, "sentiment": {"tune": 2, "report": 2}}
    assert len(record["layer_weights"]) == 30 and record["layer_weights"]["model.layers.0"] != [1.0, 1.0]
    assert set(record["reporting_split"]["after"]) == set(skills)
    assert record["dtype"] == ("bfloat16" if native_bf16() else "float32")  # --tune-dtype auto
    recipe = json.loads((out / "merge_recipe.json").read_text())
    assert recipe["layer_weights"] == record["layer_weights"]

    again = tmp_path / "again"
    result = runner.invoke(cli, ["merge", "--recipe", str(out / "tune_recipe.toml"), "-o", str(again)])
    assert result.exit_code == 0, result.output
    made, remade = _files(out), _files(again)
    assert {"ia3/adapter_model.safetensors", "lora/adapter_model.safetensors"} <= set(remade)
    assert remade == {k: v for k, v in made.items() if k in remade}
    extra = {"tune.json", "tune_recipe.toml", "tune_search.png", "tune_retention.png"}
    assert set(made) - set(remade) == extra


@pytest.mark.model
def test_compare_gains_tuned_and_budget_rows(example_base, tmp_path):
    skills = ["add", "sort"]
    out = tmp_path / "report"
    args = ["compare", *(f"{s}={ROOT / 'examples/adapters' / s}" for s in skills)]
    args += ["--base", str(example_base), *_small_evals(tmp_path, skills), "-s", "svd", "--ranks", "4"]
    args += ["--budget", "r4", "--tune", "1", "--tune-strategy", "cat,iso_c", "--tune-dtype", "bfloat16"]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    by = {v["label"]: v for v in data["variants"]}
    uniform = by["svd r=4"]
    budget_label = next(label for label in by if label.startswith("svd budget="))
    assert int(budget_label.split("=")[1].replace(",", "")) == uniform["params"]  # r4: uniform rank 4's size
    assert by[budget_label]["params"] <= uniform["params"]
    assert by[budget_label]["weight_error_max"] != uniform["weight_error_max"]  # a different allocation
    for label in ("tuned cat", "tuned iso_c"):
        assert set(by[label]["skills"]) == set(skills) and by[label]["passed"] is None
    runs = {r["label"]: r for r in data["search"]["runs"]}
    assert len(runs["tuned cat"]["trace"]) == 2 and runs["tuned cat"]["evaluations"] == 3  # 1 step + 2
    assert len(runs["tuned iso_c"]["trace"]) == 1 and runs["tuned iso_c"]["evaluations"] == 1
    best = max(runs.values(), key=lambda r: r["tuning_objective"]["chosen"])
    assert data["search"]["label"] == best["label"] and best["seconds_per_evaluation"] > 0
    assert "reporting split (4 examples)" in data["notes"][0]
    assert [n.split(":")[0] for n in data["notes"][1:]] == ["tuned cat", "tuned iso_c"]
    assert all(r["dtype"] == "bfloat16" for r in runs.values())  # the searches; every row measured in float32
    assert all(n.endswith("searched in bfloat16.") for n in data["notes"][1:])
    assert data["loss_dtype"] == "float32"
    assert {"tune_search.png", "tune_retention.png"} <= set(data["plots"])
    assert "reporting split" in (out / "report.md").read_text()


@pytest.mark.model
def test_tuning_iso_cts_with_its_knob_is_remade_by_its_recipe(example_base, tmp_path):
    """A gradient-free tune of iso_cts (weights and common fraction) writes a recipe that remakes it."""
    skills = ["add", "sort"]
    out = tmp_path / "tuned"
    args = ["tune", *(f"{s}={ROOT / 'examples/adapters' / s}" for s in skills), "--base", str(example_base)]
    args += _small_evals(tmp_path, skills) + ["-s", "iso_cts", "--evaluations", "6", "--lr", "0.5"]
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(cli, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "tune.json").read_text())
    assert record["strategy"] == "iso_cts" and set(record["knobs"]) == {"common_fraction"}
    assert (
        len(record["trace"]) <= 6
        and record["tuning_objective"]["chosen"] >= record["tuning_objective"]["start"]
    )
    assert set(record["reporting_split"]["intervals"]["after"]) == set(skills)
    recipe = (out / "tune_recipe.toml").read_text()
    assert f"common_fraction = {record['knobs']['common_fraction']!r}" in recipe
    again = tmp_path / "again"
    result = runner.invoke(cli, ["merge", "--recipe", str(out / "tune_recipe.toml"), "-o", str(again)])
    assert result.exit_code == 0, result.output
    made, remade = _files(out), _files(again)
    assert remade == {k: v for k, v in made.items() if k in remade}
    assert "adapter_model.safetensors" in remade
    from peft import PeftConfig, PeftType

    assert PeftConfig.from_pretrained(str(out)).peft_type == PeftType.LORA  # an ordinary PEFT LoRA folder


@pytest.mark.model
def test_a_tuned_dare_merge_records_its_seed_and_is_remade_byte_for_byte(example_base, tmp_path):
    """DARE's drop masks follow --seed: the tune recipe records it, remakes the file exactly, and another
    seed on the same recipe draws other masks."""
    skills = ["add", "sort"]
    out = tmp_path / "tuned"
    args = ["tune", *(f"{s}={ROOT / 'examples/adapters' / s}" for s in skills), "--base", str(example_base)]
    args += _small_evals(tmp_path, skills) + ["-s", "dare_ties", "--seed", "7", "--evaluations", "2"]
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(cli, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "seed = 7" in (out / "tune_recipe.toml").read_text().splitlines()
    assert json.loads((out / "merge_recipe.json").read_text())["options"]["seed"] == 7
    remade = {}
    for name, extra in (("again", []), ("other", ["--seed", "8"])):
        recipe = ["merge", "--recipe", str(out / "tune_recipe.toml"), *extra, "-o", str(tmp_path / name)]
        result = runner.invoke(cli, recipe)
        assert result.exit_code == 0, result.output
        remade[name] = (tmp_path / name / "adapter_model.safetensors").read_bytes()
    assert remade["again"] == (out / "adapter_model.safetensors").read_bytes() != remade["other"]
