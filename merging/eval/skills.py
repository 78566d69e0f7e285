"""Held-out skill losses for ``compare``: the base, each input alone, the inputs stacked, each candidate.

The references (base, alone, stacked) and the candidates that claim exactness run through
``runtime.stacked`` with the model's own loss, as before. A candidate that claims no exactness runs folded
into the float32 weights (``runtime.evaluated``: ``merge_into``, undone bit for bit), equal to stacking up
to rounding at the cost of one plain forward: every skill's texts packed into one batch with no padding
and the output layer applied at the answer positions only (``data.answer_losses``; first checked against
the model's own loss on the base, skill by skill: ``data.packed_agrees``). Candidates with identical adapters
(``content_digest``; cat and multiplicative here) are measured once. Texts are tokenised once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from merging.core.adapter import Pair, content_digest, weighted
from merging.eval.data import Batches, alone_losses, answer_losses, losses, pack, packed_agrees, retention
from merging.eval.results import Skill, Skills
from merging.runtime.stacked import evaluated, stacked

Progress = Callable[[int, int, str], None]


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
    fast = packed_agrees(model, packed, base)
    tick("base")
    alone = alone_losses(model, inputs, batches, lambda skill: losses(model, {skill: batches[skill]})[skill])
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
