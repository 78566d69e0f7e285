"""The pieces TIES and DARE are made of: sparsify, elect a sign, combine (as in PEFT's merge_utils).

Each works on a stack of dense task deltas τ of shape (n, out, in_flat).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core.deltas import AdditiveDelta


def task_stack(deltas: Sequence[AdditiveDelta]) -> torch.Tensor:
    """The dense task deltas ΔW_i stacked: (n, out, in_flat)."""
    return torch.stack([d.dense() for d in deltas])


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌈density·numel⌉ largest-magnitude entries of each task delta, zero the rest.

    Args:
        t: (n, ...) task deltas.
        density: fraction kept, in (0, 1].
    """
    flat = t.reshape(t.shape[0], -1)
    k = max(1, int(density * flat.shape[1]))  # as PEFT
    mags = flat.abs()
    # the k-th largest magnitude by selection (≈3× faster than a topk of half the entries): where exactly k
    # entries reach it, they are topk's k entries; where the k-th ties with the next, topk picks among them
    kth = mags.kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values  # (n, 1)
    mask = mags >= kth
    if bool((mask.sum(1) != k).any()):  # a tie at the k-th magnitude (or a NaN): topk's own choice
        idx = mags.topk(k, dim=1).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return (flat * mask).reshape(t.shape)


def prune_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 − density and rescale the survivors by 1/density."""
    keep = torch.rand(t.shape, generator=generator) < density
    return t * keep / density


def elect_sign(t: torch.Tensor, method: str) -> torch.Tensor:
    """Which entries agree with the majority sign, elected from the sum ("total") or from the count of
    signs ("frequency"), ties going to +. Zeros never agree. Returns a bool mask like t."""
    votes = t.sum(0) if method == "total" else t.sign().sum(0)
    return t.sign() == torch.where(votes >= 0, 1.0, -1.0)


def disjoint_mean(t: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Σ over the agreeing entries divided by how many agree (at least 1)."""
    return (t * agree).sum(0) / agree.sum(0).clamp(min=1)


def weighted(t: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """w_i·τ_i for each task delta."""
    return t * torch.tensor(weights, dtype=t.dtype).reshape(-1, *([1] * (t.dim() - 1)))


def prune_kth(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim as the TIES and KnOTS repositories count it: keep |x| ≥ the (n − ⌊n·density⌋)-th smallest
    magnitude of each task delta (⌊n·density⌋ + 1 entries without ties, one more than ``prune_magnitude``).

    Args:
        t: (n_tasks, ...) task deltas.
        density: fraction kept, in (0, 1]; 1 keeps everything.
    """
    if density >= 1 or t[0].numel() == 0:
        return t
    flat = t.reshape(t.shape[0], -1)
    n = flat.shape[1]
    kth = flat.abs().kthvalue(n - int(n * density), dim=1, keepdim=True).values  # (n_tasks, 1)
    return (flat * (flat.abs() >= kth)).reshape(t.shape)


def elect_sign_resolved(t: torch.Tensor) -> torch.Tensor:
    """TIES sign election as the TIES repository resolves it: the sign of the sum, an entry whose sum is
    zero taking the majority (the sign of the sum of the elected signs). Returns the agreeing entries
    (bool mask like t): positive ones where the sign is +, negative ones elsewhere."""
    sign = t.sum(0).sign()
    sign[sign == 0] = sign.sum().sign()
    return torch.where(sign > 0, t > 0, t < 0)
