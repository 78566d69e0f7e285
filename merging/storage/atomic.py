"""Atomic, durable output that keeps what is not ours.

A writer builds its output in a temporary sibling (``.NAME.tmp-PID.START-XXXX``), every file gets the
mode the umask gives and is fsynced with its folders, and only then is it swapped into place (one
``renameat2(RENAME_EXCHANGE)`` on Linux) and the parent folder fsynced; the previous output goes last.
With ``force`` an existing folder is replaced only in the names its writer owns: every other entry
(a user's NOTES.txt, a logs/ folder) is hard-linked into the new folder before the swap, so at every
instant ``out`` is the whole previous output or the whole new one. Temporary siblings left by a process
that died (its pid gone, or reused by a later process) are cleaned at the next write; a live one never.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from merging.errors import MergingError
from merging.storage.durable import fsync_path, start_writeback, umask

WRITE_ERRORS = (OSError, SafetensorError)
Owns = Iterable[str] | Callable[[Path], Iterable[str]]


@dataclass(frozen=True)
class Replacement:
    """What a forced write did to an existing output: names replaced, removed (owned, not rewritten), kept."""

    out: Path
    replaced: tuple[str, ...]
    removed: tuple[str, ...]
    kept: tuple[str, ...]


_REPLACED: contextvars.ContextVar[list[Replacement] | None] = contextvars.ContextVar("replaced", default=None)


@contextmanager
def collect_replaced() -> Iterator[list[Replacement]]:
    """Collect a Replacement for every existing output the writes inside the block replace."""
    found: list[Replacement] = []
    token = _REPLACED.set(found)
    try:
        yield found
    finally:
        _REPLACED.reset(token)


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ------------------------------------------------------------------------------ test hook


_points = [0]


def checkpoint(what: str) -> None:
    """A point inside a write where the crash tests stop the process.

    With MERGING_TEST_PAUSE_AT=N:FD every point writes ``count what`` to file descriptor FD and the N-th
    one then sleeps until the test kills the process (N=0 only counts). Unset, it does nothing.
    """
    spec = os.environ.get("MERGING_TEST_PAUSE_AT")
    if not spec:
        return
    at, _, fd = spec.partition(":")
    _points[0] += 1
    if fd:
        os.write(int(fd), f"{_points[0]} {what}\n".encode())
    if _points[0] == int(at):
        while True:
            time.sleep(60)


# ------------------------------------------------------------------------------ temporary names


def _start_time(pid: int) -> str:
    """The process start time in clock ticks since boot (Linux), "0" where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def _token() -> str:
    pid = os.getpid()
    return f"{pid}.{_start_time(pid)}-{secrets.token_hex(4)}"


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return start == "0" or _start_time(pid) in (start, "0")


def _temp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)\.(\d+)-[0-9a-f]+$")


def clean_stale(out: Path) -> list[str]:
    """Remove the temporary siblings of ``out`` whose writer died; put back a previous output that a dead
    writer had moved aside and not replaced. Returns the names handled."""
    out = Path(out)
    pattern, done = _temp_pattern(out.name), []
    try:
        entries = sorted(os.scandir(out.parent), key=lambda e: e.name)
    except OSError:
        return done
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or _alive(int(m[2]), m[3]):
            continue
        path = Path(entry.path)
        if m[1] == "old" and not os.path.lexists(out):
            os.rename(path, out)  # the swap was cut between its two renames: the previous output returns
        elif entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        done.append(entry.name)
    return done


def _settle(root: Path) -> None:
    """Give every file and folder under ``root`` the umask's mode and fsync it, deepest first (the writeback
    of every file is started first, so that the disk writes them together)."""
    mask = umask()
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                start_writeback(fd)
            finally:
                os.close(fd)
    if root.is_file():
        os.chmod(root, 0o666 & ~mask)
        fsync_path(root)
        return
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(folder, name)
            if os.lstat(p).st_nlink == 1:  # a hard link (link_tree) shares the user's file
                os.chmod(p, 0o666 & ~mask)
            fsync_path(Path(p))
            checkpoint(f"fsync {name}")
        os.chmod(folder, 0o777 & ~mask)
        fsync_path(Path(folder), directory=True)


_EXCHANGE = 2  # RENAME_EXCHANGE


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system or the filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _record(rep: Replacement) -> None:
    found = _REPLACED.get()
    if found is not None:
        found.append(rep)


def _cannot(out: Path, e: BaseException) -> MergingError:
    return MergingError(f"{out}: cannot write ({_why(e)}); nothing was written")


# ------------------------------------------------------------------------------ outputs


def _target(out: Path, *, folder: bool, force: bool) -> Path:
    """The path to write (a symlinked output is written where it points), checked against what is there."""
    out = Path(out)
    if out.is_symlink():
        out = Path(os.path.realpath(out))
    if out.name in ("", ".", ".."):  # "-o ." names the folder by where it is: its temp goes beside it
        out = Path(os.path.abspath(out))
    if os.path.lexists(out):
        if folder and not out.is_dir():
            raise MergingError(f"{out}: is a file, not an output folder; remove it or choose another output")
        if not folder and out.is_dir():
            raise MergingError(f"{out}: is a folder; give a file name for this output")
        if not force:
            raise MergingError(f"{out}: already exists (pass `force` to replace it)")
    return out


def _temp(out: Path, *, folder: bool) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        path = out.parent / f".{out.name}.tmp-{_token()}"
        if folder:
            os.mkdir(path, 0o777)
        else:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as e:
        raise _cannot(out, e) from e
    return path


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)


def link_tree(src: Path, dst: Path, dev: int | None = None) -> None:
    """``dst`` becomes ``src`` without copying data: files hard-linked (copied where they cannot be), folders
    recreated with their mode. With ``dev``, a folder on another filesystem (a mount inside) is refused."""
    st = src.lstat()
    if stat.S_ISDIR(st.st_mode):
        if dev is not None and st.st_dev != dev:
            raise MergingError(
                f"{src}: another filesystem is mounted there and cannot be kept across a replace; "
                "unmount it or choose another output"
            )
        dst.mkdir()
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            link_tree(Path(entry.path), dst / entry.name, dev)
        shutil.copystat(src, dst)
        fsync_path(dst, directory=True)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # no hard links here (or not allowed): a copy keeps the content
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
            fsync_path(dst)


def _keep_others(out: Path, tmp: Path, owns: Owns) -> Replacement:
    """Link every entry of ``out`` that the new output neither writes nor owns into ``tmp``."""
    owned = set(owns(out) if callable(owns) else owns)
    replaced, removed, kept = [], [], []
    dev = out.stat().st_dev
    for entry in sorted(os.scandir(out), key=lambda e: e.name):
        if os.path.lexists(tmp / entry.name):
            replaced.append(entry.name)
        elif entry.name in owned:
            removed.append(entry.name)
        else:
            link_tree(Path(entry.path), tmp / entry.name, dev)
            kept.append(entry.name)
            checkpoint(f"keep {entry.name}")
    return Replacement(out, tuple(replaced), tuple(removed), tuple(kept))


def _commit_folder(tmp: Path, out: Path, *, force: bool, owns: Owns) -> None:
    """Put the complete, settled ``tmp`` at ``out``; ``tmp`` ends up absent or holding the previous output."""
    for _ in range(3):
        if not os.path.lexists(out):
            try:
                os.rename(tmp, out)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue  # another writer put an output there meanwhile: replace it (or refuse) below
            checkpoint("renamed")
            fsync_path(out.parent, directory=True)
            return
        if not force:
            raise MergingError(f"{out}: already exists (pass `force` to replace it)")
        rep = _keep_others(out, tmp, owns)
        fsync_path(tmp, directory=True)
        checkpoint("kept")
        if not _exchange(tmp, out):
            old = out.parent / f".{out.name}.old-{_token()}"
            os.rename(out, old)
            checkpoint("moved aside")
            os.rename(tmp, out)
            os.rename(old, tmp)
        checkpoint("exchanged")
        fsync_path(out.parent, directory=True)
        _record(rep)
        return
    raise MergingError(f"{out}: other writers keep replacing it; try again")


@contextmanager
def atomic_folder(out: Path, *, force: bool = False, owns: Owns = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it vanishes.

    An existing ``out`` is refused unless ``force``. With ``force`` it is kept whole until the new one is
    complete and durable; then the new one takes its place, keeping every entry of the old one that the
    new one does not write and that is not in ``owns`` (names, or a function of the old folder giving them).
    """
    out = _target(out, folder=True, force=force)
    tmp = _temp(out, folder=True)
    try:
        try:
            yield tmp
            checkpoint("written")
            _settle(tmp)
            _commit_folder(tmp, out, force=force, owns=owns)
        except WRITE_ERRORS as e:  # a full disk, a file-size limit, a permission: one clear line
            raise _cannot(out, e) from e
    finally:
        _discard(tmp)


@contextmanager
def atomic_file(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it replaces ``out``, on failure it vanishes."""
    out = _target(out, folder=False, force=force)
    tmp = _temp(out, folder=False)
    try:
        try:
            yield tmp
            checkpoint("written")
            _settle(tmp)
            existed = os.path.lexists(out)
            if force:
                os.replace(tmp, out)
            else:
                try:
                    os.link(tmp, out)  # never over a file another writer put there meanwhile
                except FileExistsError:
                    raise MergingError(f"{out}: already exists (pass `force` to replace it)") from None
            checkpoint("renamed")
            fsync_path(out.parent, directory=True)
            if existed:
                _record(Replacement(out, (out.name,), (), ()))
        except WRITE_ERRORS as e:
            raise _cannot(out, e) from e
    finally:
        _discard(tmp)
