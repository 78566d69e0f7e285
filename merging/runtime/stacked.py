"""Adapters on a live torch model: stacked active (the ground truth), and folded into the weights.

Stacked-active follows PEFT's base layer pattern, innermost first: an additive delta gives
y = inner(x) + Δ(x); an IA³ vector with side=out gives y = l ⊙ inner(x), with side=in y = inner(l ⊙ x).
A LyCORIS IA³ (``AddedScale``) adds (w ⊙ W) x, W the original base weight, as LyCORIS networks do.
Deltas are applied in factored form, B(A x). ``stacked`` swaps wrapper modules in and restores the
originals on exit; no parameter of the model is touched.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from merging.base.tied_weights import differing
from merging.core import dora
from merging.core.adapter import Pair, Stacks, common_invocation, layer_kind, stacks
from merging.core.alora import Gate, refuse_gated
from merging.core.deltas import (
    AdditiveDelta,
    Delta,
    Dense,
    Layer,
    LowRank,
    ModuleReplacement,
    Scale,
    Target,
)
from merging.core.experts import is_param_key
from merging.core.lycoris_ia3 import AddedScale
from merging.core.replacements import Auxiliary, BaseTensors, TokenRows
from merging.errors import ShapeMismatch, UnsupportedError
from merging.runtime import params


@dataclass(frozen=True, eq=False)
class _Op:
    """One stacked delta prepared for a layer: factors (or a dense matrix) on the layer's device."""

    kind: str  # "add", "scale" or "dora"
    weight: float
    b: torch.Tensor | None = None  # (out, r)
    a: torch.Tensor | None = None  # (r, in_flat)
    d: torch.Tensor | None = None  # dense (out, in_flat) for Dense deltas
    scale: float = 1.0
    bias: torch.Tensor | None = None
    l: torch.Tensor | None = None
    side: str = "out"


def _prepare(delta: Delta, weight: float, ref: torch.Tensor, kind: Layer) -> _Op:
    dev, dt = ref.device, ref.dtype
    if isinstance(delta, AddedScale):  # LyCORIS IA³: the original base weight, scaled per channel
        delta = delta.resolve(ref.detach(), kind)
    if isinstance(delta, Scale):
        return _Op("scale", weight, l=(delta.l.double() ** weight).to(dev, dt), side=delta.side)
    if dora.is_dora(delta):  # s from the base weight alone, as PEFT's DoRA layer computes it
        if weight != 1.0:
            raise UnsupportedError(f"a DoRA input has no stacked meaning at weight {weight:g}")
        s = dora.magnitude_scale(delta, delta.target.to_matrix(ref.detach().float()))
        return _Op(
            "dora", 1.0, b=delta.b.to(dev, dt), a=delta.a.to(dev, dt), scale=delta.scale, l=s.to(dev, dt)
        )  # fmt: skip
    if isinstance(delta, Dense):
        bias = None if delta.bias is None else (weight * delta.scale * delta.bias.float()).to(dev, dt)
        return _Op("add", weight, d=delta.dense().to(dev, dt), scale=weight, bias=bias)
    lr = delta.low_rank()
    bias = None if getattr(lr, "bias", None) is None else (weight * lr.scale * lr.bias.float()).to(dev, dt)
    return _Op("add", weight, b=lr.b.to(dev, dt), a=lr.a.to(dev, dt), scale=weight * lr.scale, bias=bias)


class StackedLayer(nn.Module):
    """A base module with deltas stacked on top, innermost first (gated by an aLoRA's mask if any)."""

    def __init__(self, base: nn.Module, kind: Layer, ops: list[_Op], gate: Gate | None = None) -> None:
        super().__init__()
        self.base = base
        self.kind = kind
        self.ops = ops
        self.gate = gate
        if kind in ("conv1d", "conv2d") and base.groups != 1:
            raise UnsupportedError(f"grouped convolutions (groups={base.groups}) are not supported")

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for parents that read their child's ``.weight`` (T5 reads ``wo.weight.dtype``)."""
        return self.base.weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._run(len(self.ops), x, args, kwargs)

    def _run(self, k: int, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        if k == 0:
            return self.base(x, *args, **kwargs)
        op = self.ops[k - 1]
        if op.kind == "scale":
            if op.side == "in":
                return self._run(k - 1, x * self._channel(op.l, x), args, kwargs)
            y = self._run(k - 1, x, args, kwargs)
            return y * self._channel(op.l, y)
        if op.kind == "dora":
            return self._dora(op, x, self._run(k - 1, x, args, kwargs))
        delta = self._delta(op, x)
        if self.gate is not None:
            delta = delta * self.gate.mask[..., None].to(delta.dtype)
        return self._run(k - 1, x, args, kwargs) + delta

    def _dora(self, op: _Op, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA on the running result y: s·(y − bias) + bias + s·ΔW x (an embedding: s·y + s·ΔW[x])."""
        s = self._channel(op.l, y)
        bias = getattr(self.base, "bias", None) if self.kind != "embedding" else None
        if bias is None:
            return s * (y + self._delta(op, x))
        b = self._channel(bias, y)
        return s * (y - b + self._delta(op, x)) + b

    def _channel(self, l: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """l shaped to broadcast over the channel dimension of t."""
        if self.kind == "conv2d":
            return l.view(1, -1, 1, 1)
        if self.kind == "conv1d":
            return l.view(1, -1, 1)
        return l

    def _delta(self, op: _Op, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if self.kind == "embedding":  # a scaled embedding (Gemma) scales the adapter's rows too, as PEFT does
            y = F.embedding(x, op.d) if op.d is not None else F.embedding(x, op.b) @ op.a
            return op.scale * y * embed_scale(base, y.dtype)
        if self.kind in ("conv1d", "conv2d"):
            conv = F.conv2d if self.kind == "conv2d" else F.conv1d
            w_shape = base.weight.shape
            if op.d is not None:
                y = op.scale * conv(x, op.d.reshape(w_shape), None, base.stride, base.padding, base.dilation)
                return y if op.bias is None else y + self._channel(op.bias, y)
            a = op.a.reshape(op.a.shape[0], *w_shape[1:])  # (r, in, k...)
            b = op.b.reshape(*op.b.shape, *([1] * (len(w_shape) - 2)))  # (out, r, 1...)
            y = conv(conv(x, a, None, base.stride, base.padding, base.dilation), b)
            y = op.scale * y
            return y if op.bias is None else y + self._channel(op.bias, y)
        if op.d is not None:
            y = op.scale * (x @ op.d.T)
            return y if op.bias is None else y + op.bias
        y = op.scale * ((x @ op.a.T) @ op.b.T)
        return y if op.bias is None else y + op.bias


def embed_scale(embedding: nn.Module, dtype: torch.dtype) -> torch.Tensor | float:
    """The factor a scaled embedding multiplies its rows by (``embed_scale``, scalar), else 1."""
    scale = getattr(embedding, "embed_scale", None)
    if isinstance(scale, (int, float)):
        return float(scale)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale.to(dtype)
    return 1.0


def effective_weight(
    stack: Sequence[tuple[Delta, float]],
    w: torch.Tensor,
    b: torch.Tensor | None,
    kind: Layer,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a stack of deltas amounts to (stored layout), in float32.

    Args:
        stack: (delta, weight) pairs, innermost first.
        w: the base weight as stored.
        b: the base bias or None.
        kind: the layer kind (sets the stored layout).
        inplace: a float32 ``w`` may be modified in place (the caller owns it; saves a copy).
    """
    target = Target(kind, tuple(w.shape))
    stack = [(d.resolve(w, kind) if isinstance(d, AddedScale) else d, wt) for d, wt in stack]  # from W itself
    w0 = target.to_matrix(w.float()).clone() if any(dora.is_dora(d) for d, _ in stack) else None
    m = target.to_matrix(w) if inplace and w.dtype == torch.float32 else target.to_matrix(w.float()).clone()
    for d, wt in stack:
        if dora.is_dora(d):
            if wt != 1.0:
                raise UnsupportedError(f"a DoRA input has no stacked meaning at weight {wt:g}")
            m = dora.fold(m, d, w0)
        elif isinstance(d, Scale):
            m = Scale((d.l.double() ** wt).float(), d.side, d.layer).fold(m)
        elif isinstance(d, LowRank):
            m.addmm_(d.b.float() * (wt * d.scale), d.a.float())  # in place, no (out, in) temporary
        elif isinstance(d, AdditiveDelta):
            m.add_(d.dense(), alpha=wt)  # in place: one (out, in) temporary, not two
        else:
            raise UnsupportedError(f"cannot fold {type(d).__name__} into a weight")
    return target.to_stored(m), effective_bias(stack, b)


def effective_bias(stack: Sequence[tuple[Delta, float]], b: torch.Tensor | None) -> torch.Tensor | None:
    """The bias a stack of deltas amounts to (float32): IA³ output scalings and LoRA/dense bias deltas."""
    bias = None if b is None else b.float().clone()
    for d, wt in stack:
        if isinstance(d, Scale):
            if d.side == "out" and bias is not None:
                bias = bias * (d.l.double() ** wt).float()
        elif getattr(d, "bias", None) is not None:
            extra = wt * d.scale * d.bias.float()
            bias = extra if bias is None else bias + extra
    return bias


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _replacement(module: nn.Module, aux: Auxiliary, name: str = "") -> nn.Module:
    """A copy of the module with the auxiliary tensors in place (the original is left untouched)."""
    new = copy.deepcopy(module)
    with torch.no_grad():
        if isinstance(aux, ModuleReplacement | BaseTensors):
            for key, value in aux.tensors.items():
                old = getattr(new, key, None)
                if old is None or old.shape != value.shape:
                    got = None if old is None else tuple(old.shape)
                    shape = tuple(value.shape)
                    raise ShapeMismatch(f"module {name}: saved {key} of shape {shape}, the base has {got}")
                old.copy_(value)
        else:
            new.weight[list(aux.indices)] = aux.rows.to(new.weight.dtype)
    return new


@contextmanager
def stacked(model: nn.Module, pairs: Sequence[Pair]) -> Iterator[nn.Module]:
    """Activate adapters on a model at once, in order (innermost first), restoring it exactly on exit.

    Args:
        model: a torch model whose module paths the adapters name.
        pairs: (Adapter, weight) in stacking order: the weight multiplies an additive delta and is the
            exponent of an IA³ vector (``adapter.weighted`` makes pairs of weight 1).

    Yields:
        The same model, with wrapper modules in place.
    """
    plan = stacks(pairs)
    tokens = common_invocation([ad for ad, _ in pairs])
    gate = None if tokens is None else Gate(tokens)
    hook = None if gate is None else model.register_forward_pre_hook(gate, with_kwargs=True)
    aux = active_aux(model, plan)
    try:
        mods = [m for m in sorted(set(plan.modules) | set(aux)) if not is_param_key(m)]  # experts: params
        layers = {m: stacked_layer(model, m, plan, aux, gate) for m in mods}
        with swapped(model, layers), params.activated(model, plan):
            yield model
    finally:
        if hook is not None:
            hook.remove()


def active_aux(model: nn.Module, plan: Stacks) -> dict[str, Auxiliary]:
    """The auxiliary modules a plan activates, tied lm_heads that see new token rows included."""
    return tied_rows(model, plan.aux) | plan.aux


def stacked_layer(
    model: nn.Module, mod: str, plan: Stacks, aux: dict[str, Auxiliary], gate: Gate | None = None
) -> nn.Module:
    """What stacking ``plan`` puts in place of module ``mod``: its base (or replacement), deltas on top."""
    try:
        original = model.get_submodule(mod)
    except AttributeError:
        raise ShapeMismatch(f"module {mod} is not in the model") from None
    kind = layer_kind(original)
    if kind is None:
        raise UnsupportedError(f"module {mod} is a {type(original).__name__}, not an adaptable layer")
    base = _replacement(original, aux[mod], mod) if mod in aux else original
    ref = base.weight  # DoRA norms use the base layer's weight, as loaded
    stack = plan.deltas.get(mod, [])
    dora.check(mod, stack)
    _check_shapes(mod, stack, kind, tuple(ref.shape))
    ops = [_prepare(d, w, ref, kind) for d, w in stack]
    if gate is not None and (kind != "linear" or any(op.kind != "add" for op in ops)):
        raise UnsupportedError(f"module {mod}: aLoRA gating is modelled on plain LoRA linear layers")
    return StackedLayer(base, kind, ops, gate) if ops else base


@contextmanager
def swapped(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """The model with the named modules replaced by ``layers``; the originals put back on exit."""
    originals: dict[str, nn.Module] = {}
    try:
        for mod, layer in layers.items():
            parent, child = _parent(model, mod)
            originals[mod] = getattr(parent, child)
            setattr(parent, child, layer)
        yield model
    finally:
        for mod, original in originals.items():
            parent, child = _parent(model, mod)
            setattr(parent, child, original)


def tied_rows(model: nn.Module, aux: dict[str, Auxiliary]) -> dict[str, TokenRows]:
    """Modules sharing the weight of an embedding that takes token rows (a tied lm_head): they see the new
    rows too, as PEFT's TrainableTokensWrapper ties them."""
    out = {}
    for mod, a in aux.items():
        if isinstance(a, TokenRows):
            try:
                w = model.get_submodule(mod).weight
            except AttributeError:
                continue  # reported by the caller, naming the module
            out |= {name: a for name, m in model.named_modules()
                    if name != mod and getattr(m, "weight", None) is w}  # fmt: skip
    return out


def _check_shapes(mod: str, stack: list[tuple[Delta, float]], kind: Layer, shape: tuple[int, ...]) -> None:
    out, inf = Target(kind, shape).matrix_shape
    for d, _ in stack:
        if isinstance(d, (Scale, AddedScale)):
            numel = d.l.numel() if isinstance(d, Scale) else d.w.numel()
            n = out if d.side == "out" else (shape[1] if kind in ("conv1d", "conv2d") else inf)
            if numel != n:
                raise ShapeMismatch(f"module {mod}: IA³ vector of length {numel}, the layer needs {n}")
        elif d.target.matrix_shape != (out, inf):
            raise ShapeMismatch(
                f"module {mod}: delta of shape {d.target.matrix_shape}, the weight is {(out, inf)}"
            )


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
    refuse_gated(pairs)
    plan = stacks(pairs)
    if split := differing(model, plan):
        a, b = split[0]
        raise UnsupportedError(
            f"modules {a} and {b} share one weight that the adapters change differently; bake unties them"
        )
    saved: dict[str, torch.Tensor] = {}
    try:
        _fold(model, plan, saved)
    except BaseException:  # a refusal half-way leaves the model as it was
        Undo(model, saved)()
        raise
    return Undo(model, saved)


def _fold(model: nn.Module, plan: Stacks, saved: dict[str, torch.Tensor]) -> None:
    """merge_into's loop: each module's stack folded in place, its tensors saved into ``saved`` first."""
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
                if p is not None:
                    saved.setdefault(f"{mod}.{pname}", p.detach().clone())
            if mod in plan.aux:
                m.load_state_dict(_replacement(m, plan.aux[mod], mod).state_dict())
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
