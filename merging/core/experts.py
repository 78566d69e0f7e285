"""LoRA on parameters (PEFT ``target_parameters``): MoE experts stored as one 3-D tensor, one delta each.

transformers 5 stores the experts of Mixtral, Qwen3-MoE, gpt-oss... as parameters of shape
(E, out, in) (``is_transposed``: (E, in, out)) on one module. PEFT's ``ParamWrapper`` adapts such a
parameter with lora_A (E·r, in) and lora_B (out, r·E); expert e's delta is

    ΔW_e = scale · B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e]      # (out, in)

We keep one delta per expert, under the key ``module:param.e`` (``module:param`` for a 2-D parameter),
so every strategy works expert by expert. The delta's ``Target.site`` records the parameter, the expert
and the nesting: several parameters of one module are nested wrappers, the first defined innermost
(``module.base_layer...lora_A``), so the order is the base's parameter definition order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.errors import ShapeMismatch

SEP = ":"  # module:param — a module path never holds one


@dataclass(frozen=True)
class ParamSite:
    """Where a delta on a parameter acts: ``param`` of its module, expert ``expert`` of ``experts``.

    ``nesting`` is the module's targeted parameters in the base's definition order (PEFT nests them so,
    the first innermost); ``expert`` is None for a 2-D parameter (``experts`` 1).
    """

    param: str
    expert: int | None
    experts: int
    nesting: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.param not in self.nesting:
            raise ShapeMismatch(f"parameter {self.param} is not in its module's nesting {self.nesting}")
        if self.expert is not None and not 0 <= self.expert < self.experts:
            raise ShapeMismatch(f"expert {self.expert} of a parameter with {self.experts} experts")

    @property
    def depth(self) -> int:
        """How many ``base_layer.`` levels PEFT's file puts before this parameter's tensors."""
        return len(self.nesting) - 1 - self.nesting.index(self.param)


def key(module: str, param: str, expert: int | None) -> str:
    """The adapter key of one expert (or a 2-D parameter): ``module:param.e`` (``module:param``)."""
    return f"{module}{SEP}{param}" if expert is None else f"{module}{SEP}{param}.{expert}"


def is_param_key(name: str) -> bool:
    return SEP in name


def split(name: str) -> tuple[str, str, int | None]:
    """``module:param.e`` → (module, param, e); ``module:param`` → (module, param, None)."""
    module, _, rest = name.partition(SEP)
    param, _, expert = rest.partition(".")
    return module, param, int(expert) if expert else None


def transposed(module: torch.nn.Module) -> bool:
    """Whether a module stores its experts as (E, in, out) (transformers' ``is_transposed``, gpt-oss)."""
    return bool(getattr(module, "is_transposed", False))


def stored_kind(module: torch.nn.Module, param: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    """(layer kind, stored shape) of one expert's matrix: (out, in) as "linear", (in, out) as
    "gpt2_conv1d" (stores Wᵀ) for a transposed 3-D parameter."""
    shape = tuple(param.shape[-2:])
    return ("gpt2_conv1d" if param.dim() == 3 and transposed(module) else "linear"), shape


def param_shapes(model: torch.nn.Module, keys: Sequence[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key → (layer kind, stored shape of one expert) for the parameter keys among ``keys``."""
    out = {}
    for k in keys:
        if not is_param_key(k):
            continue
        module, param, expert = split(k)
        try:
            mod = model.get_submodule(module)
        except AttributeError:
            continue
        p = getattr(mod, param, None)
        if isinstance(p, torch.Tensor) and p.dim() == (2 if expert is None else 3):
            if expert is None or expert < p.shape[0]:
                out[k] = stored_kind(mod, p)
    return out
