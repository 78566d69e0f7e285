"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors (or a weights-only .bin).

``read`` (read.py) turns LoRA, LoHa, LoKr and IA³ folders into an ``Adapter``; ``write`` (write.py) writes
them back so that ``PeftModel.from_pretrained`` loads them with the same outputs; config.py reads, checks
and builds adapter_config.json, fields.py accounts for every config field.
"""

from __future__ import annotations

from merging.formats.base import Format
from merging.formats.peft.config import CONFIG, PREFIX, RECIPE_FILE, WEIGHTS, WEIGHTS_BIN
from merging.formats.peft.read import PARTS, detect, read
from merging.formats.peft.write import OWNED, owned, recipe_text, write

FORMAT = Format("peft", detect, read, write, uses_base=True)  # write: what PEFT builds (grouped convs)

__all__ = [
    "CONFIG", "FORMAT", "OWNED", "PARTS", "PREFIX", "RECIPE_FILE", "WEIGHTS", "WEIGHTS_BIN",
    "detect", "owned", "read", "recipe_text", "write",
]  # fmt: skip
