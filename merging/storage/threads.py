"""torch's intra-op threads for memory-bound work: one thread.

torch splits every op above a small grain over all its threads. An op that only streams a few MiB
(a finiteness sum, a concatenation, a low-rank fold into a weight) gains little from that, and on a busy
machine each parallel region waits for a thread the scheduler has not run yet: with both cores of a
2-core machine taken, summing a (64, 5632) float32 tensor took 0.03 ms on one thread and 8 ms on two;
a rank-16 fold into a (5632, 2048) weight 8 ms and 12 ms. Streaming merges and bakes do such ops by
the hundred, so they run them on one thread; compute-bound work (QR, SVD) keeps every thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def serial() -> Iterator[None]:
    """Run torch ops inside the block on one intra-op thread (the previous count is restored after)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
