"""The command line: version, inspect, and one-line errors with exit code 2."""

from __future__ import annotations

from click.testing import CliRunner

from cli.main import cli
from merging import __version__


def test_version():
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_inspect_lists_modules_and_totals(fx):
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["inspect", str(fx.adapter("llama", "lora"))])
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj" in result.output
    assert "4×64" in result.output
    # 2 layers × (q, v, up, down) × (A, B)
    assert "16 tensors" in result.output


def test_inspect_corrupt_file_is_one_line_exit_2(tmp_path, fx):
    bad = tmp_path / "adapter_model.safetensors"
    data = (fx.adapter("llama", "lora") / "adapter_model.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["inspect", str(bad)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated" in lines[0]
