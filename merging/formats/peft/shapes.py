"""What PEFT builds for a module of the base, checked before a delta is written for it.

PEFT creates each adapter layer from the base module (its kind, in/out channels, kernel, groups) and loads the
saved tensors into it, refusing any other shape. So a writer that knows the base checks every delta against
that module and refuses in one line what PEFT would not load. Without the base it writes only what the
delta itself knows: a LoHa/LoKr conv kernel does not say the conv's groups (nor a Conv1d from a (k, 1)
Conv2d), so a LoRA whose conv comes from such factors alone is refused in one line asking for the base; a
flat LoHa/LoKr/AdaLoRA factor, (r, in·k...), cannot say whether it is a conv at all: the PEFT writer then
learns it from the base the adapter names, if reachable, else writes a text model's as a Linear's and
refuses any other (``kinds``; the kohya writer refuses it: its users adapt convs). A base known by its
weights alone (a state dict) does not record a conv's groups, and PEFT sizes a LoHa/LoKr factor by
in_channels // groups (peft/tuners/{loha,lokr}/layer.py), so its (r, in/g·k) matches the grouped weight's
(out, in/g, k...) whatever g is: groups cannot be inferred, and such a conv is refused in one line unless a
LoRA input on the module says them (its lora_A reads all in channels: ``Target.beside``).

| base module | LoRA tensors PEFT builds | IA³ vector |
|---|---|---|
| Linear (out, in) | A (r, in), B (out, r) | (out, 1) / (1, in) |
| Conv1D (in, out), GPT-2 | A (r, in), B (out, r) | (out, 1) / (1, in) |
| ConvNd (out, in/g, k...) | A (r, in, k...), B (out, r/g, 1...), r a multiple of g | (1, out or in, 1...) |
| Embedding (num, dim) | lora_embedding_A (r, num), _B (dim, r) | |
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from merging.core import dora
from merging.core.deltas import CONV_DIMS, Delta, Scale
from merging.errors import ShapeMismatch, UnsupportedError

if TYPE_CHECKING:
    from merging.base.layout import BaseLayout
    from merging.formats.peft.kinds import ImpliedBase

log = logging.getLogger(__name__)



def as_built(
    mod: str, d: Delta, base: BaseLayout | None, unknown: list[str] | None = None,
    implied: ImpliedBase | None = None,
) -> Delta:  # fmt: skip
    """The delta with the base module's layer kind and stored shape, or a one-line refusal naming both.

    Args:
        mod: the module path (messages name it through the caller's ``naming``).
        d: its delta (a LoRA/LoHa/LoKr target of unknown kind takes the base module's).
        base: the base layout; None (or a module it does not hold) checks only what the delta knows.
        unknown: collects the modules written as a Linear's for want of their layer kind (the caller warns
            once, ``warn_unknown``); None warns here, per module.
        implied: the base the adapter names, which decides a module of unknown kind that ``base`` does not
            hold (``kinds.ImpliedBase.linear``: a text model's Linear, else refused); None: written as a
            Linear's with a warning.
    """
    if base is None or mod not in base.modules:
        target = getattr(d, "target", None)
        if target is not None and target.layer == "unknown":  # LLM LoHa/LoKr: linear, mostly
            if implied is not None and implied.linear(mod, target):
                return d  # the base's config names its input size: a Linear's
            if unknown is None:
                warn_unknown([mod])
            else:
                unknown.append(mod)
        elif target is not None and target.from_factors:
            raise UnsupportedError(
                f"a LoHa/LoKr on a {target.layer} {target.shape}: its factors do not say the conv's groups "
                "(nor a Conv1d from a (k, 1) Conv2d), and PEFT builds the LoRA from them: pass --base"
            )
        return d
    layer, shape = base.modules[mod]
    target = getattr(d, "target", None)
    if not base.knows_groups and layer in CONV_DIMS and target is not None and target.guessed:
        raise UnsupportedError(
            f"a LoHa/LoKr/AdaLoRA on a {layer} {shape} whose groups a state dict does not record (a LoHa/"
            "LoKr factor, sized in/groups, does not say them either), and PEFT builds the LoRA from them: "
            "pass the base folder with its config.json as --base (Python: BaseLayout.from_model(model))"
        )
    if isinstance(d, Scale):
        layer = d.layer if layer == "unknown" else layer  # a weights-only base: the vector knows its layer
        n, want = d.l.numel(), _ia3_size(layer, shape, d.side, base.groups.get(mod, 1))
        if n != want:
            raise ShapeMismatch(
                f"an IA³ vector of {n} values, but PEFT's IA³ on this {layer} {shape} scales "
                f"{want} ({'input' if d.side == 'in' else 'output'} side)"
            )
        return replace(d, layer=layer)
    if target is None:
        return d
    try:
        return replace(d, target=target.refine(layer, shape))
    except ShapeMismatch as e:
        raise ShapeMismatch(f"{e}; PEFT would not load it") from None


def warn_unknown(mods: list[str]) -> None:
    """One warning for the modules whose layer kind no factor says, written as a Linear's LoRA."""
    if mods:
        more = f" and {len(mods) - 1} more" if len(mods) > 1 else ""
        log.warning("module %s%s: layer kind unknown (a LoHa/LoKr factor does not say), written as a "
                    "Linear's LoRA; if they are convs, pass --base", mods[0], more)  # fmt: skip


def _ia3_size(layer: str, shape: tuple[int, ...], side: str, groups: int) -> int:
    """The length of PEFT's IA³ vector on a module: its output or (feedforward) input channels."""
    if layer == "gpt2_conv1d":
        return shape[1] if side == "out" else shape[0]
    if side == "out":
        return shape[0]
    return shape[1] * groups if layer in CONV_DIMS else shape[1]


def grouped_a(a: torch.Tensor, groups: int) -> torch.Tensor:
    """A LoRA's A of a grouped conv's delta, (r, in/g, k...), as PEFT's ungrouped lora_A (g·r, in, k...).

    Group j's rank rows read only group j's input channels; PEFT's grouped lora_B (out, r, 1...) then sends
    them to group j's outputs: together exactly B·A on every group, as the grouped base weight holds it.
    """
    r, c = a.shape[:2]
    out = a.new_zeros(groups * r, groups * c, *a.shape[2:])  # (g·r, in, k...)
    for j in range(groups):
        out[j * r : (j + 1) * r, j * c : (j + 1) * c] = a
    return out


def beside_b(lb: torch.Tensor, groups: int) -> torch.Tensor:
    """PEFT's grouped lora_B (out, r/g, 1...) of a LoRA on a conv of g groups as the (out, r) matrix it
    applies: group j's outputs read lora_A's channels j·r/g … (j+1)·r/g, zero elsewhere."""
    out, per = lb.shape[0], lb.shape[1]
    b = lb.new_zeros(out, per * groups)
    rows = out // groups
    for j in range(groups):
        block = lb[j * rows : (j + 1) * rows].reshape(rows, per)
        b[j * rows : (j + 1) * rows, j * per : (j + 1) * per] = block
    return b


def beside_factors(b: torch.Tensor, a: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A full-conv delta B·A (B (out, R), A (R, in, k...)) as PEFT's LoRA on a conv of g groups: lora_A
    (g·n, in, k...) and grouped lora_B (out, n, 1...) (``dora.peft_layout``: DoRA's norm is computed on the
    same layout, so a magnitude written with it is the one PEFT divides by)."""
    return dora.peft_layout(b, a, groups)
