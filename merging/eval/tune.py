"""Learn merge weights on held-out data: the weights that maximise the worst (or mean) skill's retention.

The merge tuned is a weighted ``cat`` (exact for any weights: what is tuned is what is written), so the
weights are torch tensors through the stacked runtime and a few Adam steps on the tuning split's answer
loss find them. Strategies that are not differentiable in the weights (svd, ties, ...) are searched
gradient-free by a seeded (1+λ) evolution strategy, each candidate merged and measured. Each eval file is
split (seeded) into a tuning part and a reporting part; only the reporting part should be quoted.
Weights are one per input (``granularity="adapter"``) or one per input per layer (``"layer"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch

from merging.core.adapter import Pair
from merging.errors import MergingError
from merging.eval.data import (
    EvalSets,
    alone_losses,
    packed_agrees,
    plain_head,
    retention,
    skill_batch,
    skill_losses,
)
from merging.eval.objective import Split, Step, check_objective, split_evals
from merging.eval.per_layer import Weights, layers, merge_inputs, to_weights
from merging.eval.search import Granularity, Problem, Settings, evolution, gradient
from merging.runtime.stacked import stacked

__all__ = ["Settings", "Split", "TuneResult", "Weights", "check_objective", "held_out", "merge_inputs",
           "split_evals", "tune"]  # fmt: skip
Progress = Callable[[int, int, str], None]


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
        strategy: ``cat`` is tuned by gradient (exact for any weights); any other strategy by a seeded ES.
        options: the strategy's options (gradient-free search).
        progress: called as progress(step, steps, message).

    Returns:
        The chosen weights (rounded to 4 decimals), the trace, and the tuning objective at start and end.
    """
    s = settings or Settings()
    adapters = [a for a, _ in inputs]
    if missing := sorted(set(evals) - {a.name for a in adapters}):
        raise MergingError(f"`evals`: no input adapter is named {missing[0]!r}")
    names = tuple(evals)
    with torch.no_grad():
        full = skill_batch(tokenizer, evals, _device(model), names, packed=plain_head(model))
        base = skill_losses(model, replace(full, packed=None))
        own = dict(zip(names, base.tolist(), strict=True))
        packs = full.packed is not None and packed_agrees(model, full.packed, own)
        alone = _alone(model, tokenizer, inputs, evals, names)
    if not bool((base - alone > 0).any()):
        raise MergingError("no eval set improves with its adapter alone: nothing to tune for")
    groups = layers(adapters) if s.granularity == "layer" else []
    prob = Problem(model, tokenizer, adapters, evals, groups, base, base - alone, names, s, packs)
    start = torch.tensor([float(w) for _, w in inputs])
    w0 = start.expand((len(groups), len(adapters)) if groups else (len(adapters),)).clone()
    search = gradient if strategy == "cat" else partial(evolution, strategy=strategy, options=options)
    steps, w_end, first, last = search(prob, w0, progress)
    chosen = w_end if last.objective > first.objective else w0
    return TuneResult(to_weights(chosen, groups), tuple(steps), first, last, strategy, s.granularity)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _alone(model, tokenizer, inputs: Sequence[Pair], evals: EvalSets, names: tuple[str, ...]) -> torch.Tensor:
    """(skills,) each skill's loss with its adapter alone, on its own examples."""

    def loss_of(n: str) -> float:
        return float(
            skill_losses(model, skill_batch(tokenizer, {n: evals[n]}, _device(model), names))[names.index(n)]
        )

    got = alone_losses(model, inputs, names, loss_of)
    return torch.tensor([got[n] for n in names])


def held_out(model, tokenizer, inputs: Sequence[Pair], tuned: Sequence[Pair], evals: EvalSets) -> dict:
    """Retention per skill on ``evals`` (the reporting split) of the inputs stacked as given ("before")
    and of the tuned merge ("after"), with the base and alone losses they are measured against."""
    names = tuple(evals)
    full = skill_batch(tokenizer, evals, _device(model), names)
    with torch.no_grad():
        base = skill_losses(model, full).tolist()
        alone = _alone(model, tokenizer, inputs, evals, names).tolist()
        out = {"base": dict(zip(names, base, strict=True)), "alone": dict(zip(names, alone, strict=True))}
        for key, pairs in (("before", inputs), ("after", tuned)):
            with stacked(model, list(pairs)):
                losses = skill_losses(model, full).tolist()
            out[key] = {n: retention(b, a, v) for n, b, a, v in zip(names, base, alone, losses, strict=True)}
    return out
