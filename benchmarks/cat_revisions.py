"""cat end to end at git revisions side by side: interleaved fresh processes against copy + fsync, one run.

On a shared machine only ratios measured in one run mean anything; this runs every revision's
``merging merge -s cat`` (its ``merging`` package from ``git archive``) and the durable copy of the same
inputs in turn (which goes first rotating), ``--repeats`` times, and prints each one's median wall time,
its CPU time (all threads) and the ratio to copy + fsync, with the load average before and after. The
command line (``merging_cli``) is this checkout's for every revision.

    python -m benchmarks.cat_revisions --inputs small --repeats 11 b4c1d70 HEAD
    python -m benchmarks.cat_revisions --inputs 8b --repeats 4 b4c1d70 HEAD
    MERGING_READAHEAD=1 python -m benchmarks.cat_revisions HEAD   # the per-file read-ahead workers
    MERGING_HASH_BEHIND=0 python -m benchmarks.cat_revisions HEAD   # the hash on the reading thread
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, os, resource, shutil, sys, time
from pathlib import Path
job, out, ins = sys.argv[1], sys.argv[2], sys.argv[3:]
if job == "cat":
    from click.testing import CliRunner
    from merging_cli.main import cli
    import transformers, merging.merge.pipeline  # noqa: F401  (imports: a fixed cost, not timed)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
c0, t0 = cpu(), time.perf_counter()
if job == "copy_fsync":
    for src in ins:
        shutil.copytree(src, Path(out) / Path(src).name)
    for f in sorted(Path(out).rglob("*")) + [Path(out)]:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
else:
    r = CliRunner().invoke(cli, ["merge", *ins, "-s", "cat", "-o", out])
    assert r.exit_code == 0, r.output
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": cpu() - c0}))
"""


def inputs(kind: str, folder: Path) -> list[Path]:
    """The small benchmark's four rank-64 LoRAs (80 MB) or the 8B rank-16 row's four (640 MiB)."""
    if kind == "small":
        from benchmarks.run import make_adapters

        return make_adapters(folder, 2, 4, 64)
    from benchmarks.real_sizes import write_adapter

    for k in range(4):
        write_adapter(folder / f"a{k}", "llama3-8b", 16, seed=k)
    return [folder / f"a{k}" for k in range(4)]


def run(job: str, out: Path, ins: list[Path], pythonpath: str | None) -> dict:
    env = dict(os.environ) | ({"PYTHONPATH": pythonpath} if pythonpath else {})
    p = subprocess.run([sys.executable, "-c", CHILD, job, str(out), *map(str, ins)], capture_output=True,
                       text=True, env=env, cwd=out.parent)  # fmt: skip
    if p.returncode:
        raise RuntimeError(f"{job} failed: {p.stderr[-2000:]}")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("revisions", nargs="+", help="git revisions whose merging package to time")
    parser.add_argument("--inputs", choices=("small", "8b"), default="small")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        trees = {}
        for rev in args.revisions:
            trees[rev] = tmp / f"rev-{len(trees)}"
            trees[rev].mkdir()
            tar = subprocess.run(
                ["git", "archive", rev, "merging"], cwd=ROOT, capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(trees[rev])], input=tar.stdout, check=True)
        ins = inputs(args.inputs, tmp / "inputs")
        run("copy_fsync", tmp / "out", ins, None)  # untimed: the first job after writing the inputs is slow
        load = os.getloadavg()[0]
        runs: dict[str, list[dict]] = {"copy_fsync": []} | {rev: [] for rev in args.revisions}
        jobs = ["copy_fsync", *args.revisions]
        for i in range(args.repeats):  # each job first in turn: none always runs after the same one
            for name in jobs[i % len(jobs) :] + jobs[: i % len(jobs)]:
                job, path = ("copy_fsync", None) if name == "copy_fsync" else ("cat", str(trees[name]))
                runs[name].append(run(job, tmp / "out", ins, path))
    floor = statistics.median(r["wall"] for r in runs["copy_fsync"])
    print(f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after; {args.repeats} runs each")
    for name, rs in runs.items():
        wall, cpu = statistics.median(r["wall"] for r in rs), statistics.median(r["cpu"] for r in rs)
        print(f"{name:12s} wall {wall:.3f} s (min {min(r['wall'] for r in rs):.3f})  cpu {cpu:.3f} s  "
              f"÷ copy + fsync {wall / floor:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
