"""The searches behind ``tune``: Adam through the exact weighted cat, and a gradient-free search for the
other strategies (each candidate merged and measured on the whole tuning split)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from merging.core.adapter import Adapter, weighted
from merging.errors import MergingError
from merging.eval.data import EvalSets, Examples, SkillBatch, skill_batch, skill_losses
from merging.eval.objective import Objective, Step, check_objective, score, smooth
from merging.eval.per_layer import merge_inputs, pairs_for, to_weights
from merging.runtime.stacked import stacked

Granularity = Literal["adapter", "layer"]
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Settings:
    """How to search: granularity, objective, steps, learning rate (or ES step size), minibatch, seed."""

    granularity: Granularity = "adapter"
    objective: Objective = "worst"
    steps: int = 6
    lr: float = 0.3
    batch: int = 4  # gradient search: examples per skill per step (0: the whole tuning split)
    seed: int = 0
    population: int = 4  # gradient-free search: candidates per step

    def __post_init__(self) -> None:
        if self.granularity not in ("adapter", "layer"):
            raise MergingError(f"`granularity` must be adapter or layer, got {self.granularity!r}")
        if self.steps < 0 or self.population < 1 or self.batch < 0 or not self.lr > 0:
            raise MergingError("`steps` and `batch` must be ≥ 0, `population` ≥ 1 and `lr` > 0")
        check_objective(self.objective)


@dataclass(frozen=True)
class Problem:
    """What every search needs: the model, the inputs, the tuning data and the reference losses."""

    model: object
    tokenizer: object
    adapters: list[Adapter]
    evals: EvalSets
    groups: list[str]  # the layers, for per-layer weights; [] for one weight per input
    base: torch.Tensor  # (skills,) tuning-split loss of the base model
    gain: torch.Tensor  # (skills,) base − alone
    names: tuple[str, ...]
    settings: Settings
    packed: bool = False  # the search's losses from packed texts (checked against the padded batch first)

    def measure(self, losses: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Retention per skill (only skills whose adapter alone improves on the base count)."""
        keep = self.gain > 0
        r = ((self.base - losses) / self.gain)[keep]
        kept = [n for n, k in zip(self.names, keep.tolist(), strict=True) if k]
        return r, {n: float(v) for n, v in zip(kept, r.tolist(), strict=True)}

    def batch(self, evals: EvalSets) -> SkillBatch:
        return skill_batch(
            self.tokenizer, evals, next(self.model.parameters()).device, self.names, self.packed
        )

    def step(self, k: int, losses: torch.Tensor, on: str) -> tuple[torch.Tensor, Step]:
        r, named = self.measure(losses)
        return r, Step(k, score(list(named.values()), self.settings.objective), named, on)


@contextmanager
def _frozen(model) -> Iterator[None]:
    """The model's parameters without gradients for the duration (restored after)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _minibatch(evals: EvalSets, size: int, g: torch.Generator) -> dict[str, Examples]:
    """``size`` examples of every skill, drawn without replacement (all of them when size is 0)."""
    if size == 0:
        return dict(evals)
    return {n: [p[i] for i in sorted(torch.randperm(len(p), generator=g)[:size].tolist())]
            for n, p in evals.items()}  # fmt: skip


def gradient(prob: Problem, w0: torch.Tensor, progress: Progress | None):
    """Adam on the smooth objective over seeded minibatches; the weights are tensors through the runtime.

    The whole tuning split is measured at the start and at the end (the minibatch objectives are the trace).
    """
    s, model = prob.settings, prob.model
    g = torch.Generator().manual_seed(s.seed)
    full = prob.batch(prob.evals)
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=s.lr)
    steps = []
    with _frozen(model):
        with torch.no_grad(), stacked(model, pairs_for(prob.adapters, w0, prob.groups)):
            _, first = prob.step(0, skill_losses(model, full), "tune")
        for k in range(1, s.steps + 1):
            batch = prob.batch(_minibatch(prob.evals, s.batch, g))
            with stacked(model, pairs_for(prob.adapters, w, prob.groups)):
                r, step = prob.step(k, skill_losses(model, batch), "batch" if s.batch else "tune")
            steps.append(step)
            opt.zero_grad()
            (-smooth(r, s.objective)).backward()
            opt.step()
            if progress:
                progress(k, s.steps + 1, f"step {k}: objective {step.objective:.3f}")
        w_end = w.detach().clone()
        with torch.no_grad(), stacked(model, pairs_for(prob.adapters, w_end, prob.groups)):
            _, last = prob.step(s.steps, skill_losses(model, full), "tune")
    if progress:
        progress(s.steps + 1, s.steps + 1, f"objective {first.objective:.3f} → {last.objective:.3f}")
    return [first, *steps], w_end, first, last


def evolution(prob: Problem, w0: torch.Tensor, progress: Progress | None, *, strategy: str, options):
    """A seeded (1+λ) evolution strategy on the whole tuning split: λ Gaussian candidates per step, each
    merged with ``strategy`` and measured; the best replaces the parent when it improves."""
    from merging.eval.verify import base_weights
    from merging.merge import pipeline as merge_lib

    s, model = prob.settings, prob.model
    bw = base_weights(model)
    full = prob.batch(prob.evals)

    def evaluate(k: int, w: torch.Tensor) -> Step:
        weights = to_weights(w, prob.groups)
        pairs, layer_w = merge_inputs(prob.adapters, weights)
        result = merge_lib.merge(pairs, strategy, options, base_weights=bw, layer_weights=layer_w)
        with torch.no_grad(), stacked(model, weighted(result.adapters)):
            return prob.step(k, skill_losses(model, full), "tune")[1]

    g = torch.Generator().manual_seed(s.seed)
    parent, sigma = w0.clone(), s.lr
    first = best = evaluate(0, parent)
    steps = [first]
    for k in range(1, s.steps + 1):
        improved = False
        for _ in range(s.population):
            cand = parent + sigma * torch.randn(parent.shape, generator=g)
            step = evaluate(k, cand)
            if step.objective > best.objective:
                parent, best, improved = cand, step, True
        sigma = sigma * (1.5 if improved else 0.7)  # the 1/5th-success rule, coarsely
        steps.append(Step(k, best.objective, best.retention))
        if progress:
            progress(k, s.steps, f"step {k}: objective {best.objective:.3f}")
    return steps, parent, first, Step(s.steps, best.objective, best.retention)
