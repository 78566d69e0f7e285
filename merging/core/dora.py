"""DoRA as PEFT stacks it, and the one DoRA adapter that reproduces a stack exactly.

PEFT's DoRA layer (peft/tuners/lora/dora.py) adds ``(s − 1)·(result − bias) + s·ΔW x`` to the running
result of its layer, where s = m / ‖W + ΔW‖ is computed from the *base* weight W alone (per output row;
per embedding dimension for an embedding, whose result it multiplies as ``s·result + s·ΔW[x]``). So a DoRA
rescales everything stacked inside it, not only the base. In matrix form, innermost first, the state is
always diag(S)(W + Z) with Z low rank:

- an additive ΔW:  Z ← Z + diag(1/S) ΔW
- a DoRA (m, ΔW):  Z ← Z + diag(1/S) ΔW,  S ← S ⊙ m / ‖W + ΔW‖

and one DoRA adapter with factors Z and magnitude S ⊙ ‖W + Z‖ gives exactly diag(S)(W + Z) (for an
embedding, diag acts on the right). Weighted DoRA inputs have no stacked meaning and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core.deltas import AdditiveDelta, Delta, Dense, LowRank, Scale, Target
from merging.errors import UnsupportedError


def is_dora(d: Delta) -> bool:
    """Whether a delta is a DoRA LoRA (it carries a magnitude)."""
    return isinstance(d, LowRank) and d.magnitude is not None


def _axis(target: Target) -> int:
    """The dimension DoRA normalises over: per output row (dim=1), per embedding dimension (dim=0)."""
    return 0 if target.layer == "embedding" else 1


def _rescale(
    b: torch.Tensor, a: torch.Tensor, v: torch.Tensor, target: Target
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of diag(v)·BA (rows), or BA·diag(v) for an embedding (dimensions)."""
    if target.layer == "embedding":
        return b, a * v[None, :]
    return b * v[:, None], a


def magnitude_scale(d: LowRank, w: torch.Tensor) -> torch.Tensor:
    """PEFT's mag_norm_scale s = m / ‖W + scale·BA‖ for a DoRA delta, W in matrix form (float32)."""
    return d.magnitude.float() / weight_norm(d, w)


def weight_norm(d: LowRank, w: torch.Tensor) -> torch.Tensor:
    """The norm PEFT's DoRA layer divides by: ‖W + scale·BA‖ per output row (embedding: per dimension).

    Beside a conv of g groups PEFT adds to the grouped weight W (out, in/g·k) the product of its stored
    factors, lora_B (out, n) viewed as (out/g, g·n) times lora_A (g·n, in·k), read back in W's shape: not the
    delta the layer runs, but what its forward divides by; so it is computed here on the factors as
    ``peft_layout`` stores them.
    """
    t = d.target
    if t.beside > 1:
        lb, la = peft_layout(d.scale * d.b.float(), d.a.float(), t.beside)  # (out, n), (g·n, in·k)
        lw = (lb.reshape(-1, la.shape[0]) @ la).reshape(t.shape[0], -1)  # PEFT's view, (out, in/g·k)
        return (t.grouped_part(w) + lw).norm(dim=1)
    return (w + d.scale * (d.b.float() @ d.a.float())).norm(dim=_axis(t))


def peft_layout(b: torch.Tensor, a: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A full-conv delta B·A (B (out, R), A (R, ...)) as PEFT's LoRA on a conv of g groups stores it: lora_A
    (g·n, ...) and grouped lora_B (out, n), group j's outputs reading A's rows j·n … (j+1)·n.

    B already in that pattern (R = g·n, as read from PEFT) is kept as it is, zero columns too: PEFT's DoRA
    norm depends on where each factor sits. Otherwise columns of B each within one group's rows (a cat of
    read grouped LoRAs) go to that group's block (n = the most any group has), else every group reads all
    of A (n = R); the product is B·A either way."""
    out, rank = b.shape
    rows = out // groups
    blocks = torch.zeros(groups, rank, dtype=torch.bool)
    for j in range(groups):
        blocks[j] = b[j * rows : (j + 1) * rows].abs().sum(0) > 0
    n = rank // groups
    if rank % groups == 0 and not any(bool(blocks[j, : j * n].any() or blocks[j, (j + 1) * n :].any())
                                      for j in range(groups)):  # fmt: skip
        cols = [torch.arange(j * n, (j + 1) * n) for j in range(groups)]
    elif bool((blocks.sum(0) <= 1).all()):
        cols = [blocks[j].nonzero().flatten() for j in range(groups)]
    else:
        cols = [torch.arange(rank) for _ in range(groups)]
    n = max(1, *(len(c) for c in cols))
    new_a = a.new_zeros(groups * n, *a.shape[1:])
    new_b = b.new_zeros(out, n)
    for j, c in enumerate(cols):
        new_a[j * n : j * n + len(c)] = a[c]
        new_b[j * rows : (j + 1) * rows, : len(c)] = b[j * rows : (j + 1) * rows][:, c]
    return new_b, new_a


def check(module: str, stack: Sequence[tuple[Delta, float]]) -> None:
    """Refuse, in one line, a DoRA stacked where PEFT's semantics are not reproduced exactly here."""
    for i, (d, wt) in enumerate(stack):
        if not is_dora(d):
            continue
        if d.target.layer == "unknown":
            raise UnsupportedError(f"module {module}: DoRA on a layer of unknown kind; pass --base")
        if wt != 1.0:
            raise UnsupportedError(f"module {module}: a DoRA input has no stacked meaning at weight {wt:g}")
        if any(getattr(e, "bias", None) is not None for e, _ in stack):
            raise UnsupportedError(f"module {module}: lora_bias stacked with DoRA is not supported")
        if any(isinstance(e, Scale) for e, _ in stack[:i]):
            raise UnsupportedError(
                f"module {module}: a DoRA input over an IA³ vector rescales the bias; put DoRA first"
            )


def _check(stack: Sequence[tuple[Delta, float]], module: str) -> None:
    check(module, stack)


def compose(stack: Sequence[tuple[AdditiveDelta, float]], w: torch.Tensor, module: str) -> LowRank:
    """The one DoRA LowRank equal to a stack of additive and DoRA deltas, innermost first.

    Args:
        stack: (delta, weight) pairs of one module, at least one of them DoRA.
        w: the base weight in matrix form (out, in_flat).
        module: the module name, for messages.

    Returns:
        LowRank(Z factors, scale 1, magnitude S ⊙ ‖W + Z‖): PEFT's DoRA forward of it is the stack's.
    """
    _check(stack, module)
    w = w.float()
    target = stack[0][0].target
    s_total = torch.ones(w.shape[1] if target.layer == "embedding" else w.shape[0])
    bs, as_ = [], []
    for d, wt in stack:
        lr = d.low_rank()
        b, a = _rescale((wt * lr.scale) * lr.b.float(), lr.a.float(), 1.0 / s_total, target)
        bs.append(b)
        as_.append(a)
        if is_dora(d):
            s_total = s_total * magnitude_scale(d, w)
    b, a = torch.cat(bs, dim=1), torch.cat(as_, dim=0)  # (out, R), (R, in_flat)
    z = LowRank(b, a, 1.0, target)
    return LowRank(b, a, 1.0, target, magnitude=s_total * weight_norm(z, w))


Stack = Sequence[tuple[Delta, float]]


def contributions(stack: Stack, w: torch.Tensor, module: str) -> list[tuple[Delta, float]]:
    """Each input's change to the running weight, in context: additive deltas as they are, a DoRA as the
    dense diag((s−1)S)(W + Z) + diag(s)ΔW it adds on top of what is inside it (they sum to stacked − W)."""
    _check(stack, module)
    w = w.float()
    target = stack[0][0].target
    emb = target.layer == "embedding"
    s_total = torch.ones(w.shape[1] if emb else w.shape[0])
    z = torch.zeros_like(w)
    out: list[tuple[Delta, float]] = []
    for d, wt in stack:
        if not isinstance(d, AdditiveDelta):
            out.append((d, wt))
            continue
        dw = d.scale * (d.b.float() @ d.a.float()) if is_dora(d) else wt * d.dense()
        if is_dora(d):
            s = magnitude_scale(d, w)
            inner = w + z
            change = (inner * ((s - 1) * s_total)[None, :] + dw * s[None, :]) if emb else (
                inner * ((s - 1) * s_total)[:, None] + dw * s[:, None]
            )
            out.append((Dense(change, target), 1.0))
            z = z + (dw / s_total[None, :] if emb else dw / s_total[:, None])
            s_total = s_total * s
        else:
            out.append((d, wt))
            z = z + (dw / s_total[None, :] if emb else dw / s_total[:, None])
    return out


def as_dora(d: LowRank, w: torch.Tensor) -> LowRank:
    """A plain LoRA as a DoRA that rescales nothing (magnitude ‖W + ΔW‖): PEFT's use_dora is per adapter."""
    return LowRank(d.b, d.a, d.scale, d.target, bias=d.bias, magnitude=weight_norm(d, w.float()))


def fold(m: torch.Tensor, d: LowRank, w0: torch.Tensor) -> torch.Tensor:
    """The running weight m (matrix form) after a DoRA layer whose norms use the base weight w0."""
    s = magnitude_scale(d, w0.float())
    m = m + d.scale * (d.b.float() @ d.a.float())
    return m * s[None, :] if d.target.layer == "embedding" else m * s[:, None]
