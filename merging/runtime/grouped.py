"""Several candidates' adapters stacked on one model at once, each on its own equal slice of the batch.

Why: a greedy decoding step of a small batch reads every weight of the model from memory and does little
arithmetic with it, so decoding C candidates one after the other costs C passes over the weights. Here
each adapted module runs the C groups of rows one after the other while its base weight is still in the
cache: rows [c·n, (c+1)·n) of a batch of C·n see candidate c's deltas stacked as ``runtime.stacked`` does
(factored, B(A x), innermost first), and one pass over the model serves every candidate. The layers
between the adapted modules (attention, norms) run on the whole batch, as they would on each slice.
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
    """One module as each group sees it: group c's rows (an equal slice of the batch) go through layers[c]."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.groups = list(layers)  # a plain list: the shared base would be registered once per group

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for parents that read their child's ``.weight``."""
        first = self.groups[0]
        return getattr(first, "base", first).weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        n = len(self.groups)
        if x.shape[0] % n:
            raise UnsupportedError(f"a batch of {x.shape[0]} rows does not split into {n} equal groups")
        parts = zip(self.groups, x.chunk(n), strict=True)
        return torch.cat([layer(part, *args, **kwargs) for layer, part in parts])


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
    layers = {m: GroupedLayer([stacked_layer(model, m, plan, aux) for plan, aux in each]) for m in modules}
    with swapped(model, layers):
        yield model
