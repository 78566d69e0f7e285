"""Run `merging` commands as a person sees them: stdout a pseudo-terminal of a given width, or a pipe.

    outs = tty_runs([(80, ["inspect", "a/"]), (120, ["inspect", "a/"])])   # what the terminal shows
    outs = piped([["inspect", "a/"]])                                       # what `| grep` reads

``tty_runs`` starts one Python process on a pty (imports once) and runs each command in it after resizing the
terminal (TIOCSWINSZ, as a window resize does); the text comes back without ANSI escapes and carriage returns.
``@show-report FILE`` stands for compare's tables of a report.json (compare itself needs a real base).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARK = "\x1e run done "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _env(**extra: str) -> dict[str, str]:
    drop = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # one torch thread: small tensors, and two threads spinning against other work cost 3× the CPU
    return env | {"PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "OMP_NUM_THREADS": "1"} | extra


def tty_runs(runs: list[tuple[int, list[str]]], cwd: Path | None = None, raw: bool = False,
             **env: str) -> list[str]:  # fmt: skip
    """The terminal text of each (columns, args) run, in one child process on a pty (raw: with ANSI codes)."""
    master, slave = pty.openpty()
    child = subprocess.Popen([sys.executable, "-m", "tests.support.ttyrun", json.dumps(runs)], stdin=slave,
                             stdout=slave, stderr=subprocess.DEVNULL, cwd=cwd, env=_env(**env))  # fmt: skip
    os.close(slave)
    data = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            data += chunk
        elif child.poll() is not None:
            break
    child.wait()
    os.close(master)
    text = data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
    text = text if raw else ANSI.sub("", text)
    return text.split(MARK)[: len(runs)]


def piped(runs: list[list[str]], cwd: Path | None = None, **env: str) -> list[str]:
    """The text each run writes when stdout is a pipe, as ``merging ... | grep`` reads it (one child)."""
    child = subprocess.run([sys.executable, "-m", "tests.support.ttyrun", json.dumps([[0, r] for r in runs])],
                           capture_output=True, text=True, cwd=cwd, env=_env(**env), check=True)  # fmt: skip
    return child.stdout.split(MARK)[: len(runs)]


def _child(runs: list[tuple[int, list[str]]]) -> None:
    from merging_cli.main import cli

    for cols, args in runs:
        if cols:
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 50, cols, 0, 0))
        try:
            if args[0] == "@show-report":  # compare's tables for a report.json, without running compare
                from merging_cli.compare import show

                from merging.eval.results import Comparison

                show(Comparison.from_dict(json.loads(Path(args[1]).read_text())))
            else:
                cli.main(args, prog_name="merging", standalone_mode=False)
        except SystemExit:
            pass
        except Exception as e:  # the test sees it in the text
            print(f"error: {e!r}")
        sys.stdout.write(MARK)
        sys.stdout.flush()


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
