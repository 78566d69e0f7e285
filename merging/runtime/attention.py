"""An nn.MultiheadAttention with deltas stacked on it, as PEFT's LoRA on it runs: on W + ΔW.

PEFT adapts an nn.MultiheadAttention as one layer (peft/tuners/lora/layer.py, ``MultiheadAttention``): a LoRA
on its ``in_proj_weight`` (3E, E) and one on ``out_proj`` (E, E), which the attention reads as parameters,
not through their modules' forwards; so PEFT merges both into the weights for each forward and unmerges
after. (PEFT 0.21.2 adds out_proj's delta twice there, huggingface/peft#3774; this is W + ΔW, as its fix.)
Here the stacked effective weights (``runtime.effective``) are computed once and the attention's own forward
runs on them (``torch.func.functional_call``): its parameters are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from merging.core.deltas import Delta
from merging.runtime.effective import effective_weight

Stack = Sequence[tuple[Delta, float]]


class StackedAttention(nn.Module):
    """An nn.MultiheadAttention run on its in_proj and out_proj weights (and biases) as stacked."""

    def __init__(self, base: nn.MultiheadAttention, in_proj: Stack, out_proj: Stack) -> None:
        super().__init__()
        self.base = base
        self.params: dict[str, torch.Tensor] = {}
        halves = (("in_proj_weight", "in_proj_bias", in_proj), ("out_proj.weight", "out_proj.bias", out_proj))
        for weight, bias, stack in halves:
            if not stack:
                continue
            w, b = base.get_parameter(weight).detach(), _maybe(base, bias)
            new_w, new_b = effective_weight(stack, w, b, "linear")
            self.params[weight] = new_w.to(w.dtype)
            if new_b is not None:
                self.params[bias] = new_b.to(w.dtype)

    @property
    def batch_first(self) -> bool:
        """The attention's, for models that read it off the module."""
        return self.base.batch_first

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.base, self.params, args, kwargs)


def _maybe(module: nn.Module, name: str) -> torch.Tensor | None:
    """A parameter of the module by its dotted name, detached, or None when the module has none."""
    try:
        p = module.get_parameter(name)
    except AttributeError:
        return None
    return None if p is None else p.detach()
