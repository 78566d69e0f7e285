"""The model card: `publish --dry-run` prints the README.md that would be uploaded, base_model is a Hub id
or absent (with a way to name it), and the recipe lists only the options its strategy reads."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from merging_cli.main import cli

from merging.export import hub as publish


def _merge(fx, tmp_path, *extra):
    out = tmp_path / "m"
    args = ["merge", fx.adapter("llama", "lora"), fx.adapter("llama", "lokr"), "-s", "cat", "-o", out, *extra]
    r = CliRunner(env={"COLUMNS": "200"}).invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return out


def test_dry_run_prints_the_exact_card(fx, tmp_path):
    from huggingface_hub import ModelCard

    out = _merge(fx, tmp_path)
    r = CliRunner(env={"COLUMNS": "80"}).invoke(cli, ["publish", str(out), "--repo", "a/b", "--dry-run"])
    assert r.exit_code == 0, r.output
    card = publish.plan(out, "a/b").card
    assert card in r.output  # byte for byte, front matter included, not rendered as Markdown
    assert "---\nlibrary_name: peft" in r.output
    data = ModelCard(card).data.to_dict()
    assert data["library_name"] == "peft" and "base_model" not in data  # a local base is not a Hub id
    assert "--base-model" in card
    assert "Strategy: `cat` (no options)." in card and "density" not in card and "``" not in card


def test_base_model_is_recorded_when_named(fx, tmp_path):
    from huggingface_hub import ModelCard

    out = _merge(fx, tmp_path, "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct")
    card = publish.model_card(out)
    assert ModelCard(card).data.to_dict()["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(Exception, match="Hub id"):
        publish.model_card(out, base_model=str(tmp_path))


def test_recipe_lists_the_options_the_strategy_reads(fx, tmp_path):
    out = tmp_path / "t"
    inputs = [fx.adapter("llama", "lora"), fx.adapter("llama", "lora_b")]
    args = ["merge", *inputs, "-s", "ties", "--density", "0.3", "-o", out]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    card = publish.model_card(out)
    line = next(line for line in card.splitlines() if line.startswith("Strategy: `ties`"))
    assert '"density": 0.3' in line and "majority_sign" in line
    assert '"seed"' not in line and "signed" not in line
