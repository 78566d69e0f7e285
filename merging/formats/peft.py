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
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from merging.adapter import Adapter
from merging.deltas import Delta, Hadamard, Kronecker, LowRank, ModuleReplacement, Scale, Target, TokenRows
from merging.errors import FormatError, MergingError, NonFiniteError, UnsupportedError
from merging.fileio import atomic_folder, reading
from merging.tensorfiles import load_tensors

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
SUPPORTED = ("LORA", "LOHA", "LOKR", "IA3")

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
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_w1", ".lokr_w2", ".lokr_t2",
    ".ia3_l",
)  # fmt: skip


def is_peft_folder(path: Path) -> bool:
    """True when path is a folder holding a PEFT adapter_config.json."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_feedforward(config: Mapping[str, Any], module: str) -> bool:
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module == k or module.endswith("." + k) for k in ff)


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
    return config


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


def read(path: Path, *, allow_nonfinite: bool = False) -> Adapter:
    """Read a PEFT adapter folder into an Adapter.

    Args:
        path: the folder holding adapter_config.json and the weights.
        allow_nonfinite: accept NaN/Inf values instead of refusing them.

    Returns:
        The Adapter, with module paths as in the base model's ``named_modules()``.
    """
    folder = Path(path)
    with reading(folder):
        return _read(folder, allow_nonfinite)


def _read(folder: Path, allow_nonfinite: bool) -> Adapter:
    config = read_config(folder)
    file = _weights_file(folder)
    tensors = load_tensors(file)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        if not allow_nonfinite and t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(
                f"{file}: tensor {key!r} holds NaN or Inf (pass --allow-nonfinite to accept)"
            )
        module, part = _split(key, file)
        groups[module][part] = t
    peft_type = config["peft_type"]
    mts = config.get("modules_to_save") or []
    deltas: dict[str, Delta] = {}
    aux: dict = {}
    for module, parts in sorted(groups.items()):
        try:
            parts = {k: v for k, v in parts.items() if not k.startswith("base_layer.")}
            if "token_adapter.trainable_tokens_delta" in parts:
                aux[module] = TokenRows(
                    _token_indices(config, module), parts.pop("token_adapter.trainable_tokens_delta")
                )
            if not parts:
                continue
            if set(parts) <= {"weight", "bias"}:
                if not any(module == m or module.endswith("." + m) for m in mts):
                    raise FormatError(f"{file}: unknown keys {sorted(parts)} for module {module}")
                aux[module] = ModuleReplacement(dict(parts))
                continue
            deltas[module] = _DELTA_READERS[peft_type](parts, config, module)
        except MergingError as e:
            if str(file) in str(e):
                raise
            raise type(e)(f"{file}: module {module}: {e}") from None
        except KeyError as e:
            raise FormatError(f"{file}: module {module}: missing tensor {e.args[0]!r}") from None
    tied = _find_ties(deltas) if config.get("ensure_weight_tying") else {}
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


def _token_indices(config: Mapping[str, Any], module: str) -> tuple[int, ...]:
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return tuple(int(i) for i in spec)
    if isinstance(spec, dict):
        for key, idx in spec.items():
            if module == key or module.endswith("." + key):
                return tuple(int(i) for i in idx)
    raise FormatError(f"trainable tokens stored for {module} but trainable_token_indices does not name it")


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
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    mag = parts.get("lora_magnitude_vector", parts.get("lora_magnitude_vector.weight"))
    delta = LowRank(
        b, a, scale, target,
        bias=parts.get("lora_B.bias"),
        magnitude=None if mag is None else mag.flatten(),
    )  # fmt: skip
    r_cfg = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", r))
    if int(r_cfg) != r:
        raise FormatError(f"rank {r} in the tensors but {r_cfg} in the config (r / rank_pattern)")
    return delta


def _scale(config: Mapping[str, Any], module: str) -> float:
    r = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("alpha", 8))
    return float(alpha) / float(r)


def _read_loha(parts: dict[str, torch.Tensor], config: Mapping[str, Any], module: str) -> Hadamard:
    if unknown := set(parts) - {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}:
        raise FormatError(f"unknown LoHa tensors {sorted(unknown)}")
    return loha_delta(parts, _scale(config, module))


def loha_delta(parts: dict[str, torch.Tensor], scale: float) -> Hadamard:
    """A Hadamard delta from LoHa tensors named as PEFT and LyCORIS name them (hada_w1_a, ..., hada_t1)."""
    w1a, w1b, t1 = parts["hada_w1_a"], parts["hada_w1_b"], parts.get("hada_t1")
    if t1 is not None:  # Tucker conv: w1a (r, out), w1b (r, in), t1 (r, r, kh, kw)
        target = Target("conv2d", (w1a.shape[1], w1b.shape[1], *t1.shape[2:]))
    else:
        target = Target("unknown", (w1a.shape[0], w1b.shape[1]))
    return Hadamard(
        w1a, w1b, parts["hada_w2_a"], parts["hada_w2_b"], scale, target, t1=t1, t2=parts.get("hada_t2")
    )


def _read_lokr(parts: dict[str, torch.Tensor], config: Mapping[str, Any], module: str) -> Kronecker:
    return lokr_delta(parts, _scale(config, module))


def lokr_delta(parts: dict[str, torch.Tensor], scale: float) -> Kronecker:
    """A Kronecker delta from LoKr tensors named as PEFT and LyCORIS name them (lokr_w1, lokr_w2_a, ...)."""
    names = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    if unknown := set(parts) - names:
        raise FormatError(f"unknown LoKr tensors {sorted(unknown)}")
    w1 = parts.get("lokr_w1")
    a, c = w1.shape if w1 is not None else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"]
        b, d, kernel = w2.shape[0], w2.shape[1], tuple(w2.shape[2:])
    elif "lokr_t2" in parts:
        t2 = parts["lokr_t2"]
        b, d, kernel = parts["lokr_w2_a"].shape[1], parts["lokr_w2_b"].shape[1], tuple(t2.shape[2:])
    else:
        b, d, kernel = parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1], ()
    layer = {0: "unknown", 1: "conv1d", 2: "conv2d"}.get(len(kernel))
    if layer is None:
        raise FormatError(f"lokr_w2 has an unsupported kernel shape {kernel}")
    target = Target(layer, (a * b, c * d, *kernel))
    return Kronecker(
        scale, target,
        w1=w1, w1a=parts.get("lokr_w1_a"), w1b=parts.get("lokr_w1_b"),
        w2=parts.get("lokr_w2"), w2a=parts.get("lokr_w2_a"), w2b=parts.get("lokr_w2_b"),
        t2=parts.get("lokr_t2"),
    )  # fmt: skip


def _read_ia3(parts: dict[str, torch.Tensor], config: Mapping[str, Any], module: str) -> Scale:
    if set(parts) != {"ia3_l"}:
        raise FormatError(f"unknown IA³ tensors {sorted(set(parts) - {'ia3_l'})}")
    l = parts["ia3_l"]
    side = "in" if _is_feedforward(config, module) else "out"
    layer = "conv2d" if l.dim() == 4 else ("gpt2_conv1d" if config.get("fan_in_fan_out") else "linear")
    return Scale(l.flatten(), side, layer)


_DELTA_READERS = {"LORA": _read_lora, "LOHA": _read_loha, "LOKR": _read_lokr, "IA3": _read_ia3}


def _find_ties(deltas: Mapping[str, Delta]) -> dict[str, str]:
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


# ------------------------------------------------------------------------------------------ writing


def _mode(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


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


def _lora_config(adapter: Adapter, deltas: Mapping[str, LowRank]) -> dict[str, Any]:
    ranks = {m: d.b.shape[1] for m, d in deltas.items()}
    alphas = {m: d.scale * ranks[m] for m, d in deltas.items()}
    r, alpha = _mode(list(ranks.values())), _mode(list(alphas.values()))
    layers = {d.target.layer for d in deltas.values()}
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
        "target_modules": sorted(deltas),
        "use_rslora": False,
        "use_dora": any(d.magnitude is not None for d in deltas.values()),
        "lora_bias": any(d.bias is not None for d in deltas.values()),
        "fan_in_fan_out": "gpt2_conv1d" in layers,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "bias": "none",
    }


def _ia3_tensors(mod: str, d: Scale) -> dict[str, torch.Tensor]:
    if d.layer == "conv2d":
        shape = (1, -1, 1, 1)
    else:
        shape = (1, -1) if d.side == "in" else (-1, 1)
    return {f"{PREFIX}{mod}.ia3_l": d.l.reshape(shape).contiguous()}


def _passthrough_tensors(mod: str, d: Hadamard | Kronecker) -> dict[str, torch.Tensor]:
    if isinstance(d, Hadamard):
        names = {"hada_w1_a": d.w1a, "hada_w1_b": d.w1b, "hada_w2_a": d.w2a, "hada_w2_b": d.w2b}
        names |= {"hada_t1": d.t1, "hada_t2": d.t2}
    else:
        names = {"lokr_w1": d.w1, "lokr_w1_a": d.w1a, "lokr_w1_b": d.w1b, "lokr_w2": d.w2}
        names |= {"lokr_w2_a": d.w2a, "lokr_w2_b": d.w2b, "lokr_t2": d.t2}
    return {f"{PREFIX}{mod}.{k}": v.contiguous() for k, v in names.items() if v is not None}


def _factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LoKr's split of a dimension into (m, n), m ≤ n, as PEFT and LyCORIS compute it."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (n, m) if m > n else (m, n)
    factor = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _lokr_factor(deltas: Mapping[str, Kronecker]) -> int:
    """The decompose_factor that reproduces every module's (W1, W2) split (-1 when it is the default)."""
    splits = []
    for d in deltas.values():
        (a, c), w2 = d.matrix1().shape, d.raw2()
        splits.append(((a, w2.shape[0]), (c, w2.shape[1])))
    for f in [-1, *sorted({x for (o, i) in splits for x in (*o, *i)})]:
        if all(
            _factorization(o[0] * o[1], f) == o and _factorization(i[0] * i[1], f) == i for o, i in splits
        ):
            return f
    raise UnsupportedError(
        "these LoKr factor shapes match no PEFT decompose_factor; write them as LoRA (cat)"
    )


def _lycoris_config(adapter: Adapter, kind: str) -> dict[str, Any]:
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


def write(
    adapter: Adapter, path: Path, *, force: bool = False, extra_files: Mapping[str, str] | None = None
) -> Path:
    """Write an Adapter as a PEFT folder (LoRA, IA³, or LoHa/LoKr) that PEFT loads.

    Args:
        adapter: all deltas of one kind: LowRank, Scale, Hadamard or Kronecker.
        path: the output folder; written to a temporary sibling and renamed into place.
        force: replace an existing output folder.
        extra_files: name → text written into the folder within the same atomic step (a recipe, a manifest).

    Returns:
        The folder written.
    """
    kinds = {type(d) for d in adapter.deltas.values()}
    if len(kinds) > 1:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise UnsupportedError(
            f"{adapter.where}: one PEFT folder holds one adapter type, got {names}; merge first"
        )
    kind = kinds.pop() if kinds else LowRank
    tensors: dict[str, torch.Tensor] = {}
    if kind is LowRank:
        config = _lora_config(adapter, adapter.deltas)
        for mod, d in adapter.deltas.items():
            tensors |= _lora_tensors(mod, d)
        for mod, src in adapter.tied.items():
            d = adapter.deltas[src]
            tensors[f"{PREFIX}{mod}.lora_A.weight"] = d.a.contiguous()
            tensors[f"{PREFIX}{mod}.lora_B.weight"] = d.b.contiguous()
        config["ensure_weight_tying"] = bool(adapter.tied)
    elif kind is Scale:
        config = {"peft_type": "IA3", "init_ia3_weights": True}
        config["target_modules"] = sorted(adapter.deltas)
        config["feedforward_modules"] = sorted(m for m, d in adapter.deltas.items() if d.side == "in")
        config["fan_in_fan_out"] = any(d.layer == "gpt2_conv1d" for d in adapter.deltas.values())
        for mod, d in adapter.deltas.items():
            tensors |= _ia3_tensors(mod, d)
    elif kind in (Hadamard, Kronecker):
        config = _lycoris_config(adapter, "LOHA" if kind is Hadamard else "LOKR")
        for mod, d in adapter.deltas.items():
            tensors |= _passthrough_tensors(mod, d)
    else:
        raise UnsupportedError(
            f"{adapter.where}: {kind.__name__} deltas have no PEFT form; use cat or svd first"
        )
    mts, tokens = [], {}
    for mod, a in adapter.aux.items():
        if isinstance(a, ModuleReplacement):
            mts.append(mod)
            tensors |= {f"{PREFIX}{mod}.{k}": v.contiguous() for k, v in a.tensors.items()}
        else:
            tokens[mod] = list(a.indices)
            tensors[f"{PREFIX}{mod}.token_adapter.trainable_tokens_delta"] = a.rows.contiguous()
    config |= {
        "base_model_name_or_path": adapter.base_model,
        "revision": adapter.revision,
        "modules_to_save": sorted(mts) or None,
        "trainable_token_indices": tokens or None,
        "task_type": adapter.config.get("task_type"),
        "inference_mode": True,
    }
    from safetensors.torch import save_file

    with atomic_folder(Path(path), force=force) as tmp:
        save_file(dict(sorted(tensors.items())), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)
