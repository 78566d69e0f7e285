"""Several candidates' held-out losses from one forward, as ``verify`` runs its approximate candidates.

``candidate_losses`` stacks each candidate on its own copy of the tuning texts (``runtime.grouped``: rows
[c·n, (c+1)·n) see candidate c) and measures every copy in one forward; the packed texts, where the batch
carries them, are copied the same way. One candidate alone runs folded into the float32 weights
(``runtime.evaluated``: one plain forward). Both agree with stacking up to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from merging.core.adapter import Pair
from merging.errors import UnsupportedError
from merging.eval.data import Packed, SkillBatch, skill_losses
from merging.runtime.fold import evaluated
from merging.runtime.grouped import grouped

AGREE = 1e-4  # a grouped copy's losses against the same candidate alone (relative): rows did not cross
AGREE_LOWERED = 2e-2  # the same below float32: grouped stacks the deltas, alone folds them, each rounded


def replicated(batch: SkillBatch, copies: int) -> SkillBatch:
    """``copies`` copies of ``batch`` one after the other, copy c's skills renamed "c/skill"."""
    n = len(batch.names)
    names = tuple(f"{c}/{s}" for c in range(copies) for s in batch.names)

    def rep(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(copies, *([1] * (t.dim() - 1)))

    skill = torch.cat([batch.skill + c * n for c in range(copies)])
    packed = batch.packed and _replicated_packed(batch.packed, copies)
    return SkillBatch({k: rep(v) for k, v in batch.inputs.items()}, rep(batch.labels), skill, names, packed)


def _replicated_packed(p: Packed, copies: int) -> Packed:
    """The packed rows copied ``copies`` times, copy c's scored positions in groups "c/skill"."""
    n = len(p.names)
    group = torch.cat([torch.where(p.group >= 0, p.group + c * n, p.group) for c in range(copies)])
    names = tuple(f"{c}/{s}" for c in range(copies) for s in p.names)
    example = None if p.example is None else p.example.repeat(copies, 1)
    return replace(p, input_ids=p.input_ids.repeat(copies, 1), position_ids=p.position_ids.repeat(copies, 1),
                   target=p.target.repeat(copies, 1), group=group, names=names, example=example)  # fmt: skip


@torch.no_grad()
def candidate_losses(
    model,
    batch: SkillBatch,
    candidates: Sequence[Sequence[Pair]],
    *,
    check: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, bool]:
    """(candidates, skills) each candidate's ``skill_losses`` on ``batch``, all in one grouped forward (one
    alone: folded); and whether grouping can be trusted. ``check`` also runs the last candidate alone:
    where its copy disagrees (a model whose layers mix rows, e.g. routed experts) or the grouped runtime
    refuses (an aLoRA), every candidate is measured alone and grouping is reported untrustworthy. The body
    computes in ``dtype`` (``data.skill_losses``)."""
    if len(candidates) == 1:
        return _alone(model, batch, candidates[0], dtype)[None], True
    try:
        with grouped(model, [list(c) for c in candidates]):
            got = skill_losses(model, replicated(batch, len(candidates)), dtype).reshape(len(candidates), -1)
    except UnsupportedError:
        return torch.stack([_alone(model, batch, c, dtype) for c in candidates]), False
    if not check:
        return got, True
    last = _alone(model, batch, candidates[-1], dtype)
    rtol = AGREE if dtype == torch.float32 else AGREE_LOWERED
    if torch.allclose(got[-1], last, rtol=rtol, atol=0, equal_nan=True):
        return got, True
    alone = [_alone(model, batch, c, dtype) for c in candidates[:-1]]
    return torch.cat([torch.stack(alone), last[None]]), False


def _alone(model, batch: SkillBatch, pairs: Sequence[Pair], dtype: torch.dtype) -> torch.Tensor:
    with evaluated(model, list(pairs)):
        return skill_losses(model, batch, dtype)
