"""The crash harness: every writer is SIGKILLed at each of its write checkpoints, and made to fail by a
file-size limit; the previous output must stay byte-identical or the new one be complete, and the next
run must leave no temporary entry behind.

Each job runs in a child forked from tests/support/crashrunner.py (imports paid once), which kills the
child when it reaches its N-th checkpoint (MERGING_TEST_PAUSE_AT): inside a file being written, between files,
between the fsyncs, the links that keep the user's files and the swap. Two outputs A and B alternate so
that every kill replaces one complete output by another.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.system  # SIGKILLed child processes

ROOT = Path(__file__).resolve().parents[1]
SEED = 23
PER_WAY = 40  # kill points per writer and direction: all of them up to 40, else a seeded sample of 40
FSIZE_TRIES = 3


class Runner:
    """The fork server (tests/support/crashrunner.py) in a subprocess that sees this checkout."""

    def __init__(self, tmp: Path) -> None:
        # TMPDIR: a killed job cannot remove its temporary folders (verify's); they stay in pytest's tmp
        env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200", OMP_NUM_THREADS="1", TMPDIR=str(tmp))
        env.pop("MERGING_TEST_PAUSE_AT", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.crashrunner"], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip

    def run(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the crash runner died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(tmp_path_factory.mktemp("crash-tmp"))
    yield r
    r.close()


@dataclass
class Writer:
    name: str
    out: str  # the output's name in its folder
    jobs: Callable[[Path, Path], tuple[dict, dict]]  # (fixtures-independent) jobs A and B for an output
    loads: Callable[[Path], None]  # the output opens in the reader its users use


def _snap(out: Path) -> dict:
    """Every byte and mode of the output, and of the user's files beside and inside it."""
    parent = out.parent
    files = [p for p in parent.rglob("*") if p.is_file() and ".tmp-" not in str(p) and ".old-" not in str(p)]
    return {str(p.relative_to(parent)): (p.read_bytes(), p.stat().st_mode) for p in sorted(files)}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _peft_loads(fx):
    def check(out: Path) -> None:
        from peft import PeftModel

        folders = [out / n for n in json.loads((out / "merging_stack.json").read_text())["stack"]] if (
            out / "merging_stack.json"
        ).is_file() else [out]  # fmt: skip
        for folder in folders:
            PeftModel.from_pretrained(fx.load_base("llama"), folder)

    return check


def _writers(fx) -> list[Writer]:
    base = str(fx.base("llama"))
    a = {k: str(fx.adapter("llama", k)) for k in ("lora", "lora_b", "lora_r8", "ia3", "loha", "lokr")}

    def merge(*inputs, fmt="peft", extra=()):
        args = ["merge", *inputs, "-s", "cat", "--format", fmt, *extra]
        return lambda out, tmp: {"cli": [*args, "-o", str(out), "--force"]}

    def pair(x, y):
        return lambda out, tmp: (x(out, tmp), y(out, tmp))

    def kohya_loads(out):
        from merging.formats import sources

        assert sources.load(out, base=base)[0].deltas

    def gguf_loads(out):
        from gguf import GGUFReader

        assert GGUFReader(str(out)).tensors

    def bake_loads(out):
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out)

    def verify_loads(out):
        from merging.eval.results import Report

        assert Report.from_json(out.read_text()).rows

    def report_loads(out):
        from merging.eval.results import Comparison

        assert Comparison.from_dict(json.loads((out / "report.json").read_text())).variants

    def cli(*args):
        return lambda out, tmp: {"cli": [*args, "-o", str(out), "--force"]}

    def verify(strategy):
        return lambda out, tmp: {"cli": ["verify", "--base", base, a["lora"], a["lora_b"], "-s", strategy,
                                         "--max-new-tokens", "1", "--save", str(out)]}  # fmt: skip

    peft_loads, g = _peft_loads(fx), ("--base", base)
    lora, lora_b, lora_r8 = a["lora"], a["lora_b"], a["lora_r8"]
    # matplotlib needs seconds per report here: the kill runs write the pages without plots
    reports = lambda out, tmp: tuple({"report": x, "out": str(out), "plots": False} for x in "AB")  # noqa: E731
    return [
        Writer("merge-peft", "out", pair(merge(lora, lora_b), merge(lora, lora_r8)), peft_loads),
        Writer("merge-ia3+lora-pair", "out", pair(merge(a["ia3"], lora), merge(lora, lora_b)), peft_loads),
        Writer("merge-kohya", "out.safetensors",
               pair(merge(lora, lora_b, fmt="kohya"), merge(lora, lora_r8, fmt="kohya")), kohya_loads),
        Writer("merge-gguf", "out.gguf",
               pair(merge(lora, lora_b, fmt="gguf", extra=g), merge(lora, lora_r8, fmt="gguf", extra=g)),
               gguf_loads),
        Writer("convert-peft", "out",
               pair(cli("convert", a["loha"], "--to", "peft"), cli("convert", a["lokr"], "--to", "peft")),
               peft_loads),
        Writer("bake", "out", pair(cli("bake", *g, lora), cli("bake", *g, lora_b)), bake_loads),
        Writer("verify-save", "verify.json", pair(verify("cat"), verify("svd")), verify_loads),
        Writer("compare-report", "out", reports, report_loads),
    ]  # fmt: skip


def _clean(runner: Runner, job: dict) -> dict:
    r = runner.run({**job, "pause_at": 0})
    assert r["code"] == 0 and not r["killed"], r
    return r


def test_every_writer_survives_sigkill_at_every_write_checkpoint(runner, fx, tmp_path):
    """≥ 200 kill points in all: after each, the output is the previous one or the new one, byte for byte
    (modes too, the user's NOTES.txt and logs/ with it); the next run leaves no temporary entry. Then
    RLIMIT_FSIZE at seeded sizes: one line, exit 2, the previous output untouched, nothing left over."""
    rng = random.Random(SEED)
    writers = _writers(fx)
    for w in writers:  # the server pays every lazy import once, writing into a scratch folder
        job, _ = w.jobs(tmp_path / "warm" / w.name / w.out, tmp_path)
        assert runner.run({**job, "warm": True})["code"] == 0
    started, total, seen = time.perf_counter(), 0, {}
    for w in writers:
        began = time.perf_counter()
        folder = tmp_path / w.name
        folder.mkdir()
        out = folder / w.out
        (folder / "NOTES.txt").write_text("the user's notes beside the output\n")
        job_a, job_b = w.jobs(out, tmp_path)
        _clean(runner, job_a)
        if out.is_dir():
            (out / "NOTES.txt").write_text("the user's notes inside the output\n")
            (out / "logs").mkdir()
            (out / "logs" / "train.log").write_text("step 1 loss 2.0\n")
        snaps = {"A": _snap(out)}
        w.loads(out)
        points = {"B": _clean(runner, job_b)["points"]}
        snaps["B"] = _snap(out)
        w.loads(out)
        points["A"] = _clean(runner, job_a)["points"]
        assert snaps["A"] != snaps["B"] and _snap(out) == snaps["A"]
        state, outcomes = "A", {"old": 0, "new": 0}
        picks = {t: sorted(rng.sample(range(1, points[t] + 1), min(points[t], PER_WAY))) for t in "BA"}
        kills = [(t, n) for t in "BA" for n in picks[t]]
        for target, n in kills:
            if state == target:  # a kill landed after the swap: go back to the other output first
                state = "B" if target == "A" else "A"
                _clean(runner, job_a if state == "A" else job_b)
            r = runner.run({**(job_a if target == "A" else job_b), "pause_at": n})
            assert r["killed"], (w.name, n, r)
            now = _snap(out)
            assert now in (snaps[state], snaps[target]), f"{w.name}: killed at {n} ({r['label']}): lost"
            outcomes["old" if now == snaps[state] else "new"] += 1
            state = "A" if now == snaps["A"] else "B"
            total += 1
        # write failures: a file-size limit somewhere inside the new output
        size = max(len(b) for b, _ in snaps["B"].values())
        for limit in sorted(rng.sample(range(0, size), FSIZE_TRIES)):
            if state == "B":
                _clean(runner, job_a)
                state = "A"
            r = runner.run({**job_b, "fsize": limit})
            assert r["code"] == 2, (w.name, limit, r)
            assert "cannot write" in r["stderr"] and len(r["stderr"].strip().splitlines()) == 1, r["stderr"]
            assert _snap(out) == snaps["A"] and _leftovers(folder) == [], (w.name, limit)
        _clean(runner, job_b)
        assert _leftovers(folder) == [], w.name
        assert _snap(out) == snaps["B"]
        assert outcomes["old"] and outcomes["new"], (w.name, outcomes)
        seen[w.name] = (points["A"], points["B"], outcomes, f"{time.perf_counter() - began:.1f} s")
    seconds = time.perf_counter() - started
    print(f"crash harness: {total} kill points over {len(seen)} writers in {seconds:.1f} s: {seen}")
    assert total >= 200
