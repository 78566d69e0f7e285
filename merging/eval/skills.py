"""Held-out skill losses for ``compare``: the base, each input alone, the inputs stacked, each candidate.

The references (base, alone, stacked) and the candidates that claim exactness run through
``runtime.stacked`` with the model's own loss, as before. A candidate that claims no exactness runs folded
into the float32 weights (``runtime.evaluated``: ``merge_into``, undone bit for bit), equal to stacking up
to rounding at the cost of one plain forward: every skill's texts packed into one batch with no padding
and the output layer applied at the answer positions only (``answer_losses``, ``merging.packing``; first
checked against the model's own loss on the base, skill by skill). Candidates with identical adapters
(``content_digest``; cat and multiplicative here) are measured once. Texts are tokenised once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merging.core.adapter import Pair, content_digest, weighted
from merging.core.progress import Progress
from merging.eval.packing import Packed, pack, packed_losses
from merging.eval.results import Skill, Skills
from merging.runtime.fold import evaluated
from merging.runtime.stacked import stacked

Batches = dict[str, dict[str, torch.Tensor]]


def held_out(
    model, batches: Batches, inputs: Sequence[Pair], candidates: Sequence, progress: Progress | None = None
) -> tuple[Skills, dict[str, dict[str, Skill]]]:
    """Held-out losses per skill (an input's name → its tokenised batch with answer labels).

    Args:
        model: the base model; it is left exactly as it was.
        batches: skill → ``answer_batch`` of its held-out texts.
        inputs: the (adapter, weight) pairs in stacking order; an input's name keys its skill.
        candidates: the merged results (``verify.Candidate``: name, adapters, exact).
        progress: called after the base, the inputs alone, the stack and each candidate.

    Returns:
        The reference losses, and each candidate's losses and retentions by candidate name.
    """
    steps, done = 3 + len(candidates), 0

    def tick(item: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, steps, item)

    base = losses(model, batches)
    packed = pack(batches)
    fast = head_only_agrees(model, packed, base)
    tick("base")
    alone = {}
    for skill, batch in batches.items():
        with stacked(model, [(a, w) for a, w in inputs if a.name == skill]):
            alone[skill] = losses(model, {skill: batch})[skill]
    tick("each input alone")

    def measure(pairs: Sequence[Pair], exact: bool) -> dict[str, Skill]:
        with stacked(model, pairs) if exact else evaluated(model, pairs):
            got = losses(model, batches) if exact or not fast else answer_losses(model, packed)
        return {s: Skill(v, retention(base[s], alone[s], v)) for s, v in got.items()}

    stacked_skills = measure(list(inputs), True)
    tick("stacked inputs")
    merged: dict[str, dict[str, Skill]] = {}
    seen: dict[str, dict[str, Skill]] = {}  # content digest → the losses of those very adapters
    for cand in candidates:
        digest = content_digest(cand.adapters)
        if digest not in seen:
            seen[digest or cand.name] = measure(weighted(cand.adapters), cand.exact)
        merged[cand.name] = seen[digest or cand.name]
        tick(cand.name)
    return Skills(base, alone, stacked_skills), merged


@torch.no_grad()
def losses(model, batches: Batches) -> dict[str, float]:
    """Mean cross-entropy per answer token of each skill's batch (the model's own loss)."""
    return {skill: float(model(**batch).loss) for skill, batch in batches.items()}


@torch.no_grad()
def answer_losses(model, packed: Packed) -> dict[str, float]:
    """The same losses from one forward of every skill's texts packed (``merging.packing``): no pad tokens,
    and the output layer only at the answer positions (the prompts' logits, most of them, are never made)."""
    return {skill: float(v) for skill, v in packed_losses(model, packed).items()}


def head_only_agrees(model, packed: Packed, own: dict[str, float], rtol: float = 1e-5) -> bool:
    """Whether ``answer_losses`` reproduces the model's own loss on every skill (one whose head does more
    than its output layer, e.g. logit soft-capping, or that does not read packed sequences, does not: it
    keeps its own loss)."""
    try:
        got = answer_losses(model, packed)
    except (AttributeError, TypeError, NotImplementedError, RuntimeError, ValueError):
        return False
    return all(abs(got[s] - own[s]) <= rtol * abs(own[s]) for s in own)


def retention(base: float, alone: float, loss: float) -> float | None:
    """(L_base − L) / (L_base − L_alone): the share of the adapter's own improvement that survives."""
    gain = base - alone
    return None if gain <= 0 else (base - loss) / gain
