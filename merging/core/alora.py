"""aLoRA (PEFT ``alora_invocation_tokens``): an adapter that acts from the last occurrence of its invocation
tokens on, and so can never be folded into weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from merging.errors import UnsupportedError

if TYPE_CHECKING:
    from merging.core.adapter import Pair


def invocation_mask(ids: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """aLoRA: the positions from the last occurrence of the invocation tokens on, per row (PEFT's rule).

    Args:
        ids: token ids (B, T).
        tokens: the invocation sequence.

    Returns:
        A bool mask (B, T); all False in a row without the sequence.
    """
    inv = torch.tensor(list(tokens), device=ids.device)
    n, (rows, t) = len(inv), ids.shape
    if t < n:
        return torch.zeros(rows, t, dtype=torch.bool, device=ids.device)
    hits = (ids.unfold(1, n, 1) == inv).all(-1)  # (B, T-n+1): the sequence starts here
    pos = torch.arange(hits.shape[1], device=ids.device)
    start = torch.where(hits, pos, -1).amax(-1, keepdim=True)  # (B, 1): the last start, -1 if none
    return (torch.arange(t, device=ids.device)[None, :] >= start) & (start >= 0)


class Gate:
    """aLoRA gating for one stacked forward: the mask of the current input ids, kept across generation
    steps (a cached step only sees its new token, which follows the prompt's invocation)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens, self.mask, self.found = tuple(tokens), None, None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise UnsupportedError("an aLoRA needs input_ids to find its invocation tokens")
        cache = kwargs.get("past_key_values")
        if self.found is not None and cache is not None and cache.get_seq_length() > 0:
            self.mask = self.found[:, None].expand(ids.shape)
            return
        self.mask = invocation_mask(ids, self.tokens)
        self.found = self.mask.any(-1)


def refuse_gated(pairs: Sequence[Pair]) -> None:
    """An aLoRA acts only from its invocation tokens on: no weight reproduces it."""
    if gated := [ad.where for ad, _ in pairs if ad.invocation is not None]:
        raise UnsupportedError(f"{gated[0]}: an aLoRA acts only after its invocation tokens; cannot fold it")
