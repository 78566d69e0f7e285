"""A busy machine: the example's compare (merges, verify, held-out losses) quiet and beside busy loops.

Four runs in one go, each a fresh ``merging compare`` process: ours (the console script, which settles
threads and the OpenMP wait policy from affinity, quota and load: merging.core.cpus) and torch's defaults
(``python -m merging_cli.main``, which skips that), quiet and with ``LOOPS`` busy-loop processes started
here and ended by pid. The fair share is the quiet time ÷ the CPU fraction the loops leave us
(cores ÷ (cores + loops): our process wants every core, each loop one).

    python -m benchmarks.busy [--full]     # --full: the whole `make example` job (minutes per run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LOOPS = 2
SKILLS = ("add", "sort", "reverse", "translate", "sentiment")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


def compare_args(base: str, out: Path, full: bool) -> list[str]:
    """The example's compare (Makefile `example`), or a slice of it: two skills, cat only, no held-out losses
    (loading the base and verify's forwards: what every row of the example pays)."""
    skills = SKILLS if full else SKILLS[:2]
    inputs = [f"{s}=examples/adapters/{s}" for s in skills]
    evals = [a for s in skills for a in ("--eval", f"{s}=examples/data/{s}.jsonl")] if full else []
    how = (["--strategies", "all", "--ranks", "4,16,64", "--budget", "r4,r16", "--tune", "6"] if full
           else ["--strategies", "cat"])  # fmt: skip
    return ["compare", *inputs, "--base", base, *how, *evals, "-o", str(out), "--force"]


def run(kind: str, args: list[str], limit: float | None = None) -> float | None:
    """Wall seconds of one compare process: ``ours`` through the console script, ``torch`` without it
    (None: still running after ``limit`` seconds, then ended)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}  # nothing set: each side decides
    command = [str(VENV_BIN / "merging")] if kind == "ours" else [sys.executable, "-m", "merging_cli.main"]
    start = time.perf_counter()
    try:
        r = subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                           timeout=limit)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        raise RuntimeError(f"{kind} compare failed: {r.stderr[-2000:]}")
    return time.perf_counter() - start


def busy_loops(n: int) -> list[subprocess.Popen]:
    """n processes that keep one CPU each busy until ended."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def end(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def measure(full: bool = False, limit: float | None = None) -> dict:
    """Quiet and busy, ours and torch's defaults, in one run; the ratios the issue asks for (a run past
    ``limit`` seconds is ended and recorded as at least that long)."""
    base = subprocess.run([str(VENV_BIN / "merging"), "example-base"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip().splitlines()[-1]  # fmt: skip
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    seconds: dict[str, float] = {}
    over: list[str] = []

    def timed(key: str, kind: str, out: Path) -> None:
        took = run(kind, compare_args(base, out, full), limit)
        seconds[key] = took if took is not None else float(limit or 0)
        over.extend([] if took is not None else [key])

    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("ours", "torch"):
            timed(f"quiet_{kind}", kind, Path(tmp) / f"q-{kind}")
        loops = busy_loops(LOOPS)
        try:
            time.sleep(1.0)  # let the loops show in the load the choice reads
            for kind in ("ours", "torch"):
                timed(f"busy_{kind}", kind, Path(tmp) / f"b-{kind}")
        finally:
            end(loops)
    fraction = cores / (cores + LOOPS)
    fair = seconds["quiet_ours"] / fraction
    return {
        "work": "make example's compare" if full else "compare: add+sort, cat (verify only)",
        "cores": cores, "loops": LOOPS, "load_before": os.getloadavg()[0], "seconds": seconds,
        "fair_share_seconds": fair, "ended_at_limit": over,  # these seconds are lower bounds
        "ratio_vs_fair_share": seconds["busy_ours"] / fair,
        "ratio_vs_torch_defaults": seconds["busy_ours"] / seconds["busy_torch"],
    }  # fmt: skip


def render(b: dict) -> list[str]:
    """The busy-machine section of benchmarks.md."""
    s = b["seconds"]
    return [
        "", "## Busy machine (issue 35)", "",
        f"{b['work']}; {b['cores']} cores, {b['loops']} busy loops started by the benchmark "
        f"(load {b['load_before']:.1f} before it).", "",
        "| | quiet | busy |", "|---|---:|---:|",
        f"| ours (cpus.settle) | {s['quiet_ours']:.1f} s | {s['busy_ours']:.1f} s |",
        f"| torch defaults | {s['quiet_torch']:.1f} s | {s['busy_torch']:.1f} s |", "",
        f"Fair share {b['fair_share_seconds']:.1f} s: busy.ratio_vs_fair_share "
        f"{b['ratio_vs_fair_share']:.2f} (target ≤ 1.25), busy.ratio_vs_torch_defaults "
        f"{b['ratio_vs_torch_defaults']:.2f} (target < 1)." + _limited(b),
    ]  # fmt: skip


def _limited(b: dict) -> str:
    over = b.get("ended_at_limit") or []
    return f" Ended at the time limit (their seconds are lower bounds): {', '.join(over)}." if over else ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="the whole `make example` compare per run")
    parser.add_argument("--limit", type=float, default=None, help="end a run after this many seconds")
    args = parser.parse_args()
    result = measure(args.full, args.limit)
    print(json.dumps(result, indent=2))
    print("\n".join(render(result)))


if __name__ == "__main__":
    main()
