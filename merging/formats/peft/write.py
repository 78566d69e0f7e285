"""Writing PEFT adapter folders: LoRA and IA³ adapters (and LoHa/LoKr as read) that
``PeftModel.from_pretrained`` loads with the same outputs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from merging.core.adapter import MHA_OUT, Adapter
from merging.core.deltas import CONV_DIMS, Delta, Hadamard, Kronecker, LowRank, Scale
from merging.core.lazy import LazyDeltas
from merging.core.lycoris_ia3 import AddedScale, to_peft
from merging.core.replacements import BaseTensors, ModuleReplacement, TokenRows
from merging.errors import UnsupportedError
from merging.formats import lycoris, stack_folder
from merging.formats.base import WRITE_DEFAULTS, Provenance, WriteOptions, naming, recipe_of
from merging.formats.kohya_names import is_kohya_name
from merging.formats.peft import config as pc
from merging.formats.peft import params as peft_params
from merging.formats.peft.config import CONFIG, PREFIX, RECIPE_FILE, WEIGHTS, WEIGHTS_BIN
from merging.formats.peft.kinds import ImpliedBase
from merging.formats.peft.shapes import as_built, beside_factors, grouped_a, warn_unknown
from merging.storage.atomic import atomic_folder
from merging.storage.files import write_text
from merging.storage.safetensors_io import SafetensorsWriter, header_room

if TYPE_CHECKING:
    from merging.base.layout import BaseLayout


def _lora_tensors(mod: str, d: LowRank, groups: int = 1) -> dict[str, torch.Tensor]:
    """A LoRA's tensors as PEFT's layer for the module holds them (a grouped conv: see ``grouped_a``)."""
    p, t = PREFIX + mod, d.target
    if t.layer == "embedding":
        out = {f"{p}.lora_embedding_A": d.b.T.contiguous(), f"{p}.lora_embedding_B": d.a.T.contiguous()}
    else:
        r = d.b.shape[1]
        kernel = t.shape[2:] if t.layer in CONV_DIMS else ()
        in_ch = t.shape[0] if t.layer == "gpt2_conv1d" else t.shape[1]
        a = d.a.reshape(r, in_ch, *kernel)  # (r, in/groups, k...); beside a grouped conv: (r, in, k...)
        b = d.b
        if groups > 1 and t.beside == 1 and d.magnitude is not None:  # PEFT's DoRA norm would differ
            raise UnsupportedError(
                f"a DoRA on the grouped weight of a conv of {groups} groups (not PEFT's LoRA beside it) "
                "is not modelled as PEFT's DoRA; write it as kohya/LyCORIS"
            )
        if t.beside > 1:
            b, a = beside_factors(b, a, t.beside)  # (out, n), (groups·n, in, k...)
        elif groups > 1:
            a = grouped_a(a, groups)  # (groups·r, in, k...)
        out = {
            f"{p}.lora_A.weight": a.contiguous(),
            f"{p}.lora_B.weight": b.reshape(b.shape[0], b.shape[1], *(1 for _ in kernel)).contiguous(),
        }
    if d.bias is not None:
        out[f"{p}.lora_B.bias"] = d.bias.contiguous()
    if d.magnitude is not None:
        shape = (1, -1, *(1 for _ in t.shape[2:])) if t.layer in CONV_DIMS else (-1,)
        out[f"{p}.lora_magnitude_vector"] = d.magnitude.reshape(shape).contiguous()
    return out


def _attention_part(adapter: Adapter, mod: str, d: LowRank) -> LowRank:
    """One half of PEFT's LoRA on an nn.MultiheadAttention (in_proj_weight at its path, out_proj at
    ``MHA_OUT`` after it): PEFT builds both with the attention module's r and lora_alpha, so both are
    written at the larger rank, zero-padded, their scale in B (lora_alpha = r)."""
    owner = mod.removesuffix(MHA_OUT)
    other = owner if owner != mod else mod + MHA_OUT
    if other not in adapter.deltas:
        if owner != mod:
            raise UnsupportedError(
                f"an nn.MultiheadAttention out_proj LoRA without one on {owner}'s in_proj: PEFT adapts both "
                "as one layer (merge with the inputs that adapt it)"
            )
        return d
    partner = adapter.deltas[other]
    if not isinstance(partner, LowRank) or d.magnitude is not None or partner.magnitude is not None:
        raise UnsupportedError(f"{owner}: PEFT's LoRA on nn.MultiheadAttention is a plain LoRA (no DoRA)")
    r = max(d.rank, partner.rank)
    b = torch.zeros(d.b.shape[0], r, dtype=d.b.dtype)  # (out, r)
    a = torch.zeros(r, d.a.shape[1], dtype=d.a.dtype)  # (r, in)
    b[:, : d.rank] = d.b * d.scale
    a[: d.rank] = d.a
    return LowRank(b, a, 1.0, d.target, bias=None if d.bias is None else d.bias * d.scale)


def _ia3_tensors(mod: str, d: Scale) -> dict[str, torch.Tensor]:
    if d.layer in CONV_DIMS:  # PEFT's IA³ conv vector: (1, n, 1...) on either side
        shape = (1, -1, *(1,) * (CONV_DIMS[d.layer] - 2))
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
            config = _write_deltas(adapter, kind, sink, base)
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


def _write_deltas(
    adapter: Adapter, kind: type, sink: SafetensorsWriter, base: BaseLayout | None
) -> dict[str, Any]:
    """Append every module's tensors to ``sink`` (one pass over the deltas) and return the config."""
    if kind is LowRank:
        seen: dict[str, pc.LoraInfo] = {}
        params = peft_params.ParamWriter()  # target_parameters: experts gathered per parameter
        unknown: list[str] = []
        implied = ImpliedBase(adapter) if base is None else None  # looked up for a guessed kind only
        for mod, d in adapter.deltas.items():
            if not isinstance(d, LowRank):
                raise UnsupportedError(f"{adapter.where}: module {mod} is not a LoRA; merge first")
            if d.target.site is not None:
                params.add(mod, d)
                continue
            lay = base if implied is None or not d.target.guessed else implied.knows(mod)
            with naming(adapter.where, f"module {mod}"):
                d = as_built(mod, _attention_part(adapter, mod, d), lay, unknown, implied)
            groups = lay.groups.get(mod, 1) if lay is not None else 1
            tensors = _lora_tensors(mod, d, groups)
            for name, t in tensors.items():
                sink.add(name, t)
            info = pc.LoraInfo.of(d)
            if groups > 1 or d.target.beside > 1:  # PEFT's grouped lora_A has groups·n rows; the same scale
                info = info._replace(rank=tensors[f"{PREFIX}{mod}.lora_A.weight"].shape[0])
            if not mod.endswith(MHA_OUT):  # PEFT builds it from its attention module's r and lora_alpha
                seen[mod] = info
        warn_unknown(unknown)
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
            with naming(adapter.where, f"module {mod}"):
                d = as_built(mod, d, base)
            for name, t in _ia3_tensors(mod, d).items():
                sink.add(name, t)
        return {
            "peft_type": "IA3", "init_ia3_weights": True, "target_modules": sorted(adapter.deltas),
            "feedforward_modules": sorted(m for m, d in adapter.deltas.items() if d.side == "in"),
            "fan_in_fan_out": any(d.layer == "gpt2_conv1d" for d in adapter.deltas.values()),
        }  # fmt: skip
    parts = lycoris.loha_parts if kind is Hadamard else lycoris.lokr_parts
    for mod, d in adapter.deltas.items():
        if base is not None:  # stored as read, LoHa/LoKr factors need no layer kind; with a base, checked
            with naming(adapter.where, f"module {mod}"):
                as_built(mod, d, base)
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


OWNED = (CONFIG, WEIGHTS, WEIGHTS_BIN, RECIPE_FILE, stack_folder.STACK_FILE, "verify_report.json")


def owned(folder: Path) -> set[str]:
    """What replacing an adapter folder replaces: the adapter's files, its recipe, a stack manifest and the
    adapters it names, and a verify report (it verified the replaced adapter); nothing else is touched."""
    stack = stack_folder.members(Path(folder) / stack_folder.STACK_FILE)
    return set(OWNED) | {n for n in stack if "/" not in n}


def recipe_text(provenance: Mapping[str, Any]) -> str:
    """The merge_recipe.json text of a recipe dict (sorted keys, indented, one final newline)."""
    return json.dumps(provenance, indent=2, sort_keys=True) + "\n"
