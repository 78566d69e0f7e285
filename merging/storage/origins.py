"""Where a tensor's bytes already are on disk, so that a writer can copy them in the kernel.

The safetensors reader records, for each tensor it returns, the file range it read it from; a strategy
that lays tensors end to end (cat's A = [A_1; A_2; ...]) records the output as the concatenation of its
inputs' ranges. ``SafetensorsWriter.add`` then moves those bytes with ``copy_file_range`` (a reflink on
filesystems that share blocks) instead of writing them from memory. A record holds only while the tensor
is alive, unchanged in place (torch's version counter) and the source files unchanged (size, mtime):
otherwise the tensor is written as usual, so a stale record can never put wrong bytes in an output.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Range:
    """``size`` bytes of ``path`` from ``offset``, as the file was (size, mtime_ns) when read."""

    path: Path
    offset: int
    size: int
    stamp: tuple[int, int]

    def current(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == self.stamp


@dataclass(frozen=True)
class _Record:
    ref: weakref.ref  # the tensor that owns the memory (views keep it alive through ``_base``)
    version: int
    ranges: tuple[Range, ...]


_RECORDS: dict[tuple[int, int], _Record] = {}  # (data_ptr, nbytes) → record


def stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def remember(t: torch.Tensor, ranges: Sequence[Range]) -> None:
    """Record that contiguous ``t`` (or any contiguous view of all of it) holds exactly ``ranges``' bytes."""
    if not t.is_contiguous() or t.device.type != "cpu" or sum(r.size for r in ranges) != t.nbytes:
        return
    key = (t.data_ptr(), t.nbytes)
    _RECORDS[key] = _Record(weakref.ref(_root(t), lambda _r, key=key: _RECORDS.pop(key, None)), t._version,
                            tuple(ranges))  # fmt: skip


def origin(t: torch.Tensor) -> tuple[Range, ...] | None:
    """The file ranges ``t``'s bytes are, if still true (alive, same memory, not changed, files unchanged)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        return None
    rec = _RECORDS.get((t.data_ptr(), t.nbytes))
    if rec is None or rec.ref() is not _root(t) or t._version != rec.version:
        return None
    return rec.ranges if all(r.current() for r in rec.ranges) else None


def concatenated(out: torch.Tensor, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Record ``out`` = the parts end to end (torch.cat along dim 0 of contiguous parts); returns ``out``."""
    found = [origin(p) for p in parts]
    if all(f is not None for f in found) and all(p.dtype == out.dtype for p in parts):
        remember(out, [r for f in found for r in f])
    return out
