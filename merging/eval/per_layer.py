"""Per-layer weights: an adapter cut into one adapter per layer, and the learned weights as merge inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from merging.core.adapter import Adapter, Pair, layer_of, weighted


def layers(adapters: Sequence[Adapter]) -> list[str]:
    """Every layer the inputs touch, sorted."""
    return sorted({layer_of(m) for ad in adapters for m in ad.deltas})


@dataclass(frozen=True)
class Weights:
    """Learned weights: one per input; with per-layer weights, one per input for each layer too."""

    inputs: tuple[float, ...]
    layers: dict[str, tuple[float, ...]] = field(default_factory=dict)  # layer → one weight per input


def to_weights(w: torch.Tensor, group_names: Sequence[str]) -> Weights:
    """The weights ``w`` (per input, or per layer × input) rounded to 4 decimals, per-input means too."""
    rounded = [[round(float(v), 4) for v in row] for row in (w if w.dim() == 2 else w[None])]
    if not group_names:
        return Weights(tuple(rounded[0]))
    per_input = tuple(round(sum(col) / len(col), 4) for col in zip(*rounded, strict=True))
    return Weights(per_input, {g: tuple(row) for g, row in zip(group_names, rounded, strict=True)})


def merge_inputs(adapters: Sequence[Adapter], weights: Weights) -> tuple[list[Pair], dict | None]:
    """What to pass ``merge.merge`` for learned weights: the pairs and the per-layer weights (or None)."""
    return weighted(adapters, weights.inputs), (dict(weights.layers) or None)


def by_layer(adapter: Adapter) -> dict[str, Adapter]:
    """The adapter cut into one adapter per layer (stacking each keeps every module's order and meaning)."""
    groups: dict[str, dict] = {}
    for mod, d in adapter.deltas.items():
        groups.setdefault(layer_of(mod), {})[mod] = d
    out = {}
    for i, (layer, deltas) in enumerate(sorted(groups.items())):
        tied = {m: s for m, s in adapter.tied.items() if s in deltas}
        aux = adapter.aux if i == 0 else {}
        out[layer] = Adapter(adapter.name, deltas, adapter.base_model, adapter.revision, aux, tied,
                             adapter.source, adapter.config)  # fmt: skip
    return out


def layer_pairs(
    adapters: Sequence[Adapter], weight: Callable[[int, str], float | torch.Tensor]
) -> list[Pair]:
    """(per-layer adapter, weight) pairs in stacking order, weight(input index, layer) each."""
    return [(sub, weight(i, layer)) for i, ad in enumerate(adapters) for layer, sub in by_layer(ad).items()]


def pairs_for(adapters: Sequence[Adapter], w: torch.Tensor, group_names: Sequence[str]) -> list[Pair]:
    """The stacked pairs that weights ``w`` (per input, or per layer × input) mean."""
    if not group_names:
        return list(zip(adapters, w, strict=True))
    index = {g: i for i, g in enumerate(group_names)}
    return layer_pairs(adapters, lambda i, layer: w[index[layer], i])
