"""Held-out skill losses for ``compare``: the base, each input alone, the inputs stacked, each candidate.

The references (base, alone, stacked) and the candidates that claim exactness run through
``runtime.stacked``: no rounding of a fold between them and what PEFT stacks. A candidate that claims no
exactness runs folded into the float32 weights (``runtime.evaluated``: ``merge_into``, undone bit for bit),
equal to stacking up to rounding at the cost of one plain forward. Every row's losses come from every
skill's texts packed into one batch with no padding and the output layer applied at the answer positions
only (``data.answer_losses_by_example``), where that reproduces the model's own loss: checked on the base,
skill by skill, on its first texts to 1e-5 relative (``packing_holds``; on the bundled
example and a tiny Llama the packed losses are the model's own within ~1e-6, far below what the report
prints), and where the model's head stays plain under the stack (an aLoRA's gate is a forward pre-hook,
which the packed path would skip). Else the rows run padded through the model's own loss (``losses``).
Candidates with identical adapters (``content_digest``; cat and multiplicative here) are measured once.
Texts are tokenised once.
Every retention gets a 95% bootstrap interval over the examples, and each skill its best candidate with
whether its lead is significant (``merging.eval.intervals``).

With ``dtype`` bfloat16 every held-out loss (base, each input alone, the stack and every candidate, exact
or not) is one arithmetic: the adapters folded into the float32 weights (``runtime.evaluated``), the body
under bfloat16 autocast with float32 accumulation, the output layer in float32 (``data._packed_ce``). All
rows in one precision: bfloat16 lowers the base's losses on the bundled example (by up to 0.015 nats), and
measuring only some rows so would favour them. There every loss moves by ≤ 0.11 nats (≤ 2.6%), every
retention by ≤ 6 points, and rows swap only where float32's own 95% interval of their difference contains
0 (``benchmarks/bf16_losses.py``). The packing check stays float32 (the model's own loss on a few texts:
whether the model reads packed sequences does not depend on which texts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from merging.core.adapter import Pair, content_digest, weighted
from merging.core.progress import Progress
from merging.eval.data import (
    Batches,
    answer_losses_by_example,
    losses,
    losses_by_example,
    pack,
    packed_agrees,
    plain_head,
    retention,
)
from merging.eval.intervals import Lead, lead, retention_interval
from merging.eval.results import Skill, Skills
from merging.runtime.fold import evaluated
from merging.runtime.stacked import stacked

PROBE = 2  # texts (in all, one at least per skill) on which packing is checked against the model's own loss


@dataclass(frozen=True)
class Measured:
    """``held_out``'s figures: the references, each candidate's skills (with intervals), and per skill which
    candidate keeps it best and whether its lead over the runner-up is significant."""

    skills: Skills
    merged: dict[str, dict[str, Skill]]
    leads: dict[str, Lead]


def packing_holds(model, batches: Batches) -> bool:
    """Whether packed texts give the model's own loss: checked in float32 on each skill's first texts
    (``PROBE`` in all, one at least per skill) packed into one row, so that a later text would see an
    earlier one if the model did not keep attention within each text; against the model's own loss."""
    per = -(-PROBE // len(batches))
    probe = {s: {k: v[:per] for k, v in b.items()} for s, b in batches.items()}
    tokens = sum(int(b["attention_mask"].sum()) for b in probe.values())
    return packed_agrees(model, pack(probe, row=tokens), losses(model, probe))


def held_out(
    model,
    batches: Batches,
    inputs: Sequence[Pair],
    candidates: Sequence,
    progress: Progress | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Measured:
    """Held-out losses per skill (an input's name → its tokenised batch with answer labels).

    Args:
        model: the base model; it is left exactly as it was.
        batches: skill → ``answer_batch`` of its held-out texts.
        inputs: the (adapter, weight) pairs in stacking order; an input's name keys its skill.
        candidates: the merged results (``verify.Candidate``: name, adapters, exact).
        progress: called after the base, the inputs alone, the stack and each candidate.
        seed: seeds the bootstrap of the intervals.
        dtype: what the losses are computed in: float32 as the weights, or a lower dtype (every row folded,
            the body under autocast: see the module's docstring).

    Returns:
        The reference losses, each candidate's losses and retentions (95% intervals) by candidate name, and
        the best candidate per skill.
    """
    steps, done = 3 + len(candidates), 0

    def tick(item: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, steps, item)

    low = dtype != torch.float32
    packed = pack(batches)
    fast = packing_holds(model, batches)

    def run(pairs: Sequence[Pair], exact: bool, skills: Batches = batches):
        """Means and per-example sums: exact rows stacked, the others folded (every row folded below
        float32); packed where the model agrees, else padded through its own loss."""
        with evaluated(model, pairs) if low or not exact else stacked(model, pairs):
            if fast and plain_head(model):
                return answer_losses_by_example(model, packed if skills is batches else pack(skills), dtype)
            return losses_by_example(model, skills, dtype)

    base, base_sums = run([], True)
    tick("base")
    got_alone = {s: run([p for p in inputs if p[0].name == s], True, {s: batches[s]}) for s in batches}
    alone = {s: means[s] for s, (means, _) in got_alone.items()}
    alone_sums = {s: sums[s] for s, (_, sums) in got_alone.items()}
    tick("each input alone")
    sums_of: dict[str, dict[str, np.ndarray]] = {}  # candidate → skill → per-example loss sums

    def measure(pairs: Sequence[Pair], exact: bool) -> tuple[dict[str, Skill], dict[str, np.ndarray]]:
        got, sums = run(pairs, exact)
        sums = {s: v.double().cpu().numpy() for s, v in sums.items()}
        return {s: Skill(v, retention(base[s], alone[s], v), retention_interval(
            base_sums[s], alone_sums[s], sums[s], seed=seed)) for s, v in got.items()}, sums  # fmt: skip

    base_sums = {s: v.double().cpu().numpy() for s, v in base_sums.items()}
    alone_sums = {s: v.double().cpu().numpy() for s, v in alone_sums.items()}
    stacked_skills, _ = measure(list(inputs), True)
    tick("stacked inputs")
    merged: dict[str, dict[str, Skill]] = {}
    seen: dict[str, tuple] = {}  # content digest → the losses of those very adapters
    for cand in candidates:
        digest = content_digest(cand.adapters)
        if digest not in seen:
            seen[digest or cand.name] = measure(weighted(cand.adapters), cand.exact)
        merged[cand.name], sums_of[cand.name] = seen[digest or cand.name]
        tick(cand.name)
    leads = {s: found for s in base if (found := lead(base_sums[s], alone_sums[s],
             {c: sums[s] for c, sums in sums_of.items()}, seed=seed))}  # fmt: skip
    return Measured(Skills(base, alone, stacked_skills), merged, leads)
