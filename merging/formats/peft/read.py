"""Reading PEFT adapter folders: LoRA (rslora, rank/alpha patterns, DoRA, bias, Embedding, Conv, GPT-2
Conv1D), LoHa, LoKr and IA³ folders into an ``Adapter``.

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

import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from merging.core.adapter import MHA_OUT, Adapter
from merging.core.deltas import CONV_DIMS, Delta, Hadamard, Kronecker, LowRank, Scale, Target
from merging.core.lazy import LazyDeltas
from merging.core.replacements import BaseTensors, ModuleReplacement, TokenRows
from merging.errors import FormatError, NonFiniteError, UnsupportedError
from merging.formats import lycoris
from merging.formats.base import READ_DEFAULTS, ReadOptions, naming
from merging.formats.peft import config as pc
from merging.formats.peft import params as peft_params
from merging.formats.peft import shapes
from merging.formats.peft.config import CONFIG, PREFIX, WEIGHTS, WEIGHTS_BIN
from merging.formats.peft.fields import TRAINING_ONLY
from merging.storage.files import hash_ahead, reading
from merging.storage.safetensors_io import finite, open_tensors

if TYPE_CHECKING:
    from merging.base.layout import BaseLayout

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
    ".lora_A",  # AdaLoRA: parameters, not layers
    ".lora_B",
    ".lora_E",
    ".lora_velora_embed",
    ".lora_diag",
    ".base_layer.weight",
    ".base_layer.bias",
    *(f".{name}" for name in lycoris.LOHA + lycoris.LOKR),
    ".ia3_l",
)


CONV_KINDS = {n: kind for kind, n in CONV_DIMS.items()}  # weight dims → conv layer kind


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
    if (i := name.find(".lora_monteclora_sampler.")) >= 0:
        return name[:i], name[i + 1 :]
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
        where = getattr(source, "offset", None)  # in file order: the file is read front to back
        for part, key in sorted(parts.items(), key=lambda pk: where(pk[1]) if where else 0):
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
            if ".base_layer." in f"{module}." and not module.endswith(MHA_OUT):
                raise UnsupportedError(
                    f"LoRA tensors under {module.split('.base_layer')[0]}'s base_layer: PEFT saves them "
                    "there only for an nn.MultiheadAttention's out_proj"
                )
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

    kind = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr", "IA3": "ia3", "ADALORA": "lora"}[peft_type]
    if any(any(p.startswith("lora_magnitude") for p in keys) for keys in adapted.values()):
        kind = "dora"
    deltas: Mapping[str, Delta] = LazyDeltas(_file_order(source, adapted, param_deltas), build, kind)
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
    for field, prefix in TRAINING_ONLY.items():  # VeLoRA/MonteCLoRA state: their eval forward is a plain LoRA
        if config.get(field):
            parts = {k: v for k, v in parts.items() if not k.startswith(prefix)}
    allowed = {"lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B"}
    allowed |= {"lora_magnitude_vector", "lora_magnitude_vector.weight"}
    if unknown := set(parts) - allowed:
        raise FormatError(f"unknown LoRA tensors {sorted(unknown)}")
    if "lora_embedding_A" in parts:
        ea, eb = parts["lora_embedding_A"], parts["lora_embedding_B"]  # (r, num), (dim, r)
        b, a = ea.T.contiguous(), eb.T.contiguous()
        target = Target("embedding", (ea.shape[1], eb.shape[0]))
    else:
        la, lb = _block_diagonal(parts["lora_A.weight"], parts["lora_B.weight"], config, module)
        groups = la.shape[0] // lb.shape[1] if la.dim() > 2 else 1
        r = la.shape[0]
        b = shapes.beside_b(lb, groups) if groups > 1 else lb.reshape(lb.shape[0], -1)  # (out, r)
        a = la.reshape(r, -1)  # (r, in·k...)
        if la.dim() > 2:  # Conv1d/2d/3d: A (r, in, k...), B (out, r/groups, 1...)
            target = Target(CONV_KINDS[la.dim()], (lb.shape[0], *la.shape[1:]), beside=groups)
        elif config.get("fan_in_fan_out"):
            target = Target("gpt2_conv1d", (la.shape[1], lb.shape[0]))
        else:
            target = Target("linear", (lb.shape[0], la.shape[1]))
    r = a.shape[0]
    module = module.removesuffix(MHA_OUT)  # an nn.MultiheadAttention's out_proj LoRA has its r and alpha
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


def _block_diagonal(
    la: torch.Tensor, lb: torch.Tensor, config: Mapping[str, Any], module: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """BD-LoRA's factors as the matrices its forward multiplies: PEFT stores a block-diagonal factor as its
    nblocks diagonal blocks stacked, (rows, cols / nblocks), and runs ``block_diag(*chunk(w, nblocks))``."""
    bd = config.get("use_bdlora")
    if not bd:
        return la, lb
    n = int(bd.get("nblocks", 1))
    if any(p in module for p in bd.get("target_modules_bd_a") or []):
        la = torch.block_diag(*la.chunk(n, dim=0))  # (r, in)
    elif any(p in module for p in bd.get("target_modules_bd_b") or []):
        lb = torch.block_diag(*lb.chunk(n, dim=0))  # (out, r)
    return la, lb


def _read_adalora(parts: dict[str, torch.Tensor], config: Mapping[str, Any], module: str) -> LowRank:
    """AdaLoRA: ΔW = B·diag(E)·A · lora_alpha / (ranknum + 1e-5), ranknum = init_r (PEFT keeps it after
    pruning by rank_pattern); A (r, in·k...) is flat for a conv, so its layer kind comes from the base."""
    if unknown := set(parts) - {"lora_A", "lora_B", "lora_E"}:
        raise FormatError(f"unknown AdaLoRA tensors {sorted(unknown)}")
    a, e, b = parts["lora_A"], parts["lora_E"], parts["lora_B"]  # (r, in_flat), (r, 1), (out, r)
    init_r, alpha = float(config.get("init_r", 12)), float(config.get("lora_alpha", 8))
    scaling = alpha if alpha > 0 else (init_r if not config.get("rank_pattern") else float(a.shape[0]))
    if config.get("fan_in_fan_out"):
        target = Target("gpt2_conv1d", (a.shape[1], b.shape[0]))
    else:
        target = Target("unknown", (b.shape[0], a.shape[1]))
    return LowRank(b, a * e.to(a.dtype), scaling / (init_r + 1e-5), target)  # diag(E) folded into A's rows


def _read_loha(parts: dict[str, torch.Tensor], config: Mapping[str, Any], module: str) -> Hadamard:
    return lycoris.loha_delta(parts, pc.lycoris_scale(config, module))


def _read_lokr(parts: dict[str, torch.Tensor], config: Mapping[str, Any], module: str) -> Kronecker:
    return lycoris.lokr_delta(parts, pc.lycoris_scale(config, module))


def _read_ia3(parts: dict[str, torch.Tensor], config: Mapping[str, Any], module: str) -> Scale:
    if set(parts) != {"ia3_l"}:
        raise FormatError(f"unknown IA³ tensors {sorted(set(parts) - {'ia3_l'})}")
    l = parts["ia3_l"]
    side = "in" if pc.is_feedforward(config, module) else "out"
    layer = CONV_KINDS.get(l.dim()) or ("gpt2_conv1d" if config.get("fan_in_fan_out") else "linear")
    return Scale(l.flatten(), side, layer)


_DELTA_READERS = {
    "LORA": _read_lora, "LOHA": _read_loha, "LOKR": _read_lokr, "IA3": _read_ia3, "ADALORA": _read_adalora,
}  # fmt: skip


def _file_order(source, adapted: Mapping[str, Mapping[str, str]], params: Mapping[str, Delta]) -> list[str]:
    """Module paths in the order their tensors lie in the file (by name where the file does not say), so a
    streaming merge reads each file front to back and its sha256 is fed as it goes (read once)."""
    where = getattr(source, "offset", None)
    first = {m: min(where(k) for k in keys.values()) if where and keys else 0 for m, keys in adapted.items()}
    return sorted([*adapted, *params], key=lambda m: (first.get(m, 0), m))
