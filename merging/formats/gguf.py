"""llama.cpp GGUF LoRA adapters: ``blk.N.<name>.weight.lora_a / .lora_b`` with llama.cpp's layout.

| ours | GGUF tensor | numpy shape (= reversed ggml ne) |
|---|---|---|
| A (r, in) | ``<gguf name>.weight.lora_a`` | (r, in), ne [in, r] |
| B (out, r) | ``<gguf name>.weight.lora_b`` | (out, r), ne [r, out] |

Metadata: ``general.type = adapter``, ``general.architecture``, ``adapter.type = lora``,
``adapter.lora.alpha``. llama.cpp scales each module by α / r (r = B's ne[0]), or by 1 when α = 0:
one α for the file, so per-module scales are folded into B and α = 0 is written unless every module
shares one rank and one scale. HF names map through gguf's tensor name map; for the Llama family,
llama.cpp's converter permutes the rows of q_proj and k_proj (per head, halves interleaved), so B's rows
are permuted on write and un-permuted on read. Non-LoRA deltas are written through their exact low-rank
form; IA³ has no GGUF LoRA form.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from merging.core.adapter import Adapter
from merging.core.deltas import LowRank, Scale, Target
from merging.errors import FormatError, MergingError, NonFiniteError, NotAnAdapter, UnsupportedError
from merging.formats.base import (
    READ_DEFAULTS,
    WRITE_DEFAULTS,
    Format,
    Provenance,
    ReadOptions,
    WriteOptions,
    recipe_of,
    refuse_gated,
)
from merging.storage.atomic import atomic_file, checkpoint
from merging.storage.files import reading

if TYPE_CHECKING:
    from merging.base.layout import BaseLayout

ARCH_OF_MODEL_TYPE = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "gemma": "gemma",
    "phi3": "phi3",
}
PERMUTED_ARCHS = {"llama"}
OUT_TYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class BaseInfo:
    """What the GGUF mapping needs to know about the base model."""

    arch: str
    n_blocks: int
    n_head: int
    n_head_kv: int
    modules: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Mapping, modules: Iterable[str] = ()) -> BaseInfo:
        """From a transformers config.json mapping (model_type, num_hidden_layers, heads)."""
        model_type = config.get("model_type", "")
        if model_type not in ARCH_OF_MODEL_TYPE:
            raise UnsupportedError(f"no GGUF adapter mapping for model_type {model_type!r}")
        heads = int(config.get("num_attention_heads", 1))
        return cls(
            ARCH_OF_MODEL_TYPE[model_type], int(config.get("num_hidden_layers", 0)), heads,
            int(config.get("num_key_value_heads") or heads), tuple(modules),
        )  # fmt: skip

    @classmethod
    def from_layout(cls, base: BaseLayout) -> BaseInfo:
        """From the base model's layout: its config and module paths."""
        return cls.from_config(base.config, base.modules.keys())


def _name_map(info: BaseInfo):
    import gguf

    archs = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(archs[info.arch], info.n_blocks)


def _heads(module: str, info: BaseInfo) -> int | None:
    """The head count whose row permutation llama.cpp applies to this module, or None."""
    if info.arch not in PERMUTED_ARCHS:
        return None
    if module.endswith("q_proj"):
        return info.n_head
    if module.endswith("k_proj"):
        return info.n_head_kv
    return None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k permutation of output rows: per head, the two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_rows``."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_numpy(t: torch.Tensor, out_type: str):
    import gguf

    a = t.detach().float().contiguous().numpy()
    if out_type == "f32":
        return a, None
    if out_type == "f16":
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def write(
    adapter: Adapter, path: Path, *, provenance: Provenance = None,
    base: BaseLayout | None = None, force: bool = False, options: WriteOptions = WRITE_DEFAULTS,
) -> Path:  # fmt: skip
    """Write an Adapter as a llama.cpp GGUF LoRA file.

    Args:
        adapter: additive deltas on linear modules (LoHa/LoKr/dense go through their exact low-rank form).
        path: the .gguf file to write (atomically).
        provenance: the recipe, kept as JSON in the string field ``merging.recipe``.
        base: the base model (required): architecture, block count, head counts and module paths.
        force: replace an existing output file.
        options: ``out_type``, the tensor type: f32, f16 or bf16.
    """
    import gguf

    if base is None:
        raise MergingError("GGUF output needs the base model (`base`) for its architecture and heads")
    info, out_type = BaseInfo.from_layout(base), options.out_type
    if out_type not in OUT_TYPES:
        raise UnsupportedError(f"`out_type` must be one of {', '.join(OUT_TYPES)}, got {out_type!r}")
    if adapter.aux:
        raise UnsupportedError(f"{adapter.where}: modules_to_save / trainable tokens have no GGUF LoRA form")
    refuse_gated(adapter, "GGUF")
    tmap = _name_map(info)
    lows: dict[str, LowRank] = {}
    modules = adapter.expanded()
    for mod, d in modules.items():
        if isinstance(d, Scale):
            raise UnsupportedError(f"module {mod}: IA³ has no GGUF LoRA form")
        if d.target.layer not in ("linear", "unknown"):
            raise UnsupportedError(f"module {mod}: a {d.target.layer} delta has no GGUF LoRA form")
        lr = d.low_rank()
        if lr.bias is not None or lr.magnitude is not None:
            raise UnsupportedError(f"module {mod}: LoRA bias and DoRA have no GGUF LoRA form")
        lows[mod] = lr
    uniform = len({(lr.rank, lr.scale) for lr in lows.values()}) == 1
    alpha = next(iter(lows.values())).scale * next(iter(lows.values())).rank if uniform and lows else 0.0
    writer_tensors = []
    for mod, lr in sorted(lows.items()):
        name = tmap.get_name(mod)
        if name is None:
            raise UnsupportedError(f"module {mod} has no GGUF tensor name for architecture {info.arch}")
        b = lr.b.float() if uniform else lr.scale * lr.b.float()
        if (heads := _heads(mod, info)) is not None:
            b = permute_rows(b, heads)
        writer_tensors.append((f"{name}.weight.lora_a", lr.a))
        writer_tensors.append((f"{name}.weight.lora_b", b))
    with atomic_file(Path(path), force=force) as tmp:
        w = gguf.GGUFWriter(str(tmp), info.arch)
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        if adapter.base_model:
            w.add_string("general.base_model.0.repo_url", adapter.base_model)
        if provenance:
            w.add_string("merging.recipe", json.dumps(recipe_of(provenance), sort_keys=True))
        for name, t in writer_tensors:
            data, raw = _to_numpy(t, out_type)
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        checkpoint("gguf header")
        w.write_kv_data_to_file()
        checkpoint("gguf metadata")
        w.write_tensors_to_file()
        checkpoint("gguf tensors")
        w.close()
        _check_complete(tmp)
    return Path(path)


def _check_complete(path: Path) -> None:
    """Read the written file back: GGUFWriter can lose its last bytes to a full disk without an error."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError) as e:
        raise OSError(errno.EIO, SHORT) from e
    if end > path.stat().st_size:
        raise OSError(errno.EIO, SHORT)


SHORT = "the file came out short: a full disk or a file-size limit?"


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]
    return value


def read(
    path: Path, *, base: BaseLayout | None = None, allow_nonfinite: bool = False,
    options: ReadOptions = READ_DEFAULTS,
) -> Adapter:  # fmt: skip
    """Read a llama.cpp GGUF LoRA adapter.

    Args:
        path: the .gguf file.
        base: the base model (module names and heads); needed to name modules exactly and to undo the
            Llama q/k permutation. Without it, names follow gguf's map and q/k are refused for Llama.
        allow_nonfinite: accept NaN/Inf values.
        options: ``keep_permuted`` reads Llama q/k without a base, rows left permuted (for display).
    """
    file = Path(path)
    info = None if base is None else BaseInfo.from_layout(base)
    with reading(file):
        return _read(file, info, allow_nonfinite, options.keep_permuted)


def _read(file: Path, info: BaseInfo | None, allow_nonfinite: bool, keep_permuted: bool) -> Adapter:
    import gguf

    from merging.storage.tensorfiles import gguf_reader

    reader = gguf_reader(file)
    kind, atype = _field(reader, "general.type"), _field(reader, "adapter.type")
    arch = _field(reader, "general.architecture")
    if kind != "adapter" or atype != "lora":
        raise NotAnAdapter(f"{file}: not a GGUF LoRA adapter (general.type={kind!r}, adapter.type={atype!r})")
    if info is not None and arch != info.arch:
        raise FormatError(f"{file}: adapter for architecture {arch!r}, the base model is {info.arch!r}")
    alpha = float(_field(reader, "adapter.lora.alpha") or 0.0)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(
            tuple(int(s) for s in reversed(t.shape))
        )
        if not allow_nonfinite and not torch.isfinite(arr).all():
            raise NonFiniteError(
                f"{file}: tensor {t.name!r} holds NaN or Inf (pass `allow_nonfinite` to accept)"
            )
        tensors[t.name] = arr
    reverse = _reverse_names(info, arch, file, {k.rsplit(".weight.", 1)[0] for k in tensors})
    deltas = {}
    for key in sorted(k for k in tensors if k.endswith(".weight.lora_a")):
        stem = key.removesuffix(".weight.lora_a")
        a, b = tensors[key], tensors.get(f"{stem}.weight.lora_b")
        if b is None:
            raise FormatError(f"{file}: {stem}.weight.lora_a has no lora_b")
        mod = reverse[stem]
        if info is not None and (heads := _heads(mod, info)) is not None:
            b = unpermute_rows(b, heads)
        elif (
            info is None
            and arch in PERMUTED_ARCHS
            and mod.endswith(("q_proj", "k_proj"))
            and not keep_permuted
        ):
            raise UnsupportedError(f"{file}: {stem} is permuted by llama.cpp; pass the base model to undo it")
        r = a.shape[0]
        if b.shape[1] != r:
            raise FormatError(f"{file}: {stem}: lora_a rank {r} but lora_b has shape {tuple(b.shape)}")
        scale = alpha / r if alpha else 1.0
        deltas[mod] = LowRank(
            b.contiguous(), a.contiguous(), scale, Target("linear", (b.shape[0], a.shape[1]))
        )
    for key in tensors:
        if not key.endswith((".weight.lora_a", ".weight.lora_b")):
            raise FormatError(f"{file}: unknown tensor {key!r}")
    return Adapter(file.stem, deltas, base_model=_field(reader, "general.base_model.0.repo_url"), source=file,
                   config={"format": "gguf", "architecture": arch, "alpha": alpha})  # fmt: skip


def _reverse_names(info: BaseInfo | None, arch: str, file: Path, stems: set[str]) -> dict[str, str]:
    """GGUF tensor stem → HF module path."""
    n_blocks = max((int(s.split(".")[1]) + 1 for s in stems if s.startswith("blk.")), default=0)
    info_map = info or BaseInfo(arch, n_blocks, 1, 1)
    tmap = _name_map(info_map)
    out: dict[str, str] = {}
    candidates = info.modules if info is not None and info.modules else list(tmap.mapping)
    for mod in candidates:
        name = tmap.get_name(mod)
        if name in stems and name not in out and (info is not None or mod.startswith("model.")):
            out[name] = mod
    missing = stems - set(out)
    if missing:
        raise FormatError(f"{file}: tensors {sorted(missing)[:3]} match no module of the base model")
    return out


def detect(path: Path) -> bool:
    """A .gguf file (``read`` tells a LoRA adapter from a model by its metadata)."""
    return Path(path).is_file() and Path(path).suffix == ".gguf"


FORMAT = Format("gguf", detect, read, write, uses_base=True)

__all__ = ["BaseInfo", "FORMAT", "OUT_TYPES", "detect", "permute_rows", "read", "unpermute_rows", "write"]
