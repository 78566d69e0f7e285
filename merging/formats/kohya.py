"""kohya / LyCORIS single-file safetensors: ``<lora_name>.<part>`` keys, scales as LyCORIS defines them.

``lora_name`` is a prefix (``lora_unet``, ``lora_te``, ``lycoris``, ...) joined to the module path with
its dots turned into underscores (``kohya_names``: SD1.5, SDXL and DiT pipelines). Given the base's
module names, ``read`` maps them back; otherwise the names are kept verbatim. ``write`` mirrors ``read``.

| family | parts | delta | scale |
|---|---|---|---|
| LoRA / LoCon | lora_down (r, in[, k]), lora_up (out, r[, 1]), lora_mid (r, r, kh, kw) | LowRank | α / r |
| LoHa | hada_w1_a (out, r), hada_w1_b (r, in_flat), w2 likewise, hada_t1/t2 (Tucker) | Hadamard | α / r |
| LoKr | lokr_w1[_a/_b], lokr_w2[_a/_b], lokr_t2 | Kronecker | 1 if both full, else α / r (r: lora_dim) |
| IA³ | weight w = l − 1 (n,) or (1, n, 1, 1), on_input | AddedScale: ΔW = w ⊙ W, per network | – |
| full | diff (out, in[, k...]), diff_b (out,) | Dense | 1 |
| DoRA | dora_scale (out, 1[, 1...]) beside a LoRA | LowRank.magnitude | |

A missing or zero ``alpha`` means α = r (scale 1). LoKr's r is LyCORIS's lora_dim: lokr_w1_a's columns,
else lokr_t2's first dimension (Tucker: lokr_w2_a is (r, b)), else lokr_w2_a's columns. A conv factor is
never written 2-D: a LoRA whose layer kind is unknown (a LoHa/LoKr read without its base, merged into a
LoRA) is refused unless the base or another input of the merge gives the kernel.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from merging.core.adapter import Adapter
from merging.core.deltas import Delta, Dense, Hadamard, Kronecker, LowRank, Scale, Target
from merging.core.linalg import tucker_factors
from merging.core.lycoris_ia3 import AddedScale, from_peft
from merging.errors import FormatError, NonFiniteError, NotAnAdapter, UnsupportedError
from merging.formats import bfl_names, diffusers_lora, lycoris, mmdit_names, sgm_names
from merging.formats.base import (
    READ_DEFAULTS,
    WRITE_DEFAULTS,
    Format,
    Provenance,
    ReadOptions,
    WriteOptions,
    naming,
    recipe_of,
    refuse_gated,
)
from merging.formats.kohya_names import from_kohya, is_kohya_name, module_of, to_kohya
from merging.storage.atomic import atomic_file
from merging.storage.files import reading, save_safetensors
from merging.storage.tensorfiles import list_tensors, load_tensors, safetensors_metadata

if TYPE_CHECKING:
    from merging.base.layout import BaseLayout

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
    if diffusers_lora.holds(t.name for t in list_tensors(file)):
        return
    for t in list_tensors(file):
        name, _, part = t.name.partition(".")
        parts[name].add(part)
    if not any(part & marks for part in parts.values() for marks in MARKERS.values()):
        name = min(parts, default="")
        raise NotAnAdapter(f"{file}: {name}: unknown or mixed key families {sorted(parts[name])}")


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
        return _read(file, base, allow_nonfinite)


def _read(file: Path, base: BaseLayout | None, allow_nonfinite: bool) -> Adapter:
    tensors = load_tensors(file)
    for key, t in tensors.items():
        if not allow_nonfinite and t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(
                f"{file}: tensor {key!r} holds NaN or Inf (pass `allow_nonfinite` to accept)"
            )
    meta = safetensors_metadata(file)
    if diffusers_lora.holds(tensors):
        deltas = diffusers_lora.read(tensors, base, file, meta)
    else:
        deltas = _read_kohya(file, tensors, base)
    base = meta.get("ss_base_model_version") or meta.get("ss_sd_model_name")
    config = {"format": "kohya", "metadata": meta}
    if any(sgm_names.is_sgm_name(k.partition(".")[0]) for k in tensors):
        config["unet_names"] = "sgm"  # written back the same way
    if any(k.startswith("lora_transformer_") for k in tensors):
        config["transformer_names"] = "diffusers"  # LyCORIS on a diffusers DiT: not sd-scripts' fused names
    return Adapter(file.stem, deltas, base_model=base, source=file, config=config)


def _read_kohya(file: Path, tensors: dict[str, torch.Tensor], base: BaseLayout | None) -> dict[str, Delta]:
    """module → delta for ``<lora_name>.<part>`` keys; a BFL-named Flux module split onto the base's."""
    mapping = from_kohya(base.modules, base.components, base.saved) if base is not None else {}
    fused = _fused_names(base)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        m = PART.match(key)
        if not m:
            raise FormatError(f"{file}: unknown key {key!r} (expected <lora_name>.<part>)")
        groups[m["name"]][m["part"]] = t
    deltas: dict[str, Delta] = {}
    for name, parts in sorted(groups.items()):
        with naming(file, name):
            d = _READERS[_family(parts, file, name)](parts)
            got = bfl_names.split(d, fused[name], name) if name in fused else None
        if got is None:
            got = {module_of(name, mapping, file) if base is not None else name: d}
        if twice := set(got) & set(deltas):
            raise FormatError(f"{file}: {name} adapts {min(twice)}, which another key of the file adapts too")
        deltas |= got
    return deltas


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


def lokr_rank(parts: Mapping[str, torch.Tensor | None]) -> int | None:
    """LyCORIS's lora_dim of a LoKr module (None when both factors are full: scale 1)."""
    if parts.get("lokr_w1_a") is not None:
        return parts["lokr_w1_a"].shape[1]  # (a, r)
    if parts.get("lokr_t2") is not None:
        return parts["lokr_t2"].shape[0]  # (r, r, kh, kw); lokr_w2_a is (r, b)
    if parts.get("lokr_w2_a") is not None:
        return parts["lokr_w2_a"].shape[1]  # (b, r)
    return None


def _read_lokr(parts: dict[str, torch.Tensor]) -> Kronecker:
    r = lokr_rank(parts)
    scale = 1.0 if r is None else _alpha(parts, r) / r
    return lycoris.lokr_delta({k: v for k, v in parts.items() if k in lycoris.LOKR}, scale)


_READERS = {
    "lora": _read_lora, "loha": _read_loha, "lokr": _read_lokr,
    "ia3": lycoris.ia3_delta, "full": lycoris.full_delta,
}  # fmt: skip


# ------------------------------------------------------------------------------------------ writing


def _kohya_name(module: str, prefix: str, names: Mapping[str, str]) -> str:
    if is_kohya_name(module):  # already a kohya name (read without a base)
        return module
    if names:  # a pipeline base: the component's prefix
        if module not in names:
            raise FormatError("not in the base model")
        return names[module]
    return f"{prefix}_{module.replace('.', '_')}"


def file_alpha(deltas: Iterable[Delta]) -> float | None:
    """One alpha for every LoRA module of a file: the most common α = scale·r (None when there is no LoRA).

    diffusers reads per-module alphas by names that miss its attention processors (they silently take
    the file's most common alpha), so modules with another α get scale·r / α folded into lora_up instead.
    """
    alphas = Counter(d.scale * d.b.shape[1] for d in deltas if isinstance(d, LowRank) and d.scale != 0)
    return alphas.most_common(1)[0][0] if alphas else None


def _lora_parts(d: LowRank, alpha: float | None) -> dict[str, torch.Tensor]:
    t, r = d.target, d.b.shape[1]
    alpha = alpha or d.scale * r or float(r)
    up = d.b if alpha == d.scale * r else (d.b.float() * (d.scale * r / alpha)).to(d.b.dtype)
    if t.layer == "unknown":
        raise UnsupportedError(
            f"layer kind unknown for a LoRA of shape {t.matrix_shape} (a LoHa/LoKr read without its base "
            "may be a conv): pass --base so its kernel is kept"
        )
    kernel = t.shape[2:] if t.layer in ("conv1d", "conv2d") else ()
    in_ch = t.shape[0] if t.layer == "gpt2_conv1d" else t.shape[1]
    if t.layer in ("embedding", "conv3d"):
        raise UnsupportedError(f"kohya files have no {t.layer} LoRA; keep this adapter in PEFT format")
    if t.beside > 1:
        raise UnsupportedError(f"kohya has no LoRA beside a conv of {t.beside} groups; keep it as PEFT")
    parts = {
        "lora_down.weight": d.a.reshape(r, in_ch, *kernel),  # (r, in, k...)
        "lora_up.weight": up.reshape(d.b.shape[0], r, *(1 for _ in kernel)),  # (out, r, 1...)
        "alpha": torch.tensor(alpha, dtype=torch.float32),
    }
    if d.bias is not None:
        raise UnsupportedError("kohya LoRA has no bias delta; keep this adapter in PEFT format")
    if d.magnitude is not None:
        parts["dora_scale"] = d.magnitude.reshape(-1, *(1 for _ in t.shape[1:]))
    return parts


def _lokr_parts(d: Kronecker) -> dict[str, torch.Tensor]:
    parts = lycoris.lokr_parts(d)
    r = lokr_rank(parts)
    if r is None:  # LyCORIS uses scale 1 here: fold ours into w1
        parts["lokr_w1"] = (d.scale * d.w1.float()).to(d.w1.dtype)
    else:
        parts["alpha"] = torch.tensor(d.scale * r, dtype=torch.float32)
    return parts


def _parts(mod: str, d: Delta, base: BaseLayout | None, alpha: float | None) -> dict[str, torch.Tensor]:
    if isinstance(d, LowRank):
        return _lora_parts(d, alpha)
    if isinstance(d, Hadamard):
        alpha = torch.tensor(d.scale * d.w1b.shape[0], dtype=torch.float32)
        return lycoris.loha_parts(d) | {"alpha": alpha}
    if isinstance(d, Kronecker):
        return _lokr_parts(d)
    if isinstance(d, AddedScale):
        return lycoris.ia3_parts(d)
    if isinstance(d, Scale):  # PEFT's IA³: the same in LyCORIS only where no bias is scaled
        return lycoris.ia3_parts(from_peft(d, None if base is None else base.has_bias(mod)))
    if isinstance(d, Dense):
        return lycoris.full_parts(d)
    raise UnsupportedError(f"{type(d).__name__} has no kohya form")


def _refined(adapter: Adapter, base: BaseLayout) -> Adapter:
    """The adapter with the base's layer kinds and shapes on the modules the base has."""
    known = replace(adapter, deltas={m: d for m, d in adapter.deltas.items() if m in base.modules}, tied={})
    return adapter.with_deltas(dict(adapter.deltas) | dict(known.refine_targets(base.modules).deltas))


def _fused_names(base: BaseLayout | None) -> dict:
    """sd-scripts' lora_names of a DiT with fused modules (Flux in BFL's names, SD3 in MMDiT's), or {}."""
    return {} if base is None else bfl_names.table(base.modules) or mmdit_names.table(base.modules)


def _bfl_fused(deltas: dict[str, Delta], fused: dict, base: BaseLayout) -> dict[str, Delta]:
    """A Flux/SD3 transformer's deltas under sd-scripts' lora_names (fused: ``bfl_names.fuse``)."""
    out = {m: d for m, d in deltas.items() if not m.startswith("transformer.")}
    for name, pieces in fused.items():
        mine = {p.module: deltas[p.module] for p in pieces if p.module in deltas}
        if mine:
            out[name] = bfl_names.fuse(mine, pieces, base.modules[pieces[0].module][1][1], name)
    covered = {p.module for pieces in fused.values() for p in pieces}
    if left := sorted(m for m in deltas if m.startswith("transformer.") and m not in covered):
        raise UnsupportedError(f"module {left[0]} has no sd-scripts name; write it in diffusers names")
    return out


def write(
    adapter: Adapter, path: Path, *, provenance: Provenance = None,
    base: BaseLayout | None = None, force: bool = False, options: WriteOptions = WRITE_DEFAULTS,
) -> Path:  # fmt: skip
    """Write an Adapter as one kohya/LyCORIS .safetensors file (kohya ``ss_*`` metadata kept).

    Args:
        adapter: deltas of any kind; auxiliary modules have no kohya form and are refused.
        path: the output file (written to a temporary folder and renamed into place).
        provenance: the recipe, kept as JSON in the metadata key ``merging.recipe``.
        base: the base model: a pipeline's components give the prefixes (else ``options.prefix``), its
            layers the kernels of conv LoRA factors and whether a PEFT IA³ scales a bias. A Flux or SD3
            transformer is written in sd-scripts' names (BFL / MMDiT: fused modules stacked), unless the
            adapter was read in LyCORIS's ``lora_transformer_`` names.
        force: replace an existing output file.
        options: ``prefix``, the lora_name prefix (``lora_unet``, ``lora_te``, ``lycoris``...); ``unet_names``
            ``sgm`` for a UNet in Stability's names (also when the adapter was read from such a file).
    """
    if adapter.aux:
        raise UnsupportedError(f"{adapter.where}: modules_to_save / trainable tokens have no kohya form")
    refuse_gated(adapter, "kohya")
    tensors = {}
    if base is not None:
        adapter = _refined(adapter, base)
    sgm = "sgm" in (options.unet_names, adapter.config.get("unet_names"))
    names = {} if base is None else to_kohya(base.modules, base.components, base.saved, sgm=sgm)
    if base is not None and not names:  # one model: its checkpoints' paths under options.prefix
        names = {m: f"{options.prefix}_{s.replace('.', '_')}" for m, s in base.saved.items()}
    expanded = adapter.expanded()
    if adapter.config.get("transformer_names") != "diffusers" and (fused := _fused_names(base)):
        expanded = _bfl_fused(expanded, fused, base)
    alpha = file_alpha(expanded.values())
    for mod, d in expanded.items():
        with naming(adapter.where, f"module {mod}"):
            name = _kohya_name(mod, options.prefix, names)
            for part, t in _parts(mod, d, base, alpha).items():
                tensors[f"{name}.{part}"] = t.contiguous()
    meta = dict(adapter.config.get("metadata", {})) if adapter.config.get("format") == "kohya" else {}
    if provenance:
        meta["merging.recipe"] = json.dumps(recipe_of(provenance), sort_keys=True)
    if adapter.base_model and "ss_base_model_version" not in meta:
        meta["ss_base_model_version"] = adapter.base_model
    with atomic_file(Path(path), force=force) as tmp:
        save_safetensors(dict(sorted(tensors.items())), tmp, metadata=meta or {"format": "pt"})
    return Path(path)


FORMAT = Format("kohya", detect, read, write, uses_base=True)
