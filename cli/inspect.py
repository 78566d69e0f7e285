"""`merging inspect PATH`: what a checkpoint folder or file holds, summarised by module kind."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import click

from merging import formats
from merging.core.adapter import KIND_NAMES, Adapter
from merging.core.deltas import LowRank, Scale
from merging.core.lycoris_ia3 import AddedScale
from merging.errors import NotAnAdapter
from merging.formats import sources
from merging.merge import serving
from merging.storage.tensorfiles import list_tensors, tensor_files

from .common import complete_path
from .tables import Col, Grid, count, emit_json, natural, num, ranges, say, show, span

ADAPTER_PARTS = ("lora_", "hada_", "lokr_", "ia3_")
CONFIG_FIELDS = ("peft_type", "task_type", "r", "lora_alpha", "alpha", "use_rslora", "use_dora",
                 "target_modules", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform",
                 "trainable_token_indices", "alora_invocation_tokens", "revision")  # fmt: skip


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


def _module_of(name: str) -> tuple[str, str]:
    """Split a tensor name into (module path, tensor part) for display."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith(ADAPTER_PARTS) or p in {"weight", "bias"}:
            return ".".join(parts[:i]) or name, ".".join(parts[i:])
    return ".".join(parts[:-1]) or name, parts[-1]


INDEX = re.compile(r"(?<=[._])\d+(?=[._]|$)")  # layers.3.x, kohya's down_blocks_0_attentions_1_


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


def modules(ad: Adapter) -> list[Module]:
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


def stem(patterns: list[str]) -> str:
    """The start the layered kinds share up to their index (``model.layers.*.``), said once in the title."""
    layered = [p.split(".") for p in patterns if "*" in p.split(".")]
    heads = {tuple(parts[: parts.index("*") + 1]) for parts in layered}
    if len(heads) != 1:
        return ""
    head = heads.pop()
    return ".".join(head) + "." if all(len(parts) > len(head) for parts in layered) else ""


def kind_rows(ks: list[Kind], prefix: str = "") -> list[list[str]]:
    """The summary table's cells: the kind without ``prefix``, layers as ranges, spans, compact counts."""
    rows = []
    for k in ks:
        layers = _layers(k.layers, k.modules // max(1, len(k.experts)))
        if k.experts:
            layers += f" × experts {ranges(k.experts)}"
        spans = [span(k.rank, str), span(k.scale), span(k.norm)]
        rows.append([k.kind.removeprefix(prefix), layers, k.delta, *spans, count(k.params)])
    return rows


def _layers(layers: list[int], modules: int) -> str:
    """Layer indices as ranges when each module has one, else how many modules."""
    return ranges(layers) if len(layers) == modules else f"{modules} module" + "s" * (modules > 1)


def module_rows(mods: list[Module]) -> list[list[str]]:
    """The per-module table's cells."""
    return [[m.module, m.delta, m.shape, "" if m.rank is None else str(m.rank), num(m.scale),
             "needs base" if m.norm is None and m.delta == "dora" else num(m.norm), count(m.params)]
            for m in mods]  # fmt: skip


@click.command("inspect")
@click.argument("spec", shell_complete=complete_path)
@click.option("--modules", "glob", is_flag=False, flag_value="*", default=None, metavar="[GLOB]",
              help="Per-module rows (all, or those matching GLOB, e.g. '*.q_proj', 'model.layers.1?.*').")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema merging.inspect/1).")
def inspect_cmd(spec: str, glob: str | None, as_json: bool) -> None:
    """Summarise a checkpoint: an adapter's module kinds, totals and config, or a tensor file's modules.

    Example: merging inspect examples/adapters/add --modules '*.q_proj'
    """
    path = Path(spec)
    if not path.exists():  # a Hub id (user/repo[@rev][:subfolder]) through the huggingface_hub cache
        adapters = sources.load(spec)
    else:
        adapter = _as_adapter(path)
        if adapter is None:
            return _inspect_tensors(path, as_json, glob)
        adapters = [adapter]
    docs = [_adapter_doc(ad, glob) for ad in adapters]
    if as_json:
        return emit_json("merging.inspect/1", {"path": spec, "kind": "adapter", "adapters": docs})
    for ad, doc in zip(adapters, docs, strict=True):
        _show_adapter(spec, ad, doc, glob)


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
    mods = modules(ad)
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


def _show_adapter(spec: str, ad: Adapter, doc: dict[str, Any], glob: str | None) -> None:
    rev = f" @ {ad.revision}" if ad.revision else ""
    ks = [Kind(**k) for k in doc["kinds"]]
    cols = (Col("module kind"), Col("layers"), Col("delta"), Col("rank", True), Col("scale", True),
            Col("‖ΔW‖", True), Col("params", True))  # fmt: skip
    prefix = stem([k.kind for k in ks])
    title = f"{spec}{rev}: {', '.join(doc['delta_kinds'])} on {ad.base_model or 'an unknown base'}"
    title += f"; layer modules are {prefix}KIND" if prefix else ""
    show(Grid(title, cols, kind_rows(ks, prefix)))
    params = doc["params"]
    say(f"{doc['modules']} modules in {len(ks)} kinds, {params:,} parameters ({count(params)}), "
        f"{doc['bytes'] / 2**20:.2f} MiB on disk")  # fmt: skip
    for key, value in doc["config"].items():
        if value is not None:
            say(f"{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    for line in doc["serving"]:
        say(line)
    if glob is None:
        say("per module: --modules (all) or --modules GLOB, e.g. --modules '*.q_proj'")
        return
    rows = doc["module_rows"]
    mcols = (Col("module"), Col("delta"), Col("shape", True), Col("rank", True), Col("scale", True),
             Col("‖ΔW‖", True), Col("params", True))  # fmt: skip
    show(Grid(f"{len(rows)} modules matching {glob!r}", mcols, module_rows([Module(**m) for m in rows])))


def _inspect_tensors(path: Path, as_json: bool, glob: str | None) -> None:
    """A tensor file's modules by kind (tensors, shapes, dtypes); with --modules, per module."""
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
    if as_json:
        return emit_json("merging.inspect/1", doc)
    prefix = stem([k["kind"] for k in kinds_])
    title = str(path) + (f"; layer modules are {prefix}KIND" if prefix else "")
    cells = [[k["kind"].removeprefix(prefix), _layers(k["layers"], k["modules"]), ", ".join(k["tensors"]),
              ", ".join(k["shapes"]), ", ".join(k["dtypes"]), count(k["params"])]
             for k in kinds_]  # fmt: skip
    cols = (Col("module kind"), Col("layers"), Col("tensors"), Col("shapes"), Col("dtype"),
            Col("params", True))  # fmt: skip
    show(Grid(title, cols, cells))
    say(f"{len(rows)} modules in {len(kinds_)} kinds, {len(infos)} tensors, {doc['params']:,} parameters, "
        f"{doc['bytes'] / 2**20:.1f} MiB in {len(files)} file(s)")  # fmt: skip
    if looks:
        say("these look like adapter tensors, but there is no adapter_config.json: the adapter type, its "
            "scale (alpha / r) and its targets are unknown without it")  # fmt: skip
    if glob is None:
        say("per module: --modules (all) or --modules GLOB, e.g. --modules '*.q_proj'")
        return
    cells = [[r["module"], ", ".join(r["tensors"]), ", ".join("×".join(map(str, s)) for s in r["shapes"]),
              ", ".join(r["dtypes"]), count(r["params"])] for r in doc["module_rows"]]  # fmt: skip
    cols = (Col("module"), Col("tensors"), Col("shapes"), Col("dtype"), Col("params", True))
    show(Grid(f"{len(cells)} modules matching {glob!r}", cols, cells))
