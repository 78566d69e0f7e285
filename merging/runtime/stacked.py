"""Adapters stacked active on a live torch model (the ground truth).

Stacked-active follows PEFT's base layer pattern, innermost first: an additive delta gives
y = inner(x) + Δ(x); an IA³ vector with side=out gives y = l ⊙ inner(x), with side=in y = inner(l ⊙ x).
A LyCORIS IA³ (``AddedScale``) adds (w ⊙ W) x, W the original base weight, as LyCORIS networks do.
Deltas are applied in factored form, B(A x). ``stacked`` swaps wrapper modules in and restores the
originals on exit; no parameter of the model is touched. Folding into the weights is ``runtime.fold``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from merging.core import dora
from merging.core.adapter import MHA_OUT, Pair, Stacks, common_invocation, layer_kind, stacks
from merging.core.alora import Gate
from merging.core.deltas import (
    CONV_DIMS,
    Delta,
    Dense,
    Layer,
    ModuleReplacement,
    Scale,
    Target,
)
from merging.core.experts import is_param_key
from merging.core.lycoris_ia3 import AddedScale
from merging.core.replacements import Auxiliary, BaseTensors, TokenRows
from merging.errors import ShapeMismatch, UnsupportedError
from merging.runtime import params
from merging.runtime.attention import StackedAttention


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
    conv: tuple[int, ...] = ()  # a conv delta's weight shape as it runs (beside a grouped conv: a full one)
    groups: int = 1  # the groups that weight runs with


def _prepare(delta: Delta, weight: float, ref: torch.Tensor, kind: Layer, groups: int = 1) -> _Op:
    """One delta of a layer as the op its forward runs (a conv's: with the weight shape and groups it has)."""
    op = _prepare_op(delta, weight, ref, kind)
    if kind not in CONV_DIMS or op.kind == "scale":
        return op
    target = getattr(delta, "target", None)
    if target is not None and target.beside > 1:  # PEFT's LoRA on a grouped conv: a full conv beside it
        return replace(op, conv=target.shape)
    if groups > 1 and op.d is None and op.b is not None and op.a is not None:  # of the grouped weight itself
        op = replace(op, d=op.b @ op.a, b=None, a=None)
    return replace(op, conv=tuple(ref.shape), groups=groups)


def _prepare_op(delta: Delta, weight: float, ref: torch.Tensor, kind: Layer) -> _Op:
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
        if self.kind in CONV_DIMS:
            return l.view(1, -1, *(1,) * (CONV_DIMS[self.kind] - 2))
        return l

    def _delta(self, op: _Op, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if self.kind == "embedding":  # a scaled embedding (Gemma) scales the adapter's rows too, as PEFT does
            y = F.embedding(x, op.d) if op.d is not None else F.embedding(x, op.b) @ op.a
            return op.scale * y * embed_scale(base, y.dtype)
        if self.kind in CONV_DIMS:
            conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[self.kind]
            w_shape, pad = op.conv, base.padding
            if op.d is not None:
                w = op.d.reshape(w_shape)
                y = op.scale * conv(x, w, None, base.stride, pad, base.dilation, op.groups)
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


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def with_auxiliary(module: nn.Module, aux: Auxiliary, name: str = "") -> nn.Module:
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
        mods = [m for m in layer_paths([*plan.modules, *aux]) if not is_param_key(m)]  # experts: params
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
    if isinstance(original, nn.MultiheadAttention):  # PEFT's one layer for in_proj and out_proj
        if gate is not None or mod in aux:
            raise UnsupportedError(f"module {mod}: an nn.MultiheadAttention takes plain LoRA deltas only")
        return StackedAttention(original, plan.deltas.get(mod, []), plan.deltas.get(mod + MHA_OUT, []))
    kind = layer_kind(original)
    if kind is None:
        raise UnsupportedError(f"module {mod} is a {type(original).__name__}, not an adaptable layer")
    base = with_auxiliary(original, aux[mod], mod) if mod in aux else original
    ref = base.weight  # DoRA norms use the base layer's weight, as loaded
    stack = plan.deltas.get(mod, [])
    dora.check(mod, stack)
    groups = getattr(base, "groups", 1) if kind in CONV_DIMS else 1
    _check_shapes(mod, stack, kind, tuple(ref.shape), groups)
    ops = [_prepare(d, w, ref, kind, groups) for d, w in stack]
    if gate is not None and (kind != "linear" or any(op.kind != "add" for op in ops)):
        raise UnsupportedError(f"module {mod}: aLoRA gating is modelled on plain LoRA linear layers")
    return StackedLayer(base, kind, ops, gate) if ops else base


def layer_paths(mods: Sequence[str]) -> list[str]:
    """The modules to wrap for these adapted paths, sorted: an nn.MultiheadAttention's out_proj (PEFT's path
    ``<attention>.base_layer.out_proj``) is wrapped with its attention."""
    return sorted({m.removesuffix(MHA_OUT) for m in mods})


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


def _check_shapes(
    mod: str, stack: list[tuple[Delta, float]], kind: Layer, shape: tuple[int, ...], groups: int = 1
) -> None:
    out, inf = Target(kind, shape).matrix_shape
    for d, _ in stack:
        if isinstance(d, (Scale, AddedScale)):
            numel = d.l.numel() if isinstance(d, Scale) else d.w.numel()
            per = groups if isinstance(d, Scale) else 1  # PEFT's IA³: all in channels; LyCORIS: W's columns
            n = out if d.side == "out" else (shape[1] * per if kind in CONV_DIMS else inf)
            if numel != n:
                raise ShapeMismatch(f"module {mod}: IA³ vector of length {numel}, the layer needs {n}")
        elif d.target.beside > 1:  # a full conv beside the grouped one: (out, in, k...), in = g·(in/g)
            if d.target.beside != groups or d.target.shape != (shape[0], shape[1] * groups, *shape[2:]):
                raise ShapeMismatch(
                    f"module {mod}: a LoRA beside a conv of {d.target.beside} groups {d.target.shape}, the "
                    f"layer is {shape} in {groups} groups"
                )
        elif d.target.matrix_shape != (out, inf):
            raise ShapeMismatch(
                f"module {mod}: delta of shape {d.target.matrix_shape}, the weight is {(out, inf)}"
            )
