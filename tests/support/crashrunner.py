"""A fork server for the crash harness (tests/test_crash.py): imports everything once, then runs each
job in a forked child and SIGKILLs the child when it reaches its N-th write checkpoint.

Protocol: one JSON job per line on stdin, one JSON answer per line on stdout.
A job is {"cli": [args...]} (the `merging` command line) or {"report": "A"|"B", "out": path, "plots": bool}
(the comparison report writer on the bundled example report), with "pause_at": N (0 = run to the end) and
"fsize": bytes (an RLIMIT_FSIZE for the child, or null); "warm": true runs it in the server itself.
The answer says whether the child was killed, at which checkpoint, its exit code and its stderr
otherwise, and how many checkpoints it passed.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from merging_cli.main import cli  # noqa: E402

from merging.errors import MergingError  # noqa: E402
from merging.eval.results import Comparison  # noqa: E402
from merging.export import report as report_out  # noqa: E402
from merging.storage import atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = Comparison.from_dict(json.loads((ROOT / "reports" / "example" / "report.json").read_text()))
REPORTS = {"A": EXAMPLE, "B": replace(EXAMPLE, title=f"{EXAMPLE.title} (again)")}


def _child(job: dict, points_w: int, err_w: int) -> None:
    os.environ["MERGING_TEST_PAUSE_AT"] = f"{job.get('pause_at', 0)}:{points_w}"
    atomic._points[0] = 0
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(err_w, 2)
    if job.get("fsize") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
    try:
        code = _call(job)
    except BaseException as e:  # anything else is a bug the test must see
        os.write(2, f"{type(e).__name__}: {e}\n".encode())
        code = 99
    sys.stderr.flush()
    os._exit(code)


def _call(job: dict) -> int:
    try:
        if "cli" in job:
            cli.main(args=job["cli"], prog_name="merging", standalone_mode=True)
        else:
            if not job.get("plots", True):  # matplotlib takes seconds here; the report is written without it
                sys.modules["matplotlib"] = None
            report_out.write_report(REPORTS[job["report"]], Path(job["out"]), force=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except MergingError as e:  # as the command line shows it
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def warm(job: dict) -> dict:
    """Run a job in the server itself, so that its lazy imports are paid once, not in every child."""
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        code = _call(job)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
    return {"killed": False, "label": None, "points": 0, "code": code, "stderr": ""}


def run(job: dict) -> dict:
    if job.get("warm"):
        return warm(job)
    points_r, points_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(points_r)
        os.close(err_r)
        _child(job, points_w, err_w)
    os.close(points_w)
    os.close(err_w)
    at, count, label, killed, buf = job.get("pause_at", 0), 0, None, False, b""
    with os.fdopen(points_r, "rb") as points:
        for line in points:  # EOF when the child exits
            count, _, label = line.decode().strip().partition(" ")
            count = int(count)
            if count == at:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
    with os.fdopen(err_r, "rb") as err:
        buf = err.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"killed": killed, "label": label, "points": count, "code": code, "stderr": buf.decode()}


def main() -> None:
    for line in sys.stdin:
        answer = run(json.loads(line))
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
