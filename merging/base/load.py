"""Loading a base model for real: transformers models (with the head of the adapters' task type) from a
folder, a Hub id or a ``.gguf`` file (converted once into a cached transformers folder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from merging.base import pipelines
from merging.base.layout import auto_classes, build_first
from merging.errors import DeviceError, FormatError, SourceError
from merging.storage.files import cache_dir, sha256_file

DTYPE_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")  # fmt: skip


def resolve_device(device: str = "auto") -> torch.device:
    """auto → CUDA when available, else CPU; cuda without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"`device` {device}: no CUDA device is available (torch {torch.__version__}); use cpu or auto"
        )
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f"`device` {device}: {e}") from None


def load_base(
    spec: str | Path,
    device: str = "auto",
    dtype: str = "float32",
    device_map: str | None = None,
    task_type: str | None = None,
):
    """Load a base model and its tokenizer from a folder, a ``.gguf`` file or a Hub id (from the cache).

    Args:
        task_type: the adapters' PEFT task type: picks the head (``TASK_CLASSES``); a head the base does
            not store is initialised from a fixed seed, so every run sees the same one.
        device: auto, cpu or cuda (ignored with ``device_map``).
        device_map: e.g. "auto": spread a base larger than one device over the GPUs and CPU memory
            (transformers + accelerate); the runtime's deltas follow each module's device.

    Returns:
        (model in eval mode, tokenizer or None when the folder has none).
    """
    from transformers import AutoTokenizer

    if dtype not in DTYPE_CHOICES:
        raise SourceError(f"`dtype` must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    dev = resolve_device(device) if device_map is None else None
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        path = _gguf_folder(path)
    where = str(path) if path.exists() else str(spec)
    if path.is_dir() and (pipelines.is_pipeline(path) or pipelines.is_component(path)):
        raise SourceError(
            f"{spec}: a diffusers folder; verify takes the pipeline folder (model_index.json), bake loads "
            "transformers bases only (convert and merge take either as --base)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise SourceError(f"{spec}: not a transformers model folder (no config.json)")
    extra = {"device_map": device_map} if device_map else {}
    classes = auto_classes(task_type)
    try:
        with torch.random.fork_rng(devices=[]):  # a head the base lacks (a fresh classifier): same every run
            torch.manual_seed(0)
            torch_dtype = DTYPE_CHOICES[dtype]
            model = build_first(classes, lambda cls: cls.from_pretrained(where, dtype=torch_dtype, **extra))
    except (OSError, ValueError, KeyError) as e:  # missing, no weights, unknown model_type: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{spec}: cannot load the base model ({first})") from None
    tokenizer = None
    if not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError, TypeError, RuntimeError):
            tokenizer = None  # verify then runs on seeded token ids
    if dev is not None:
        model = model.to(dev)
    return model.eval(), tokenizer


def _gguf_folder(gguf_file: Path) -> Path:
    """The transformers folder converted (once, cached by sha256) from a GGUF model file."""
    out = cache_dir() / "models" / f"{gguf_file.stem}-{sha256_file(gguf_file)[:12]}"
    if (out / "config.json").exists():
        return out
    return convert_gguf_model(gguf_file, out)


def convert_gguf_model(gguf_file: Path, out: Path) -> Path:
    """Convert a GGUF causal LM into a transformers folder (float32 safetensors, config, tokenizer).

    Args:
        gguf_file: a llama.cpp model file transformers can read (``gguf_file=`` support).
        out: destination folder; written to a temporary sibling and renamed into place.

    Returns:
        ``out``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{gguf_file}: transformers cannot load this GGUF model ({e})") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf_file.name}\nsha256 {sha256_file(gguf_file)}\n")
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
