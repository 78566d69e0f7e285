"""Learn merge weights on held-out data: the weights that maximise the worst (or mean) skill's retention.

Any registered strategy can be tuned (``merging.eval.search``): ``cat`` by Adam through the exact weighted
cat, the others gradient-free with ``scipy.optimize``, their own knobs too. Each eval file is split
(seeded) into a tuning part and a reporting part; only the reporting part should be quoted. Weights are
one per input (``granularity="adapter"``) or one per input per layer (``"layer"``): per-layer weights
start from the per-input solution (searched first) and are regularised toward it.

The search's losses (``settings.dtype``) may be computed in bfloat16 (autocast: bfloat16 matrix products
accumulated in float32, the output layer in float32; "auto" where the device multiplies bfloat16 natively):
every loss the objective reads then alike, the base's and each input alone's too (the candidates folded into
the float32 weights, undone bit for bit; the packing check stays float32). Only the weights chosen depend
on it: ``held_out`` and ``compare`` measure the tuned merge in float32 like every other row. Where the
model reads packed texts (``packed_agrees``), the references are packed too, each input alone folded: one
plain forward each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from merging import strategies
from merging.core.adapter import Pair
from merging.core.progress import Progress
from merging.errors import MergingError
from merging.eval.data import (
    EvalSets,
    alone_losses,
    answer_batch,
    loss_dtype,
    plain_head,
    retention,
    skill_batch,
    skill_losses,
    skill_losses_by_example,
)
from merging.eval.intervals import Interval, retention_interval
from merging.eval.objective import Split, Step, check_objective, split_evals
from merging.eval.per_layer import Weights, layers, merge_inputs, to_weights
from merging.eval.search import Found, Granularity, Problem, Settings, free_search, gradient
from merging.eval.skills import PROBE, packing_holds
from merging.runtime.fold import evaluated
from merging.runtime.stacked import stacked
from merging.strategies import Options

__all__ = ["Settings", "Split", "TuneResult", "Weights", "check_objective", "held_out", "merge_inputs",
           "split_evals", "tune"]  # fmt: skip


@dataclass(frozen=True)
class TuneResult:
    """The weights chosen, the search trace, and the tuning-split objective where it starts and ends.

    ``chosen`` is the better of ``start`` (the given weights) and ``end`` (the searched ones), so tuning
    never returns weights that measured worse on the tuning split than the ones it started from.
    """

    weights: Weights
    steps: tuple[Step, ...]
    start: Step
    end: Step
    strategy: str
    granularity: Granularity
    knobs: dict[str, float] = field(default_factory=dict)  # the strategy's knobs chosen (Options fields)
    evaluations: int = 0  # passes over the tuning texts: merges measured, or Adam steps + 2 (cat)
    dtype: str = "float32"  # what the search's losses were computed in ("float32", "bfloat16")

    @property
    def chosen(self) -> Step:
        return self.end if self.end.objective > self.start.objective else self.start

    @property
    def trace(self) -> list[float]:
        """The objective at every step (on the step's minibatch for the gradient search)."""
        return [s.objective for s in self.steps]


def tune(
    model,
    tokenizer,
    inputs: Sequence[Pair],
    evals: EvalSets,
    *,
    settings: Settings | None = None,
    strategy: str = "cat",
    options=None,
    progress: Progress | None = None,
) -> TuneResult:
    """Search the inputs' merge weights that maximise the objective on ``evals`` (the tuning split).

    Args:
        model, tokenizer: the base model and its tokenizer (the model's parameters are not changed).
        inputs: (adapter, weight) pairs in stacking order; the weights are where the search starts.
        evals: skill name (an input's name) → (prompt, answer) pairs to tune on.
        settings: granularity, objective, steps, learning rate, minibatch, seed.
        strategy: any registered strategy: ``cat`` is tuned by gradient (exact for any weights), any other
            gradient-free (``scipy.optimize``), with its knobs (``settings.knobs``).
        options: the strategy's options; its tuned knobs start from these.
        progress: called as progress(step, steps, message).

    Returns:
        The chosen weights (rounded to 4 decimals) and knobs, the trace, and the tuning objective at start
        and end.
    """
    s = settings or Settings()
    adapters = [a for a, _ in inputs]
    if missing := sorted(set(evals) - {a.name for a in adapters}):
        raise MergingError(f"`evals`: no input adapter is named {missing[0]!r}")
    names, weight = tuple(evals), next(model.parameters())
    dtype = loss_dtype(s.dtype, weight.device, weight.dtype)
    with torch.no_grad():
        full = skill_batch(tokenizer, evals, _device(model), names, packed=plain_head(model))
        packs = full.packed is not None and _packing_holds(model, tokenizer, evals)
        full = full if packs else replace(full, packed=None)
        base = skill_losses(model, full, dtype)
        alone = _search_alone(model, tokenizer, inputs, evals, names, packs, dtype)
    if not bool((base - alone > 0).any()):
        raise MergingError("no eval set improves with its adapter alone: nothing to tune for")
    prob = Problem(model, tokenizer, adapters, evals, [], base, base - alone, names, s, packs, dtype=dtype)
    start = torch.tensor([float(w) for _, w in inputs])
    coarse = _search(strategy, options)(prob, start, progress)
    won = coarse.last.objective > coarse.first.objective
    w, knobs, last = (coarse.weights, coarse.knobs, coarse.last) if won else (start, {}, coarse.first)
    steps, groups, evaluations = coarse.steps, [], coarse.evaluations
    if s.granularity == "layer":  # per layer, from the per-input solution and regularised toward it
        groups = layers(adapters)
        anchor = w.expand(len(groups), len(adapters)).clone()
        fine_prob = replace(prob, groups=groups, anchor=anchor, settings=replace(s, knobs=()))
        fine = _search(strategy, replace(options or Options(), **knobs))(fine_prob, anchor, progress)
        steps = [*steps, *(replace(t, step=t.step + len(steps)) for t in fine.steps)]
        evaluations += fine.evaluations
        if fine.last.objective - float(fine_prob.penalty(fine.weights)) > fine.first.objective:
            w, last = fine.weights, fine.last
        else:
            w = anchor
    return TuneResult(to_weights(w, groups), tuple(steps), coarse.first, last, strategy, s.granularity, knobs,
                      evaluations, str(dtype).removeprefix("torch."))  # fmt: skip


def _packing_holds(model, tokenizer, evals: EvalSets) -> bool:
    """Whether packed texts give the model's own losses (``skills.packing_holds``: a few texts in one row,
    each skill's first tokenised here, not the whole tuning split)."""
    per, device = -(-PROBE // len(evals)), _device(model)
    return packing_holds(model, {n: answer_batch(tokenizer, p[:per], device) for n, p in evals.items()})


def _search_alone(
    model, tokenizer, inputs: Sequence[Pair], evals: EvalSets, names: tuple[str, ...], packs: bool,
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """(skills,) each skill's loss with its adapter alone, as the search measures its candidates: folded
    (``runtime.evaluated``), packed where the model agrees, the body in ``dtype``."""
    out = []
    for i, n in enumerate(names):
        batch = skill_batch(tokenizer, {n: evals[n]}, _device(model), names, packed=packs)
        with evaluated(model, [(a, w) for a, w in inputs if a.name == n]):
            out.append(skill_losses(model, batch, dtype)[i])
    return torch.stack(out)


def _search(strategy: str, options) -> Callable[..., Found]:
    """Adam for ``cat`` (exact for any weights), ``scipy.optimize`` for any other strategy."""
    strategies.get(strategy)  # an unknown name fails here, listing the valid ones
    return gradient if strategy == "cat" else partial(free_search, strategy=strategy, options=options)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _alone(
    model, tokenizer, inputs: Sequence[Pair], evals: EvalSets, names: tuple[str, ...]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(skills,) each skill's loss with its adapter alone, on its own examples; and each example's sum."""

    def loss_of(n: str) -> tuple[float, torch.Tensor]:
        means, sums = skill_losses_by_example(
            model, skill_batch(tokenizer, {n: evals[n]}, _device(model), names)
        )
        return float(means[names.index(n)]), sums

    got = alone_losses(model, inputs, names, loss_of)
    return torch.tensor([got[n][0] for n in names]), {n: got[n][1].cpu() for n in names}


def held_out(
    model, tokenizer, inputs: Sequence[Pair], tuned: Sequence[Pair], evals: EvalSets, seed: int = 0
) -> dict:
    """Retention per skill on ``evals`` (the reporting split) of the inputs stacked as given ("before")
    and of the tuned merge ("after"), with the base and alone losses they are measured against, and each
    retention's 95% bootstrap interval over the examples ("intervals": before/after → skill → [low, high])."""
    names = tuple(evals)
    full = skill_batch(tokenizer, evals, _device(model), names)
    rows = {n: (full.skill == i).cpu() for i, n in enumerate(names)}
    with torch.no_grad():
        base, base_sums = skill_losses_by_example(model, full)
        base, base_sums = base.tolist(), base_sums.cpu()  # the bootstrap runs in numpy
        alone, alone_sums = _alone(model, tokenizer, inputs, evals, names)
        alone = alone.tolist()
        out = {"base": dict(zip(names, base, strict=True)), "alone": dict(zip(names, alone, strict=True))}
        out["intervals"] = {}
        for key, pairs in (("before", inputs), ("after", tuned)):
            with stacked(model, list(pairs)):
                losses, sums = skill_losses_by_example(model, full)
            sums = sums.cpu()
            out[key] = {
                n: retention(b, a, v) for n, b, a, v in zip(names, base, alone, losses.tolist(), strict=True)
            }
            out["intervals"][key] = {n: _listed(retention_interval(
                base_sums[rows[n]], alone_sums[n], sums[rows[n]], seed=seed)) for n in names}  # fmt: skip
    return out


def _listed(found: Interval | None) -> list[float] | None:
    return None if found is None else [found.low, found.high]
