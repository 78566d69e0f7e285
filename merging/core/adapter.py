"""Adapter: metadata plus {module name: delta}; aligning several adapters on one base."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch

from merging.core.deltas import (
    CONV_DIMS,
    AdditiveDelta,
    Delta,
    Dense,
    Hadamard,
    Kronecker,
    Layer,
    LowRank,
    Scale,
    TokenRows,
)
from merging.core.experts import is_param_key
from merging.core.lazy import LazyDeltas
from merging.core.lycoris_ia3 import AddedScale
from merging.core.replacements import Auxiliary, BaseTensors, ModuleReplacement
from merging.errors import IncompatibleAdapters, MergingError, ShapeMismatch

KIND_NAMES = {
    LowRank: "lora", Hadamard: "loha", Kronecker: "lokr", Dense: "full", Scale: "ia3", AddedScale: "ia3",
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class Adapter:
    """One adapter: its deltas by module path (as in ``model.named_modules()``) and where it came from.

    ``tied`` maps a module to the module whose delta it shares (e.g. ``lm_head`` → ``model.embed_tokens``):
    the shared delta is stored once, under the source module, and applies to both.
    ``config`` keeps the format's own options (PEFT's adapter_config.json) for faithful round trips.
    """

    name: str
    deltas: Mapping[str, Delta]
    base_model: str | None = None
    revision: str | None = None
    aux: Mapping[str, Auxiliary] = field(default_factory=dict)
    tied: Mapping[str, str] = field(default_factory=dict)
    source: Path | None = None
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for mod, src in self.tied.items():
            if src not in self.deltas:
                raise MergingError(f"{self.where}: module {mod} is tied to {src}, which has no delta")

    @property
    def where(self) -> str:
        """How to name this adapter in a message: its path, else its name."""
        return str(self.source) if self.source else self.name

    @property
    def kinds(self) -> set[str]:
        """Adapter types present: lora, loha, lokr, full, ia3 (dora for LoRA with magnitudes)."""
        if isinstance(self.deltas, LazyDeltas) and self.deltas.kind:
            return {self.deltas.kind}
        out = set()
        for d in self.deltas.values():
            out.add("dora" if isinstance(d, LowRank) and d.magnitude is not None else KIND_NAMES[type(d)])
        return out

    @property
    def numel(self) -> int:
        return sum(d.numel for d in self.deltas.values())

    @property
    def invocation(self) -> tuple[int, ...] | None:
        """aLoRA's invocation tokens (PEFT ``alora_invocation_tokens``): the deltas act from their last
        occurrence on; None for an adapter that acts on every token."""
        tokens = self.config.get("alora_invocation_tokens")
        return None if tokens is None else tuple(int(t) for t in tokens)

    def expanded(self) -> dict[str, Delta]:
        """Every module's delta, tied modules included (each sharing its source module's delta)."""
        return dict(self.deltas) | {mod: self.deltas[src] for mod, src in self.tied.items()}

    def with_deltas(self, deltas: Mapping[str, Delta]) -> Adapter:
        return replace(self, deltas=dict(deltas))

    def refine_targets(self, shapes: Mapping[str, tuple[Layer, tuple[int, ...]]]) -> Adapter:
        """Fill in each delta's base layer kind and stored shape from the base model's modules.

        Args:
            shapes: module path → (layer kind, stored weight shape), e.g. from ``base_shapes(model)``.

        Returns:
            A new Adapter; a module missing from ``shapes`` or with a different shape raises ShapeMismatch.
        """
        if missing := [m for m in self.deltas if m not in shapes and not is_param_key(m)]:
            raise ShapeMismatch(f"{self.where}: module {missing[0]} is not in the base model")
        for mod, aux in self.aux.items():
            got = tuple(aux.tensors["weight"].shape) if "weight" in getattr(aux, "tensors", {}) else None
            if isinstance(aux, ModuleReplacement) and mod in shapes and got not in (None, shapes[mod][1]):
                raise ShapeMismatch(
                    f"{self.where}: module {mod} is saved whole with a {got} weight, the base's is "
                    f"{shapes[mod][1]}: load the base with the head the adapter was trained with "
                    "(a classifier's num_labels, a resized vocabulary)"
                )

        def refine(mod: str, d: Delta) -> Delta:
            if mod not in shapes:  # an expert of a parameter: checked against the live parameter
                return d
            layer, shape = shapes[mod]
            if isinstance(d, (Scale, AddedScale)):  # a weights-only base does not know a 2-D layer's kind
                return replace(d, layer=layer) if layer != "unknown" else d
            try:
                return replace(d, target=d.target.refine(layer, shape))
            except ShapeMismatch as e:
                raise ShapeMismatch(f"{self.where}: module {mod}: {e}") from None

        if isinstance(self.deltas, LazyDeltas):
            return replace(self, deltas=self.deltas.mapped(refine))
        return self.with_deltas({mod: refine(mod, d) for mod, d in self.deltas.items()})


LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(module: str) -> str:
    """The layer of a module: its path up to the first numeric part (``model.layers.3``), else itself."""
    m = LAYER.match(module)
    return m.group(1) if m else module


def layer_kind(module: torch.nn.Module) -> Layer | None:
    """The layer kind of a torch module the deltas know how to adapt, or None."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Conv2d):
        return "conv2d"
    if isinstance(module, torch.nn.Conv3d):
        return "conv3d"
    if isinstance(module, torch.nn.Conv1d):
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D
        return "gpt2_conv1d"
    return None


MHA_OUT = ".base_layer.out_proj"  # PEFT's path of an nn.MultiheadAttention's out_proj LoRA, after its own


def base_shapes(model: torch.nn.Module) -> dict[str, tuple[Layer, tuple[int, ...]]]:
    """Module path → (layer kind, stored weight shape) for every adaptable module of a model."""
    out = {}
    for name, mod in model.named_modules():
        kind = layer_kind(mod)
        if kind is not None:
            out[name] = (kind, tuple(mod.weight.shape))
        elif isinstance(mod, torch.nn.MultiheadAttention) and mod.in_proj_weight is not None:
            # PEFT's LoRA on it: in_proj_weight (3E, E) at its path, out_proj at PEFT's path for it
            out[name] = ("linear", tuple(mod.in_proj_weight.shape))
            out[name + MHA_OUT] = ("linear", tuple(mod.out_proj.weight.shape))
    return out


def conv_groups(model: torch.nn.Module) -> dict[str, int]:
    """Module path → groups for every grouped convolution of a model (PEFT's LoRA on it has its own shape)."""
    return {n: m.groups for n, m in model.named_modules() if layer_kind(m) in CONV_DIMS and m.groups > 1}


def base_identity(name: str) -> str:
    """Which base model a name means: a local folder by its resolved path (``base`` = ``./base/``), else the
    Hub id as written."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name.rstrip("/")


def align(adapters: Sequence[Adapter]) -> list[str]:
    """Check that adapters agree on every module they share; return the union of modules, sorted.

    Raises:
        IncompatibleAdapters: they name different base models.
        ShapeMismatch: a shared module has different base weight shapes (naming the module and both shapes).
    """
    check_same_parameters(adapters)
    bases = {base_identity(a.base_model) for a in adapters if a.base_model}
    if len(bases) > 1:
        names = ", ".join(f"{a.where} ({a.base_model})" for a in adapters if a.base_model)
        raise IncompatibleAdapters(f"adapters are for different base models: {names}")
    revisions = {a.revision for a in adapters if a.base_model and a.revision}
    if len(revisions) > 1:  # one Hub id, two commits of it: not the same weights
        names = ", ".join(f"{a.where} ({a.base_model}@{a.revision})" for a in adapters if a.revision)
        raise IncompatibleAdapters(f"adapters are for different revisions of the base model: {names}")
    for mod in sorted({m for a in adapters if not isinstance(a.deltas, LazyDeltas) for m in a.deltas}):
        same_shape(mod, [(ad, ad.deltas[mod]) for ad in adapters
                         if not isinstance(ad.deltas, LazyDeltas) and mod in ad.deltas])  # fmt: skip
    return sorted({m for a in adapters for m in a.deltas})


def same_shape(mod: str, deltas: Sequence[tuple[Adapter, Delta]]) -> None:
    """Raise ShapeMismatch, naming both inputs, when the additive deltas of one module differ in shape
    (lazily read inputs are checked when the module is merged)."""
    seen: tuple[Adapter, tuple[int, int]] | None = None
    for ad, d in deltas:
        if not isinstance(d, AdditiveDelta):
            continue
        shape = d.target.matrix_shape
        if d.target.beside > 1:  # PEFT's LoRA on a grouped conv: compared as the grouped weight it adapts
            shape = (shape[0], shape[1] // d.target.beside)
        if seen is not None and seen[1] != shape:
            other, other_shape = seen
            raise ShapeMismatch(
                f"module {mod}: {other.where} has shape {other_shape}, {ad.where} has shape {shape}"
            )
        seen = seen or (ad, shape)


Pair = tuple[Adapter, float]  # weight: multiplies an additive delta, is the exponent of an IA³ vector
Stack = list[tuple[Delta, float]]  # one module's (delta, weight) pairs, innermost first


def weighted(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> list[Pair]:
    """(adapter, weight) pairs in order; weights default to 1 each and must be one per adapter."""
    ws = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(ws) != len(adapters):
        raise MergingError(f"{len(ws)} weights for {len(adapters)} input adapters")
    return list(zip(adapters, ws, strict=True))


@dataclass(frozen=True)
class Stacks:
    """What several adapters amount to, module by module."""

    deltas: dict[str, Stack]  # module → (delta, weight) pairs, innermost first, ties expanded
    aux: dict[str, Auxiliary]  # module → its one replacement (disjoint token rows united)

    @property
    def modules(self) -> list[str]:
        """Every module touched, sorted."""
        return sorted(set(self.deltas) | set(self.aux))


def stacks(pairs: Sequence[Pair], *, expand_tie: Callable[[str], bool] | None = None) -> Stacks:
    """Group the deltas of several adapters by module, in stacking order, and check their aux modules.

    Args:
        pairs: (adapter, weight) in stacking order (innermost first).
        expand_tie: whether a tied module gets its source's delta too (default: always); ``bake`` says
            no where the base stores one shared tensor for both, which must take the delta once.

    Returns:
        Stacks; two inputs replacing one module (other than disjoint token rows) raise IncompatibleAdapters.
    """
    check_same_parameters([ad for ad, _ in pairs])
    deltas: dict[str, Stack] = {}
    aux_items: dict[str, list[tuple[Adapter, Auxiliary]]] = {}
    for ad, w in pairs:
        for mod, d in ad.deltas.items():
            deltas.setdefault(mod, []).append((d, w))
        for mod, src in ad.tied.items():
            if expand_tie is None or expand_tie(mod):
                deltas.setdefault(mod, []).append((ad.deltas[src], w))
        for mod, a in ad.aux.items():
            aux_items.setdefault(mod, []).append((ad, a))
    return Stacks(deltas, {mod: combine_aux(mod, items) for mod, items in aux_items.items()})


def combine_aux(mod: str, items: Sequence[tuple[Adapter, Auxiliary]]) -> Auxiliary:
    """One module's replacement from several adapters: token rows on disjoint indices unite; else an error."""
    if len(items) == 1:
        return items[0][1]
    kinds = {type(a) for _, a in items}
    if len(kinds) > 1:
        names = " and ".join(sorted(k.__name__ for k in kinds))
        raise IncompatibleAdapters(f"module {mod}: replaced in different ways by the inputs ({names})")
    if kinds == {BaseTensors}:
        return _same_base_tensors(mod, items)
    if kinds == {TokenRows}:
        idx = [i for _, a in items for i in a.indices]
        if len(set(idx)) == len(idx):  # disjoint rows: the union is exact
            return TokenRows(tuple(idx), torch.cat([a.rows for _, a in items]))
    names = ", ".join(ad.where for ad, _ in items)
    raise IncompatibleAdapters(f"module {mod} is replaced by several inputs ({names})")


def _same_base_tensors(mod: str, items: Sequence[tuple[Adapter, BaseTensors]]) -> BaseTensors:
    """Saved base-layer tensors of several inputs: equal ones are one; different ones cannot be stacked."""
    merged: dict[str, torch.Tensor] = {}
    for ad, a in items:
        for key, t in a.tensors.items():
            if key in merged and not torch.equal(merged[key], t):
                raise IncompatibleAdapters(
                    f"module {mod}: {ad.where} and an earlier input both saved a different base {key} "
                    "(PEFT bias='all'/'lora_only' or saved embedding layers); loaded together, PEFT keeps "
                    "only the last one"
                )
            merged[key] = t
    return BaseTensors(merged)


def common_invocation(adapters: Sequence[Adapter]) -> tuple[int, ...] | None:
    """The aLoRA invocation tokens all inputs share (None when none is gated); mixing is an error."""
    found = {ad.invocation for ad in adapters}
    if len(found) > 1:
        names = ", ".join(f"{ad.where} ({list(ad.invocation or []) or 'every token'})" for ad in adapters)
        raise IncompatibleAdapters(f"aLoRA inputs must share their invocation tokens: {names}")
    return found.pop() if found else None


def content_digest(adapters: Sequence[Adapter]) -> str | None:
    """A sha256 over every delta's kind, fields and tensor bytes, in stacking order: equal digests act
    identically on any model. None when an adapter carries more than deltas (module replacements, token
    rows, tied modules, an aLoRA gate), which the digest does not cover."""
    h = hashlib.sha256()
    for ad in adapters:
        if ad.aux or ad.tied or ad.invocation is not None:
            return None
        h.update(b"\0adapter")
        for mod, d in ad.deltas.items():
            if not is_dataclass(d):
                return None
            h.update(f"\0{mod}\0{type(d).__name__}".encode())
            for f in fields(d):
                v = getattr(d, f.name)
                if isinstance(v, torch.Tensor):
                    h.update(f"\0{f.name} {v.dtype} {tuple(v.shape)}".encode())
                    h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                else:
                    h.update(f"\0{f.name} {v!r}".encode())
    return h.hexdigest()


def targeted(adapter: Adapter) -> frozenset[str] | None:
    """The adapter's ``target_parameters`` (PEFT config), None when it targets none."""
    cfg = adapter.config if isinstance(adapter.config, Mapping) else {}
    found = cfg.get("target_parameters")
    return frozenset(found) if found else None


def check_same_parameters(adapters: Sequence[Adapter]) -> None:
    """PEFT stacks adapters on parameters only when they target the same ones: else refuse, naming both."""
    seen: tuple[Adapter, frozenset[str]] | None = None
    for ad in adapters:
        mine = targeted(ad)
        if mine is None:
            continue
        if seen is not None and seen[1] != mine:
            raise IncompatibleAdapters(
                f"{seen[0].where} targets parameters {sorted(seen[1])} and {ad.where} targets "
                f"{sorted(mine)}: PEFT stacks adapters on parameters only when they target the same ones"
            )
        seen = seen or (ad, mine)
