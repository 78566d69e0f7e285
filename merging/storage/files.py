"""Files: safe parsing of untrusted input, the cache root, hashes, outputs vs inputs, chunked writes.

The atomic writers are ``storage.atomic``.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from merging.errors import FormatError, MergingError
from merging.storage import hasher
from merging.storage.atomic import checkpoint


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn any unexpected failure while parsing an untrusted file into one FormatError naming it."""
    try:
        yield
    except MergingError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, OverflowError, AttributeError,
            UnicodeError, MemoryError, re.error, struct.error) as e:  # fmt: skip
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path}: malformed ({type(e).__name__}: {first[:200]})") from e


def cache_dir() -> Path:
    """The cache root: $MERGING_CACHE, else $XDG_CACHE_HOME/merging, else ~/.cache/merging."""
    if os.environ.get("MERGING_CACHE"):
        return Path(os.environ["MERGING_CACHE"]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "merging"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file: from the bytes a reader already fed it (``hash_ahead``), the rest read now."""
    with _HASH_LOCK:
        pending = _HASHES.get(_stat_key(path))
    if pending is not None:
        return pending.hexdigest()
    return _sha256(path, chunk)


def hash_ahead(path: Path) -> StreamHash:
    """Say that ``path``'s sha256 will be asked for: the reader of its bytes feeds them to the returned
    hash as it reads (``hashing(path)``), so the file is read once; ``sha256_file`` reads only what no reader
    did. Keyed by path, size, mtime and inode, so a file changed since is hashed afresh."""
    key = _stat_key(path)
    with _HASH_LOCK:
        return _HASHES.setdefault(key, StreamHash(Path(path), key[1]))


def hashing(path: Path) -> StreamHash | None:
    """The hash that wants ``path``'s bytes (``hash_ahead``), if any."""
    with _HASH_LOCK:
        return _HASHES.get(_stat_key(path)) if _HASHES else None


class StreamHash:
    """sha256 of a file fed by whoever reads it, in any order: bytes at the next offset are hashed at once,
    bytes ahead of it kept (up to ``AHEAD`` bytes; past that, read again at the end), bytes behind ignored."""

    AHEAD = 64 << 20

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self._h, self._next, self._ahead, self._kept = hashlib.sha256(), 0, {}, 0
        self._lock, self._digest = threading.Lock(), None
        self.read_again = 0  # bytes hexdigest had to read itself (no reader fed them)

    def feed(self, offset: int, data) -> None:
        """Bytes of the file read at ``offset`` (bytes, bytearray or a memoryview; copied if kept)."""
        view = memoryview(data).cast("B")
        with self._lock:
            if self._digest is not None or offset + len(view) <= self._next:
                return
            if offset > self._next:
                if self._kept + len(view) <= self.AHEAD and offset not in self._ahead:
                    self._ahead[offset] = bytes(view)
                    self._kept += len(view)
                return
            self._take(view[self._next - offset :])

    def _take(self, view: memoryview) -> None:
        self._h.update(view)
        self._next += len(view)
        while self._ahead:
            first = min(self._ahead)
            if first > self._next:
                return
            block = self._ahead.pop(first)
            self._kept -= len(block)
            if first + len(block) > self._next:
                self._h.update(memoryview(block)[self._next - first :])
                self._next = first + len(block)

    def hexdigest(self, chunk: int = 1 << 20) -> str:
        """The digest, reading whatever no reader fed (``read_again`` counts those bytes)."""
        hasher.drain()  # the bytes read but still queued for the hash (``storage.hasher``)
        with self._lock:
            if self._digest is None:
                with open(self.path, "rb", buffering=0) as f:
                    while self._next < self.size:
                        ahead = [o for o in self._ahead if o > self._next]
                        stop = min([self.size, self._next + chunk, *ahead])
                        block = os.pread(f.fileno(), stop - self._next, self._next)
                        if not block:
                            break
                        self.read_again += len(block)
                        self._take(memoryview(block))
                self._digest = self._h.hexdigest()
            return self._digest


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        block = bytearray(chunk)
        view = memoryview(block)
        while n := f.readinto(block):
            h.update(view[:n])
    return h.hexdigest()


def _stat_key(path: Path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _forget_hashes() -> None:
    """A forked child starts afresh (it did not see its parent's reads)."""
    global _HASH_LOCK
    _HASH_LOCK = threading.Lock()
    _HASHES.clear()


_HASH_LOCK = threading.Lock()
_HASHES: dict[tuple, StreamHash] = {}
os.register_at_fork(after_in_child=_forget_hashes)


def refuse_overlap(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is an input, contains one or lies inside one (with or without force)."""
    o = Path(out).expanduser().resolve()
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        i = Path(given).expanduser().resolve()
        same = o == i or (o.exists() and os.path.samefile(o, i))
        how = "is" if same else "contains" if o in i.parents else "lies inside" if i in o.parents else None
        if how:
            raise MergingError(f"{out}: the output {how} the input {given}; choose another output path")


def write_bytes(path: Path, data: bytes, chunk: int = 1 << 16) -> None:
    """Write ``data`` to ``path`` in chunks (a crash test can stop the process between two of them)."""
    with open(path, "wb") as f:
        checkpoint(f"open {Path(path).name}")
        for i in range(0, len(data), chunk):
            f.write(data[i : i + chunk])
            checkpoint(f"write {Path(path).name}")


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text (see write_bytes)."""
    write_bytes(path, text.encode())


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file with the crash tests' checkpoints around it."""
    from safetensors.torch import save_file

    checkpoint(f"open {Path(path).name}")
    save_file(tensors, str(path), metadata=metadata)
    checkpoint(f"wrote {Path(path).name}")
