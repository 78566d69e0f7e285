"""Several candidates' adapters stacked on one model at once, each on its own equal slice of the batch.

Why: a greedy decoding step of a small batch reads every weight of the model from memory and does little
arithmetic with it, so decoding C candidates one after the other costs C passes over the weights. Here
rows [c·n, (c+1)·n) of a batch of C·n see candidate c's deltas stacked as ``runtime.stacked`` does
(factored, B(A x), innermost first), and one pass over the model serves every candidate: each adapted
module runs the C groups of rows one after the other while its base weight is still in the cache. The
layers between the adapted modules (attention, norms) run on the whole batch, as they would on each slice.
(Running the base layer once on the whole batch, each group's ops around it, measured no faster on the
bundled example's verify: 0.99-1.06x; what remains there is compute-bound.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from merging.core.adapter import Pair, common_invocation, stacks
from merging.errors import UnsupportedError
from merging.runtime.stacked import active_aux, layer_paths, stacked_layer, swapped


class GroupedLayer(nn.Module):
    """One module as each group sees it: group c's rows (an equal slice of the batch) go through layers[c].

    A layer that takes one input (Linear, conv, Embedding) has its batch on dim 0. An nn.MultiheadAttention
    (``attention``) gets each group's slice of query, key and value (batch on dim 0 if ``batch_first``, else
    dim 1), of key_padding_mask (N, S) and of a per-row attn_mask (N·heads, L, S); a shared (L, S) mask goes
    to every group whole.
    """

    attention: nn.MultiheadAttention | None

    def __init__(self, layers: Sequence[nn.Module], attention: nn.MultiheadAttention | None = None) -> None:
        super().__init__()
        self.groups = list(layers)  # a plain list: the shared base would be registered once per group
        object.__setattr__(self, "attention", attention)  # not registered: the model holds it already

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for parents that read their child's ``.weight``."""
        first = self.groups[0]
        return getattr(first, "base", first).weight

    @property
    def batch_first(self) -> bool:
        """An nn.MultiheadAttention's, for models that read it off their attention module."""
        if self.attention is None:
            raise AttributeError("batch_first")
        return self.attention.batch_first

    def forward(self, *args, **kwargs):
        n = len(self.groups)
        if self.attention is not None:
            calls, dim = attention_parts(self.attention, n, args, kwargs)
            outs = [layer(*a, **k) for layer, (a, k) in zip(self.groups, calls, strict=True)]
            weights = [w for _, w in outs]
            return torch.cat([o for o, _ in outs], dim), None if weights[0] is None else torch.cat(weights)
        x, *rest = args
        if any(torch.is_tensor(v) for v in (*rest, *kwargs.values())):
            what = type(self.groups[0]).__name__
            raise UnsupportedError(f"a {what} given tensors besides its input: run candidates one at a time")
        parts = zip(self.groups, _chunks(x, n, 0), strict=True)
        return torch.cat([layer(part, *rest, **kwargs) for layer, part in parts])


MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
            "is_causal")  # nn.MultiheadAttention.forward's, in order


def attention_parts(
    mha: nn.MultiheadAttention, n: int, args: tuple, kwargs: dict
) -> tuple[list[tuple[tuple, dict]], int]:
    """An nn.MultiheadAttention call's arguments cut into n groups' (args, kwargs), and the batch dim."""
    named = dict(zip(MHA_ARGS[: len(args)], args, strict=True)) | kwargs  # positional as named: cut by name
    query = named["query"]
    if query.dim() != 3:
        shape = tuple(query.shape)
        raise UnsupportedError(f"nn.MultiheadAttention on an unbatched {shape}: run candidates one at a time")
    dim = 0 if mha.batch_first else 1
    cut: dict[int, list[torch.Tensor]] = {}  # one cut per tensor: query is key is value stays so in a group
    for name in ("query", "key", "value"):
        cut.setdefault(id(named[name]), _chunks(named[name], n, dim))
    for name, d in (("key_padding_mask", 0), ("attn_mask", 0)):
        t = named.get(name)
        if t is not None and (name == "key_padding_mask" or t.dim() == 3):  # (N, S); (N·heads, L, S)
            cut.setdefault(id(t), _chunks(t, n, d))
    parts = [{k: cut[id(v)][c] if id(v) in cut else v for k, v in named.items()} for c in range(n)]
    return [((), p) for p in parts], dim


def _chunks(x: torch.Tensor, n: int, dim: int) -> list[torch.Tensor]:
    """x cut into n equal slices along dim, refused in one line when its size there does not split."""
    if x.shape[dim] % n:
        raise UnsupportedError(f"a batch of {x.shape[dim]} rows does not split into {n} equal groups")
    return list(x.chunk(n, dim))


@contextmanager
def grouped(model: nn.Module, groups: Sequence[Sequence[Pair]]) -> Iterator[nn.Module]:
    """Each group's (adapter, weight) pairs stacked on its own equal slice of the batch, restored on exit.

    Args:
        model: a torch model whose module paths the adapters name.
        groups: one list of pairs per group, in stacking order; a batch given to the model must have a
            multiple of ``len(groups)`` rows, group c taking the c-th slice.

    Yields:
        The same model, with grouped wrapper modules in place.
    """
    if any(common_invocation([ad for ad, _ in pairs]) is not None for pairs in groups):
        raise UnsupportedError("aLoRA inputs gate on their invocation tokens: run them one at a time")
    plans = [stacks(pairs) for pairs in groups]
    auxes = [active_aux(model, plan) for plan in plans]
    each = list(zip(plans, auxes, strict=True))
    modules = layer_paths([m for plan, aux in each for m in (*plan.modules, *aux)])
    layers = {m: GroupedLayer([stacked_layer(model, m, plan, aux) for plan, aux in each], _mha(model, m))
              for m in modules}  # fmt: skip
    with swapped(model, layers):
        yield model


def _mha(model: nn.Module, mod: str) -> nn.MultiheadAttention | None:
    """The module if it is an nn.MultiheadAttention (its inputs are cut by name), else None."""
    m = model.get_submodule(mod)
    return m if isinstance(m, nn.MultiheadAttention) else None
