"""Threads on a shared machine: the console script settles torch's pool before torch is imported."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from merging.core import cpus


def settle_threads(argv: list[str], env: MutableMapping[str, str] = os.environ) -> cpus.ThreadChoice:
    """Set OMP/MKL threads and the OpenMP wait policy from ``--threads N`` in ``argv``, the environment (it
    wins when set), or what this process may use (affinity, cgroup quota, the load at start)."""
    return cpus.settle(argv, env)


def describe_threads(env: Mapping[str, str] = os.environ) -> str:
    """One line: the thread settings in force."""
    return cpus.describe(env)
