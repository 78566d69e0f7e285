"""The comparison report on the bundled example: structure, exactness, skills, and the HTML renders."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from merging_cli.main import cli

from merging.eval.verify import GROUPED

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ["add", "sort", "reverse", "translate", "sentiment"]


@pytest.fixture(scope="module")
def example_report(example_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "example"
    args = [
        "compare",
        *(f"{s}={ROOT / 'examples/adapters' / s}" for s in SKILLS),
        "--base",
        str(example_base),
    ]
    args += ["--strategies", "cat,svd,ties,linear,multiplicative", "--ranks", "4,16"]
    args += [a for s in SKILLS for a in ("--eval", f"{s}={ROOT / 'examples/data' / f'{s}.jsonl'}")]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.model
def test_report_structure_exactness_and_skills(example_report):
    out, output = example_report
    data = json.loads((out / "report.json").read_text())
    labels = [v["label"] for v in data["variants"]]
    assert labels == ["cat", "svd r=4", "svd r=16", "ties r=4", "ties r=16", "multiplicative"]
    assert [s["label"] for s in data["not_applicable"]] == ["linear"]
    by = {v["label"]: v for v in data["variants"]}
    assert by["cat"]["passed"] is True and by["cat"]["effect_rel_error"] <= 1e-4
    assert by["multiplicative"]["passed"] is True
    assert by["svd r=4"]["effect_rel_error"] > by["svd r=16"]["effect_rel_error"] > 0
    assert {by[k]["loaded_by"] for k in ("svd r=4", "svd r=16", "ties r=4", "ties r=16")} == {GROUPED}
    assert by["ties r=4"]["params"] < by["ties r=16"]["params"]  # the ranks share one SVD, not one result
    for v in data["variants"]:
        assert set(v["skills"]) == set(SKILLS)
        assert all(isinstance(v["skills"][s]["retention"], float) for s in SKILLS)
        for s in SKILLS:  # every retention with its 95% interval around it
            got = v["skills"][s]
            assert got["interval"]["low"] <= got["retention"] <= got["interval"]["high"]
    assert set(data["leads"]) == set(SKILLS)
    for s, lead in data["leads"].items():  # the best row per skill, and whether its lead is significant
        best = max(data["variants"], key=lambda v: v["skills"][s]["retention"])
        assert best["skills"][s]["retention"] == by[lead["best"]]["skills"][s]["retention"]
        assert lead["significant"] == (lead["difference"]["low"] > 0)
    # cat folds what the stack folds: equal up to rounding (in bf16, of the weights: 0.4% seen on add)
    rtol = {"float32": 1e-3, "bfloat16": 1e-2}[data["loss_dtype"]]
    for s in SKILLS:  # each bundled adapter really learnt its skill
        assert data["skills"]["alone"][s] < 0.6 * data["skills"]["base"][s], s
        assert by["cat"]["skills"][s]["loss"] == pytest.approx(data["skills"]["stacked"][s]["loss"], rel=rtol)
    assert {
        "fidelity_vs_rank.png",
        "per_layer_error.png",
        "size_vs_fidelity.png",
        "skill_retention.png",
    } <= set(data["plots"])
    md = (out / "report.md").read_text()
    for p in data["plots"]:
        assert f"]({p})" in md and (out / p).stat().st_size > 5000
    assert "PASS" in output and "skill retention" in output
    assert "95% bootstrap intervals" in md and "| skill | best | runner-up |" in md


@pytest.mark.model
def test_html_is_self_contained_and_renders(example_report, tmp_path):
    out, _ = example_report
    page = (out / "report.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<link" not in page and "http" not in page.replace("http-equiv", "")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed; the file references were checked")
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    flags += ["--no-first-run", "--disable-component-update", "--disable-sync"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400"]
    subprocess.run([chromium, *flags, (out / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
