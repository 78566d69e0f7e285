"""Deltas on parameters (MoE experts, PEFT ``target_parameters``) on a live model: stacked and folded.

PEFT's ``ParamWrapper`` runs the module with its parameter replaced by W + ΔW (a torch parametrization);
stacking does the same here: every expert's stacked deltas summed into one ΔW of the parameter's shape,
the parametrization removed on exit. Folding adds ΔW into the parameter in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from merging.core import experts
from merging.core.adapter import Stack, Stacks
from merging.core.deltas import AdditiveDelta, Target
from merging.errors import ShapeMismatch, UnsupportedError
from merging.runtime.effective import effective_weight


class _Added(nn.Module):
    """A parametrization: the parameter plus a fixed ΔW (the stacked experts' deltas)."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("delta", delta, persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta.to(w.dtype)


def _param(model: nn.Module, module: str, param: str) -> tuple[nn.Module, torch.Tensor]:
    """The module and its (unparametrized) parameter named by a parameter key."""
    try:
        mod = model.get_submodule(module)
    except AttributeError:
        raise ShapeMismatch(f"module {module} is not in the model") from None
    p = getattr(mod, param, None)
    if not isinstance(p, torch.Tensor):
        raise ShapeMismatch(f"module {module} has no parameter {param}")
    return mod, p


def _expert_delta(key: str, stack: Stack, mod: nn.Module, p: torch.Tensor) -> torch.Tensor:
    """Σ weight·ΔW of one expert's stack, in the stored layout of ``p[expert]`` (float32)."""
    expert = experts.split(key)[2]

    if (expert is None) != (p.dim() == 2) or expert is not None and expert >= p.shape[0]:
        raise ShapeMismatch(f"{key}: the base parameter has shape {tuple(p.shape)}")
    if bad := [type(d).__name__ for d, _ in stack if not isinstance(d, AdditiveDelta)]:
        raise UnsupportedError(f"{key}: a {bad[0]} on a parameter has no PEFT meaning")
    kind, shape = experts.stored_kind(mod, p)
    want = Target(kind, shape).matrix_shape  # (out, in)
    if got := [d.target.matrix_shape for d, _ in stack if d.target.matrix_shape != want]:
        raise ShapeMismatch(f"{key}: delta of shape {got[0]}, the expert's weight is {want}")
    zero = torch.zeros(shape, dtype=torch.float32, device=p.device)
    delta, _ = effective_weight(stack, zero, None, kind, inplace=True)
    return delta


def param_groups(plan: Stacks) -> dict[tuple[str, str], list[str]]:
    """(module, parameter) → the plan's keys on it."""
    out: dict[tuple[str, str], list[str]] = {}
    for k in plan.deltas:
        if experts.is_param_key(k):
            module, param, _ = experts.split(k)
            out.setdefault((module, param), []).append(k)
    return out


def full_delta(model: nn.Module, plan: Stacks, module: str, param: str, keys: list[str]) -> torch.Tensor:
    """ΔW of a whole parameter (its shape, float32): every expert's stacked deltas, zero elsewhere."""
    mod, p = _param(model, module, param)
    total = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    for k in keys:
        expert = experts.split(k)[2]
        d = _expert_delta(k, plan.deltas[k], mod, p)
        if expert is None:
            total += d
        else:
            total[expert] += d
    return total


@contextmanager
def activated(model: nn.Module, plan: Stacks) -> Iterator[nn.Module]:
    """The plan's parameter deltas active on the model (W + ΔW as a parametrization), removed on exit."""
    done: list[tuple[nn.Module, str]] = []
    try:
        for (module, param), keys in sorted(param_groups(plan).items()):
            delta = full_delta(model, plan, module, param, keys)
            mod = model.get_submodule(module)
            parametrize.register_parametrization(mod, param, _Added(delta))
            done.append((mod, param))
        yield model
    finally:
        for mod, param in reversed(done):
            parametrize.remove_parametrizations(mod, param, leave_parametrized=False)


def fold(model: nn.Module, plan: Stacks, saved: dict[str, torch.Tensor] | None) -> None:
    """Add the plan's parameter deltas into the parameters in place, expert by expert (one expert's ΔW in
    float32 at a time, never the whole parameter's); each parameter saved into ``saved`` first (None: a
    bake, which keeps no undo)."""
    with torch.no_grad():
        for (module, param), keys in sorted(param_groups(plan).items()):
            mod, p = _param(model, module, param)
            if saved is not None:
                saved.setdefault(f"{module}.{param}", p.detach().clone())
            for k in keys:
                expert = experts.split(k)[2]
                delta = _expert_delta(k, plan.deltas[k], mod, p)
                w = p if expert is None else p[expert]  # a view: written in place
                w.copy_((w.float() + delta).to(p.dtype))
