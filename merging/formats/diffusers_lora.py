"""One-file LoRAs in diffusers' own names: ``<component>.<module path>.lora_A.weight`` (what
``save_lora_weights`` writes and ai-toolkit and most Flux/SD3 trainers ship).

| key | shape | meaning |
|---|---|---|
| ``<component>.<path>.lora_A.weight`` | (r, in) | A |
| ``<component>.<path>.lora_B.weight`` | (out, r) | B |
| ``<component>.<path>.alpha`` (optional) | () | diffusers' network alpha: scale α / r (1 without it) |
| ``<text encoder>.<path>.lora_linear_layer.down/up.weight`` | | A / B in diffusers' older names |

CLIP text encoders are written in the older names: diffusers 0.42 converts a text encoder's PEFT-named keys
only when some attention projection is among them (an MLP-only file fails to load).

Module paths are the pipeline's, with text encoders named as their checkpoints name them
(``text_encoder.text_model.encoder...``); both spellings are read. A file carrying PEFT configs in its
``lora_adapter_metadata`` (rank/alpha patterns, DoRA) is refused by name: diffusers would apply them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from merging.core.deltas import Delta, LowRank, Target
from merging.errors import FormatError, UnsupportedError
from merging.formats.kohya_names import t5_components
from merging.storage.atomic import atomic_file
from merging.storage.files import save_safetensors

if TYPE_CHECKING:
    from merging.base.layout import BaseLayout

LEGACY = ("lora_linear_layer.down", "lora_linear_layer.up")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
PARTS = {  # key ending → A, B or alpha
    "lora_A.weight": "A", "lora_B.weight": "B", "lora_linear_layer.down.weight": "A",
    "lora_linear_layer.up.weight": "B", "alpha": "alpha",
}  # fmt: skip


def holds(keys: object) -> bool:
    """Whether a file's keys are diffusers-named LoRA keys (a pipeline component, then lora_A/lora_B)."""
    ends = (".lora_A.weight", ".lora_linear_layer.down.weight")
    return any(k.split(".")[0] in COMPONENTS and k.endswith(ends) for k in keys)


def read(tensors: Mapping[str, torch.Tensor], base: BaseLayout | None, file: Path, meta: Mapping) -> dict:
    """module path → LowRank for a diffusers-named file, mapped onto the base's modules (as named without)."""
    if "lora_adapter_metadata" in meta:
        raise UnsupportedError(
            f"{file}: lora_adapter_metadata (PEFT configs diffusers applies) is not read yet; "
            "drop it from the file if it only restates rank and alpha"
        )
    back = {} if base is None else {s: m for m, s in base.saved.items()}
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        part = next((p for p in PARTS if key.endswith(f".{p}")), None)
        if part is None or key.split(".")[0] not in COMPONENTS:
            raise FormatError(f"{file}: unknown key {key!r} in a diffusers-named LoRA file")
        groups[key[: -len(part) - 1]][PARTS[part]] = t
    deltas: dict[str, Delta] = {}
    for path, parts in sorted(groups.items()):
        module = path if base is None or path in base.modules else back.get(path)
        if module is None:
            raise FormatError(f"{file}: {path} matches no module of the base model")
        if not {"A", "B"} <= set(parts):
            raise FormatError(f"{file}: {path}: lora_A and lora_B (down and up) both needed")
        a, b = parts["A"], parts["B"]  # (r, in[, k...]), (out, r[, 1...])
        r, layer = a.shape[0], "linear" if a.dim() == 2 else "unknown"  # a conv: its base gives the kernel
        alpha = float(parts["alpha"]) if "alpha" in parts else float(r)
        a, b = a.reshape(r, -1), b.reshape(b.shape[0], r)
        deltas[module] = LowRank(b, a, alpha / r, Target(layer, (b.shape[0], a.shape[1])))
    return deltas


def write(deltas: Mapping[str, Delta], path: Path, base: BaseLayout, *, force: bool = False) -> Path:
    """LoRA deltas as a diffusers-named file (scale folded into B), loadable by ``load_lora_weights``."""
    t5 = t5_components(base.modules)
    clips = tuple(f"{c}." for c in base.components if c.startswith("text_encoder") and c not in t5)
    tensors = {}
    for mod, d in sorted(deltas.items()):
        if not isinstance(d, LowRank) or d.magnitude is not None or d.bias is not None:
            raise UnsupportedError(f"{mod}: only plain LoRA deltas have a diffusers-named form")
        if d.target.layer != "linear":
            raise UnsupportedError(f"{mod}: a {d.target.layer} LoRA: write it in kohya names")
        name = base.saved.get(mod, mod)
        down, up = LEGACY if mod.startswith(clips) else ("lora_A", "lora_B")
        tensors[f"{name}.{down}.weight"] = d.a.clone()  # a fused module's parts share A: one copy each
        tensors[f"{name}.{up}.weight"] = (d.scale * d.b.float()).to(d.b.dtype)
    with atomic_file(Path(path), force=force) as tmp:
        save_safetensors(tensors, tmp, metadata={"format": "pt"})
    return Path(path)
