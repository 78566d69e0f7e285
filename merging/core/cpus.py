"""How many CPUs this process may really use, and how torch's OpenMP threads should use them.

Chosen once at start, before torch is imported (OpenMP reads its environment when the library loads):
threads = the CPUs the process may run on (its affinity, capped by a cgroup CPU quota); the wait policy
PASSIVE when other work keeps those CPUs busy now (sampled over 0.1 s: ``others_busy``) or a quota
throttles us, else OpenMP's default (on a quiet 2-core machine the bundled example runs 1.4× faster spinning).
Spinning threads fight the other jobs: on 2 cores beside two busy loops one SmolLM2 forward took 5.8 s
with torch's 2 spinning threads and 4.5 s passive (3.7 s is the fair share); under a load of ~5, 25 s
spinning, 16 s on 1 thread, 7.7 s on 2 passive ones. Fewer threads than CPUs give away the scheduler's
share (it shares by thread), so the count stays at the usable CPUs and the policy does the yielding.

Precedence: an explicit ``--threads N``, then OMP_NUM_THREADS / MKL_NUM_THREADS / OMP_WAIT_POLICY when
set, then this choice. This module does not import torch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

CONTENDED = 0.5  # other runnable work, in CPUs, from which our threads should yield instead of spin


@dataclass(frozen=True)
class CpuShare:
    """What the process may use: CPUs it may run on, a cgroup quota in CPUs (None: none), others' load."""

    affinity: int
    quota: float | None = None
    others: float = 0.0  # runnable work of other processes at start, in CPUs

    def __post_init__(self) -> None:
        if self.affinity < 1 or (self.quota is not None and self.quota <= 0) or self.others < 0:
            raise ValueError(f"not a CPU share: {self}")

    @property
    def usable(self) -> int:
        """CPUs our threads may keep busy: the affinity, capped by the quota (at least 1)."""
        cap = self.affinity if self.quota is None else max(1, math.floor(self.quota + 1e-9))
        return max(1, min(self.affinity, cap))


@dataclass(frozen=True)
class ThreadChoice:
    """The environment torch should start with, and why (one line for --debug logs)."""

    threads: int
    wait_policy: str | None  # "PASSIVE", or None: OpenMP's default (spin a while, then sleep)
    why: str


def choose(share: CpuShare, requested: int | None = None) -> ThreadChoice:
    """Threads and wait policy for a process with this CPU share (``requested``: an explicit --threads)."""
    threads = requested if requested is not None else share.usable
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    throttled = share.quota is not None and share.quota < share.affinity
    busy = share.others >= CONTENDED or threads > share.usable
    policy = "PASSIVE" if busy or throttled else None
    why = (f"{threads} thread(s) on {share.usable} usable CPU(s) (affinity {share.affinity}, quota "
           f"{'none' if share.quota is None else f'{share.quota:g}'}, others' load {share.others:.1f}); "
           f"wait policy {policy or 'default'}")  # fmt: skip
    return ThreadChoice(threads, policy, why)


def apply(choice: ThreadChoice, env: MutableMapping[str, str], *, explicit: bool = False) -> dict[str, str]:
    """Write the choice into ``env`` (os.environ before torch is imported); returns what was set.

    Variables already set win, except that an explicit --threads sets the thread counts anyway.
    """
    want = {"OMP_NUM_THREADS": str(choice.threads), "MKL_NUM_THREADS": str(choice.threads)}
    if choice.wait_policy:
        want["OMP_WAIT_POLICY"] = choice.wait_policy
    counts = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    done = {k: v for k, v in want.items() if k not in env or (explicit and k in counts)}
    env.update(done)
    return done


def current_share(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> CpuShare:
    """This process's CPU share, read from the system (Linux; elsewhere the CPU count and no load)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    return CpuShare(affinity, cgroup_quota(cgroup), others_busy(proc, affinity))


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup v2 CPU quota in CPUs (``cpu.max`` "quota period"; "max": None), v1 likewise."""
    for file, parse in ((root / "cpu.max", _v2), (root / "cpu" / "cpu.cfs_quota_us", _v1)):
        try:
            return parse(file)
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


def _v2(file: Path) -> float | None:
    quota, period = file.read_text().split()[:2]
    return None if quota == "max" else int(quota) / int(period)


def _v1(file: Path) -> float | None:
    quota = int(file.read_text())
    period = int((file.parent / "cpu.cfs_period_us").read_text())
    return None if quota <= 0 else quota / period


def others_busy(proc: Path = Path("/proc"), affinity: int | None = None, window: float = 0.1) -> float:
    """Other processes' CPU use now, in CPUs, seen on our CPUs: the machine's non-idle time over a short
    ``window`` (``/proc/stat``) less our own, scaled to the share of the machine's CPUs we may run on.

    A sample, not the load average: the 1-minute average still counts a job that ended seconds ago (after
    ``pip install`` or a test run it reads ~1 on an idle 2-core machine, which made a quiet ``make example``
    wait passively: 290 s instead of 200 s), and misses one that just started. Time stolen by a hypervisor
    counts as busy; waiting on I/O does not.
    """
    try:
        before, mine = _cpu_times(proc / "stat"), _own_seconds()
        time.sleep(window)
        after, mine = _cpu_times(proc / "stat"), _own_seconds() - mine
    except (OSError, ValueError, IndexError):
        return 0.0
    (busy0, total0), (busy1, total1) = before, after
    online = os.cpu_count() or 1
    if total1 <= total0:
        return 0.0
    busy = (busy1 - busy0) / (total1 - total0) * online - mine / window  # CPUs, ourselves taken out
    share = online if affinity is None else min(affinity, online)
    return max(0.0, busy * share / online)


def _cpu_times(stat: Path) -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat's first line (idle and iowait are not busy)."""
    fields = [float(v) for v in stat.read_text().splitlines()[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def settle(argv: list[str], env: MutableMapping[str, str] = os.environ) -> ThreadChoice:
    """At a program's start, before torch is imported: choose and set the threading environment.

    ``argv`` is read for ``--threads N`` / ``--threads=N`` only (the parser validates it later).
    """
    requested = requested_threads(argv)
    share = current_share()
    if requested is None and "OMP_NUM_THREADS" in env:
        requested = _int(env["OMP_NUM_THREADS"])
    choice = choose(share, requested)
    apply(choice, env, explicit=requested_threads(argv) is not None)
    return choice


def requested_threads(argv: list[str]) -> int | None:
    """The N of ``--threads N`` or ``--threads=N`` before the command name, if any and valid."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return None  # the command: its own options are not ours
        if arg == "--threads" and i + 1 < len(argv):
            return _int(argv[i + 1])
        if arg.startswith("--threads="):
            return _int(arg.partition("=")[2])
    return None


def _int(text: str) -> int | None:
    try:
        n = int(text)
    except ValueError:
        return None
    return n if n >= 1 else None


def describe(env: Mapping[str, str]) -> str:
    """The threading variables as set, for a debug line."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
    return ", ".join(f"{k}={env[k]}" for k in keys if k in env) or "torch defaults"
