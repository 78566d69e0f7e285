"""Adapters folded into a live model's weights: the weight a stack amounts to, ``merge_into`` with its
bit-for-bit ``Undo`` (``fold_into`` without, for a bake), and ``evaluated`` (folded where that is
equivalent to stacking, else stacked).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from merging.base.tied_weights import differing
from merging.core import dora
from merging.core.adapter import Pair, Stacks, layer_kind, stacks
from merging.core.alora import refuse_gated
from merging.core.experts import is_param_key
from merging.errors import UnsupportedError
from merging.runtime import params
from merging.runtime.effective import effective_weight
from merging.runtime.stacked import stacked, with_auxiliary


class Undo:
    """Restores the tensors ``merge_into`` changed, bit for bit."""

    def __init__(self, model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        self.model, self.saved = model, saved

    def __call__(self) -> None:
        with torch.no_grad():
            for name, value in self.saved.items():
                self.model.get_parameter(name).copy_(value)


def merge_into(model: nn.Module, pairs: Sequence[Pair]) -> Undo:
    """Fold (Adapter, weight) pairs into the model's weights in place (stacked semantics); return an undo.

    Tied weights shared by two modules receive each module's delta once (as a shared tensor would);
    modules sharing a weight that the adapters change differently (a LoRA on a tied embedding: PEFT
    changes the input side only) are refused, since one tensor cannot hold both.
    """
    plan = _plan(model, pairs)
    saved: dict[str, torch.Tensor] = {}
    try:
        _fold(model, plan, saved)
    except BaseException:  # a refusal half-way leaves the model as it was
        Undo(model, saved)()
        raise
    return Undo(model, saved)


def fold_into(model: nn.Module, pairs: Sequence[Pair]) -> None:
    """``merge_into`` for a model that is written and dropped (a bake): no undo, so no copy of what it
    changes is kept (the experts fold one at a time); a refusal half-way leaves the model half-folded."""
    _fold(model, _plan(model, pairs), None)


def _plan(model: nn.Module, pairs: Sequence[Pair]) -> Stacks:
    """The pairs' stacks, once the refusals both folds share are passed (an aLoRA gate, a tie split)."""
    refuse_gated(pairs)
    plan = stacks(pairs)
    if split := differing(model, plan):
        a, b = split[0]
        raise UnsupportedError(
            f"modules {a} and {b} share one weight that the adapters change differently; bake unties them"
        )
    return plan


def _fold(model: nn.Module, plan: Stacks, saved: dict[str, torch.Tensor] | None) -> None:
    """The folds' loop: each module's stack folded in place, its tensors saved into ``saved`` first (None:
    nothing kept)."""
    seen: set[int] = set()
    with torch.no_grad():
        params.fold(model, plan, saved)  # deltas on parameters (MoE experts)
        for mod in plan.modules:
            if is_param_key(mod):
                continue
            m = model.get_submodule(mod)
            kind = layer_kind(m)
            if id(m.weight) in seen:  # a tied weight already got this delta
                continue
            seen.add(id(m.weight))
            dora.check(mod, plan.deltas.get(mod, []))
            for pname in ("weight", "bias"):
                p = getattr(m, pname, None)
                if p is not None and saved is not None:
                    saved.setdefault(f"{mod}.{pname}", p.detach().clone())
            if mod in plan.aux:
                m.load_state_dict(with_auxiliary(m, plan.aux[mod], mod).state_dict())
            w, b = effective_weight(
                plan.deltas.get(mod, []), m.weight, m.bias if hasattr(m, "bias") else None, kind
            )
            m.weight.copy_(w.to(m.weight.dtype))
            if b is not None:
                if getattr(m, "bias", None) is None:
                    raise UnsupportedError(f"module {mod} has no bias to fold a LoRA bias into")
                m.bias.copy_(b.to(m.bias.dtype))


FOLDED = "merging.runtime folded into the weights"


def _foldable(model: nn.Module, plan: Stacks) -> bool:
    """Whether folding is evaluated as stacking is: float32 weights, no replaced modules or token rows."""
    if plan.aux:
        return False
    try:
        return all(model.get_submodule(mod).weight.dtype == torch.float32 for mod in plan.modules)
    except AttributeError:
        return False


@contextmanager
def evaluated(model: nn.Module, pairs: Sequence[Pair]) -> Iterator[str]:
    """Pairs active on the model: folded into its float32 weights (``merge_into``, undone bit for bit on
    exit) where that is equivalent to stacking them, else stacked (``stacked``).

    Folding changes float32 rounding only (W + ΔW summed once instead of Wx + B(Ax) per call), and runs
    the model's own layers: one forward costs what the base costs. Lower precisions stay stacked.

    Yields:
        How they were applied: FOLDED or "merging.runtime" (stacked).
    """
    undo = None
    if _foldable(model, stacks(pairs)):
        try:
            undo = merge_into(model, pairs)
        except UnsupportedError:  # e.g. a tied weight changed two ways, an aLoRA gate: stacking handles it
            undo = None
    if undo is None:
        with stacked(model, pairs):
            yield "merging.runtime"
        return
    try:
        yield FOLDED
    finally:
        undo()
