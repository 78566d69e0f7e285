"""The progress callback every long job takes (merge, verify, compare, tune, bake): one type, one order."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Called after each step: the steps done so far, the steps in all, and what the step was."""

    def __call__(self, done: int, total: int, what: str, /) -> None: ...
