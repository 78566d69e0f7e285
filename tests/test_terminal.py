"""What a person sees: every table-printing command in a pseudo-terminal of 80 and 120 columns and through a
pipe. No cell is cut (no "…", every value whole), no terminal line is wider than the terminal, and the values
shown are the command's --json values in the same compact form."""

from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner
from merging_cli import tables
from merging_cli.compare import rows as compare_rows
from merging_cli.compare import skill_rows
from merging_cli.main import cli
from merging_cli.tables import count, pct, sci, span
from rich.cells import cell_len
from rich.console import Console

from merging.eval.results import Comparison
from tests.support.ttyrun import ANSI, piped, tty_runs

ROOT = Path(__file__).resolve().parents[1]
# small tensors: one thread (the children too, ttyrun); every test runs pty children: a system test
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.system]
ADD, SORT, SENTIMENT = (str(ROOT / "examples" / "adapters" / n) for n in ("add", "sort", "sentiment"))


def as_seen(text: str, width: int | None) -> dict[str, set[str]]:
    """Check the text whole (and within ``width`` on a terminal); every row's cells by its first cell, over
    all the parts a narrow terminal splits a table into."""
    assert "…" not in text and "..." not in text
    assert not re.search(r"[│┃━─]{3}.*…", text)
    if width is not None:
        wide = [ln for ln in text.splitlines() if cell_len(ln) > width]
        assert not wide, f"wider than {width}: {wide}"
    rows: dict[str, set[str]] = defaultdict(set)
    for ln in text.splitlines():
        cells = re.split(r"\s{2,}", ln.strip())
        if len(cells) > 1:
            rows[cells[0]] |= set(cells[1:])
    return rows


def shown(rows: dict[str, set[str]], key: str, values: list[str]) -> None:
    missing = [v for v in values if v and v not in rows[key]]
    assert not missing, f"{key}: {missing} not among {sorted(rows[key])}"


def json_of(*args: str) -> dict:
    return json.loads(in_pipe(*args, "--json"))


def in_pipe(*args: str) -> str:
    """What a run writes to a stdout that is not a terminal, in this process (a child costs the imports)."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code in (0, 1), result.output
    return result.output


def test_formats_are_compact_and_whole():
    assert [sci(6.734e-4), sci(0.0), sci(None), sci(2.16e12)] == ["6.7e-04", "0", "", "2.2e+12"]
    shares = [pct(1.0), pct(0.99996), pct(0.875), pct(0.0), pct(1e-6)]
    assert shares == ["100%", "99.9%", "87.5%", "0%", "0.1%"]
    assert [count(912), count(4608), count(276480), count(1_536_000), count(7.2e9)] == [
        "912", "4.6k", "276k", "1.5M", "7.2G",
    ]  # fmt: skip
    assert [tables.ranges([0, 1, 2, 29, 28, 5]), span([3.1, 0.67, 1.0]), span([2, 2])] == [
        "0–2, 5, 28–29", "0.67–3.1", "2",
    ]  # fmt: skip
    names = sorted(["layers.10", "layers.2", "layers.1"], key=tables.natural)
    assert names == ["layers.1", "layers.2", "layers.10"]


def test_a_narrow_terminal_gets_parts_then_blocks_never_a_cut_cell():
    grid = tables.Grid("t", (tables.Col("name"), tables.Col("error", True), tables.Col("verdict")),
                       [["model.layers.10.q_proj", "6.7e-04", "FAIL"], ["[red]x", "0", "PASS"]])  # fmt: skip
    assert tables.fit([22, 7, 7], 80) == [[0, 1, 2]] and tables.fit([22, 7, 7], 32) == [[0, 1], [0, 2]]
    assert tables.fit([22, 7, 7], 30) is None and tables.fit([81], 80) is None
    for width, kind in ((80, "one part"), (32, "parts"), (24, "blocks")):
        term = Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)
        tables.show(grid, term)
        text = term.file.getvalue()
        assert all(cell_len(ln) <= width for ln in text.splitlines()), (kind, text)
        assert text.count("model.layers.10.q_proj") == {"one part": 1, "parts": 2, "blocks": 1}[kind]
        assert "6.7e-04" in text and "FAIL" in text and "[red]x" in text  # whole, and not read as markup
    assert "  error: 6.7e-04" in text  # the blocks: header: value
    assert tables.plain(grid).splitlines()[3:] == [
        "model.layers.10.q_proj  6.7e-04  FAIL", "[red]x                        0  PASS",
    ]  # fmt: skip


def test_inspect_summary_and_modules_at_80_120_and_in_a_pipe():
    doc = json_of("inspect", ADD, "--modules", "*.q_proj")
    assert doc["schema"] == "merging.inspect/1"
    (ad,) = doc["adapters"]
    kinds = {k["kind"]: k for k in ad["kinds"]}
    assert set(kinds) == {"model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.v_proj"}
    q = kinds["model.layers.*.self_attn.q_proj"]
    assert q["layers"] == list(range(30)) and q["rank"] == [8, 8] and q["scale"] == [2.0, 2.0]
    first = [m["module"] for m in ad["module_rows"]][:3]
    assert first == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1, 2)]
    assert sum(m["params"] for m in ad["module_rows"]) == q["params"] == 30 * 8 * (576 + 576)
    summary, modules = ["inspect", ADD], ["inspect", ADD, "--modules", "*.q_proj"]
    texts = tty_runs([(80, summary), (120, summary), (80, modules)])
    views = dict(zip(("t80", "t120", "m80"), texts, strict=True))
    views |= dict(zip(("pipe", "mpipe"), piped([summary, modules]), strict=True))
    for name, text in views.items():
        rows = as_seen(text, {"t80": 80, "t120": 120, "m80": 80}.get(name))
        for k in ad["kinds"]:  # the summary: the kind without model.layers.*, layers as ranges
            short = k["kind"].removeprefix("model.layers.*.")
            shown(rows, short, ["0–29", k["delta"], span(k["rank"], str), span(k["scale"]), span(k["norm"]),
                                count(k["params"])])  # fmt: skip
        assert f"{ad['params']:,} parameters" in text and "target_modules: q_proj, v_proj" in text
        for m in ad["module_rows"] if name in ("m80", "mpipe") else []:
            shown(rows, m["module"], [m["delta"], m["shape"], str(m["rank"]), tables.num(m["scale"]),
                                      tables.num(m["norm"]), count(m["params"])])  # fmt: skip
    page = (ROOT / "docs" / "cli.md").read_text()
    quoted = re.search(r"```\n(examples/adapters/add: .*?)```", page, flags=re.S)[1].splitlines()
    assert set(quoted[1:]) <= set(views["pipe"].splitlines())  # docs/cli.md quotes this output as it is
    grep = [ln for ln in views["mpipe"].splitlines() if "q_proj" in ln and ln.startswith("model.layers.")]
    assert len(grep) == 30 and grep[10].split()[0] == "model.layers.10.self_attn.q_proj"  # natural order
    assert "─" not in views["pipe"] and "─" in views["t80"]  # plain text for grep/awk; a rule on a terminal


def test_merge_summary_and_convert_at_80_120_and_in_a_pipe(tmp_path):
    merge = ["merge", ADD, SORT, "-s", "svd", "--rank", "4", "--force", "-o"]
    mixed = ["merge", ADD, SENTIMENT, "-s", "cat", "--force", "-o"]
    doc = json_of(*merge, str(tmp_path / "j"))
    assert doc["schema"] == "merging.merge/1" and doc["strategy"] == "svd"
    conv = json_of("convert", str(tmp_path / "j"), "-o", str(tmp_path / "j.safetensors"), "--to", "kohya")
    assert conv["schema"] == "merging.convert/1" and conv["modules"] == 90
    assert conv["bytes"] == (tmp_path / "j.safetensors").stat().st_size
    runs = [(80, [*merge, "t80"]), (120, [*merge, "t120"]), (80, [*mixed, "x80"]),
            (80, ["convert", "t80", "-o", "k.safetensors", "--to", "kohya", "--force"])]  # fmt: skip
    texts = tty_runs(runs, cwd=tmp_path)
    pipes = [in_pipe(*merge, str(tmp_path / "p")), in_pipe(*mixed, str(tmp_path / "xp"))]
    for text, width in zip([*texts[:3], *pipes], (80, 120, 80, None, None), strict=True):
        rows = as_seen(text, width)
        lora = next(a for a in doc["adapters"] if a["name"] == "lora") if "ia3" not in rows else None
        if lora:  # the same merge, written again: the same figures
            shown(rows, "lora", [str(lora["modules"]), str(lora["max_rank"]), count(lora["params"]),
                                 count(lora["bytes"]), sci(lora["weight_error_max"])])  # fmt: skip
        else:
            shown(rows, "ia3", ["90", count(57600)])
        assert "serving: max rank" in text and "vLLM: pass --max-lora-rank" in text
    as_seen(texts[3], 80)
    assert f"{conv['params']:,} parameters, {conv['bytes']:,} bytes" in texts[3]


def test_compare_tables_of_the_example_report_at_80_120_and_in_a_pipe():
    """The widest report there is: 23 variants, 5 skills (compare itself needs the real base: test_docs)."""
    path = ROOT / "reports" / "example" / "report.json"
    report = Comparison.from_dict(json.loads(path.read_text()))
    run = ["@show-report", str(path)]
    raw = tty_runs([(80, run), (120, run)], raw=True, NO_COLOR="1")
    assert "\x1b[1m" in raw[0] and not re.search(r"\x1b\[[0-9;]*3[0-9]m", raw[0])  # bold, but no colour
    texts = [*(ANSI.sub("", t) for t in raw), *piped([run])]
    for text, width in zip(texts, (80, 120, None), strict=True):
        rows = as_seen(text, width)
        for v, cells in zip(report.variants, compare_rows(report), strict=True):
            assert cells[3] == sci(v.row.effect_rel_error) and cells[-1] == count(v.params)
            shown(rows, v.label, cells[1:])
        for cells in skill_rows(report):
            shown(rows, cells[0], cells[1:])
    assert "PASS" in texts[0] and "approx." in texts[0]
    assert len([ln for ln in texts[2].splitlines() if ln.startswith("dare_ties r=16 ")]) == 2  # both tables


@pytest.fixture(scope="module")
def tiny(fx) -> tuple[str, list[str]]:
    return str(fx.base("llama")), [str(fx.adapter("llama", "lora")), str(fx.adapter("llama", "loha"))]


def test_verify_and_bake_at_80_120_and_in_a_pipe(tiny, tmp_path):
    base, ads = tiny
    verify = ["verify", "--base", base, *ads, "-s", "cat", "-s", "svd", "--rank", "2"]
    doc = json_of(*verify)
    assert doc["schema"] == "merging.verify/1" and [r["name"] for r in doc["rows"]] == ["cat", "svd r=2"]
    bake = ["bake", "--base", base, ads[0], "--force", "-o"]
    runs = [(80, verify), (120, ["--no-color", *verify]), (80, [*bake, "b80"]), (80, ["inspect", base])]
    raw = tty_runs(runs, cwd=tmp_path, raw=True)
    colour = re.compile(r"\x1b\[[0-9;]*3[0-9]m")  # a foreground colour: PASS in green
    assert colour.search(raw[0]) and not colour.search(raw[1])
    texts = [ANSI.sub("", t) for t in raw]
    baked = json_of(*bake, str(tmp_path / "bj"))
    assert baked["schema"] == "merging.bake/1" and "config.json" in baked["files"]
    for text, width in zip(texts[:2], (80, 120), strict=True):
        rows = as_seen(text, width)
        for r in doc["rows"]:  # a fresh run on the same tiny model: the same figures to two digits
            verdict = {True: "PASS", False: "FAIL", None: "approx."}[r["passed"]]
            shown(rows, r["name"], [verdict, sci(r["effect_rel_error"]), sci(r["kl"]),
                                    pct(r["top1_agreement"]), pct(r["greedy_agreement"]),
                                    sci(r["weight_error_max"])])  # fmt: skip
        assert "Reference:" in text
    as_seen(texts[2], 80)
    assert f"{sum(baked['files'].values()):,} bytes" in texts[2]
    model = json_of("inspect", base)  # a model folder: its tensors by module kind
    rows = as_seen(texts[3], 80)
    for k in model["kinds"]:
        layers = tables.ranges(k["layers"]) if k["layers"] else "1 module"
        cells = [layers, ", ".join(k["shapes"]), count(k["params"])]
        shown(rows, k["kind"].removeprefix("model.layers.*."), cells)
    assert {k["kind"] for k in model["kinds"]} >= {"lm_head", "model.layers.*.self_attn.q_proj"}
    pipe = in_pipe(*verify)
    shown(as_seen(pipe, None), "cat", ["PASS", "cat", sci(doc["rows"][0]["effect_rel_error"])])
    assert re.search(r"^Reference: .*loaded by peft: cat, svd r=2\.$", pipe, flags=re.M)  # one whole line


def test_completion_of_commands_strategies_and_paths():
    def complete(words: str) -> list[str]:
        cword = str(len(words.split()) - 1)
        env = {"_MERGING_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": cword}
        r = CliRunner().invoke(cli, [], env=env, prog_name="merging")
        assert r.exit_code == 0, r.output
        return r.output.split()

    assert complete("merging me") == ["plain,merge"]
    assert complete("merging compare a --strategies cat,sv") == ["plain,cat,svd"]
    assert "plain,all" in complete("merging compare a -s al")
    assert complete("merging verify --base B a -s dare_") == ["plain,dare_linear", "plain,dare_ties"]
    assert complete("merging merge a -s ti") == ["plain,ties"]
    assert complete("merging inspect exa") == ["file,exa"]
    assert "plain,--modules" in complete("merging inspect a --mo")
