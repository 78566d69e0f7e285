"""Byte buffers reused across tensor reads: fresh memory costs a page fault per 4 KiB on its first touch.

A merge reads tensors of a few shapes over and over (the same modules on every layer). Memory freed by one
read and allocated by the next may come back from the allocator as fresh pages (large blocks are mapped and
unmapped; blocks freed by another thread stay in that thread's arena), and touching fresh pages costs about
as much as copying them. ``take(n)`` hands out a tensor backed by a pooled block of at least ``n`` bytes; the
block returns to the pool when the tensor and every view of it are gone (reference counting, as for any
tensor's memory), so nothing can see a block's bytes change under it. The free blocks kept are bounded.
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref

import numpy as np
import torch

KEEP = 64 << 20  # free bytes kept for reuse, at the most
SMALL = 1 << 16  # below this, a plain allocation (no page faults worth saving)

_lock = threading.Lock()
_free: list[tuple[int, int, np.ndarray]] = []  # (capacity, id, block), by capacity
_kept = 0


def take(n: int) -> torch.Tensor:
    """A (n,) uint8 tensor of undefined content, its memory reused from an earlier, released one if any."""
    if n < SMALL:
        return torch.empty(n, dtype=torch.uint8)
    global _kept
    with _lock:
        i = bisect.bisect_left(_free, (n, -1))
        if i < len(_free) and _free[i][0] <= 2 * n:  # the smallest that fits, if not wastefully large
            cap, _, block = _free.pop(i)
            _kept -= cap
        else:
            block = np.empty(n, dtype=np.uint8)
    view = block[:n]  # its own array object: alive exactly as long as the tensor's memory
    weakref.finalize(view, _release, block).atexit = False
    return torch.from_numpy(view)


def _release(block: np.ndarray) -> None:
    """Keep a block for reuse (bounded by ``KEEP``: the largest free ones are let go first)."""
    global _kept
    with _lock:
        bisect.insort(_free, (block.nbytes, id(block), block))
        _kept += block.nbytes
        while _kept > KEEP:
            cap, _, _ = _free.pop()
            _kept -= cap


def _forget() -> None:
    """A forked child starts with a fresh lock (another thread may have held the parent's)."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget)
