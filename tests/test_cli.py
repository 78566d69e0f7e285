"""The command line: version, inspect, and one-line errors with exit code 2."""

from __future__ import annotations

import re

from click.testing import CliRunner
from merging_cli.main import cli

from merging import __version__


def test_version():
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_inspect_lists_tensor_files(fx):
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["inspect", str(fx.base("llama")), "--modules"])
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj" in result.output and "64×64" in result.output
    kind = next(ln for ln in result.output.splitlines() if ln.startswith("self_attn.q_proj "))
    assert kind.split()[:4] == ["self_attn.q_proj", "0–1", "weight", "64×64"]  # the summary: one row per kind
    # embed, lm_head, final norm + 2 layers × (4 attention + 3 mlp + 2 norms)
    assert "21 tensors" in result.output


def test_inspect_adapter_shows_deltas(fx):
    """The summary groups layers by module kind; --modules GLOB gives the per-module rows, whole in a pipe."""
    path = str(fx.adapter("llama", "lora_patterns"))
    result = CliRunner().invoke(cli, ["inspect", path, "--modules", "*.v_proj"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = {cells[0]: cells[1:] for ln in lines if len(cells := re.split(r"\s{2,}", ln.strip())) > 4}
    assert rows["model.layers.1.self_attn.v_proj"][:4] == ["lora", "32×64", "6", "0.5"]
    assert [m for m in rows if m.startswith("model.layers.")] == [
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"
    ]  # only the matching modules, in layer order
    assert rows["self_attn.v_proj"][:2] == ["0–1", "lora"]  # the summary: one row for both layers
    assert "6 modules" in result.output


def test_inspect_corrupt_file_is_one_line_exit_2(tmp_path, fx):
    bad = tmp_path / "adapter_model.safetensors"
    data = (fx.adapter("llama", "lora") / "adapter_model.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["inspect", str(bad)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated" in lines[0]


def test_inspect_says_when_the_config_is_missing(fx, tmp_path):
    import shutil

    (tmp_path / "a").mkdir()
    shutil.copy(fx.adapter("llama", "lora") / "adapter_model.safetensors", tmp_path / "a")
    r = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["inspect", str(tmp_path / "a")])
    assert r.exit_code == 0 and "no adapter_config.json" in r.output and "unknown without it" in r.output


def test_compare_prints_the_librarys_refusal_of_an_option_as_one_line(fx, tmp_path):
    """--loss-dtype and --budget are checked by the library alone; the CLI prints its line with the flag."""
    said = {"--loss-dtype": "error: --loss-dtype must be one of auto, float32, bfloat16, got 'fp8'",
            "--budget": "error: --budget '4k': a parameter count or rN"}  # fmt: skip
    for flag, value in (("--loss-dtype", "fp8"), ("--budget", "r4,4k")):
        args = ["compare", str(fx.adapter("llama", "lora")), "--base", str(tmp_path / "no-base"),
                "-o", str(tmp_path / "report"), flag, value]  # fmt: skip
        result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert result.output.strip() == said[flag]
    assert not (tmp_path / "report").exists()
