"""The docs cannot go stale: every command in docs/cli.md runs, the guide's figures are the report's,
the recipes merge, and every command's --help ends with an example."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from merging_cli.main import cli

from merging.eval.results import Comparison
from merging.export import report as report_out
from merging.formats import sources

ROOT = Path(__file__).resolve().parents[1]


def commands(markdown: str) -> list[str]:
    """The `merging ...` lines of the ```bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip().startswith("merging ")]


def python_blocks(markdown: str) -> list[str]:
    """The ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def run_blocks(blocks: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run docs/api.md's blocks in order in one namespace, from a folder with the examples, as a notebook."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    namespace: dict = {}
    for i, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/api.md, python block {i}", "exec"), namespace)
    return namespace


def test_api_md_runs_up_to_the_base_model(tmp_path, monkeypatch):
    """The load, merge, save and inspect blocks (no base model needed) run and check what they print."""
    blocks = python_blocks((ROOT / "docs" / "api.md").read_text())
    first_base = next(i for i, b in enumerate(blocks) if "example_base()" in b)
    ns = run_blocks(blocks[:first_base], tmp_path, monkeypatch)
    assert ns["cat"].exact and (tmp_path / "out" / "api-svd" / "merge_recipe.json").is_file()


@pytest.mark.model
def test_every_block_of_api_md_runs(example_base, tmp_path, monkeypatch):
    ns = run_blocks(python_blocks((ROOT / "docs" / "api.md").read_text()), tmp_path, monkeypatch)
    assert not ns["report"].failed and (tmp_path / "out" / "api-compare" / "report.json").is_file()


def test_every_command_has_help_ending_with_an_example():
    for name in cli.commands:
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0
        body = result.output.split("Options:")[0].strip().splitlines()
        assert body[-1].strip().startswith("Example: merging "), name


def test_cli_page_covers_every_command():
    text = (ROOT / "docs" / "cli.md").read_text()
    ran = {c.split()[1] for c in commands(text)}
    assert ran == set(cli.commands), set(cli.commands) ^ ran


@pytest.mark.model
def test_every_command_in_cli_md_runs(example_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    for line in commands((ROOT / "docs" / "cli.md").read_text()):
        line = line.replace('"$(merging example-base)"', shlex.quote(str(example_base)))
        args = shlex.split(line)[1:]
        result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, args)
        assert result.exit_code == 0, f"{line}\n{result.output}"
    report = json.loads((tmp_path / "out" / "exact" / "verify_report.json").read_text())
    assert report["rows"][0]["passed"] is True


def test_guide_tables_are_the_committed_report():
    """Every row of the guide's tables is a row of reports/example/report.json, rendered the same way."""
    data = json.loads((ROOT / "reports" / "example" / "report.json").read_text())
    report = Comparison.from_dict(data)
    assert report.to_dict() == data  # the typed report reads and writes report.json unchanged
    guide = (ROOT / "docs" / "guide.md").read_text()
    head, rows = report_out.table_rows(report)
    quoted = [ln for ln in guide.splitlines() if ln.startswith("| ") and ln.count("|") == len(head) + 1]
    expected = {"| " + " | ".join(r) + " |" for r in rows}
    fidelity = [q for q in quoted if q.split("|")[1].strip() in {r[0] for r in rows}]
    assert len(fidelity) >= 5 and set(fidelity) <= expected
    shead, srows = report_out.skill_rows(report)
    skills = {"| " + " | ".join(r) + " |" for r in srows}
    names = {r[0] for r in srows}
    quoted_skills = [
        ln
        for ln in guide.splitlines()
        if ln.count("|") == len(shead) + 1 and ln.split("|")[1].strip() in names
    ]
    assert len(quoted_skills) >= 3 and set(quoted_skills) <= skills


RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_merge(recipe, tmp_path):
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        cli, ["merge", "--recipe", str(recipe), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    merged = sources.load(tmp_path / "o")
    spec = recipe.read_text()
    inputs = [sources.load(recipe.parent / p)[0] for p in re.findall(r'"(\.\./adapters/\w+)"', spec)]
    if '"cat"' in spec or '"multiplicative"' in spec:  # exact: check the weight space against dense math
        lora = next(a for a in merged if "lora" in a.kinds)
        for mod, d in lora.deltas.items():
            stack = [ad.deltas[mod] for ad in inputs if mod in ad.deltas and "ia3" not in ad.kinds]
            if any(mod in ad.deltas for ad in inputs if "ia3" in ad.kinds):
                continue  # folded with an IA³ vector: covered by test_strategies
            expected = sum(x.dense() for x in stack)
            assert torch.allclose(d.dense(), expected, rtol=1e-4, atol=1e-7), mod
    assert len(merged) == (2 if "ia3" in recipe.stem else 1)
