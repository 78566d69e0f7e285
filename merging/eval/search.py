"""The searches behind ``tune``: Adam through the exact weighted cat, and ``scipy.optimize`` for the others.

``cat`` is exact for any weights, so the weights are tensors through the stacked runtime and Adam steps on
the answer loss. Every other strategy is searched gradient-free (``free_search``): each candidate's weights
(and the strategy's own knobs, e.g. TIES's density or Iso-CTS's common fraction) are rounded to 4
decimals, merged with the strategy and measured on the whole tuning split, so what is measured is what is
written. Gradients through those merges exist in form only: the SVD's backward divides by σ_i² − σ_j²,
which Iso-C makes zero by construction (it flattens the spectrum), and TIES/DARE's top-k and sign election
are piecewise constant; so they are not used. Points known at once (Nelder-Mead's first simplex) are
measured ``group`` per forward, each on its own copy of the texts (``eval.batched``); on 2 CPU cores a
forward over the example's tuning texts is compute-bound, so this is no faster there (``group`` 1, the
default, folds each merge into the weights: one plain forward). The search stops after ``evaluations``
merges, or after ``patience`` evaluations without improvement. Per-layer weights are regularised toward
the per-input solution (``anchor``): the objective minus ``regularisation`` · mean((W − anchor)²).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import torch

from merging.core.adapter import Adapter, Pair, weighted
from merging.core.progress import Progress
from merging.errors import MergingError
from merging.eval.batched import candidate_losses
from merging.eval.data import LOSS_DTYPES, EvalSets, Examples, SkillBatch, skill_batch, skill_losses
from merging.eval.objective import Objective, Step, check_objective, score, smooth
from merging.eval.per_layer import merge_inputs, pairs_for, to_weights
from merging.runtime.stacked import stacked
from merging.strategies import Options

Granularity = Literal["adapter", "layer"]


METHODS = ("nelder-mead", "powell")
KNOB_RANGES = {"density": (0.05, 1.0), "common_fraction": (0.05, 0.95), "alpha": (0.25, 4.0)}
READ_BY = {  # which strategies read each knob
    "density": ("ties", "dare_linear", "dare_ties", "magnitude_prune"),
    "common_fraction": ("iso_cts",),
    "alpha": ("iso_c", "iso_cts", "tsv", "knots", "core"),
}
# the knobs tuned unless asked otherwise: alpha is left out, since every strategy reading it is homogeneous
# of degree 1 in the weights (scaling every weight scales the merge as alpha does): a flat direction
DEFAULT_KNOBS = {"ties": ("density",), "dare_linear": ("density",), "dare_ties": ("density",),
                 "magnitude_prune": ("density",), "iso_cts": ("common_fraction",)}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """How to search: granularity, objective, steps, learning rate (the gradient-free search's first step
    too), minibatch, seed; and for the gradient-free search its budget of evaluations, patience, method
    and knobs; ``regularisation`` pulls per-layer weights toward the per-input solution."""

    granularity: Granularity = "adapter"
    objective: Objective = "worst"
    steps: int = 6
    lr: float = 0.3
    batch: int = 4  # gradient search: examples per skill per step (0: the whole tuning split)
    seed: int = 0
    evaluations: int = 40  # gradient-free search: merges measured at most
    patience: int = (
        15  # gradient-free search: stop after this many evaluations without improvement (0: never)
    )
    method: str = "nelder-mead"  # gradient-free search: scipy.optimize.minimize's method
    knobs: tuple[str, ...] | None = None  # the strategy's knobs tuned too (None: DEFAULT_KNOBS)
    regularisation: float = 3.0  # per-layer weights: the penalty on mean((W − per-input solution)²)
    group: int = 1  # gradient-free search: candidates measured per forward where several are known at once
    dtype: str = "float32"  # the search's losses: float32, bfloat16, or auto (``data.loss_dtype``)

    def __post_init__(self) -> None:
        if self.granularity not in ("adapter", "layer"):
            raise MergingError(f"`granularity` must be adapter or layer, got {self.granularity!r}")
        if self.steps < 0 or self.batch < 0 or not self.lr > 0:
            raise MergingError("`steps` and `batch` must be ≥ 0 and `lr` > 0")
        if self.evaluations < 1 or self.group < 1 or self.patience < 0 or self.regularisation < 0:
            raise MergingError("`evaluations` and `group` must be ≥ 1, `patience` and `regularisation` ≥ 0")
        if self.method not in METHODS:
            raise MergingError(f"`method` must be one of {', '.join(METHODS)}, got {self.method!r}")
        for k in self.knobs or ():
            if k not in KNOB_RANGES:
                raise MergingError(f"`knobs`: {k!r} is not tunable (tunable: {', '.join(KNOB_RANGES)})")
        check_objective(self.objective)
        if self.dtype not in LOSS_DTYPES:
            raise MergingError(f"`tune_dtype` must be one of {', '.join(LOSS_DTYPES)}, got {self.dtype!r}")


def knobs_for(strategy: str, asked: tuple[str, ...] | None) -> tuple[str, ...]:
    """The knobs to tune with ``strategy``: those asked for (each must be one it reads), else its defaults."""
    if asked is None:
        return DEFAULT_KNOBS.get(strategy, ())
    for k in asked:
        if strategy not in READ_BY[k]:
            reads = [n for n, by in READ_BY.items() if strategy in by]
            raise MergingError(
                f"`knobs`: {strategy} does not read {k} (it reads: {', '.join(reads) or 'none'})"
            )
    return tuple(asked)


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
    anchor: torch.Tensor | None = None  # per-layer search: the per-input solution, (layers, inputs)
    dtype: torch.dtype = torch.float32  # the body's arithmetic in every loss of the search

    def penalty(self, w: torch.Tensor) -> torch.Tensor:
        """The regularisation toward the anchor (0 without one)."""
        if self.anchor is None:
            return w.new_zeros(())
        return self.settings.regularisation * ((w - self.anchor) ** 2).mean()

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


def gradient(prob: Problem, w0: torch.Tensor, progress: Progress | None) -> Found:
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
            _, first = prob.step(0, skill_losses(model, full, prob.dtype), "tune")
        for k in range(1, s.steps + 1):
            batch = prob.batch(_minibatch(prob.evals, s.batch, g))
            with stacked(model, pairs_for(prob.adapters, w, prob.groups)):
                r, step = prob.step(k, skill_losses(model, batch, prob.dtype), "batch" if s.batch else "tune")
            steps.append(step)
            opt.zero_grad()
            (prob.penalty(w) - smooth(r, s.objective)).backward()
            opt.step()
            if progress:
                progress(k, s.steps + 1, f"step {k}: objective {step.objective:.3f}")
        w_end = w.detach().clone()
        with torch.no_grad(), stacked(model, pairs_for(prob.adapters, w_end, prob.groups)):
            _, last = prob.step(s.steps, skill_losses(model, full, prob.dtype), "tune")
    if progress:
        progress(s.steps + 1, s.steps + 1, f"objective {first.objective:.3f} → {last.objective:.3f}")
    return Found([first, *steps], w_end, {}, first, last, s.steps + 2)


class _Stop(Exception):
    """The gradient-free search's budget or patience ran out."""


@dataclass(frozen=True)
class Found:
    """A search's outcome: the trace, the weights and knobs it ends at, and the objective there."""

    steps: list[Step]
    weights: torch.Tensor
    knobs: dict[str, float]
    first: Step
    last: Step
    evaluations: int  # passes over the tuning texts: merges measured (free search), or Adam steps + 2


def free_search(
    prob: Problem, w0: torch.Tensor, progress: Progress | None, *, strategy: str, options
) -> Found:
    """``scipy.optimize.minimize`` (Nelder-Mead or Powell) over the weights and the strategy's knobs, each
    candidate merged with ``strategy`` (rounded to 4 decimals) and measured on the whole tuning split.

    The trace has one step per evaluation: the best (penalised) objective so far.
    """
    import numpy as np
    from scipy import optimize

    from merging.eval.verify import base_weights
    from merging.merge import pipeline as merge_lib

    s, model = prob.settings, prob.model
    opts = options or Options()
    names = knobs_for(strategy, s.knobs)
    bw, full, n_w = base_weights(model), prob.batch(prob.evals), w0.numel()
    seen: dict[tuple[float, ...], tuple[Step, float]] = {}
    steps: list[Step] = []
    best: list = [None, -float("inf"), None]  # step, penalised value, rounded point
    since, trusted = 0, True  # evaluations without gain; whether grouped forwards agreed with one alone

    def merged(key: tuple[float, ...]) -> list[Pair]:
        w = torch.tensor(key[:n_w], dtype=torch.float32).reshape(w0.shape)
        pairs, layer_w = merge_inputs(prob.adapters, to_weights(w, prob.groups))
        knobs = dict(zip(names, key[n_w:], strict=True))
        result = merge_lib.merge(  # (no weight-space errors: only its losses are read)
            pairs, strategy, replace(opts, **knobs), base_weights=bw, layer_weights=layer_w, errors=False
        )
        return weighted(result.adapters)

    def measure(keys: list[tuple[float, ...]]) -> None:
        """Measure new points, ``s.group`` per forward (each merged, on its own copy of the texts)."""
        nonlocal trusted
        size, checked = (s.group if trusted else 1), False
        for at in range(0, len(keys), size):
            chunk = keys[at : at + size]
            losses, ok = candidate_losses(
                model, full, [merged(k) for k in chunk], check=not checked, dtype=prob.dtype
            )
            trusted, checked = trusted and ok, True
            for key, loss in zip(chunk, losses, strict=True):
                step = prob.step(len(seen), loss, "tune")[1]
                w = torch.tensor(key[:n_w]).reshape(w0.shape)
                seen[key] = step, step.objective - float(prob.penalty(w))
                if progress:
                    top = max(v[0].objective for v in seen.values())
                    progress(len(seen), s.evaluations, f"{len(seen)} merges: best objective {top:.3f}")

    def f(x) -> float:
        nonlocal since
        if len(steps) >= s.evaluations or (s.patience and since >= s.patience):
            raise _Stop
        key = tuple(round(float(v), 4) for v in x)
        if key not in seen:
            measure([key])
        step, value = seen[key]
        since += 1
        if value > best[1]:
            best[:], since = [step, value, key], 0
        steps.append(Step(len(steps), best[0].objective, best[0].retention))
        return -value

    x0 = np.array([*w0.flatten().tolist(), *(float(getattr(opts, k)) for k in names)])
    low = [-np.inf] * n_w + [KNOB_RANGES[k][0] for k in names]
    high = [np.inf] * n_w + [KNOB_RANGES[k][1] for k in names]
    steps_at = np.array([s.lr] * n_w + [0.2 * (KNOB_RANGES[k][1] - KNOB_RANGES[k][0]) for k in names])
    x0 = np.clip(x0, low, high)
    if s.method == "nelder-mead":
        simplex = np.vstack([x0, x0 + np.diag(steps_at)])
        simplex = np.clip(simplex, low, high)
        # Nelder-Mead measures every vertex first: known at once, they are measured together
        measure(list(dict.fromkeys(tuple(round(float(v), 4) for v in x) for x in simplex[: s.evaluations])))
        how = {"initial_simplex": simplex, "maxfev": 10 * s.evaluations, "xatol": 1e-4, "fatol": 1e-6}
    else:
        how = {"direc": np.diag(steps_at), "maxfev": 10 * s.evaluations, "xtol": 1e-4, "ftol": 1e-6}
    try:
        optimize.minimize(f, x0, method=s.method, bounds=optimize.Bounds(low, high), options=how)
    except _Stop:
        pass
    first = seen[next(iter(seen))][0]
    key = best[2]
    w_end = torch.tensor(key[:n_w], dtype=torch.float32).reshape(w0.shape)
    last = Step(len(steps), best[0].objective, best[0].retention)
    return Found(steps, w_end, dict(zip(names, key[n_w:], strict=True)), first, last, len(seen))
