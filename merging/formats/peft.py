"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors (or a weights-only .bin).

``read`` turns LoRA (rslora, rank/alpha patterns, DoRA, bias, Embedding, Conv, GPT-2 Conv1D), LoHa,
LoKr and IA³ folders into an ``Adapter``; ``write`` writes LoRA and IA³ adapters (and LoHa/LoKr as read)
that ``PeftModel.from_pretrained`` loads with the same outputs.

Tensor layouts (PEFT → our matrix form (out, in_flat)):

| PEFT tensor | shape | ours |
|---|---|---|
| lora_A.weight | (r, in[, k...]) | A = flatten to (r, in_flat) |
| lora_B.weight | (out, r[, 1...]) | B = (out, r) |
| lora_embedding_A | (r, num) | B = Aᵀ (num, r) |
| lora_embedding_B | (dim, r) | A = Bᵀ (r, dim) |
| hada_w1_a / hada_w1_b | (out, r) / (r, in_flat) | as stored (Tucker: (r, out) / (r, in) + hada_t1) |
| lokr_w1[_a/_b], lokr_w2[_a/_b], lokr_t2 | | as stored |
| ia3_l | (out, 1), (1, in), (1, n, 1, 1) | l = flatten, side from feedforward_modules |
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from merging.core.adapter import Adapter
from merging.core.deltas import Delta, Hadamard, Kronecker, LowRank, Scale, Target
from merging.core.lazy import LazyDeltas
from merging.core.lycoris_ia3 import AddedScale, to_peft
from merging.core.replacements import BaseTensors, ModuleReplacement, TokenRows
from merging.errors import FormatError, NonFiniteError, UnsupportedError
from merging.formats import lycoris, peft_params
from merging.formats import peft_config as pc
from merging.formats.base import (
    READ_DEFAULTS,
    WRITE_DEFAULTS,
    Format,
    Provenance,
    ReadOptions,
    WriteOptions,
    naming,
    recipe_of,
)
from merging.formats.kohya_names import is_kohya_name
from merging.formats.peft_config import CONFIG
from merging.storage.files import atomic_folder, hash_ahead, reading, write_text
from merging.storage.safetensors_io import SafetensorsWriter, finite, header_room, open_tensors

if TYPE_CHECKING:
    from merging.base.layout import BaseLayout

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
RECIPE_FILE = "merge_recipe.json"
PREFIX = "base_model.model."

# Tensor-name suffixes after the module path, longest first so that the split is unambiguous.
PARTS = (
    ".token_adapter.trainable_tokens_delta",
    ".lora_magnitude_vector.weight",
    ".lora_magnitude_vector",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_B.bias",
    ".base_layer.weight",
    ".base_layer.bias",
    *(f".{name}" for name in lycoris.LOHA + lycoris.LOKR),
    ".ia3_l",
)


def detect(path: Path) -> bool:
    """True when path is a folder holding a PEFT adapter_config.json."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def _weights_file(folder: Path) -> Path:
    for name in (WEIGHTS, WEIGHTS_BIN):
        if (folder / name).is_file():
            return folder / name
    raise FormatError(f"{folder}: no {WEIGHTS} or {WEIGHTS_BIN}")


def _split(key: str, file: Path) -> tuple[str, str]:
    """'base_model.model.x.y.lora_A.weight' → ('x.y', 'lora_A.weight')."""
    name = key.removeprefix(PREFIX)
    for part in PARTS:
        if name.endswith(part):
            return name[: -len(part)], part[1:]
    for part in (".weight", ".bias"):
        if name.endswith(part):
            return name[: -len(part)], part[1:]
    raise FormatError(f"{file}: unknown key {key!r}")


def read(
    path: Path, *, base: BaseLayout | None = None, allow_nonfinite: bool = False,
    options: ReadOptions = READ_DEFAULTS,
) -> Adapter:  # fmt: skip
    """Read a PEFT adapter folder into an Adapter.

    Args:
        path: the folder holding adapter_config.json and the weights.
        base: unused (PEFT names modules by their full paths).
        allow_nonfinite: accept NaN/Inf values instead of refusing them.
        options: ``lazy`` reads each module's tensors when its delta is asked for (and checks them then).

    Returns:
        The Adapter, with module paths as in the base model's ``named_modules()``.
    """
    folder = Path(path)
    with reading(folder):
        return _read(folder, allow_nonfinite, options.lazy)


def _read(folder: Path, allow_nonfinite: bool, lazy: bool) -> Adapter:
    config = pc.read_config(folder)
    file = _weights_file(folder)
    source = open_tensors(file)
    hash_ahead(file)  # the recipe's sha256, on another thread while the deltas are read
    groups: dict[str, dict[str, str]] = defaultdict(dict)  # module → part → tensor key
    for key in source.keys():
        module, part = _split(key, file)
        groups[module][part] = key

    def tensors(module: str, parts: Mapping[str, str]) -> dict[str, torch.Tensor]:
        out = {}
        for part, key in parts.items():
            out[part] = t = source.get(key)
            if not allow_nonfinite and not finite(t):
                raise NonFiniteError(
                    f"{file}: tensor {key!r} holds NaN or Inf (pass `allow_nonfinite` to accept)"
                )
        return out

    peft_type = config["peft_type"]
    consumed, param_deltas = peft_params.read_params(groups, config, file, lambda m: tensors(m, groups[m]))
    groups = {m: keys for m, keys in groups.items() if m not in consumed}  # target_parameters: per expert
    mts = config.get("modules_to_save") or []
    adapted: dict[str, dict[str, str]] = {}
    aux: dict = {}
    for module, keys in sorted(groups.items()):
        with naming(file, f"module {module}"):
            saved = {k[len("base_layer.") :]: v for k, v in keys.items() if k.startswith("base_layer.")}
            keys = {k: v for k, v in keys.items() if not k.startswith("base_layer.")}
            if saved:
                aux[module] = BaseTensors(tensors(module, saved))
            if "token_adapter.trainable_tokens_delta" in keys:
                if saved:
                    raise UnsupportedError("trainable tokens on a layer whose base weights are saved too")
                rows = tensors(module, {"d": keys.pop("token_adapter.trainable_tokens_delta")})["d"]
                aux[module] = TokenRows(pc.token_indices(config, module), rows)
            if not keys:
                continue
            if set(keys) <= {"weight", "bias"}:
                if any(module == m or module.endswith("." + m) for m in mts):
                    aux[module] = ModuleReplacement(tensors(module, keys))
                elif set(keys) == {"bias"} and config.get("bias", "none") == "all":
                    aux[module] = BaseTensors(tensors(module, keys))  # a trained bias, module not adapted
                else:
                    raise FormatError(f"{file}: unknown keys {sorted(keys)} for module {module}")
                continue
            adapted[module] = keys

    def build(module: str) -> Delta:
        if module in param_deltas:
            return param_deltas[module]
        with reading(folder), naming(file, f"module {module}"):
            return _DELTA_READERS[peft_type](tensors(module, adapted[module]), config, module)

    kind = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr", "IA3": "ia3"}[peft_type]
    if any(any(p.startswith("lora_magnitude") for p in keys) for keys in adapted.values()):
        kind = "dora"
    deltas: Mapping[str, Delta] = LazyDeltas(sorted([*adapted, *param_deltas]), build, kind)
    if not lazy or config.get("ensure_weight_tying"):  # finding ties compares tensors
        deltas = dict(deltas.items())
    tied = pc.find_ties(deltas) if config.get("ensure_weight_tying") else {}
    for mod in tied:
        del deltas[mod]
    return Adapter(
        name=folder.name,
        deltas=deltas,
        base_model=config.get("base_model_name_or_path"),
        revision=config.get("revision"),
        aux=aux,
        tied=tied,
        source=folder,
        config=config,
    )


def _read_lora(parts: dict[str, torch.Tensor], config: Mapping[str, Any], module: str) -> LowRank:
    allowed = {"lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B"}
    allowed |= {"lora_magnitude_vector", "lora_magnitude_vector.weight"}
    if unknown := set(parts) - allowed:
        raise FormatError(f"unknown LoRA tensors {sorted(unknown)}")
    if "lora_embedding_A" in parts:
        ea, eb = parts["lora_embedding_A"], parts["lora_embedding_B"]  # (r, num), (dim, r)
        b, a = ea.T.contiguous(), eb.T.contiguous()
        target = Target("embedding", (ea.shape[1], eb.shape[0]))
    else:
        la, lb = parts["lora_A.weight"], parts["lora_B.weight"]
        r = la.shape[0]
        b, a = lb.reshape(lb.shape[0], -1), la.reshape(r, -1)
        if la.dim() == 4:
            target = Target("conv2d", (lb.shape[0], *la.shape[1:]))
        elif la.dim() == 3:
            target = Target("conv1d", (lb.shape[0], *la.shape[1:]))
        elif config.get("fan_in_fan_out"):
            target = Target("gpt2_conv1d", (la.shape[1], lb.shape[0]))
        else:
            target = Target("linear", (lb.shape[0], la.shape[1]))
    r = a.shape[0]
    alpha = float(pc.pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    mag = parts.get("lora_magnitude_vector", parts.get("lora_magnitude_vector.weight"))
    delta = LowRank(
        b, a, scale, target,
        bias=parts.get("lora_B.bias"),
        magnitude=None if mag is None else mag.flatten(),
    )  # fmt: skip
    r_cfg = pc.pattern_value(config.get("rank_pattern") or {}, module, config.get("r", r))
    if int(r_cfg) != r:
        raise FormatError(f"rank {r} in the tensors but {r_cfg} in the config (r / rank_pattern)")
    return delta


def _read_loha(parts: dict[str, torch.Tensor], config: Mapping[str, Any], module: str) -> Hadamard:
    return lycoris.loha_delta(parts, pc.lycoris_scale(config, module))


def _read_lokr(parts: dict[str, torch.Tensor], config: Mapping[str, Any], module: str) -> Kronecker:
    return lycoris.lokr_delta(parts, pc.lycoris_scale(config, module))


def _read_ia3(parts: dict[str, torch.Tensor], config: Mapping[str, Any], module: str) -> Scale:
    if set(parts) != {"ia3_l"}:
        raise FormatError(f"unknown IA³ tensors {sorted(set(parts) - {'ia3_l'})}")
    l = parts["ia3_l"]
    side = "in" if pc.is_feedforward(config, module) else "out"
    layer = "conv2d" if l.dim() == 4 else ("gpt2_conv1d" if config.get("fan_in_fan_out") else "linear")
    return Scale(l.flatten(), side, layer)


_DELTA_READERS = {"LORA": _read_lora, "LOHA": _read_loha, "LOKR": _read_lokr, "IA3": _read_ia3}


# ------------------------------------------------------------------------------------------ writing


def _lora_tensors(mod: str, d: LowRank) -> dict[str, torch.Tensor]:
    p, t = PREFIX + mod, d.target
    if t.layer == "embedding":
        out = {f"{p}.lora_embedding_A": d.b.T.contiguous(), f"{p}.lora_embedding_B": d.a.T.contiguous()}
    else:
        r = d.b.shape[1]
        kernel = t.shape[2:] if t.layer in ("conv1d", "conv2d") else ()
        in_ch = t.shape[0] if t.layer == "gpt2_conv1d" else t.shape[1]
        if t.layer == "unknown":  # only the matrix form is known (a LoHa/LoKr read without its base)
            log.warning("module %s: layer kind unknown, written as a linear LoRA (pass --base for conv)", mod)
        out = {
            f"{p}.lora_A.weight": d.a.reshape(r, in_ch, *kernel).contiguous(),
            f"{p}.lora_B.weight": d.b.reshape(d.b.shape[0], r, *(1 for _ in kernel)).contiguous(),
        }
    if d.bias is not None:
        out[f"{p}.lora_B.bias"] = d.bias.contiguous()
    if d.magnitude is not None:
        shape = (1, -1, *(1 for _ in t.shape[2:])) if t.layer in ("conv1d", "conv2d") else (-1,)
        out[f"{p}.lora_magnitude_vector"] = d.magnitude.reshape(shape).contiguous()
    return out


def _ia3_tensors(mod: str, d: Scale) -> dict[str, torch.Tensor]:
    if d.layer == "conv2d":
        shape = (1, -1, 1, 1)
    else:
        shape = (1, -1) if d.side == "in" else (-1, 1)
    return {f"{PREFIX}{mod}.ia3_l": d.l.reshape(shape).contiguous()}


def _peft_ia3(where: str, mod: str, d: Delta, base: BaseLayout | None) -> Delta:
    """A LyCORIS IA³ as PEFT's, where both mean the same (else one line); other deltas unchanged."""
    if not isinstance(d, AddedScale):
        return d
    with naming(where, f"module {mod}"):
        return to_peft(d, None if base is None else base.has_bias(mod))


def write(
    adapter: Adapter, path: Path, *, provenance: Provenance = None,
    base: BaseLayout | None = None, force: bool = False, options: WriteOptions = WRITE_DEFAULTS,
) -> Path:  # fmt: skip
    """Write an Adapter as a PEFT folder (LoRA, IA³, or LoHa/LoKr) that PEFT loads.

    A LoRA adapter is written in one pass over its deltas, each module's tensors appended as it comes, so a
    streamed merge result (``LazyDeltas``) is never whole in memory.

    Args:
        adapter: all deltas of one kind: LowRank, Scale, Hadamard or Kronecker.
        path: the output folder; written to a temporary sibling and renamed into place.
        provenance: the recipe (or a function giving it, called once the weights are written), written as
            merge_recipe.json within the same atomic step.
        base: tells whether a layer has a bias (a LyCORIS IA³ on the output becomes PEFT's only without).
        force: replace an existing output folder.
        options: unused.

    Returns:
        The folder written.
    """
    if kohya := sorted(m for m in adapter.deltas if is_kohya_name(m)):
        raise UnsupportedError(
            f"{adapter.where}: module {kohya[0]} is a kohya lora_name, which PEFT cannot target; "
            "pass --base to map kohya names to the base model's module paths"
        )
    if base is not None and base.components:
        raise UnsupportedError(
            f"{adapter.where}: a PEFT folder adapts one model, the base is a pipeline "
            f"({', '.join(base.components)}): write kohya, or pass one component folder as --base"
        )
    streamed = isinstance(adapter.deltas, LazyDeltas) and adapter.deltas.kind in ("lora", "dora")
    if not streamed:
        adapter = adapter.with_deltas(
            {m: _peft_ia3(adapter.where, m, d, base) for m, d in adapter.deltas.items()}
        )
    kinds = {LowRank} if streamed else {type(d) for d in adapter.deltas.values()}
    if len(kinds) > 1:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise UnsupportedError(
            f"{adapter.where}: one PEFT folder holds one adapter type, got {names}; merge first"
        )
    kind = kinds.pop() if kinds else LowRank
    if kind not in (LowRank, Scale, Hadamard, Kronecker):
        raise UnsupportedError(
            f"{adapter.where}: {kind.__name__} deltas have no PEFT form; use cat or svd first"
        )
    tokens = {m: list(a.indices) for m, a in adapter.aux.items() if isinstance(a, TokenRows)}
    if tokens and kind is not LowRank:
        raise UnsupportedError(f"{adapter.where}: trainable tokens have a PEFT form beside LoRA only")
    if adapter.invocation is not None and kind is not LowRank:
        raise UnsupportedError(f"{adapter.where}: aLoRA gating exists for LoRA only")
    with atomic_folder(Path(path), force=force, owns=owned) as tmp:
        sink = SafetensorsWriter(tmp / WEIGHTS, header_room(_names(adapter)))
        try:
            config = _write_deltas(adapter, kind, sink)
            config |= _write_aux(adapter, config, sink)
            sink.close({"format": "pt"})
        except BaseException:
            sink.abort()
            raise
        config |= {
            "base_model_name_or_path": adapter.base_model,
            "revision": adapter.revision,
            "task_type": adapter.config.get("task_type"),
            "inference_mode": True,
        }
        if kind is LowRank:
            config["trainable_token_indices"] = tokens or None
        if adapter.invocation is not None:
            config["alora_invocation_tokens"] = list(adapter.invocation)
        write_text(tmp / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
        if provenance:
            write_text(tmp / RECIPE_FILE, recipe_text(recipe_of(provenance)))
    return Path(path)


def _write_deltas(adapter: Adapter, kind: type, sink: SafetensorsWriter) -> dict[str, Any]:
    """Append every module's tensors to ``sink`` (one pass over the deltas) and return the config."""
    if kind is LowRank:
        seen: dict[str, pc.LoraInfo] = {}
        params = peft_params.ParamWriter()  # target_parameters: experts gathered per parameter
        for mod, d in adapter.deltas.items():
            if not isinstance(d, LowRank):
                raise UnsupportedError(f"{adapter.where}: module {mod} is not a LoRA; merge first")
            if d.target.site is not None:
                params.add(mod, d)
                continue
            for name, t in _lora_tensors(mod, d).items():
                sink.add(name, t)
            seen[mod] = pc.LoraInfo.of(d)
        for mod, src in adapter.tied.items():
            d = adapter.deltas[src]
            sink.add(f"{PREFIX}{mod}.lora_A.weight", d.a.contiguous())
            sink.add(f"{PREFIX}{mod}.lora_B.weight", d.b.contiguous())
        for name, t in params.tensors(PREFIX):
            sink.add(name, t)
        config = params.config(pc.lora_config(seen | params.infos()))
        return config | {"ensure_weight_tying": bool(adapter.tied)}
    if kind is Scale:
        for mod, d in adapter.deltas.items():
            for name, t in _ia3_tensors(mod, d).items():
                sink.add(name, t)
        return {
            "peft_type": "IA3", "init_ia3_weights": True, "target_modules": sorted(adapter.deltas),
            "feedforward_modules": sorted(m for m, d in adapter.deltas.items() if d.side == "in"),
            "fan_in_fan_out": any(d.layer == "gpt2_conv1d" for d in adapter.deltas.values()),
        }  # fmt: skip
    parts = lycoris.loha_parts if kind is Hadamard else lycoris.lokr_parts
    for mod, d in adapter.deltas.items():
        for k, v in parts(d).items():
            sink.add(f"{PREFIX}{mod}.{k}", v.contiguous())
    return pc.lycoris_config(adapter, "LOHA" if kind is Hadamard else "LOKR")


def _write_aux(adapter: Adapter, config: dict[str, Any], sink: SafetensorsWriter) -> dict[str, Any]:
    """Append saved base tensors (setting ``bias`` in config), modules_to_save and token rows."""
    mts = []
    if saved := {m: a for m, a in adapter.aux.items() if isinstance(a, BaseTensors)}:
        for name, t in pc.base_tensors(adapter, saved, config, PREFIX).items():
            sink.add(name, t)
    for mod, a in adapter.aux.items():
        if isinstance(a, ModuleReplacement):
            mts.append(mod)
            for k, v in a.tensors.items():
                sink.add(f"{PREFIX}{mod}.{k}", v.contiguous())
        elif isinstance(a, TokenRows):
            sink.add(f"{PREFIX}{mod}.token_adapter.trainable_tokens_delta", a.rows.contiguous())
    return {"modules_to_save": sorted(mts) or None}


def _names(adapter: Adapter) -> list[str]:
    """The tensor names a PEFT folder of this adapter will most likely hold (to reserve header room)."""
    parts = ("lora_A.weight", "lora_B.weight")
    names = [f"{PREFIX}{m}.{p}" for m in [*adapter.deltas, *adapter.tied] for p in parts]
    for mod, a in adapter.aux.items():
        keys = a.tensors if isinstance(a, ModuleReplacement | BaseTensors) else ["token_adapter.x"]
        names += [f"{PREFIX}{mod}.base_layer.{k}" for k in keys]
    return names


OWNED = (CONFIG, WEIGHTS, WEIGHTS_BIN, RECIPE_FILE, "merging_stack.json", "verify_report.json")


def owned(folder: Path) -> set[str]:
    """What replacing an adapter folder replaces: the adapter's files, its recipe, a stack manifest and the
    adapters it names, and a verify report (it verified the replaced adapter); nothing else is touched."""
    names = set(OWNED)
    try:
        stack = json.loads((Path(folder) / "merging_stack.json").read_text())["stack"]
        names |= {n for n in stack if isinstance(n, str) and "/" not in n}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return names


FORMAT = Format("peft", detect, read, write, uses_base=False)


def recipe_text(provenance: Mapping[str, Any]) -> str:
    """The merge_recipe.json text of a recipe dict (sorted keys, indented, one final newline)."""
    return json.dumps(provenance, indent=2, sort_keys=True) + "\n"
