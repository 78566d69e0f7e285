"""Safe, format-agnostic access to tensor files: safetensors (mmap), ``.bin`` (weights only), GGUF.

Nothing here unpickles arbitrary objects: ``.bin`` files load with ``torch.load(weights_only=True)``.
Every failure is a ``FormatError`` naming the file.
"""

from __future__ import annotations

import json
import pickle
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.errors import FormatError

TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's name, shape and dtype as stored, without its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def tensor_files(path: Path) -> list[Path]:
    """The tensor files a path stands for: the file itself, or the tensor files in a folder."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TENSOR_SUFFIXES)
    safe = [p for p in files if p.suffix == ".safetensors"]
    return safe or files


def safetensors_header(path: Path) -> dict:
    """Read and sanity-check a safetensors header without reading any tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise FormatError(f"{path}: safetensors header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            shape = [int(s) for s in meta["shape"]]
            str(meta["dtype"])
        except (TypeError, KeyError, ValueError) as e:
            raise FormatError(f"{path}: tensor {key!r} has a malformed header entry") from e
        if not 0 <= begin <= end <= data_len or any(s < 0 for s in shape):
            raise FormatError(f"{path}: tensor {key!r} points outside the file (truncated or corrupt)")
    return header


def list_tensors(path: Path) -> list[TensorInfo]:
    """Names, shapes and dtypes of every tensor in a file or folder, reading headers only where possible."""
    from merging.storage.files import reading

    with reading(Path(path)):
        return _list_tensors(path)


def _list_tensors(path: Path) -> list[TensorInfo]:
    out: list[TensorInfo] = []
    for f in tensor_files(path):
        if f.suffix == ".safetensors":
            for k, meta in safetensors_header(f).items():
                if k != "__metadata__":
                    out.append(TensorInfo(k, tuple(meta["shape"]), meta["dtype"].lower(), f))
        elif f.suffix == ".gguf":
            import gguf

            from merging.storage.gguf_header import read_header

            for t in read_header(f).tensors:  # the header only: no tokenizer arrays parsed
                out.append(TensorInfo(t.name, t.shape, gguf.GGMLQuantizationType(t.qtype).name.lower(), f))
        else:
            for k, t in load_tensors(f).items():
                out.append(TensorInfo(k, tuple(t.shape), str(t.dtype).removeprefix("torch."), f))
    return out


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file (empty when absent)."""
    meta = safetensors_header(Path(path)).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of one safetensors or torch file, safely."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        safetensors_header(path)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise FormatError(f"{path}: cannot read safetensors file ({e})") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own advice on this path is to unpickle anyway
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FormatError(
            f"{path}: holds pickled objects besides tensors, which merging never loads; convert it to "
            "safetensors where you trust its source"
        ) from e
    except Exception as e:  # torch raises many kinds here (RuntimeError, EOFError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path}: not a readable torch weights file ({first[:120]})") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FormatError(f"{path}: expected a mapping of tensor names to tensors")
    return {str(k): v for k, v in obj.items()}


def gguf_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError, ...
        raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


class LazyWeights:
    """Tensors of a model folder (safetensors shards) by name, read one at a time on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.where = {t.name: t.file for t in list_tensors(self.folder) if t.file.suffix == ".safetensors"}
        if not self.where:
            raise FormatError(f"{self.folder}: no safetensors weights found")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.where:
            raise FormatError(f"{self.folder}: no tensor {name!r} in the base weights")
        with safe_open(str(self.where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def module_weight(self, module: str) -> torch.Tensor:
        """The weight of a module path (``model.layers.0.mlp.up_proj`` → ``....weight``)."""
        return self.get(f"{module}.weight")
