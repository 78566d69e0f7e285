"""Hash behind: the bytes a reader just read are fed to their file's sha256 on one shared thread.

A merge reads every input byte once and the recipe's sha256 comes from those bytes (issue 35). sha256 runs at
about the speed of the copy + fsync floor, so on the merging thread it alone doubles a cat. Here the reader
reads each tensor itself (one ``preadv`` into memory of its own) and hands the tensor to one hashing thread
for every file (``hashlib`` releases the GIL): the merge goes on at once and the hash runs beside it on
another core. The queue holds a reference to each tensor until it is hashed (its memory is not reused
before), and at most ``BEHIND`` bytes wait in it; the merge never changes what it read (a ``Delta`` is data:
strategies build new tensors), so the bytes hashed are the bytes merged. ``StreamHash.hexdigest`` waits for
its file's bytes in the queue. One thread for all inputs: on a busy machine one more thread is a fair share,
not a crowd (the per-file read-ahead workers were one per input).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable

import torch

BEHIND = 16 << 20  # bytes read but not yet hashed, at the most

Feed = Callable[[int, memoryview], None]


class _Queue:
    """The tensors waiting to be hashed, in the order they were read, and the thread hashing them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: collections.deque[tuple[Feed, int, torch.Tensor]] = collections.deque()
        self.bytes = 0
        self.busy = 0  # items taken off the queue and being hashed
        self.thread: threading.Thread | None = None

    def put(self, feed: Feed, offset: int, raw: torch.Tensor) -> None:
        with self.cond:
            while self.bytes and self.bytes + raw.numel() > BEHIND:
                self.cond.wait()
            self.items.append((feed, offset, raw))
            self.bytes += raw.numel()
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="hash-behind", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def drain(self) -> None:
        """Wait until every queued tensor is hashed."""
        with self.cond:
            while self.items or self.busy:
                self.cond.wait()

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.items:
                    self.cond.wait()
                feed, offset, raw = self.items.popleft()
                self.busy += 1
            try:
                feed(offset, memoryview(raw.numpy()))
            except Exception:  # noqa: S110  (bytes not fed are read again by ``StreamHash.hexdigest``)
                pass
            finally:
                with self.cond:
                    self.busy -= 1
                    self.bytes -= raw.numel()
                    self.cond.notify_all()


_queue = _Queue()


def hash_behind(feed: Feed, offset: int, raw: torch.Tensor) -> None:
    """Feed ``raw`` (a 1-D uint8 tensor read at ``offset``) to ``feed`` on the hashing thread, soon."""
    if raw.numel():
        _queue.put(feed, offset, raw)


def drain() -> None:
    """Wait for every tensor handed to ``hash_behind`` to be hashed."""
    _queue.drain()


def _forget() -> None:
    """A forked child has no hashing thread and nothing queued (its parent's queue is the parent's)."""
    global _queue
    _queue = _Queue()


os.register_at_fork(after_in_child=_forget)
