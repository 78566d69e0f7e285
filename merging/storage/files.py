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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from merging.errors import FormatError, MergingError
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
    """Hex sha256 of a file, read in chunks (taken from ``hash_ahead`` when it started on this file)."""
    key = _stat_key(path)
    with _HASH_LOCK:
        pending = _HASHES.get(key)
    if pending is not None:
        return pending.result()
    return _sha256(path, chunk)


def hash_ahead(path: Path) -> None:
    """Start hashing a file on a worker thread (hashlib and reads release the GIL); ``sha256_file`` waits for
    it. The result is keyed by path, size, mtime and inode, so a file changed since is hashed again."""
    global _HASHER
    key = _stat_key(path)
    with _HASH_LOCK:
        if key in _HASHES:
            return
        if _HASHER is None:
            _HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merging-sha256")
        _HASHES[key] = _HASHER.submit(_sha256, Path(path))


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
    """A forked child has no worker thread: start afresh (pending results would never come)."""
    global _HASH_LOCK, _HASHER
    _HASH_LOCK, _HASHER = threading.Lock(), None
    _HASHES.clear()


_HASH_LOCK = threading.Lock()
_HASHES: dict[tuple, Future] = {}
_HASHER: ThreadPoolExecutor | None = None
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
