"""A lean GGUF header reader and writer: the layout, a few scalar values, the key/value section as bytes.

GGUF (llama.cpp's ``gguf.md``), little-endian::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv × (key: string, type u32, value)                    string = u64 length + UTF-8 bytes
    n_tensors × (name: string, n_dims u32, ne u64 × n_dims, type u32, offset u64)
    zero padding to ``general.alignment`` (default 32), then the tensor data; each tensor's offset
    (relative to the data start) is a multiple of the alignment, the gaps zero bytes.

``read_header`` walks the key/value section without building its arrays (a tokenizer's 50k strings are
skipped by their lengths), keeps the scalar and string values, and checks every tensor lies inside the
file. ``write_header`` writes a model's header with new tensor types, the key/value section copied as
the base's own bytes; ``layout`` gives the offsets the tensors then go to.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from merging.errors import FormatError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
           12: "<d"}  # fmt: skip
Value = int | float | bool | str


@dataclass(frozen=True)
class GgufTensor:
    """One tensor's entry: name, ggml dims (ne[0] = row length), type, offset from the data start."""

    name: str
    ne: tuple[int, ...]
    qtype: int
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy shape of the elements, (rows, row length)."""
        return tuple(reversed(self.ne))

    @property
    def nbytes(self) -> int:
        """The size of its data."""
        return tensor_nbytes(self.ne, self.qtype)


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's layout: version, the key/value section's byte range, its scalar values, tensors."""

    path: Path
    version: int
    n_kv: int
    kv_span: tuple[int, int]  # [start, end) of the key/value section in the file
    values: dict[str, Value]  # scalar and string values (arrays are skipped, their bytes kept in kv_span)
    tensors: tuple[GgufTensor, ...]
    alignment: int
    data_offset: int

    def get(self, key: str) -> Value | None:
        """One scalar or string value, or None."""
        return self.values.get(key)


def tensor_nbytes(ne: tuple[int, ...], qtype: int) -> int:
    """Bytes of a tensor of ggml dims ``ne`` and type ``qtype`` (a row is whole blocks)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    n = 1
    for d in ne[1:]:
        n *= d
    return n * (ne[0] // block) * size if ne else 0


class _Cursor:
    """Reads little-endian values from a buffer, any overrun a FormatError naming the file."""

    def __init__(self, buf, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.buf):
            raise FormatError(f"{self.path}: not a readable GGUF file (header truncated at byte {self.pos})")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(f"{self.path}: not a readable GGUF file (header truncated at byte {self.pos})")
        self.pos += n

    def string(self) -> str:
        n = self.take("<Q")
        start = self.pos
        self.skip(n)
        try:
            return self.buf[start : self.pos].decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: not a readable GGUF file (bad UTF-8 at byte {start})") from None

    def skip_value(self, kind: int) -> None:
        if kind in SCALARS:
            self.skip(struct.calcsize(SCALARS[kind]))
        elif kind == STRING:
            self.skip(self.take("<Q"))
        elif kind == ARRAY:
            sub, count = self.take("<I"), self.take("<Q")
            if sub in SCALARS:
                self.skip(count * struct.calcsize(SCALARS[sub]))
            else:
                for _ in range(count):
                    self.skip_value(sub)
        else:
            raise FormatError(f"{self.path}: not a readable GGUF file (value type {kind} at byte {self.pos})")


def read_header(path: Path) -> GGUFHeader:
    """Parse a GGUF file's header; a corrupt or truncated file is one FormatError naming it.

    Args:
        path: the .gguf file.

    Returns:
        Its layout; every tensor checked to lie inside the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise FormatError(f"{path}: not a readable GGUF file ({size} bytes, shorter than a header)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, path, size)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from e


def _parse(buf: mmap.mmap, path: Path, size: int) -> GGUFHeader:
    import gguf

    try:
        c = _Cursor(buf, path)
        if bytes(buf[:4]) != MAGIC:
            raise FormatError(f"{path}: not a GGUF file (starts {bytes(buf[:4])!r}, not b'GGUF')")
        c.skip(4)
        version = c.take("<I")
        if version & 0xFFFF == 0:
            raise FormatError(f"{path}: a big-endian GGUF file; only little-endian ones are read")
        if version not in (2, 3):
            raise FormatError(f"{path}: GGUF version {version}; versions 2 and 3 are read")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        start, values = c.pos, {}
        for _ in range(n_kv):
            key, kind = c.string(), c.take("<I")
            if kind in SCALARS:
                values[key] = c.take(SCALARS[kind])
            elif kind == STRING:
                values[key] = c.string()
            else:
                c.skip_value(kind)
        kv_span = (start, c.pos)
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.take("<I")
            if n_dims > 4:
                raise FormatError(f"{path}: tensor {name!r} has {n_dims} dims (GGUF allows 4)")
            ne = tuple(c.take("<Q") for _ in range(n_dims))
            qtype, offset = c.take("<I"), c.take("<Q")
            if qtype not in gguf.GGML_QUANT_SIZES:
                raise FormatError(f"{path}: tensor {name!r} has unknown type {qtype}")
            if ne and ne[0] % gguf.GGML_QUANT_SIZES[qtype][0]:
                raise FormatError(f"{path}: tensor {name!r}: rows of {ne[0]} are not whole blocks")
            infos.append(GgufTensor(name, ne, qtype, offset))
    except FormatError:
        raise
    except (ValueError, OverflowError) as e:
        raise FormatError(f"{path}: not a readable GGUF file ({e})") from e
    alignment = values.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"{path}: general.alignment is {alignment!r}, not a power of two")
    data = pad(c.pos, alignment)
    for t in infos:
        if t.offset % alignment:
            raise FormatError(f"{path}: tensor {t.name!r} at offset {t.offset}, not aligned to {alignment}")
        end = data + t.offset + t.nbytes
        if end > size:
            raise FormatError(f"{path}: truncated: tensor {t.name!r} ends at byte {end}, the file has {size}")
    return GGUFHeader(path, version, n_kv, kv_span, values, tuple(infos), alignment, data)


def pad(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return (n + alignment - 1) // alignment * alignment


def layout(tensors: list[GgufTensor], alignment: int) -> list[GgufTensor]:
    """The tensors with offsets laid out in order, each aligned (what gguf's writer and llama.cpp do)."""
    out, at = [], 0
    for t in tensors:
        out.append(GgufTensor(t.name, t.ne, t.qtype, at))
        at += pad(t.nbytes, alignment)
    return out


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def header_bytes(base: GGUFHeader, kv: bytes, tensors: list[GgufTensor]) -> bytes:
    """A GGUF header: the base's version and key/value section ``kv``, the ``tensors`` (laid out), padding.

    Args:
        base: the header whose version, key count and alignment are kept.
        kv: the base's key/value section, its bytes as they are.
        tensors: the output's tensor entries, offsets from ``layout``.

    Returns:
        The bytes up to the data start (a multiple of the alignment).
    """
    parts = [MAGIC, struct.pack("<IQQ", base.version, len(tensors), base.n_kv), kv]
    for t in tensors:
        parts += [_string(t.name), struct.pack("<I", len(t.ne)), struct.pack(f"<{len(t.ne)}Q", *t.ne),
                  struct.pack("<IQ", t.qtype, t.offset)]  # fmt: skip
    head = b"".join(parts)
    return head + bytes(pad(len(head), base.alignment) - len(head))


def kv_bytes(base: GGUFHeader) -> bytes:
    """The base's key/value section as it is in the file."""
    start, end = base.kv_span
    with open(base.path, "rb") as f:
        return os.pread(f.fileno(), end - start, start)


def write_all(fd: int, data) -> None:
    """Write every byte of ``data`` at the file position of ``fd``."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def copy_range(src: int, dst: int, offset: int, n: int, chunk: int = 1 << 24) -> None:
    """Copy ``n`` bytes of ``src`` from ``offset`` to the position of ``dst``, in the kernel where it can.

    ``os.copy_file_range`` (no bytes through this process; a reflink on filesystems that share blocks),
    else ``pread``/``write`` in chunks of ``chunk`` bytes.
    """
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < n:
                got = os.copy_file_range(src, dst, n - done, offset + done)
                if got == 0:
                    raise OSError(f"the base ended {n - done} bytes early")
                done += got
            return
        except OSError as e:
            if done or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    while done < n:
        data = os.pread(src, min(chunk, n - done), offset + done)
        if not data:
            raise OSError(f"the base ended {n - done} bytes early")
        write_all(dst, data)
        done += len(data)
