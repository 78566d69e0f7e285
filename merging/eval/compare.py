"""Strategy comparison: run strategies (and ranks) on the same adapters, verify each, measure skills.

``compare`` produces the report (a typed ``Comparison``); ``merging.export.report`` renders it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch

from merging import strategies
from merging.core.adapter import Adapter
from merging.core.progress import Progress
from merging.errors import MergingError, UnsupportedError
from merging.eval import skills as skills_lib
from merging.eval.data import EvalSets, answer_batch
from merging.eval.results import Comparison, Skills, Skipped, VariantResult
from merging.eval.verify import Candidate, base_weights, verify
from merging.merge import pipeline as merge_lib
from merging.merge.recipe import Versions, inputs_of
from merging.merge.result import MergeResult
from merging.merge.spectra import Spectra
from merging.strategies import Options


@dataclass(frozen=True)
class Variant:
    """One strategy at one rank (rank None: the strategy's own default or not rank-based), or svd under
    one global parameter budget."""

    strategy: str
    rank: int | None = None
    budget: int | None = None

    @property
    def label(self) -> str:
        if self.budget is not None:
            return f"{self.strategy} budget={self.budget:,}"
        return self.strategy if self.rank is None else f"{self.strategy} r={self.rank}"


@dataclass(frozen=True, eq=False)
class Extra:
    """A merge made outside the comparison (a tuned merge) shown as one more row, verified like the rest."""

    label: str
    result: MergeResult
    seconds: float


def variants(names: Sequence[str], ranks: Sequence[int]) -> list[Variant]:
    """Every strategy, at every rank for the rank-based ones."""
    out = []
    for name in names:
        if strategies.get(name).ranked and ranks:
            out += [Variant(name, r) for r in ranks]
        else:
            out.append(Variant(name))
    return out


def compare(
    model,
    tokenizer,
    inputs: Sequence[tuple[Adapter, float]],
    chosen: Sequence[Variant],
    *,
    evals: EvalSets | None = None,
    options: Options | None = None,
    base_name: str = "",
    progress: Progress | None = None,
    extra: Sequence[Extra] = (),
    fold_approximate: bool = True,
    loss_dtype: torch.dtype = torch.float32,
) -> Comparison:
    """Merge with every variant, verify each against the stacked inputs, and measure skill retention.

    Args:
        model, tokenizer: the base model and its tokenizer.
        inputs: (adapter, weight) pairs in stacking order; adapter names key the evals.
        chosen: the strategy variants to run; one that cannot handle the inputs is reported as such.
        evals: skill name (an input's name) → held-out (prompt, answer) examples.
        options: options shared by all variants (rank is set per variant).
        extra: merges made elsewhere (``merging tune``'s), verified and measured as rows after the variants.
        fold_approximate: run approximate rows through our runtime (``verify``'s option); False loads every
            row as users load it (PEFT), as on a bitsandbytes base, whose layers our runtime does not wrap.
        loss_dtype: what the held-out losses are computed in (``skills.held_out``); verify's figures and
            the exact rows' PASS/FAIL stay in the model's own dtype.

    Returns:
        The report: every figure, the inputs, the options and the versions.
    """
    evals = evals or {}
    names = {ad.name for ad, _ in inputs}
    for skill in evals:
        if skill not in names:
            raise MergingError(
                f"`evals`: no input adapter is named {skill!r} (inputs: {', '.join(sorted(names))})"
            )
    base_opts = options or Options()
    ads = [a for a, _ in inputs]
    ws = [w for _, w in inputs]
    total = _steps(len(chosen), len(chosen), evals)
    candidates, measured, skipped = [], [], []
    shared = _shared_spectra(chosen)
    for i, var in enumerate(chosen):
        opts = Options(**(asdict(base_opts) | {"rank": var.rank if var.rank is not None else base_opts.rank,
                                               "budget": var.budget}))  # fmt: skip
        spectra = shared.get(var)
        spent = spectra.seconds if spectra else 0.0
        started = time.perf_counter()
        try:
            result = merge_lib.merge(
                inputs, var.strategy, opts, base_weights=base_weights(model), spectra=spectra
            )
        except UnsupportedError as e:
            skipped.append(Skipped(var.label, var.strategy, var.rank, str(e)))
            continue
        seconds = time.perf_counter() - started
        if spectra:  # the time this merge takes alone: its own, and the spectra it shares
            seconds += spent
            if not any(shared.get(v) is spectra for v in chosen[i + 1 :]):
                spectra.by_module.clear()  # its last variant: free the triplets
        parts = tuple(s for s in (result.additive_strategy, result.ia3_strategy) if s)
        candidates.append(Candidate(var.label, result.adapters, var.strategy, result.exact))
        params = sum(a.numel for a in result.adapters)
        max_rank = max((m.rank for m in result.modules), default=0)
        measured.append(
            partial(VariantResult, label=var.label, rank=var.rank, seconds=seconds, params=params,
                    max_rank=max_rank, parts=parts)
        )  # fmt: skip
        if progress:
            progress(i + 1, total, f"merged {var.label}")
    for ex in extra:  # merges made elsewhere (a tuned merge): rows like the others
        result = ex.result
        parts = tuple(s for s in (result.additive_strategy, result.ia3_strategy) if s)
        candidates.append(Candidate(ex.label, result.adapters, result.strategy, False))
        max_rank = max((m.rank for m in result.modules), default=0)
        params = sum(a.numel for a in result.adapters)
        measured.append(partial(VariantResult, label=ex.label, rank=None, seconds=ex.seconds, params=params,
                                max_rank=max_rank, parts=parts))  # fmt: skip
    total = _steps(len(chosen), len(candidates), evals)
    report = verify(
        model, tokenizer, inputs, candidates, base_name=base_name, fold_approximate=fold_approximate,
        progress=_after(progress, len(chosen), total, "verified"),
    )  # fmt: skip
    ticks = _after(progress, len(chosen) + len(candidates) + 2, total, "held-out loss")
    measured_skills = _skills(model, tokenizer, inputs, candidates, evals, ticks, base_opts.seed, loss_dtype)
    return Comparison(
        title=f"{len(inputs)} adapters on {base_name}",
        base=base_name,
        device=report.device,
        dtype=report.dtype,
        tolerance=report.tolerance,
        prompts=tuple(report.prompts),
        inputs=inputs_of(ads, ws),
        options=base_opts,
        variants=tuple(
            variant(row=row, skills=measured_skills.merged.get(cand.name, {}))
            for cand, variant, row in zip(candidates, measured, report.rows, strict=True)
        ),
        not_applicable=tuple(skipped),
        skills=measured_skills.skills,
        versions=Versions.current(),
        reference_reason=report.reference_reason,
        reference_checks=report.reference_checks,
        leads=measured_skills.leads,
        loss_dtype=str(loss_dtype).removeprefix("torch."),
    )


def _shared_spectra(chosen: Sequence[Variant]) -> dict[Variant, Spectra]:
    """One ``Spectra`` per strategy run at several ranks (svd, TIES, DARE...): each module's SVD once."""
    ranks: dict[str, list[int]] = {}
    for var in chosen:
        if var.rank is not None and var.budget is None and strategies.get(var.strategy).spectrum:
            ranks.setdefault(var.strategy, []).append(var.rank)
    spectra = {name: Spectra(keep=max(rs)) for name, rs in ranks.items() if len(rs) > 1}
    return {v: spectra[v.strategy] for v in chosen if v.budget is None and v.strategy in spectra}


def _steps(chosen: int, candidates: int, evals: EvalSets) -> int:
    """Progress steps of ``compare``: each merge, verify's (base, stacked, each candidate), the losses'."""
    return chosen + (2 + candidates) + ((3 + candidates) if evals else 0)


def _after(progress: Progress | None, start: int, total: int, what: str) -> Progress | None:
    """A progress callback for one phase, whose steps count on from ``start`` of ``total``."""
    if progress is None:
        return None
    return lambda done, _total, item: progress(start + done, total, f"{what}: {item}")


def _skills(model, tokenizer, inputs, candidates, evals, progress: Progress | None = None, seed: int = 0,
            dtype: torch.dtype = torch.float32):  # fmt: skip
    """Held-out losses: base, each adapter alone, all stacked; and each merged candidate's, by name."""
    if not evals:
        return skills_lib.Measured(Skills(), {}, {})
    device = next(model.parameters()).device
    batches = {s: answer_batch(tokenizer, p, device) for s, p in evals.items()}  # tokenised once
    return skills_lib.held_out(model, batches, inputs, candidates, progress, seed, dtype)
