"""A merge's auxiliary parts: tied modules, modules_to_save, token rows, saved base tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from merging.core.adapter import Adapter, combine_aux
from merging.core.replacements import Auxiliary, BaseTensors, ModuleReplacement, TokenRows
from merging.errors import IncompatibleAdapters, MergingError, UnsupportedError

BaseWeights = Callable[[str], torch.Tensor]  # module path → its base weight (stored layout)


def merge_tied(adapters: Sequence[Adapter]) -> dict[str, str]:
    """Union of the inputs' tied modules; tied in one input and adapted alone in another is an error."""
    tied: dict[str, str] = {}
    for ad in adapters:
        for mod, src in ad.tied.items():
            if tied.setdefault(mod, src) != src:
                raise IncompatibleAdapters(
                    f"{mod} is tied to {tied[mod]} in one input and to {src} in {ad.where}"
                )
    for ad in adapters:
        for mod in tied:
            if mod in ad.deltas:
                raise IncompatibleAdapters(
                    f"{mod} is tied to {tied[mod]} in one input but has its own delta in {ad.where}"
                )
    return tied


def merge_aux(
    adapters: Sequence[Adapter], how: str, base_weights: BaseWeights | None, adapted: set[str]
) -> dict[str, Auxiliary]:
    """Carry auxiliary modules over; overlapping ones are an error unless summed as deltas (how="sum")."""
    if how not in ("error", "sum"):
        raise MergingError(f"`aux` must be error or sum, got {how!r}")
    by_module: dict[str, list[tuple[Adapter, Auxiliary]]] = {}
    for ad in adapters:
        for mod, a in ad.aux.items():
            by_module.setdefault(mod, []).append((ad, a))
    out: dict[str, Auxiliary] = {}
    for mod, items in by_module.items():
        if mod in adapted and any(isinstance(a, ModuleReplacement) for _, a in items):
            raise IncompatibleAdapters(
                f"module {mod} is replaced by modules_to_save and also adapted by a delta"
            )
        try:
            out[mod] = combine_aux(mod, items)
        except IncompatibleAdapters as e:
            if how != "sum" or len({type(a) for _, a in items}) > 1:
                raise IncompatibleAdapters(f"{e}; pass `aux`=sum to add them as deltas") from None
            if base_weights is None:
                raise MergingError(f"`aux`=sum needs `base_weights` for module {mod}") from None
            out[mod] = sum_aux(mod, [a for _, a in items], base_weights)
    return out


def sum_aux(mod: str, items: list, base_weights: BaseWeights) -> ModuleReplacement | TokenRows:
    if isinstance(items[0], BaseTensors):
        raise UnsupportedError(f"`aux`=sum cannot add saved base tensors (trained biases) of module {mod}")
    base = base_weights(mod).float()
    if isinstance(items[0], TokenRows):
        idx = sorted({i for a in items for i in a.indices})
        rows = base[idx].clone()
        pos = {i: k for k, i in enumerate(idx)}
        for a in items:
            for j, i in enumerate(a.indices):
                rows[pos[i]] += a.rows[j].float() - base[i]
        return TokenRows(tuple(idx), rows.to(items[0].rows.dtype))
    tensors = {}
    for key in items[0].tensors:
        if key != "weight":
            raise UnsupportedError(f"`aux`=sum handles module weights; {mod}.{key} has no base value here")
        tensors[key] = (base + sum(a.tensors[key].float() - base for a in items)).to(
            items[0].tensors[key].dtype
        )
    return ModuleReplacement(tensors)
