"""Durability: the umask read without a race, fsync by path, writeback started early (Linux)."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path


def umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """fsync a file or a folder by path."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory and sys.platform == "win32":  # folders cannot be opened there
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages to disk now, without waiting (Linux
    sync_file_range; elsewhere nothing): the fsync that makes the output durable then waits less."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
            _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE: start writeback of the whole file


_sync_file_range = None
