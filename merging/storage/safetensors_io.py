"""safetensors one tensor at a time: a reader that keeps nothing resident, a writer that appends.

``SafetensorsReader.get`` reads one tensor with ``pread`` into memory of its own (no mmap: pages touched
through a mapping would count in the process's RSS until it is unmapped), reused from released tensors
(``storage.buffers``); when the file's sha256 is wanted its bytes are hashed behind the reads on another
thread (``storage.hasher``). ``SafetensorsWriter`` reserves the header's room, appends each tensor's bytes
as it comes (written on a thread of their own, ``storage.behind``) and writes the header last, padded with
spaces (the format allows it), so a merge never holds its whole output.
``stream_shard`` copies a file with some tensors replaced (bake), the untouched bytes in the kernel.
``finite`` is the fast NaN/Inf check: a sum is finite only if every entry is. One ``pread_into`` reads
for all of them.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch

from merging.errors import FormatError
from merging.storage import buffers
from merging.storage.atomic import checkpoint
from merging.storage.behind import WriteBehind
from merging.storage.durable import start_writeback
from merging.storage.files import StreamHash, hashing
from merging.storage.hasher import hash_behind
from merging.storage.readahead import ReadAhead, asked
from merging.storage.tensorfiles import load_tensors, safetensors_header
from merging.storage.threads import serial

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
NAMES = {v: k for k, v in DTYPES.items()}
SPAN = 2 << 20  # bytes a reader reads in one preadv: a tensor and those after it in the file, at the most


def finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite (one fast reduction; the exact check only when the sum overflows)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    with serial():  # one pass over memory: threads only add waiting (merging.threads)
        return math.isfinite(t.sum()) or bool(torch.isfinite(t).all())


class SafetensorsReader:
    """The tensors of one safetensors file by name, each read on demand into its own memory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        header = safetensors_header(self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        with open(self.path, "rb") as f:
            size = f.read(8)
            self.start = 8 + struct.unpack("<Q", size)[0]
            self._head = size + f.read(self.start - 8)  # fed to the file's sha256 with the tensors
        self._hash: StreamHash | None = None
        self._worker: ReadAhead | None = None
        self._file: io.FileIO | None = None
        self._order = sorted((m["data_offsets"][0], m["data_offsets"][1], k) for k, m in header.items())
        self._index = {k: i for i, (_, _, k) in enumerate(self._order)}
        self._span: tuple[int, torch.Tensor] | None = None  # (data offset, bytes) of the span's rest
        for key, meta in header.items():
            if meta["dtype"] not in DTYPES:
                raise FormatError(f"{self.path}: tensor {key!r} has an unknown dtype {meta['dtype']!r}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def offset(self, key: str) -> int:
        """Where the tensor's bytes start in the file (reading in this order reads the file front to back)."""
        return self.start + self.entries[key]["data_offsets"][0]

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from the file now (a KeyError names a missing key)."""
        meta = self.entries[key]
        begin, end = meta["data_offsets"]
        dtype, shape = DTYPES[meta["dtype"]], tuple(meta["shape"])
        raw = self._ahead(key)
        if raw is None:
            raw = self._read(key, begin, end)
        n = 1
        for s in shape:
            n *= s
        if n * dtype.itemsize != end - begin:
            raise FormatError(f"{self.path}: tensor {key!r}: {end - begin} bytes for shape {list(shape)}")
        return raw.view(dtype).reshape(shape)

    def _read(self, key: str, begin: int, end: int) -> torch.Tensor:
        """The tensor's bytes (data offsets ``begin:end``): from the span read with the tensors before it, or
        read now with the tensors after it in the file, up to ``SPAN`` bytes in one ``preadv``. One read and
        one hash feed per span, not per tensor (an 8B-shaped LoRA holds 1792 tensors of 0.25-1 MiB); a view
        of the span's memory, which goes back to the pool once every tensor read from it is gone. Each tensor
        of a span is handed out once: one asked for again is read again (whoever had it may have changed it).
        """
        if self._span is not None:
            lo, held = self._span
            if lo <= begin and end <= lo + held.numel():
                self._span = (end, held[end - lo :]) if end < lo + held.numel() else None
                return held[begin - lo : end - lo]
        order, stop, j = self._order, end, self._index[key] + 1
        while (
            j < len(order) and order[j][0] == stop and order[j][1] - begin <= SPAN and (stop - begin) % 8 == 0
        ):
            stop = order[j][1]  # the next tensor in the file, end to end (8-aligned in the buffer: any dtype)
            j += 1
        raw = buffers.take(max(stop - begin, SPAN))[: stop - begin]  # (bytes,) one block size: reused warm
        f = self._opened()
        try:
            _read_tensor(f, raw, self.start + begin, key)
        except FormatError:  # cut short somewhere in the span: say which tensor
            if stop == end:
                raise
            return self._read_alone(f, key, begin, end)
        self._feed(self.start + begin, raw)
        self._span = (end, raw[end - begin :]) if stop > end else None
        return raw[: end - begin]

    def _opened(self) -> io.FileIO:
        """The file, opened at the first read and kept for the reads after, closed with the reader (the
        8B-shaped cat reads its inputs in 344 spans; under cProfile each ``open`` took 0.13 ms, 49 ms)."""
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115  (closed by the finalizer)
            weakref.finalize(self, self._file.close)
        return self._file

    def _read_alone(self, f, key: str, begin: int, end: int) -> torch.Tensor:
        raw = buffers.take(end - begin)  # (bytes,)
        _read_tensor(f, raw, self.start + begin, key)
        self._feed(self.start + begin, raw)
        return raw

    def _ahead(self, key: str) -> torch.Tensor | None:
        """The tensor's bytes from the read-ahead worker, started at the first read when the file's sha256 is
        wanted (``files.hash_ahead``) and workers are asked for (``readahead.asked``): it reads and hashes the
        tensors in file order on another thread."""
        if self._worker is None and self._hash is None and (wanted := hashing(self.path)) is not None:
            if not asked():
                return None
            self._hash = wanted
            wanted.feed(0, self._head)
            spans = sorted((self.offset(k), k, m["data_offsets"][1] - m["data_offsets"][0])
                           for k, m in self.entries.items())  # fmt: skip
            self._worker = ReadAhead(self.path, [(k, o, n) for o, k, n in spans], _read_tensor, wanted.feed)
        return self._worker.take(key) if self._worker is not None else None

    def _feed(self, offset: int, raw: torch.Tensor) -> None:
        """Give the bytes just read to the sha256 that wants them (``files.hash_ahead``); read once. The hash
        runs behind the merge on another thread (``storage.hasher``; ``MERGING_HASH_BEHIND=0``: here)."""
        if self._hash is None:
            self._hash = hashing(self.path)
            if self._hash is None:
                return
            self._hash.feed(0, self._head)
        if os.environ.get("MERGING_HASH_BEHIND") != "0":
            hash_behind(self._hash.feed, offset, raw)
        elif raw.numel():
            self._hash.feed(offset, raw.numpy())


class SafetensorsWriter:
    """Append tensors to a new safetensors file; ``close`` writes the header into the reserved room.

    Args:
        path: the file to create (inside an atomic folder: a failure leaves nothing behind).
        header_room: bytes reserved for the header; when the header outgrows it the data is moved once.
    """

    def __init__(self, path: Path, header_room: int) -> None:
        self.path = Path(path)
        self.room = max(64, -(-header_room // 8) * 8)
        self.entries: dict[str, dict] = {}
        self.size = 0
        checkpoint(f"open {self.path.name}")
        self.file = open(self.path, "wb")  # noqa: SIM115  (closed in close())
        self._behind = WriteBehind(self.file.fileno(), self.path.name)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor's bytes (contiguous, little-endian, as stored). They are written by the writer's
        thread (``storage.behind``): the tensor must not change after it is added."""
        if name in self.entries:
            raise ValueError(f"tensor {name!r} written twice")
        t = _plain(tensor)
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        if raw.numel():
            self._behind.put(8 + self.room + self.size, raw)
        self.entries[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.size, self.size + raw.numel()]}  # fmt: skip
        self.size += raw.numel()

    def close(self, metadata: Mapping[str, str] | None = None) -> None:
        """Write the header (sorted keys, space-padded) once every tensor is written, and close the file."""
        self._behind.finish()
        header = dict(sorted(self.entries.items()))
        if metadata:
            header = {"__metadata__": dict(metadata)} | header
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > self.room:
            self._grow(len(text))
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.room) + text + b" " * (self.room - len(text)))
        self.file.flush()
        start_writeback(self.file.fileno())  # the last bytes go to disk while the caller finishes the rest
        self.file.close()
        checkpoint(f"wrote {self.path.name}")

    def abort(self) -> None:
        """Stop writing (what was queued is written, errors ignored) and close the file."""
        try:
            self._behind.finish()
        except Exception:  # noqa: S110  (the caller is already failing; its own error is the one to see)
            pass
        self.file.close()

    def _grow(self, needed: int) -> None:
        """Move the data further into the file so that a header of ``needed`` bytes fits."""
        room = -(-needed // 8) * 8
        self.file.flush()
        with open(self.path, "rb") as src:
            src.seek(8 + self.room)
            data = src.read()
        self.file.seek(8 + room)
        self.file.write(data)
        self.room = room


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, contiguous, on the CPU, calling torch only for what is missing: each torch call lets
    go of the GIL, and taking it back waits behind the hashing and writing threads (``storage.hasher``)."""
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t if t.is_contiguous() else t.contiguous()


class LoadedTensors:
    """A torch weights file (``.bin``), loaded whole (weights only), behind the reader's interface."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tensors = load_tensors(self.path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def open_tensors(path: Path) -> SafetensorsReader | LoadedTensors:
    """A safetensors file read tensor by tensor, or a torch file loaded whole."""
    return SafetensorsReader(path) if Path(path).suffix == ".safetensors" else LoadedTensors(path)


def header_room(names: list[str]) -> int:
    """Room for a header naming these tensors (dtype, a 4-D shape and two offsets of 16 digits each)."""
    return 256 + sum(len(json.dumps(n)) + 110 for n in names)


CHUNK = 64 << 20


def stream_shard(src: Path, dst: Path, transforms: dict, extra: dict | None = None) -> None:
    """Copy a safetensors file tensor by tensor, replacing the named tensors by transform(name, tensor).

    Shapes and dtypes do not change, so every offset stays. Untouched tensors are copied in the kernel; each
    transformed one is read into one buffer that every tensor of the shard reuses (sized for the largest),
    folded there in place and written from it, so memory stays at one tensor however large the shard, and
    no tensor costs fresh pages of its own. ``extra`` maps a new tensor's name to (source tensor name, fn):
    fn(new name, a copy of the source as stored) is appended after the others (its shape and dtype are the
    source's).
    """
    header = safetensors_header(src)
    extra = extra or {}
    tensors = {n: meta for n, meta in header.items() if n != "__metadata__"}
    offset = max((meta["data_offsets"][1] for meta in tensors.values()), default=0)
    added = {}
    for name, (source, _) in extra.items():
        meta = header[source]
        size = meta["data_offsets"][1] - meta["data_offsets"][0]
        added[name] = meta | {"data_offsets": [offset, offset + size]}
        offset += size
    sources = {name: [new for new, (source, _) in extra.items() if source == name] for name in tensors}
    folded = [meta["data_offsets"] for name, meta in tensors.items() if name in transforms or sources[name]]
    buf = torch.empty(max((e - b for b, e in folded), default=0), dtype=torch.uint8)  # (bytes,) reused
    made: dict[str, torch.Tensor] = {}
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        (n,) = struct.unpack("<Q", _pread(fin, 8, 0))
        if added:
            text = json.dumps(header | added, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            write_all(fout, struct.pack("<Q", len(text)) + text)
        else:
            write_all(fout, struct.pack("<Q", n) + _pread(fin, n, 8))
        data_start = 8 + n
        for (begin, end), name in sorted((meta["data_offsets"], name) for name, meta in tensors.items()):
            if name in transforms or sources[name]:
                meta = header[name]
                raw = buf[: end - begin]
                pread_into(fin, raw, data_start + begin)
                t = raw.view(DTYPES[meta["dtype"]]).reshape(meta["shape"]) if end > begin else torch.empty(0)
                for new in sources[name]:
                    made[new] = extra[new][1](new, t.clone()).contiguous()
                out = transforms[name](name, t).contiguous() if name in transforms else t
                if out.dtype != t.dtype or out.shape != t.shape:  # the header keeps its dtype and offsets
                    raise FormatError(
                        f"{src}: tensor {name!r} would be written as {out.dtype} {list(out.shape)} where the "
                        f"header says {t.dtype} {list(t.shape)}: cast it to the stored type"
                    )
                _write(fout, out)
            else:
                copy_range(fin, fout, data_start + begin, end - begin)
                start_writeback(fout.fileno())
            checkpoint(f"tensor {name}")
        for name in added:
            _write(fout, made[name])
            checkpoint(f"tensor {name}")


def _pread(f, size: int, offset: int) -> bytes:
    """``size`` bytes of ``f`` at ``offset`` (a short read is a truncated file)."""
    data = os.pread(f.fileno(), size, offset)
    if len(data) < size:
        raise FormatError(f"{f.name}: truncated safetensors file")
    return data


def pread_into(f, raw: torch.Tensor, offset: int, short: str = "truncated safetensors file") -> None:
    """Fill the byte tensor ``raw`` from ``f`` at ``offset``; a short read raises FormatError(short)."""
    view, done = memoryview(raw.numpy()), 0
    while done < len(view):
        got = os.preadv(f.fileno(), [view[done:]], offset + done)
        if got == 0:
            raise FormatError(f"{f.name}: {short}")
        done += got


def _read_tensor(f, raw: torch.Tensor, offset: int, key: str) -> None:
    pread_into(f, raw, offset, f"tensor {key!r} is cut short (truncated file)")


def write_all(f, data) -> None:
    """Write every byte of ``data`` (an unbuffered file may take fewer per call)."""
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += f.write(view[done:])


def _write(f, t: torch.Tensor) -> None:
    """Append a tensor's bytes (no copy) and start their writeback to disk."""
    if t.numel():
        write_all(f, t.reshape(-1).view(torch.uint8).numpy())
        start_writeback(f.fileno())


def copy_range(fin, fout, offset: int, size: int, at: int | None = None) -> int:
    """Copy ``size`` bytes of ``fin`` from ``offset`` into ``fout`` at ``at`` (its end when None), in the
    kernel (copy_file_range) where it can, else read + write; ``fout`` is left positioned after them.

    Returns:
        The offset in ``fout`` just after the bytes copied.
    """
    at = fout.seek(0, os.SEEK_END) if at is None else at
    fi, fo, done = fin.fileno(), fout.fileno(), 0
    while done < size:
        try:
            n = os.copy_file_range(fi, fo, size - done, offset + done, at + done)
        except (OSError, AttributeError):  # across filesystems, or no copy_file_range here: read + write
            block = os.pread(fi, min(CHUNK, size - done), offset + done)
            n = os.pwrite(fo, block, at + done) if block else 0
        if n == 0:
            raise FormatError(f"{fin.name}: truncated safetensors file (or cut short while it was copied)")
        done += n
    fout.seek(at + size)
    return at + size
