"""Atomic output: write into a temporary sibling folder, rename into place at the end."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from merging.errors import FormatError, MergingError

WRITE_ERRORS = (OSError, SafetensorError)


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@contextmanager
def atomic_folder(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it vanishes.

    An existing ``out`` is refused unless ``force``; with ``force`` it is kept until the new one is complete.
    """
    out = Path(out)
    if out.exists() and not force:
        raise MergingError(f"{out}: already exists (pass `force` to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        try:
            yield tmp
        except WRITE_ERRORS as e:  # a full disk, a file-size limit, a permission: one clear line
            raise MergingError(f"{out}: cannot write ({_why(e)}); nothing was written") from e
        tmp.chmod(0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it replaces ``out``, on failure it vanishes."""
    out = Path(out)
    if out.exists() and not force:
        raise MergingError(f"{out}: already exists (pass `force` to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            yield tmp
        except WRITE_ERRORS as e:
            raise MergingError(f"{out}: cannot write ({_why(e)}); nothing was written") from e
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


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
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
