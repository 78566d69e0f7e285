"""Threads on a shared machine (merging.core.cpus): the choice from affinity, quota and load, the system
files it reads, the precedence of --threads and the environment, and the console script setting it all
before torch is imported."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merging.core import cpus
from merging.core.cpus import CpuShare, ThreadChoice, apply, choose

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


@pytest.mark.parametrize(
    ("share", "threads", "policy"),
    [
        (CpuShare(2), 2, None),  # a quiet 2-core machine: torch's own behaviour
        (CpuShare(2, others=2.0), 2, "PASSIVE"),  # two busy loops beside us: yield, keep the scheduler share
        (CpuShare(2, others=0.3), 2, None),  # a little noise is not contention
        (CpuShare(64, quota=3.5), 3, "PASSIVE"),  # a container with 3.5 CPUs of quota on a 64-core host
        (CpuShare(8, quota=16.0), 8, None),  # a quota above the affinity changes nothing
        (CpuShare(4, quota=0.5), 1, "PASSIVE"),  # half a CPU: one thread, never spinning
        (CpuShare(1, others=5.0), 1, "PASSIVE"),
    ],
)
def test_choice_from_affinity_quota_and_load(share: CpuShare, threads: int, policy: str | None):
    got = choose(share)
    assert (got.threads, got.wait_policy) == (threads, policy)


def test_requested_threads_win_and_oversubscription_is_passive():
    assert choose(CpuShare(8), requested=3).threads == 3
    assert choose(CpuShare(8), requested=3).wait_policy is None
    assert choose(CpuShare(2), requested=4).wait_policy == "PASSIVE"  # more threads than CPUs: do not spin
    with pytest.raises(ValueError):
        CpuShare(0)


def test_environment_set_wins_unless_threads_are_explicit():
    choice = ThreadChoice(2, "PASSIVE", "")
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "6"}
    assert apply(choice, env) == {"MKL_NUM_THREADS": "2"}
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "6", "MKL_NUM_THREADS": "2"}
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "6"}
    apply(choice, env, explicit=True)  # --threads 2 on the command line
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    env = {}
    apply(ThreadChoice(3, None, ""), env)
    assert env == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}  # no policy: OpenMP's default stays


def test_settle_reads_threads_from_argv_and_environment(monkeypatch):
    monkeypatch.setattr(cpus, "current_share", lambda: CpuShare(4, others=3.0))
    env: dict[str, str] = {}
    assert cpus.settle(["--debug", "--threads", "2", "merge", "--threads", "9"], env).threads == 2
    assert env == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_NUM_THREADS": "1"}
    assert cpus.settle(["merge", "--threads", "9"], env).threads == 1  # a command's own option is not ours
    assert env["MKL_NUM_THREADS"] == "1"
    assert cpus.requested_threads(["--threads=3", "inspect"]) == 3
    assert cpus.requested_threads(["--threads", "zero"]) is None


def test_share_read_from_proc_and_cgroup_files(tmp_path: Path, monkeypatch):
    proc, v2, v1 = tmp_path / "proc", tmp_path / "v2", tmp_path / "v1"
    for d in (proc, v2, v1 / "cpu"):
        d.mkdir(parents=True)
    (proc / "stat").write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n")
    (v2 / "cpu.max").write_text("150000 100000\n")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert cpus.cgroup_quota(v2) == 1.5
    assert cpus.cgroup_quota(v1) == 2.5
    assert cpus.cgroup_quota(tmp_path / "none") is None
    # over the 0.1 s window the machine's 4 CPUs count 40 jiffies, 30 of them busy (user, system, steal):
    # 3 CPUs busy, of which 0.05 s of CPU (0.5 CPUs) was our own
    own = itertools.cycle([1.0, 1.05])
    monkeypatch.setattr(cpus, "_own_seconds", lambda: next(own))
    later = "cpu  120 0 55 805 55 0 0 5 0 0\n"
    monkeypatch.setattr(cpus.time, "sleep", lambda s: (proc / "stat").write_text(later))
    assert cpus.others_busy(proc) == pytest.approx(2.5)
    (proc / "stat").write_text("cpu  100 0 50 800 50 0 0 0 0 0\n")
    assert cpus.others_busy(proc, affinity=2) == pytest.approx(1.25)  # half the CPUs: half the load on ours
    assert cpus.others_busy(tmp_path / "nowhere") == 0.0
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_quota(v2) is None
    monkeypatch.setattr(cpus, "cgroup_quota", lambda root=None: 1.5)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    share = cpus.current_share(proc)
    assert (share.affinity, share.quota, share.usable) == (2, 1.5, 1)


SCRIPT = """
import os, sys
import merging.core.cpus as cpus
real, seen = cpus.settle, {}
def spy(argv, env=os.environ):
    seen["torch before"] = "torch" in sys.modules
    return real(argv, env)
cpus.settle = spy
sys.argv = ["merging", *sys.argv[1:]]
from merging_cli import entry
try:
    entry.main()
except SystemExit as e:
    seen["exit"] = e.code
import torch
print(seen["torch before"], seen["exit"], torch.get_num_threads(), os.environ["OMP_NUM_THREADS"])
print(cpus.current_share().usable)
"""


@pytest.mark.system
@pytest.mark.parametrize("given", [["--threads", "1"], []])
def test_console_script_sets_threads_before_torch_starts(given: list[str]):
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    command = [sys.executable, "-c", SCRIPT, *given, "inspect", "examples/adapters/add"]
    r = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first, usable = r.stdout.strip().splitlines()[-2:]
    torch_before, code, threads, omp = first.split()
    want = given[1] if given else usable
    assert (torch_before, code, threads, omp) == ("False", "0", want, want)
