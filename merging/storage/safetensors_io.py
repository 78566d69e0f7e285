"""safetensors one tensor at a time: a reader that keeps nothing resident, a writer that appends.

``SafetensorsReader.get`` reads one tensor with ``pread`` into fresh memory (no mmap: pages touched
through a mapping would count in the process's RSS until it is unmapped). ``SafetensorsWriter`` reserves
the header's room, appends each tensor's bytes as it comes and writes the header last, padded with
spaces (the format allows it), so a merge never holds its whole output. ``finite`` is the fast NaN/Inf
check both use: a sum is finite only if every entry is.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from merging.errors import FormatError
from merging.storage.atomic import checkpoint
from merging.storage.durable import start_writeback
from merging.storage.tensorfiles import load_tensors, safetensors_header
from merging.storage.threads import serial

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
NAMES = {v: k for k, v in DTYPES.items()}
WRITEBACK = 32 << 20  # bytes written between two requests to start writing them to disk


def finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite (one fast reduction; the exact check only when the sum overflows)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    with serial():  # one pass over memory: threads only add waiting (merging.threads)
        return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class SafetensorsReader:
    """The tensors of one safetensors file by name, each read on demand into its own memory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        header = safetensors_header(self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        with open(self.path, "rb") as f:
            self.start = 8 + struct.unpack("<Q", f.read(8))[0]
        for key, meta in header.items():
            if meta["dtype"] not in DTYPES:
                raise FormatError(f"{self.path}: tensor {key!r} has an unknown dtype {meta['dtype']!r}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from the file now (a KeyError names a missing key)."""
        meta = self.entries[key]
        begin, end = meta["data_offsets"]
        dtype, shape = DTYPES[meta["dtype"]], tuple(meta["shape"])
        raw = torch.empty(end - begin, dtype=torch.uint8)  # (bytes,)
        if end > begin:
            view, done = memoryview(raw.numpy()), 0
            with open(self.path, "rb", buffering=0) as f:
                while done < len(view):
                    n = os.preadv(f.fileno(), [view[done:]], self.start + begin + done)
                    if n == 0:
                        raise FormatError(f"{self.path}: tensor {key!r} is cut short (truncated file)")
                    done += n
        n = 1
        for s in shape:
            n *= s
        if n * dtype.itemsize != end - begin:
            raise FormatError(f"{self.path}: tensor {key!r}: {end - begin} bytes for shape {list(shape)}")
        return raw.view(dtype).reshape(shape)


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
        self.size = self._unsynced = 0
        checkpoint(f"open {self.path.name}")
        self.file = open(self.path, "wb")  # noqa: SIM115  (closed in close())
        self.file.seek(8 + self.room)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor's bytes (contiguous, little-endian, as stored)."""
        if name in self.entries:
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        self.file.write(memoryview(raw.numpy()))
        self._unsynced += raw.numel()
        if self._unsynced > WRITEBACK:  # start the disk writes while the next modules are merged
            self.file.flush()
            start_writeback(self.file.fileno())
            self._unsynced = 0
        self.entries[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.size, self.size + raw.numel()]}  # fmt: skip
        self.size += raw.numel()

    def close(self, metadata: Mapping[str, str] | None = None) -> None:
        """Write the header (sorted keys, space-padded) and close the file."""
        header = dict(sorted(self.entries.items()))
        if metadata:
            header = {"__metadata__": dict(metadata)} | header
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > self.room:
            self._grow(len(text))
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.room) + text + b" " * (self.room - len(text)))
        self.file.close()
        checkpoint(f"wrote {self.path.name}")

    def abort(self) -> None:
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
