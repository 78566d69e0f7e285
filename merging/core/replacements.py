"""What an adapter replaces besides its deltas: whole modules, embedding rows, base-layer tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from merging.errors import ShapeMismatch


@dataclass(frozen=True, eq=False)
class ModuleReplacement:
    """A module replaced wholesale (PEFT ``modules_to_save``): its new tensors by name (weight, bias)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class TokenRows:
    """Embedding rows replaced (PEFT ``trainable_token_indices``): rows[i] is the new row of indices[i]."""

    indices: tuple[int, ...]
    rows: torch.Tensor  # (k, dim)

    def __post_init__(self) -> None:
        if self.rows.dim() != 2 or self.rows.shape[0] != len(self.indices):
            n, shape = len(self.indices), tuple(self.rows.shape)
            raise ShapeMismatch(f"{n} token indices but rows of shape {shape}")


@dataclass(frozen=True, eq=False)
class BaseTensors:
    """The base layer's own tensors as the adapter saved them; they replace the base's.

    PEFT saves them with ``bias="all"`` / ``"lora_only"`` (trained biases, as ``<module>.base_layer.bias``
    or ``<module>.bias``) and with ``save_embedding_layers`` (``<module>.base_layer.weight``). Unlike a
    ``ModuleReplacement`` the module may carry deltas too; they act on top of these tensors.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


Auxiliary = ModuleReplacement | TokenRows | BaseTensors
