"""Target: the base weight a delta applies to (layer kind, stored shape), and the layer kinds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from merging.core.experts import ParamSite
from merging.errors import ShapeMismatch

Layer = Literal["linear", "conv1d", "conv2d", "conv3d", "embedding", "gpt2_conv1d", "unknown"]
CONV_DIMS: dict[str, int] = {"conv1d": 3, "conv2d": 4, "conv3d": 5}  # conv layer kind → weight dims
Side = Literal["in", "out"]

@dataclass(frozen=True)
class Target:
    """The base weight a delta applies to: its layer kind and its shape as stored.

    ``layer="unknown"`` with a 2-D shape means only the matrix form (out, in_flat) is known (for
    example a LoHa read from a file without its base); ``refine`` fills in the stored shape.
    ``site``: the delta acts on one expert of a parameter (PEFT ``target_parameters``), not a module.
    ``beside``: g > 1 for PEFT's LoRA on a conv of g groups: lora_A reads all input channels, so the delta is
    a full conv's (out, in, k...) run beside the grouped layer, not a change of its (out, in/g, k...) weight.
    ``from_factors``: a conv kind and kernel read from LoHa/LoKr factors alone, not from the base: the
    conv's groups (its in channels per group) and a Conv1d kept as a (k, 1) kernel are not known.
    """

    layer: Layer
    shape: tuple[int, ...]
    site: ParamSite | None = None
    from_factors: bool = False
    beside: int = 1  # g > 1: a full conv (out, in, k...) run beside a conv of g groups (PEFT's LoRA on it)

    def __post_init__(self) -> None:
        if self.layer in ("linear", "embedding", "gpt2_conv1d", "unknown") and len(self.shape) != 2:
            raise ShapeMismatch(f"a {self.layer} weight is 2-D, got shape {self.shape}")
        if self.layer in CONV_DIMS and len(self.shape) != CONV_DIMS[self.layer]:
            raise ShapeMismatch(f"a {self.layer} weight has shape (out, in, k...), got {self.shape}")

    @property
    def guessed(self) -> bool:
        """Its layer kind (or a conv's groups) comes from LoHa/LoKr/AdaLoRA factors alone, not the base."""
        return self.layer == "unknown" or self.from_factors

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(out, in_flat) of the algebra's matrix form."""
        if self.layer == "gpt2_conv1d":
            return self.shape[1], self.shape[0]
        return self.shape[0], math.prod(self.shape[1:])

    def to_stored(self, m: torch.Tensor) -> torch.Tensor:
        """Matrix form (out, in_flat) → the base weight's stored layout."""
        if self.layer == "gpt2_conv1d":
            return m.T.contiguous()
        return m.reshape(self.shape)

    def to_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """Stored layout → matrix form (out, in_flat); beside a grouped conv, its grouped weight (out, in/g,
        k...) as the full conv it runs (zero outside each output group's own input channels)."""
        if self.layer == "gpt2_conv1d":
            return w.T
        if self.beside > 1 and tuple(w.shape) != self.shape:
            return ungroup(w, self.beside).reshape(self.matrix_shape)
        return w.reshape(self.matrix_shape)

    def grouped_part(self, m: torch.Tensor) -> torch.Tensor:
        """Beside a conv of g groups: a full matrix (out, in·k) cut to the grouped weight's (out, in/g·k),
        each output group's own input channels (the inverse of ``to_matrix`` on a grouped weight)."""
        g, out = self.beside, self.shape[0]
        cols = m.shape[1] // g
        rows = [m[j * out // g : (j + 1) * out // g, j * cols : (j + 1) * cols] for j in range(g)]
        return torch.cat(rows)

    def refine(self, layer: Layer, shape: tuple[int, ...]) -> Target:
        """This target with the base's real layer kind and stored shape (checked to agree)."""
        if layer == "unknown":  # a base known by its weights only: a 2-D weight of unknown kind
            return self._refine_2d(tuple(shape))
        if self.beside > 1:  # full in channels beside the grouped weight: it keeps its shape
            full = (shape[0], shape[1] * self.beside, *shape[2:])
            if layer != self.layer or self.shape not in (tuple(full), tuple(shape)):
                raise ShapeMismatch(
                    f"a LoRA beside a {self.layer} of {self.beside} groups, {self.shape}; the base is "
                    f"{layer} {shape}"
                )
            return self
        groups = self.guessed and layer in CONV_DIMS  # kept: a weights-only base does not know them either
        new = Target(layer, tuple(shape), self.site, from_factors=groups)
        convs = self.layer in CONV_DIMS and layer in CONV_DIMS  # LoHa/LoKr keep a Conv1d's kernel as (k, 1)
        if self.layer != "unknown" and self.layer != layer and not convs:
            raise ShapeMismatch(f"delta is for a {self.layer} layer, the base module is {layer}")
        if new.matrix_shape != self.matrix_shape:
            raise ShapeMismatch(f"delta has shape {self.matrix_shape}, the base weight {new.matrix_shape}")
        return new

    def _refine_2d(self, shape: tuple[int, ...]) -> Target:
        """Against a 2-D base weight of unknown kind (Linear, Embedding or GPT-2 Conv1D): the delta keeps its
        kind (one of unknown kind becomes a Linear: LoHa/LoKr/AdaLoRA adapt no other 2-D layer)."""
        new = Target("linear" if self.layer == "unknown" else self.layer, self.shape, self.site)
        if new.layer in CONV_DIMS or new.shape != shape:
            raise ShapeMismatch(f"delta is for a {self.layer} weight {self.shape}, the base weight {shape}")
        return new


def ungroup(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight (out, in/g, k...) as the full conv's (out, in, k...) that computes the same:
    output group j reads input channels of group j only."""
    out, per = w.shape[:2]
    full = w.new_zeros(out, per * groups, *w.shape[2:])
    rows = out // groups
    for j in range(groups):
        full[j * rows : (j + 1) * rows, j * per : (j + 1) * per] = w[j * rows : (j + 1) * rows]
    return full
