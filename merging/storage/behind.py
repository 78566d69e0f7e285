"""Write behind: a file's tensors written at their offsets by a thread of their own while the merge goes on.

A streamed merge alternates building a module (reads, finite checks, concatenations: the merging thread)
and writing it (a copy of every byte into the page cache, about a third of a cat's time). ``os.pwrite``
releases the GIL, so a thread that writes module k while the next module is built puts the two on two
cores. The queue keeps a reference to each tensor until it is written (pooled memory is not reused before)
and holds at most ``BEHIND`` bytes; the tensors handed over must not change after (a merge's outputs are
new tensors nobody changes). A failed write is raised by the next ``put`` or by ``finish``.
"""

from __future__ import annotations

import collections
import os
import threading

import torch

from merging.storage.durable import start_writeback

BEHIND = 16 << 20  # bytes handed over but not yet written, at the most
WRITEBACK = 32 << 20  # bytes written between two requests to start writing them to disk


class WriteBehind:
    """Writes (offset, bytes) pieces to one open file descriptor in order, on a thread started at once."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self._cond = threading.Condition()
        self._items: collections.deque[tuple[int, torch.Tensor] | None] = collections.deque()
        self._bytes = 0
        self._error: BaseException | None = None
        self._done = False
        self._thread = threading.Thread(target=self._work, name=f"write-behind {name}", daemon=True)
        self._thread.start()

    def put(self, offset: int, raw: torch.Tensor) -> None:
        """Queue a 1-D uint8 tensor to be written at ``offset`` (waits while ``BEHIND`` bytes are queued)."""
        with self._cond:
            while self._bytes and self._bytes + raw.numel() > BEHIND and self._error is None:
                self._cond.wait()
            self._raise()
            self._items.append((offset, raw))
            self._bytes += raw.numel()
            self._cond.notify_all()

    def finish(self) -> None:
        """Wait until everything queued is written and stop the thread; raise what a write raised."""
        with self._cond:
            if not self._done:
                self._items.append(None)
                self._cond.notify_all()
        self._thread.join()
        with self._cond:
            self._done = True
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        unsynced = 0
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
            if item is None:
                return
            offset, raw = item
            try:
                if self._error is None:
                    _pwrite_all(self.fd, memoryview(raw.numpy()), offset)
                    unsynced += raw.numel()
                    if unsynced > WRITEBACK:  # start the disk writes while the next modules are merged
                        start_writeback(self.fd)
                        unsynced = 0
            except BaseException as e:  # raised on the merging thread by the next put or by finish
                with self._cond:
                    self._error = e
            finally:
                with self._cond:
                    self._bytes -= raw.numel()
                    self._cond.notify_all()


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
