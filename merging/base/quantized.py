"""Bases loaded as QLoRA adapters were trained on them: bitsandbytes nf4 / fp4 / int8, on the CPU too.

bitsandbytes 0.50 quantises and dequantises nf4 and fp4 on the CPU (its own CPU backend), and
re-quantising a float weight gives the bytes transformers' loader stores. Its CPU forward, on processors
with AVX512-BF16, takes a packed bf16 kernel by default (≈3e-3 relative error against dequant(W)·x);
``load_quantized`` switches that kernel off so the layer computes dequant(W)·x in its float32 compute
dtype, as the adapter's training forward did. transformers quantises every Linear but the output head.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from merging.errors import SourceError, UnsupportedError

if TYPE_CHECKING:
    from merging.base.layout import BaseLayout

QUANTS = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # transformers' BitsAndBytesConfig: 4-bit blocks of 64, no double quantisation by default


def require_bnb():
    """The bitsandbytes module, or one line saying how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise UnsupportedError(
            "a quantised base needs bitsandbytes: pip install 'merging[qlora]' (0.50 and later run on CPU)"
        ) from None
    return bitsandbytes


def bnb_config(quant: str):
    """transformers' BitsAndBytesConfig for nf4, fp4 (4-bit, float32 compute) or int8."""
    from transformers import BitsAndBytesConfig

    if quant not in QUANTS:
        raise SourceError(f"`base_quant` must be one of {', '.join(QUANTS)}, got {quant!r}")
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    fp32 = torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=fp32)


def load_quantized(folder: str | Path, quant: str, task_type: str | None = None) -> nn.Module:
    """A transformers base loaded through bitsandbytes in ``quant``, on the CPU, in eval mode."""
    from merging.base.layout import auto_classes, build_first

    require_bnb()
    config = bnb_config(quant)

    def load(cls):
        where = str(folder)
        return cls.from_pretrained(where, quantization_config=config, device_map="cpu", dtype=torch.float32)

    try:
        model = build_first(auto_classes(task_type), load)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"{folder}: cannot load the base in {quant} ({first})") from None
    for mod in model.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False  # dequant(W)·x in float32, not the packed bf16 kernel
    return model.eval()


def load_quantized_base(spec: str | Path, quant: str, task_type: str | None = None):
    """(the base in ``quant``, its tokenizer or None): ``layout.load_base`` for a QLoRA-trained base."""
    from transformers import AutoTokenizer

    model = load_quantized(spec, quant, task_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec))
    except (OSError, ValueError, TypeError, RuntimeError):
        tokenizer = None  # verify then runs on seeded token ids
    return model, tokenizer


def load_judged_base(
    spec: str | Path, quant: str | None, task_type: str | None = None, *, device: str = "auto",
    dtype: str = "float32", device_map: str | None = None,
) -> tuple[nn.Module, Any, BaseLayout]:  # fmt: skip
    """The base verify and compare judge on: through bitsandbytes in ``quant`` (``load_quantized_base``),
    else ``load_base`` with ``device``, ``dtype`` and ``device_map``.

    Returns:
        (model, tokenizer or None, its BaseLayout: a quantised base's from its float folder's config).
    """
    from merging.base.layout import BaseLayout
    from merging.base.load import load_base

    if quant:
        model, tokenizer = load_quantized_base(spec, quant, task_type)
        return model, tokenizer, BaseLayout.from_folder(spec, task_type)
    model, tokenizer = load_base(spec, device, dtype, device_map=device_map, task_type=task_type)
    return model, tokenizer, BaseLayout.from_model(model)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The bitsandbytes layers of a model by path (Linear4bit, Linear8bitLt)."""
    return {n: m for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}


def dequantize(module: nn.Module) -> torch.Tensor:
    """A bitsandbytes layer's weight as its forward sees it, float32 (out, in)."""
    import bitsandbytes.functional as F

    w = module.weight
    if type(module).__name__ == "Linear4bit":
        return F.dequantize_4bit(w.data, w.quant_state).float()
    scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB  # moved to state by a forward
    return F.int8_vectorwise_dequant(w.data, scb).float()  # (out, in): CB · SCB / 127


def roundtrip(w: torch.Tensor, quant: str) -> torch.Tensor:
    """``w`` (out, in) quantised as transformers' loader quantises it, then dequantised (float32)."""
    import bitsandbytes.functional as F

    require_bnb()
    w = w.float().contiguous()
    if quant == "int8":
        cb, scb, _ = F.int8_vectorwise_quant(w)
        return F.int8_vectorwise_dequant(cb, scb).float()
    q, state = F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=quant)
    return F.dequantize_4bit(q, state).float()
