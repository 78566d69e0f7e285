"""LyCORIS tensor names ↔ deltas, in both directions, for PEFT folders and kohya files alike.

PEFT's LoHa/LoKr tuners store the same tensors under the same names as LyCORIS; only the scale
differs (PEFT: α / r always; LyCORIS: 1 when both LoKr factors are full), so the callers pass it in.
IA³ and full (diff) are LyCORIS's own forms, written only to kohya files.

| family | tensors | delta |
|---|---|---|
| LoHa | hada_w1_a (out, r), hada_w1_b (r, in_flat), w2 alike; Tucker: (r, out), (r, in), hada_t1 | Hadamard |
| LoKr | lokr_w1 (a, c) or lokr_w1_a/_b; lokr_w2 (b, d[, k...]) or lokr_w2_a/_b (+ lokr_t2) | Kronecker |
| IA³ | weight w = l − 1, (n,) or (1, n, 1, 1); on_input (1 = input side) | AddedScale (merging.ia3) |
| full | diff (out, in[, k...]), diff_b (out,) | Dense |
"""

from __future__ import annotations

import torch

from merging.core.deltas import Dense, Hadamard, Kronecker, Target
from merging.core.lycoris_ia3 import AddedScale
from merging.errors import FormatError

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
IA3 = ("weight", "on_input")
FULL = ("diff", "diff_b")
KERNEL_LAYERS = {0: "unknown", 1: "conv1d", 2: "conv2d"}  # kernel dims → layer kind
DIM_LAYERS = {4: "conv2d", 3: "conv1d", 2: "linear"}  # stored weight dims → layer kind


def loha_delta(parts: dict[str, torch.Tensor], scale: float) -> Hadamard:
    """A Hadamard delta from LoHa tensors (hada_w1_a, ..., hada_t1) and the format's scale."""
    if unknown := set(parts) - set(LOHA):
        raise FormatError(f"unknown LoHa tensors {sorted(unknown)}")
    w1a, w1b, t1 = parts["hada_w1_a"], parts["hada_w1_b"], parts.get("hada_t1")
    if t1 is not None:  # Tucker conv: w1a (r, out), w1b (r, in), t1 (r, r, kh, kw)
        target = Target("conv2d", (w1a.shape[1], w1b.shape[1], *t1.shape[2:]), from_factors=True)
    else:
        target = Target("unknown", (w1a.shape[0], w1b.shape[1]))
    return Hadamard(
        w1a, w1b, parts["hada_w2_a"], parts["hada_w2_b"], scale, target, t1=t1, t2=parts.get("hada_t2")
    )


def loha_parts(d: Hadamard) -> dict[str, torch.Tensor]:
    """The LoHa tensors of a Hadamard delta, by name (its scale is the format's business)."""
    values = (d.w1a, d.w1b, d.w2a, d.w2b, d.t1, d.t2)
    return {k: v for k, v in zip(LOHA, values, strict=True) if v is not None}


def lokr_delta(parts: dict[str, torch.Tensor], scale: float) -> Kronecker:
    """A Kronecker delta from LoKr tensors (lokr_w1, lokr_w2_a, ...) and the format's scale."""
    if unknown := set(parts) - set(LOKR):
        raise FormatError(f"unknown LoKr tensors {sorted(unknown)}")
    w1 = parts.get("lokr_w1")
    a, c = w1.shape if w1 is not None else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"]
        b, d, kernel = w2.shape[0], w2.shape[1], tuple(w2.shape[2:])
    elif "lokr_t2" in parts:
        t2 = parts["lokr_t2"]
        b, d, kernel = parts["lokr_w2_a"].shape[1], parts["lokr_w2_b"].shape[1], tuple(t2.shape[2:])
    else:  # w2_b (r, d·k...) as LyCORIS's module stores it, or (r, d, k...) as its weight_gen makes it
        w2b = parts["lokr_w2_b"]
        b, d, kernel = parts["lokr_w2_a"].shape[0], w2b.shape[1], tuple(w2b.shape[2:])
        parts = parts | {"lokr_w2_b": w2b.reshape(w2b.shape[0], -1)}  # (r, d·k...)
    layer = KERNEL_LAYERS.get(len(kernel))
    if layer is None:
        raise FormatError(f"lokr_w2 has an unsupported kernel shape {kernel}")
    target = Target(layer, (a * b, c * d, *kernel), from_factors=layer != "unknown")
    return Kronecker(
        scale, target,
        w1=w1, w1a=parts.get("lokr_w1_a"), w1b=parts.get("lokr_w1_b"),
        w2=parts.get("lokr_w2"), w2a=parts.get("lokr_w2_a"), w2b=parts.get("lokr_w2_b"),
        t2=parts.get("lokr_t2"),
    )  # fmt: skip


def lokr_parts(d: Kronecker) -> dict[str, torch.Tensor]:
    """The LoKr tensors of a Kronecker delta, by name (its scale is the format's business)."""
    values = (d.w1, d.w1a, d.w1b, d.w2, d.w2a, d.w2b, d.t2)
    return {k: v for k, v in zip(LOKR, values, strict=True) if v is not None}


def ia3_delta(parts: dict[str, torch.Tensor]) -> AddedScale:
    """An AddedScale from LyCORIS IA³ tensors: weight w = l − 1, on_input says the side."""
    if unknown := set(parts) - set(IA3):
        raise FormatError(f"unknown IA³ tensors {sorted(unknown)}")
    w = parts["weight"]
    side = "in" if int(parts["on_input"].reshape(-1)[0]) else "out"
    return AddedScale(w.reshape(-1), side, DIM_LAYERS.get(w.dim(), "linear"))


def ia3_parts(d: AddedScale) -> dict[str, torch.Tensor]:
    """The LyCORIS IA³ tensors of an AddedScale: weight w, (n,) or (1, n, 1, 1) for conv."""
    shape = {"conv2d": (1, -1, 1, 1), "conv1d": (1, -1, 1)}.get(d.layer, (-1,))
    return {"weight": d.w.reshape(shape), "on_input": torch.tensor(int(d.side == "in"))}


def full_delta(parts: dict[str, torch.Tensor]) -> Dense:
    """A Dense delta from LyCORIS full tensors (diff, diff_b)."""
    d = parts["diff"]
    layer = DIM_LAYERS.get(d.dim())
    if layer is None:
        raise FormatError(f"diff has an unsupported shape {tuple(d.shape)}")
    return Dense(d.reshape(d.shape[0], -1), Target(layer, tuple(d.shape)), bias=parts.get("diff_b"))


def full_parts(d: Dense) -> dict[str, torch.Tensor]:
    """The LyCORIS full tensors of a Dense delta, its scale folded in."""
    parts = {"diff": (d.scale * d.d.float()).reshape(d.target.shape).to(d.d.dtype)}
    if d.bias is not None:
        parts["diff_b"] = (d.scale * d.bias.float()).to(d.bias.dtype)
    return parts


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LoKr's split of a dimension into (m, n), m ≤ n, as PEFT and LyCORIS compute it."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (n, m) if m > n else (m, n)
    factor = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)
