"""Read ahead: a file's tensors read in file order and hashed on a worker thread before they are asked for.

A merge reads every input byte once and the recipe's sha256 comes from those bytes (issue 35). sha256 runs at
about the speed of the copy + fsync floor, so on the merging thread it alone doubles a cat. ``preadv`` and
``hashlib`` release the GIL: a worker thread reads each tensor into its own memory, feeds it to the hash and
only then hands it over, so the reads and the hash overlap the merge's own work (concatenations, writes) on
another core. Nothing is copied for the hash, and a tensor changed in place after it was taken cannot change
the hash (it was hashed before anyone saw it). All workers together hold at most ``AHEAD`` bytes read but not
yet taken (each may always hold one tensor), so memory stays bounded however many inputs a merge reads; a
tensor asked for behind its worker (out of file order) is read by the caller, as without a worker. Only when
asked for (``MERGING_READAHEAD=1``): by default the reader reads for itself and ``storage.hasher`` hashes
behind it on one thread for every input.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from merging.storage import buffers

AHEAD = 8 << 20  # bytes read and hashed but not yet taken, by all workers together
_COND = threading.Condition()  # guards every worker's state and ``_held``
_held = 0

Feed = Callable[[int, memoryview], None]
Read = Callable[[BinaryIO, torch.Tensor, int, str], None]  # read(file, into, offset, key) fills ``into``


class _State:
    """What one worker and its taker share (under ``_COND``)."""

    def __init__(self) -> None:
        self.ready: dict[int, torch.Tensor] = {}  # span index → its bytes, read and hashed
        self.held = 0  # bytes in ``ready``
        self.taken = 0  # spans before this index are taken or passed over
        self.done = 0  # spans before this index are read (or the worker stopped)
        self.failed = False
        self.stop = False

    def drop(self, i: int) -> torch.Tensor | None:
        """Take span ``i`` out of ``ready`` (None when it is not there)."""
        global _held
        t = self.ready.pop(i, None)
        if t is not None:
            self.held -= t.numel()
            _held -= t.numel()
        return t

    def halt(self) -> None:
        with _COND:
            self.stop = True
            for i in list(self.ready):
                self.drop(i)
            _COND.notify_all()


def asked() -> bool:
    """Whether read-ahead workers are asked for (``MERGING_READAHEAD=1``). By default a reader reads for
    itself and its file's hash runs behind it on one shared thread (``storage.hasher``): with one worker per
    input, four inputs ran five threads on two cores (small cat benchmark: 2.99x the copy + fsync floor)."""
    return os.environ.get("MERGING_READAHEAD") == "1"


class ReadAhead:
    """A worker reading ``spans`` (key, file offset, bytes) in offset order, feeding each to ``feed``.

    Args:
        path: the file.
        spans: every tensor's key, offset and size, sorted by offset.
        read: fills a byte tensor from the open file at an offset (the reader's own ``preadv`` loop).
        feed: gets (offset, bytes) of each span once it is read, before the span is handed over.
    """

    def __init__(self, path: Path, spans: Sequence[tuple[str, int, int]], read: Read, feed: Feed) -> None:
        self._index = {key: i for i, (key, _, _) in enumerate(spans)}
        self._state = _State()
        self._pid = os.getpid()
        worker = threading.Thread(target=_work, args=(self._state, Path(path), list(spans), read, feed),
                                  name=f"read-ahead {Path(path).name}", daemon=True)  # fmt: skip
        weakref.finalize(self, self._state.halt)  # nobody left to take: the worker stops
        worker.start()

    def take(self, key: str) -> torch.Tensor | None:
        """The tensor's bytes, read and hashed; None when the caller must read them (behind the worker, an
        unknown key, a read that failed there, or a forked child without the worker)."""
        i = self._index.get(key)
        st = self._state
        if i is None or os.getpid() != self._pid:
            return None
        with _COND:
            if i < st.taken:
                return None
            for j in range(st.taken, i):  # passed over: their hash was fed, their memory goes
                st.drop(j)
            st.taken = i  # the worker keeps span i (and those after it) for us
            _COND.notify_all()
            while i not in st.ready and st.done <= i and not st.failed:
                _COND.wait()
            st.taken = i + 1
            t = st.drop(i)
            _COND.notify_all()
            return t


def _work(st: _State, path: Path, spans: list[tuple[str, int, int]], read: Read, feed: Feed) -> None:
    """Read and hash every span in order, keeping those still wanted, while someone may take them."""
    global _held
    try:
        with open(path, "rb", buffering=0) as f:
            for i, (key, offset, size) in enumerate(spans):
                with _COND:
                    while not st.stop and i >= st.taken and st.held and _held + size > AHEAD:
                        _COND.wait()
                    if st.stop:
                        return
                raw = buffers.take(size)  # (bytes,) the taker's own memory
                read(f, raw, offset, key)
                if size:
                    feed(offset, memoryview(raw.numpy()))
                with _COND:
                    if i >= st.taken and not st.stop:
                        st.ready[i] = raw
                        st.held += size
                        _held += size
                    st.done = i + 1
                    _COND.notify_all()
    except Exception:  # the taker reads the span itself and meets the same failure, in its own words
        with _COND:
            st.failed = True
            _COND.notify_all()


def _forget() -> None:
    """A forked child has no workers; its readers read for themselves (``take`` checks the process)."""
    global _COND, _held
    _COND, _held = threading.Condition(), 0


os.register_at_fork(after_in_child=_forget)
