"""kohya / LyCORIS single-file safetensors: ``<lora_name>.<part>`` keys, scales as LyCORIS defines them.

``lora_name`` is a prefix (``lora_unet``, ``lora_te``, ``lycoris``, ...) joined to the module path with
its dots turned into underscores. Given the base's module names, ``read`` maps them back; otherwise the
names are kept verbatim. ``write`` mirrors ``read``.

| family | parts | delta | scale |
|---|---|---|---|
| LoRA / LoCon | lora_down (r, in[, k]), lora_up (out, r[, 1]), lora_mid (r, r, kh, kw) | LowRank | α / r |
| LoHa | hada_w1_a (out, r), hada_w1_b (r, in_flat), w2 likewise, hada_t1/t2 (Tucker) | Hadamard | α / r |
| LoKr | lokr_w1[_a/_b], lokr_w2[_a/_b], lokr_t2 | Kronecker | 1 if both full, else α / r |
| IA³ | weight = l − 1 (n,) or (1, n, 1, 1), on_input | Scale | – |
| full | diff (out, in[, k...]), diff_b (out,) | Dense | 1 |
| DoRA | dora_scale (out, 1[, 1...]) beside a LoRA | LowRank.magnitude | |

A missing or zero ``alpha`` means α = r (scale 1).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from merging.adapter import Adapter
from merging.deltas import Delta, Dense, Hadamard, Kronecker, LowRank, Scale, Target
from merging.errors import FormatError, NonFiniteError, NotAnAdapter, UnsupportedError
from merging.fileio import atomic_file, reading, save_safetensors
from merging.formats import lycoris
from merging.formats.base import (
    READ_DEFAULTS,
    WRITE_DEFAULTS,
    Format,
    ReadOptions,
    WriteOptions,
    naming,
    refuse_gated,
)
from merging.linalg import tucker_factors
from merging.tensorfiles import list_tensors, load_tensors, safetensors_metadata

if TYPE_CHECKING:
    from merging.basemodel import BaseLayout

PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te", "lycoris", "lora")
LORA = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
SCALED = ("alpha", "dora_scale")
FAMILIES = {
    "lora": {*LORA, *SCALED},
    "loha": {*lycoris.LOHA, *SCALED},
    "lokr": {*lycoris.LOKR, *SCALED},
    "ia3": set(lycoris.IA3),
    "full": set(lycoris.FULL),
}
MARKERS = {  # a group belongs to a family only when it holds one of these
    "lora": {"lora_down.weight"},
    "loha": {"hada_w1_a"},
    "lokr": {"lokr_w1", "lokr_w1_a"},
    "ia3": {"on_input"},
    "full": {"diff"},
}
PART = re.compile(r"^(?P<name>[^.]+)\.(?P<part>.+)$")


def detect(path: Path) -> bool:
    """A single .safetensors file (``read`` tells a kohya/LyCORIS file from a model by its keys)."""
    return Path(path).is_file() and Path(path).suffix == ".safetensors"


def _check_holds_adapter(file: Path) -> None:
    """NotAnAdapter unless some key ends in a family's marker part (a model file has none), headers only."""
    parts: dict[str, set[str]] = defaultdict(set)
    for t in list_tensors(file):
        name, _, part = t.name.partition(".")
        parts[name].add(part)
    if not any(part & marks for part in parts.values() for marks in MARKERS.values()):
        name = min(parts, default="")
        raise NotAnAdapter(f"{file}: {name}: unknown or mixed key families {sorted(parts[name])}")


def name_map(modules: Iterable[str]) -> dict[str, str]:
    """kohya lora_name → module path, for every known prefix."""
    out = {}
    for mod in modules:
        flat = mod.replace(".", "_")
        for prefix in PREFIXES:
            out[f"{prefix}_{flat}"] = mod
    return out


def _family(parts: dict[str, torch.Tensor], file: Path, name: str) -> str:
    found = [f for f, keys in FAMILIES.items() if set(parts) <= keys and _has_marker(f, parts)]
    if len(found) != 1:
        raise FormatError(f"{file}: {name}: unknown or mixed key families {sorted(parts)}")
    return found[0]


def _has_marker(family: str, parts: dict) -> bool:
    return bool(MARKERS[family] & set(parts))


def read(
    path: Path, *, base: BaseLayout | None = None, allow_nonfinite: bool = False,
    options: ReadOptions = READ_DEFAULTS,
) -> Adapter:  # fmt: skip
    """Read a kohya/LyCORIS file into an Adapter.

    Args:
        path: the .safetensors file.
        base: the base model, whose module paths map kohya names back (kept verbatim otherwise).
        allow_nonfinite: accept NaN/Inf values.
        options: unused.
    """
    file = Path(path)
    with reading(file):
        _check_holds_adapter(file)
        return _read(file, None if base is None else base.modules, allow_nonfinite)


def _read(file: Path, modules: Iterable[str] | None, allow_nonfinite: bool) -> Adapter:
    tensors = load_tensors(file)
    mapping = name_map(modules) if modules is not None else {}
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        m = PART.match(key)
        if not m:
            raise FormatError(f"{file}: unknown key {key!r} (expected <lora_name>.<part>)")
        if not allow_nonfinite and t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(
                f"{file}: tensor {key!r} holds NaN or Inf (pass `allow_nonfinite` to accept)"
            )
        groups[m["name"]][m["part"]] = t
    deltas: dict[str, Delta] = {}
    for name, parts in sorted(groups.items()):
        module = mapping.get(name, name)
        if modules is not None and name not in mapping:
            raise FormatError(f"{file}: {name} matches no module of the base model")
        with naming(file, name):
            deltas[module] = _READERS[_family(parts, file, name)](parts)
    meta = safetensors_metadata(file)
    base = meta.get("ss_base_model_version") or meta.get("ss_sd_model_name")
    return Adapter(
        file.stem, deltas, base_model=base, source=file, config={"format": "kohya", "metadata": meta}
    )


def _alpha(parts: dict[str, torch.Tensor], r: int) -> float:
    a = parts.get("alpha")
    value = float(a.float().reshape(-1)[0]) if a is not None and a.numel() else 0.0
    return value if value != 0 else float(r)


def _magnitude(parts: dict[str, torch.Tensor], out: int) -> torch.Tensor | None:
    d = parts.get("dora_scale")
    if d is None:
        return None
    if d.shape[0] != out or d.numel() != out:
        raise UnsupportedError(
            f"dora_scale of shape {tuple(d.shape)}: only output-side DoRA (out, 1, ...) is supported"
        )
    return d.reshape(out)


def _read_lora(parts: dict[str, torch.Tensor]) -> LowRank:
    down, up, mid = parts["lora_down.weight"], parts["lora_up.weight"], parts.get("lora_mid.weight")
    r, out = down.shape[0], up.shape[0]
    if mid is not None:  # Tucker: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1)
        b, a = tucker_factors(mid, up.reshape(out, -1).T, down.reshape(r, -1))
        target = Target("conv2d" if mid.dim() == 4 else "conv1d", (out, down.shape[1], *mid.shape[2:]))
    else:
        b, a = up.reshape(out, -1), down.reshape(r, -1)
        layer = lycoris.DIM_LAYERS.get(down.dim())
        if layer is None:
            raise FormatError(f"lora_down has an unsupported shape {tuple(down.shape)}")
        target = Target(layer, (out, *down.shape[1:]))
    scale = _alpha(parts, r) / r
    return LowRank(b, a, scale, target, magnitude=_magnitude(parts, out))


def _read_loha(parts: dict[str, torch.Tensor]) -> Hadamard:
    r = parts["hada_w1_b"].shape[0]
    return lycoris.loha_delta({k: v for k, v in parts.items() if k in lycoris.LOHA}, _alpha(parts, r) / r)


def _read_lokr(parts: dict[str, torch.Tensor]) -> Kronecker:
    full = "lokr_w1" in parts and "lokr_w2" in parts
    r = 1 if full else (parts["lokr_w1_a"] if "lokr_w1_a" in parts else parts["lokr_w2_a"]).shape[1]
    scale = 1.0 if full else _alpha(parts, r) / r
    return lycoris.lokr_delta({k: v for k, v in parts.items() if k in lycoris.LOKR}, scale)


_READERS = {
    "lora": _read_lora, "loha": _read_loha, "lokr": _read_lokr,
    "ia3": lycoris.ia3_delta, "full": lycoris.full_delta,
}  # fmt: skip


# ------------------------------------------------------------------------------------------ writing


def _kohya_name(module: str, prefix: str) -> str:
    if module.startswith(PREFIXES) and "." not in module:  # already a kohya name (read without a base)
        return module
    return f"{prefix}_{module.replace('.', '_')}"


def _lora_parts(d: LowRank) -> dict[str, torch.Tensor]:
    t, r = d.target, d.b.shape[1]
    kernel = t.shape[2:] if t.layer in ("conv1d", "conv2d") else ()
    in_ch = t.shape[0] if t.layer == "gpt2_conv1d" else (t.shape[1] if t.layer != "embedding" else t.shape[1])
    if t.layer == "embedding":
        raise UnsupportedError("kohya files have no embedding LoRA; keep this adapter in PEFT format")
    parts = {
        "lora_down.weight": d.a.reshape(r, in_ch, *kernel),
        "lora_up.weight": d.b.reshape(d.b.shape[0], r, *(1 for _ in kernel)),
        "alpha": torch.tensor(d.scale * r, dtype=torch.float32),
    }
    if d.bias is not None:
        raise UnsupportedError("kohya LoRA has no bias delta; keep this adapter in PEFT format")
    if d.magnitude is not None:
        parts["dora_scale"] = d.magnitude.reshape(-1, *(1 for _ in t.shape[1:]))
    return parts


def _lokr_parts(d: Kronecker) -> dict[str, torch.Tensor]:
    parts = lycoris.lokr_parts(d)
    if d.w1 is not None and d.w2 is not None:  # LyCORIS uses scale 1 here: fold ours into w1
        parts["lokr_w1"] = (d.scale * d.w1.float()).to(d.w1.dtype)
    else:
        r = (d.w1a if d.w1a is not None else d.w2a).shape[1]
        parts["alpha"] = torch.tensor(d.scale * r, dtype=torch.float32)
    return parts


def _parts(d: Delta) -> dict[str, torch.Tensor]:
    if isinstance(d, LowRank):
        return _lora_parts(d)
    if isinstance(d, Hadamard):
        alpha = torch.tensor(d.scale * d.w1b.shape[0], dtype=torch.float32)
        return lycoris.loha_parts(d) | {"alpha": alpha}
    if isinstance(d, Kronecker):
        return _lokr_parts(d)
    if isinstance(d, Scale):
        return lycoris.ia3_parts(d)
    if isinstance(d, Dense):
        return lycoris.full_parts(d)
    raise UnsupportedError(f"{type(d).__name__} has no kohya form")


def write(
    adapter: Adapter, path: Path, *, provenance: Mapping[str, Any] | None = None,
    base: BaseLayout | None = None, force: bool = False, options: WriteOptions = WRITE_DEFAULTS,
) -> Path:  # fmt: skip
    """Write an Adapter as one kohya/LyCORIS .safetensors file (kohya ``ss_*`` metadata kept).

    Args:
        adapter: deltas of any kind; auxiliary modules have no kohya form and are refused.
        path: the output file (written to a temporary folder and renamed into place).
        provenance: the recipe, kept as JSON in the metadata key ``merging.recipe``.
        base: unused (module paths become lora_names with ``options.prefix``).
        force: replace an existing output file.
        options: ``prefix``, the lora_name prefix (``lora_unet``, ``lora_te``, ``lycoris``...).
    """
    if adapter.aux:
        raise UnsupportedError(f"{adapter.where}: modules_to_save / trainable tokens have no kohya form")
    refuse_gated(adapter, "kohya")
    tensors = {}
    modules = adapter.expanded()
    for mod, d in modules.items():
        name = _kohya_name(mod, options.prefix)
        for part, t in _parts(d).items():
            tensors[f"{name}.{part}"] = t.contiguous()
    meta = dict(adapter.config.get("metadata", {})) if adapter.config.get("format") == "kohya" else {}
    if provenance:
        meta["merging.recipe"] = json.dumps(provenance, sort_keys=True)
    if adapter.base_model and "ss_base_model_version" not in meta:
        meta["ss_base_model_version"] = adapter.base_model
    with atomic_file(Path(path), force=force) as tmp:
        save_safetensors(dict(sorted(tensors.items())), tmp, metadata=meta or {"format": "pt"})
    return Path(path)


FORMAT = Format("kohya", detect, read, write, uses_base=True)
