"""What a checkpoint holds (``merging.inspect``): an adapter's modules by kind, or a tensor file's modules.

``inspect`` returns exactly the data ``merging inspect --json`` prints (schema merging.inspect/1).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from merging import formats
from merging.core.adapter import KIND_NAMES, Adapter
from merging.core.deltas import LowRank, Scale
from merging.core.lycoris_ia3 import AddedScale
from merging.errors import NotAnAdapter
from merging.formats import sources
from merging.merge import serving
from merging.storage.tensorfiles import list_tensors, tensor_files

ADAPTER_PARTS = ("lora_", "hada_", "lokr_", "ia3_")
CONFIG_FIELDS = ("peft_type", "task_type", "r", "lora_alpha", "alpha", "use_rslora", "use_dora",
                 "target_modules", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform",
                 "trainable_token_indices", "alora_invocation_tokens", "revision")  # fmt: skip
INDEX = re.compile(r"(?<=[._])\d+(?=[._]|$)")  # layers.3.x, kohya's down_blocks_0_attentions_1_


@dataclass(frozen=True)
class Module:
    """One module's delta as inspect shows it (``--modules``)."""

    module: str
    delta: str
    shape: str
    rank: int | None
    scale: float | None
    norm: float | None  # ‖ΔW‖ from the factors; None when it needs the base (DoRA, tied, auxiliary)
    params: int


@dataclass(frozen=True)
class Kind:
    """The modules of one kind (name with layer indices as ``*``, and delta type): the summary's row."""

    kind: str
    delta: str
    layers: list[int]
    modules: int
    rank: list[int]  # [min, max]; empty when the delta has none
    scale: list[float]
    norm: list[float]
    params: int
    experts: list[int] = field(default_factory=list)  # MoE experts (``module:param.e``), like layers


def inspect(spec: str | Path, modules: str | None = None) -> dict[str, Any]:
    """What ``spec`` holds: ``{"path", "kind": "adapter", "adapters": [...]}`` for an adapter (a stack folder
    gives two), else the tensor file's modules by kind (``"kind": "tensors"``).

    Args:
        spec: an adapter folder or file, a Hub id (user/repo[@rev][:subfolder]), or any tensor file.
        modules: also list the modules matching this glob (``"*"`` for all) as ``module_rows``.
    """
    spec = str(spec)
    path = Path(spec)
    if not path.exists():  # a Hub id (user/repo[@rev][:subfolder]) through the huggingface_hub cache
        adapters = sources.load(spec)
    else:
        adapter = _as_adapter(path)
        if adapter is None:
            return _tensors_doc(path, modules)
        adapters = [adapter]
    return {"path": spec, "kind": "adapter", "adapters": [_adapter_doc(ad, modules) for ad in adapters]}


def natural(name: str) -> tuple:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def kind_of(module: str) -> tuple[str, int | None]:
    """(the name with each index as ``*``, the layer index when there is exactly one).

    An expert of a parameter (``module:param.e``) has its layer index in the module part."""
    name, sep, param = module.partition(":")
    idx = INDEX.findall(name)
    return INDEX.sub("*", name) + sep + INDEX.sub("*", param), int(idx[0]) if len(idx) == 1 else None


def expert_of(module: str) -> int | None:
    """The expert index of ``module:param.e``, else None."""
    tail = module.partition(":")[2].rpartition(".")[2]
    return int(tail) if tail.isdigit() else None


def module_list(ad: Adapter) -> list[Module]:
    """Every module of an adapter (deltas, tied modules, auxiliary parts) in natural order."""
    out = []
    for mod, d in ad.deltas.items():
        if isinstance(d, (Scale, AddedScale)):  # PEFT's l, or LyCORIS's w = l − 1 (added: w ⊙ W)
            v, kind = (d.l, "ia3") if isinstance(d, Scale) else (d.w, "ia3 lycoris")
            out.append(Module(mod, f"{kind} ({d.side})", str(v.numel()), None, None, float(v.float().norm()),
                              d.numel))  # fmt: skip
            continue
        kind = "dora" if isinstance(d, LowRank) and d.magnitude is not None else KIND_NAMES[type(d)]
        norm = None if kind == "dora" else float(d.norm())
        shape = "×".join(map(str, d.target.matrix_shape))
        out.append(Module(mod, kind, shape, d.rank, float(d.scale), norm, d.numel))
    out += [Module(mod, f"tied to {src}", "", None, None, None, 0) for mod, src in ad.tied.items()]
    for mod, a in ad.aux.items():
        tensors = list(a.tensors.values()) if hasattr(a, "tensors") else [a.rows]
        out.append(Module(mod, type(a).__name__, "", None, None, None, sum(t.numel() for t in tensors)))
    return sorted(out, key=lambda m: natural(m.module))


def kinds(mods: list[Module]) -> list[Kind]:
    """The modules grouped by kind, in the order their first module comes."""
    groups: dict[tuple[str, str], list[tuple[Module, int | None]]] = defaultdict(list)
    for m in mods:
        pattern, layer = kind_of(m.module)
        groups[pattern, m.delta].append((m, layer))
    out = []
    for (pattern, delta), items in groups.items():
        ms = [m for m, _ in items]

        def lo_hi(values: list) -> list:
            vs = [v for v in values if v is not None]
            return [min(vs), max(vs)] if vs else []

        layers = sorted({layer for _, layer in items if layer is not None})
        experts = sorted({e for m in ms if (e := expert_of(m.module)) is not None})
        out.append(Kind(pattern, delta, layers, len(ms), lo_hi([m.rank for m in ms]),
                        lo_hi([m.scale for m in ms]), lo_hi([m.norm for m in ms]), sum(m.params for m in ms),
                        experts))
    return out


def config_of(ad: Adapter) -> dict[str, Any]:
    """The config fields that matter for using the adapter (set ones only), plus base and revision."""
    fields = {k: ad.config[k] for k in CONFIG_FIELDS if ad.config.get(k) not in (None, {}, [], "")}
    return fields | {"base_model": ad.base_model, "base_revision": ad.revision}


def _module_of(name: str) -> tuple[str, str]:
    """Split a tensor name into (module path, tensor part) for display."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith(ADAPTER_PARTS) or p in {"weight", "bias"}:
            return ".".join(parts[:i]) or name, ".".join(parts[i:])
    return ".".join(parts[:-1]) or name, parts[-1]


def _as_adapter(path: Path) -> Adapter | None:
    """The adapter a path holds (PEFT folder, kohya file, GGUF LoRA), or None for other tensor files."""
    fmt = formats.detect(path)
    if fmt is None:
        return None
    try:
        return fmt.read(path, options=formats.ReadOptions(keep_permuted=True))
    except NotAnAdapter:
        return None  # a model, not an adapter: list its tensors


def _adapter_doc(ad: Adapter, glob: str | None) -> dict[str, Any]:
    """An adapter's inspect JSON: kinds, totals, config, serving, and the matching modules."""
    mods = module_list(ad)
    files = tensor_files(ad.source) if ad.source else []
    doc = {
        "name": ad.name, "delta_kinds": sorted(ad.kinds), "modules": len(mods), "params": ad.numel,
        "bytes": sum(f.stat().st_size for f in files), "config": config_of(ad),
        "kinds": [asdict(k) for k in kinds(mods)], "serving": serving.of([ad]).lines(),
    }  # fmt: skip
    if glob is not None:
        doc["module_rows"] = [asdict(m) for m in mods if _matches(m.module, glob)]
    return doc


def _matches(module: str, glob: str) -> bool:
    """fnmatch on the whole name, or on its tail: ``q_proj`` and ``self_attn.*`` match as written."""
    return fnmatchcase(module, glob) or fnmatchcase(module, f"*.{glob}")


def _tensors_doc(path: Path, glob: str | None) -> dict[str, Any]:
    """A tensor file's modules by kind (tensors, shapes, dtypes); with ``glob``, per module."""
    infos = list_tensors(path)
    groups: dict[str, list] = defaultdict(list)
    for t in infos:
        groups[_module_of(t.name)[0]].append(t)
    files = {t.file for t in infos}
    rows = [
        {"module": mod, "tensors": [_module_of(t.name)[1] for t in ts], "shapes": [list(t.shape) for t in ts],
         "dtypes": sorted({t.dtype for t in ts}), "params": sum(t.numel for t in ts)}
        for mod, ts in sorted(groups.items(), key=lambda kv: natural(kv[0]))
    ]  # fmt: skip
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_kind[kind_of(r["module"])[0]].append(r)
    kinds_ = [{"kind": k, "layers": sorted({kind_of(r["module"])[1] for r in rs} - {None}),
               "modules": len(rs),
               "tensors": sorted({n for r in rs for n in r["tensors"]}),
               "shapes": sorted({"×".join(map(str, s)) for r in rs for s in r["shapes"]}, key=natural),
               "dtypes": sorted({d for r in rs for d in r["dtypes"]}), "params": sum(r["params"] for r in rs)}
              for k, rs in by_kind.items()]  # fmt: skip
    looks = any(_module_of(t.name)[1].startswith(ADAPTER_PARTS) for t in infos)
    doc = {"path": str(path), "kind": "tensors", "modules": len(rows), "kinds": kinds_, "tensors": len(infos),
           "params": sum(t.numel for t in infos), "bytes": sum(f.stat().st_size for f in files),
           "files": len(files), "adapter_without_config": looks}  # fmt: skip
    if glob is not None:
        doc["module_rows"] = [r for r in rows if _matches(r["module"], glob)]
    return doc
