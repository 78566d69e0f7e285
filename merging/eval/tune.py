"""Learn merge weights on held-out data: the weights that maximise the worst (or mean) skill's retention.

The merge tuned is a weighted ``cat`` (exact for any weights: what is tuned is what is written), so the
weights are torch tensors through the stacked runtime and a few Adam steps on the tuning split's answer
loss find them. Strategies that are not differentiable in the weights (svd, ties, ...) are searched
gradient-free by a seeded (1+λ) evolution strategy, each candidate merged and measured. Each eval file is
split (seeded) into a tuning part and a reporting part; only the reporting part should be quoted.
Weights are one per input (``granularity="adapter"``) or one per input per layer (``"layer"``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

from merging.core.adapter import Adapter, Pair, layer_of, weighted
from merging.core.progress import Progress
from merging.errors import MergingError
from merging.eval.packing import Packed, pack, packed_losses
from merging.runtime.stacked import stacked

Pairs = list[tuple[str, str]]
Evals = Mapping[str, Pairs]
Granularity = Literal["adapter", "layer"]
Objective = Literal["worst", "mean"] | float  # a float λ: λ·worst + (1 − λ)·mean
TEMPERATURE = 0.05  # softmin temperature of the worst-skill objective's gradient


@dataclass(frozen=True)
class Split:
    """Each eval set in two disjoint parts: ``tune`` (searched on) and ``report`` (quoted)."""

    tune: dict[str, Pairs]
    report: dict[str, Pairs]


def split_evals(evals: Evals, *, seed: int = 0, fraction: float = 0.5) -> Split:
    """Split every eval set by a seeded permutation (per skill name); each part keeps the file's order."""
    if not 0 < fraction < 1:
        raise MergingError(f"`tune_fraction` must be in (0, 1), got {fraction}")
    tune, report = {}, {}
    for name, pairs in evals.items():
        if len(pairs) < 2:
            raise MergingError(f"eval set {name!r} has {len(pairs)} example: tuning needs at least 2")
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        k = min(len(pairs) - 1, max(1, round(len(pairs) * fraction)))
        chosen = set(torch.randperm(len(pairs), generator=g)[:k].tolist())
        tune[name] = [p for i, p in enumerate(pairs) if i in chosen]
        report[name] = [p for i, p in enumerate(pairs) if i not in chosen]
    return Split(tune, report)


def layers(adapters: Sequence[Adapter]) -> list[str]:
    """Every layer the inputs touch, sorted."""
    return sorted({layer_of(m) for ad in adapters for m in ad.deltas})


@dataclass(frozen=True)
class Weights:
    """Learned weights: one per input; with per-layer weights, one per input for each layer too."""

    inputs: tuple[float, ...]
    layers: dict[str, tuple[float, ...]] = field(default_factory=dict)  # layer → one weight per input


@dataclass(frozen=True)
class Step:
    """One point of the search: the objective and each skill's retention at some weights.

    ``on`` says what was measured: "tune" (the whole tuning split) or "batch" (the step's minibatch).
    """

    step: int
    objective: float
    retention: dict[str, float]
    on: str = "tune"


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


def retention(base: float, alone: float, loss: float) -> float | None:
    """(L_base − L) / (L_base − L_alone); None when the adapter alone does not improve on the base."""
    gain = base - alone
    return None if gain <= 0 else (base - loss) / gain


def score(values: Sequence[float], how: Objective) -> float:
    """The objective of per-skill retentions: the worst, the mean, or λ·worst + (1 − λ)·mean."""
    if how == "worst":
        return min(values)
    if how == "mean":
        return sum(values) / len(values)
    lam = float(how)
    return lam * min(values) + (1 - lam) * sum(values) / len(values)


def _smooth(r: torch.Tensor, how: Objective) -> torch.Tensor:
    """A differentiable stand-in for ``score``: the worst skill as a softmin."""
    worst = -TEMPERATURE * torch.logsumexp(-r / TEMPERATURE, 0)
    if how == "worst":
        return worst
    if how == "mean":
        return r.mean()
    return float(how) * worst + (1 - float(how)) * r.mean()


def check_objective(how: str | float) -> Objective:
    """``worst``, ``mean`` or a number λ in [0, 1] (λ·worst + (1 − λ)·mean)."""
    if how in ("worst", "mean"):
        return how  # type: ignore[return-value]
    try:
        lam = float(how)
    except ValueError:
        raise MergingError(f"`objective` must be worst, mean or a number in [0, 1], got {how!r}") from None
    if not 0 <= lam <= 1:
        raise MergingError(f"`objective` λ must be in [0, 1], got {lam}")
    return lam


# ------------------------------------------------------------------------------------ measuring losses


@dataclass(frozen=True)
class _Batch:
    """Some skills' examples in one right-padded batch, and which skill each row belongs to."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # (n, t - 1) next-token labels, -100 off the answers
    skill: torch.Tensor  # (n,) skill index per row
    names: tuple[str, ...]
    packed: Packed | None = None  # the same texts packed (no padding): one forward, where the model agrees


def _batch(
    tokenizer, evals: Evals, device, names: Sequence[str] | None = None, packed: bool = False
) -> _Batch:
    from merging.eval.compare import answer_batch

    names = tuple(names or evals)
    rows = [(names.index(n), p) for n in evals for p in evals[n]]
    b = answer_batch(tokenizer, [p for _, p in rows], device)
    skill = torch.tensor([i for i, _ in rows], device=device)
    packs = None
    if packed:  # pack reads each skill's rows as its own batch
        mine = {n: skill == i for i, n in enumerate(names) if evals.get(n)}
        packs = pack({n: {k: v[rows_of] for k, v in b.items()} for n, rows_of in mine.items()})
    labels = b.pop("labels")[:, 1:]
    return _Batch(b, labels, skill, names, packs)


def _plain(model) -> bool:
    """Whether the model's logits are its output layer on the body's last hidden states (no soft-capping,
    no forward pre-hook such as an aLoRA gate, which reads the ids at the top model)."""
    head, body = model.get_output_embeddings(), getattr(model, "base_model", None)
    plain = getattr(model.config, "final_logit_softcapping", None) is None and body is not model
    return head is not None and body is not None and plain and not model._forward_pre_hooks


def _logits_at(model, batch: _Batch, where: torch.Tensor) -> torch.Tensor:
    """The logits at the answer positions only (the head runs on those rows; the rest are not needed)."""
    if not _plain(model):
        return model(**batch.inputs).logits[:, :-1][where].float()
    hidden = model.base_model(**batch.inputs).last_hidden_state[:, :-1]  # (n, t - 1, d)
    return model.get_output_embeddings()(hidden[where]).float()


def _packed_agrees(model, batch: _Batch, padded: torch.Tensor) -> bool:
    """Whether the packed texts give the padded batch's losses on this model (one that does not read packed
    sequences, or has no decoder to run alone, keeps the padded batch)."""
    try:
        return bool(torch.allclose(_losses(model, batch), padded, rtol=1e-5, atol=0))
    except (AttributeError, TypeError, NotImplementedError, RuntimeError, ValueError):
        return False


def _losses(model, batch: _Batch) -> torch.Tensor:
    """Mean answer-token cross-entropy per skill (as ``report.answer_loss`` computes it per eval set);
    NaN for a skill with no row in the batch. From the packed texts when the batch carries them."""
    if batch.packed is not None and _plain(model):  # (an aLoRA gate, stacked later, is a pre-hook)
        got = packed_losses(model, batch.packed)
        nan = torch.tensor(float("nan"), device=batch.skill.device)
        return torch.stack([got.get(n, nan) for n in batch.names])
    where = batch.labels != -100
    ce = F.cross_entropy(_logits_at(model, batch, where), batch.labels[where], reduction="none")
    skill = batch.skill[:, None].expand_as(batch.labels)[where]
    out = []
    for i in range(len(batch.names)):
        mine = skill == i
        out.append(ce[mine].mean() if bool(mine.any()) else ce.new_tensor(float("nan")))
    return torch.stack(out)


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


def by_layer(adapter: Adapter) -> dict[str, Adapter]:
    """The adapter cut into one adapter per layer (stacking each keeps every module's order and meaning)."""
    groups: dict[str, dict] = {}
    for mod, d in adapter.deltas.items():
        groups.setdefault(layer_of(mod), {})[mod] = d
    out = {}
    for i, (layer, deltas) in enumerate(sorted(groups.items())):
        tied = {m: s for m, s in adapter.tied.items() if s in deltas}
        aux = adapter.aux if i == 0 else {}
        out[layer] = Adapter(adapter.name, deltas, adapter.base_model, adapter.revision, aux, tied,
                             adapter.source, adapter.config)  # fmt: skip
    return out


def layer_pairs(
    adapters: Sequence[Adapter], weight: Callable[[int, str], float | torch.Tensor]
) -> list[Pair]:
    """(per-layer adapter, weight) pairs in stacking order, weight(input index, layer) each."""
    return [(sub, weight(i, layer)) for i, ad in enumerate(adapters) for layer, sub in by_layer(ad).items()]


# ------------------------------------------------------------------------------------------ the search


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
class _Problem:
    """What every search needs: the model, the inputs, the tuning data and the reference losses."""

    model: object
    tokenizer: object
    adapters: list[Adapter]
    evals: Evals
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

    def batch(self, evals: Evals) -> _Batch:
        return _batch(self.tokenizer, evals, next(self.model.parameters()).device, self.names, self.packed)

    def step(self, k: int, losses: torch.Tensor, on: str) -> tuple[torch.Tensor, Step]:
        r, named = self.measure(losses)
        return r, Step(k, score(list(named.values()), self.settings.objective), named, on)


def tune(
    model,
    tokenizer,
    inputs: Sequence[Pair],
    evals: Evals,
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
    device = next(model.parameters()).device
    with torch.no_grad():
        full = _batch(tokenizer, evals, device, names, packed=_plain(model))
        base = _losses(model, replace(full, packed=None))
        packs = full.packed is not None and _packed_agrees(model, full, base)
        alone = base.clone()
        for i, n in enumerate(names):  # each adapter alone on its own skill's examples
            with stacked(model, [(a, w) for a, w in inputs if a.name == n]):
                alone[i] = _losses(model, _batch(tokenizer, {n: evals[n]}, device, names))[i]
    if not bool((base - alone > 0).any()):
        raise MergingError("no eval set improves with its adapter alone: nothing to tune for")
    groups = layers(adapters) if s.granularity == "layer" else []
    prob = _Problem(model, tokenizer, adapters, evals, groups, base, base - alone, names, s, packs)
    start = torch.tensor([float(w) for _, w in inputs])
    w0 = start.expand((len(groups), len(adapters)) if groups else (len(adapters),)).clone()
    search = _gradient if strategy == "cat" else partial(_evolution, strategy=strategy, options=options)
    steps, w_end, first, last = search(prob, w0, progress)
    chosen = w_end if last.objective > first.objective else w0
    return TuneResult(_weights(chosen, groups), tuple(steps), first, last, strategy, s.granularity)


def _weights(w: torch.Tensor, group_names: Sequence[str]) -> Weights:
    rounded = [[round(float(v), 4) for v in row] for row in (w if w.dim() == 2 else w[None])]
    if not group_names:
        return Weights(tuple(rounded[0]))
    per_input = tuple(round(sum(col) / len(col), 4) for col in zip(*rounded, strict=True))
    return Weights(per_input, {g: tuple(row) for g, row in zip(group_names, rounded, strict=True)})


def pairs_for(adapters: Sequence[Adapter], w: torch.Tensor, group_names: Sequence[str]) -> list[Pair]:
    """The stacked pairs that weights ``w`` (per input, or per layer × input) mean."""
    if not group_names:
        return list(zip(adapters, w, strict=True))
    index = {g: i for i, g in enumerate(group_names)}
    return layer_pairs(adapters, lambda i, layer: w[index[layer], i])


def _minibatch(evals: Evals, size: int, g: torch.Generator) -> dict[str, Pairs]:
    """``size`` examples of every skill, drawn without replacement (all of them when size is 0)."""
    if size == 0:
        return dict(evals)
    return {n: [p[i] for i in sorted(torch.randperm(len(p), generator=g)[:size].tolist())]
            for n, p in evals.items()}  # fmt: skip


def _gradient(prob: _Problem, w0: torch.Tensor, progress: Progress | None):
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
            _, first = prob.step(0, _losses(model, full), "tune")
        for k in range(1, s.steps + 1):
            batch = prob.batch(_minibatch(prob.evals, s.batch, g))
            with stacked(model, pairs_for(prob.adapters, w, prob.groups)):
                r, step = prob.step(k, _losses(model, batch), "batch" if s.batch else "tune")
            steps.append(step)
            opt.zero_grad()
            (-_smooth(r, s.objective)).backward()
            opt.step()
            if progress:
                progress(k, s.steps + 1, f"step {k}: objective {step.objective:.3f}")
        w_end = w.detach().clone()
        with torch.no_grad(), stacked(model, pairs_for(prob.adapters, w_end, prob.groups)):
            _, last = prob.step(s.steps, _losses(model, full), "tune")
    if progress:
        progress(s.steps + 1, s.steps + 1, f"objective {first.objective:.3f} → {last.objective:.3f}")
    return [first, *steps], w_end, first, last


def _evolution(prob: _Problem, w0: torch.Tensor, progress: Progress | None, *, strategy: str, options):
    """A seeded (1+λ) evolution strategy on the whole tuning split: λ Gaussian candidates per step, each
    merged with ``strategy`` and measured; the best replaces the parent when it improves."""
    from merging.eval.verify import base_weights
    from merging.merge import pipeline as merge_lib

    s, model = prob.settings, prob.model
    bw = base_weights(model)
    full = prob.batch(prob.evals)

    def evaluate(k: int, w: torch.Tensor) -> Step:
        weights = _weights(w, prob.groups)
        pairs, layer_w = merge_inputs(prob.adapters, weights)
        result = merge_lib.merge(pairs, strategy, options, base_weights=bw, layer_weights=layer_w)
        with torch.no_grad(), stacked(model, weighted(result.adapters)):
            return prob.step(k, _losses(model, full), "tune")[1]

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


def merge_inputs(adapters: Sequence[Adapter], weights: Weights) -> tuple[list[Pair], dict | None]:
    """What to pass ``merge.merge`` for learned weights: the pairs and the per-layer weights (or None)."""
    return weighted(adapters, weights.inputs), (dict(weights.layers) or None)


def held_out(model, tokenizer, inputs: Sequence[Pair], tuned: Sequence[Pair], evals: Evals) -> dict:
    """Retention per skill on ``evals`` (the reporting split) of the inputs stacked as given ("before")
    and of the tuned merge ("after"), with the base and alone losses they are measured against."""
    names = tuple(evals)
    device = next(model.parameters()).device
    full = _batch(tokenizer, evals, device, names)
    with torch.no_grad():
        base = _losses(model, full)
        alone = base.clone()
        for i, n in enumerate(names):
            with stacked(model, [(a, w) for a, w in inputs if a.name == n]):
                alone[i] = _losses(model, _batch(tokenizer, {n: evals[n]}, device, names))[i]
        out = {"base": dict(zip(names, base.tolist(), strict=True)),
               "alone": dict(zip(names, alone.tolist(), strict=True))}  # fmt: skip
        for key, pairs in (("before", inputs), ("after", tuned)):
            with stacked(model, list(pairs)):
                losses = _losses(model, full).tolist()
            out[key] = {n: retention(b, a, v) for n, b, a, v in
                        zip(names, base.tolist(), alone.tolist(), losses, strict=True)}  # fmt: skip
    return out
