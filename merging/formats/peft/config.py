"""PEFT's adapter_config.json: reading and checking it, and building one under which PEFT rebuilds
exactly the deltas we write (ranks, alphas and their per-module patterns, LoKr's decompose_factor)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from merging.core.adapter import Adapter
from merging.core.deltas import Delta, Hadamard, Kronecker, LowRank
from merging.core.replacements import BaseTensors
from merging.errors import FormatError, UnsupportedError
from merging.formats.lycoris import factorization
from merging.formats.peft.fields import check_fields

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
RECIPE_FILE = "merge_recipe.json"
PREFIX = "base_model.model."
SUPPORTED = ("LORA", "LOHA", "LOKR", "IA3", "ADALORA")


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def is_feedforward(config: Mapping[str, Any], module: str) -> bool:
    """Whether IA³ scales this module's input, matched as PEFT matches: a regex on the whole module name,
    or a list of plain string suffixes (``4h_to_h`` matches ``dense_4h_to_h``)."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(k) for k in ff)


def read_config(folder: Path) -> dict[str, Any]:
    """Load and check adapter_config.json."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FormatError(f"{folder}: no {CONFIG} (not a PEFT adapter folder)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise FormatError(f"{path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED:
        raise FormatError(f"{path}: unknown peft_type {peft_type!r}; supported: {', '.join(SUPPORTED)}")
    check_fields(config, path)
    return config


def token_indices(config: Mapping[str, Any], module: str) -> tuple[int, ...]:
    """The trainable_token_indices for one embedding module."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return tuple(int(i) for i in spec)
    if isinstance(spec, dict):
        for key, idx in spec.items():
            if module == key or module.endswith("." + key):
                return tuple(int(i) for i in idx)
    raise FormatError(f"trainable tokens stored for {module} but trainable_token_indices does not name it")


def lycoris_scale(config: Mapping[str, Any], module: str) -> float:
    """PEFT's LoHa/LoKr scale α / r for one module (even when both LoKr factors are full)."""
    r = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("alpha", 8))
    return float(alpha) / float(r)


def _mode(values: list) -> Any:
    """The most common value (the first seen among ties)."""
    return Counter(values).most_common(1)[0][0]


class LoraInfo(NamedTuple):
    """What a LoRA module contributes to adapter_config.json."""

    rank: int
    scale: float
    layer: str
    dora: bool
    bias: bool

    @classmethod
    def of(cls, d: LowRank) -> LoraInfo:
        return cls(d.b.shape[1], d.scale, d.target.layer, d.magnitude is not None, d.bias is not None)


def lora_config(infos: Mapping[str, LoraInfo]) -> dict[str, Any]:
    """A LoraConfig (as JSON) for modules with these ranks, scales and layers: the most common rank and
    alpha as r and lora_alpha, the others as rank_pattern and alpha_pattern."""
    plain = sorted(m for m, d in infos.items() if not d.dora)
    if plain and len(plain) < len(infos):
        raise UnsupportedError(
            f"module {plain[0]} has no DoRA magnitude but PEFT's use_dora applies to every module; "
            "merge with `base_weights` (--base) to give it one"
        )
    ranks = {m: d.rank for m, d in infos.items()}
    alphas = {m: d.scale * ranks[m] for m, d in infos.items()}
    r, alpha = _mode(list(ranks.values())), _mode(list(alphas.values()))
    layers = {d.layer for d in infos.values()}
    if "gpt2_conv1d" in layers and layers - {"gpt2_conv1d", "embedding"}:
        raise UnsupportedError(
            "cannot write GPT-2 Conv1D and other linear layers in one PEFT LoRA (fan_in_fan_out)"
        )
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "target_modules": sorted(infos),
        "use_rslora": False,
        "use_dora": any(d.dora for d in infos.values()),
        "lora_bias": any(d.bias for d in infos.values()),
        "fan_in_fan_out": "gpt2_conv1d" in layers,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "bias": "none",
    }


def _lokr_factor(deltas: Mapping[str, Kronecker]) -> int:
    """The decompose_factor that reproduces every module's (W1, W2) split (-1 when it is the default)."""
    splits = []
    for d in deltas.values():
        (a, c), w2 = d.matrix1().shape, d.raw2()
        splits.append(((a, w2.shape[0]), (c, w2.shape[1])))
    for f in [-1, *sorted({x for (o, i) in splits for x in (*o, *i)})]:
        if all(factorization(o[0] * o[1], f) == o and factorization(i[0] * i[1], f) == i for o, i in splits):
            return f
    raise UnsupportedError(
        "these LoKr factor shapes match no PEFT decompose_factor; write them as LoRA (cat)"
    )


def lycoris_config(adapter: Adapter, kind: str) -> dict[str, Any]:
    """LoHa/LoKr: a PEFT config under which PEFT builds exactly these factor shapes and scales."""
    ranks: dict[str, int] = {}
    for mod, d in adapter.deltas.items():
        if isinstance(d, Hadamard):
            ranks[mod] = d.w1b.shape[0]
        elif d.t2 is not None:  # Tucker: t2 (r, r, kh, kw)
            ranks[mod] = d.t2.shape[0]
        elif d.w1a is not None or d.w2a is not None:
            ranks[mod] = (d.w1a if d.w1a is not None else d.w2a).shape[1]
        else:  # both factors full: any r ≥ max(W2 shape) / 2 keeps PEFT's w2 full
            ranks[mod] = max(d.raw2().shape[:2])
    alphas = {m: adapter.deltas[m].scale * r for m, r in ranks.items()}
    r, alpha = _mode(list(ranks.values())), _mode(list(alphas.values()))
    config: dict[str, Any] = {
        "peft_type": kind,
        "r": r,
        "alpha": alpha,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "target_modules": sorted(adapter.deltas),
        "init_weights": True,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": any(
            getattr(d, "t1", None) is not None or getattr(d, "t2", None) is not None
            for d in adapter.deltas.values()
        ),  # fmt: skip
    }
    if kind == "LOKR":
        config["decompose_both"] = any(d.w1a is not None for d in adapter.deltas.values())
        config["decompose_factor"] = _lokr_factor(adapter.deltas)
    return config


def find_ties(deltas: Mapping[str, Delta]) -> dict[str, str]:
    """Modules whose LoRA equals an embedding's LoRA (PEFT's ensure_weight_tying): module → embedding."""
    ties = {}
    embeds = {m: d for m, d in deltas.items() if isinstance(d, LowRank) and d.target.layer == "embedding"}
    for mod, d in deltas.items():
        if not isinstance(d, LowRank) or d.target.layer == "embedding":
            continue
        for emb, e in embeds.items():
            if (
                d.b.shape == e.b.shape
                and d.a.shape == e.a.shape
                and torch.equal(d.b, e.b)
                and torch.equal(d.a, e.a)
            ):
                ties[mod] = emb
    return ties


def base_tensors(
    adapter: Adapter, saved: Mapping[str, BaseTensors], config: dict[str, Any], prefix: str
) -> dict[str, torch.Tensor]:
    """Base-layer tensors as PEFT saves them (``<module>.base_layer.<name>`` under an adapted module) and the
    ``bias`` setting under which PEFT's save and load treat them alike."""
    if config["peft_type"] != "LORA":
        raise UnsupportedError(
            f"{adapter.where}: trained base tensors (bias='all'/'lora_only') have a PEFT form for LoRA only"
        )
    adapted = set(adapter.deltas) | set(adapter.tied)
    out: dict[str, torch.Tensor] = {}
    for mod, a in saved.items():
        where = f"{prefix}{mod}.base_layer" if mod in adapted else f"{prefix}{mod}"
        out |= {f"{where}.{k}": v.contiguous() for k, v in a.tensors.items()}
    biased = {m for m, a in saved.items() if "bias" in a.tensors}
    config["bias"] = "none" if not biased else ("lora_only" if biased <= adapted else "all")
    return out
