"""Strategy comparison: run strategies (and ranks) on the same adapters, verify each, measure skills.

``compare`` produces the report (a typed ``Comparison``); ``write_report`` renders report.json,
report.md, a self-contained report.html and PNG plots (matplotlib, the ``plots`` extra).
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from merging import strategies
from merging.core.adapter import Adapter
from merging.errors import MergingError, UnsupportedError
from merging.eval import skills as skills_lib
from merging.eval.results import Comparison, Skill, Skills, Skipped, VariantResult, judge_note
from merging.eval.verify import Candidate, base_weights, verify
from merging.merge import pipeline as merge_lib
from merging.merge.recipe import Versions, inputs_of
from merging.merge.result import MergeResult
from merging.merge.spectra import Spectra
from merging.storage.files import atomic_folder, write_text
from merging.strategies import Options

RETENTION_NOTE = (
    "Share of each adapter's own held-out loss gain that survives: (L_base − L) / (L_base − L_alone). "
    "The references and the exact rows run stacked; the approximate rows run folded into the weights "
    "(equal up to float32 rounding)."
)
Progress = Callable[[int, int, str], None]
Pairs = list[tuple[str, str]]


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


def read_eval(path: Path) -> Pairs:
    """Held-out (prompt, answer) pairs from a JSONL file with "prompt" and "answer" keys."""
    pairs = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((str(row["prompt"]), str(row["answer"])))
        except (ValueError, KeyError, TypeError) as e:
            raise MergingError(
                f'{path}: line {i + 1}: expected {{"prompt": ..., "answer": ...}} ({e})'
            ) from e
    if not pairs:
        raise MergingError(f"{path}: no evaluation examples")
    return pairs


@torch.no_grad()
def answer_loss(model, tokenizer, pairs: Pairs) -> float:
    """Mean cross-entropy per answer token given its prompt (the skill's held-out loss)."""
    return float(model(**answer_batch(tokenizer, pairs, next(model.parameters()).device)).loss)


def answer_batch(tokenizer, pairs: Pairs, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A right-padded batch of prompt + answer + EOS whose labels cover the answer only (-100 elsewhere)."""
    ids, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    n = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (n - len(x)) for x in ids], device=device),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids], device=device),
        "labels": torch.tensor([y + [-100] * (n - len(y)) for y in labels], device=device),
    }


def compare(
    model,
    tokenizer,
    inputs: Sequence[tuple[Adapter, float]],
    chosen: Sequence[Variant],
    *,
    evals: dict[str, Pairs] | None = None,
    options: Options | None = None,
    base_name: str = "",
    progress: Progress | None = None,
    extra: Sequence[Extra] = (),
) -> Comparison:
    """Merge with every variant, verify each against the stacked inputs, and measure skill retention.

    Args:
        model, tokenizer: the base model and its tokenizer.
        inputs: (adapter, weight) pairs in stacking order; adapter names key the evals.
        chosen: the strategy variants to run; one that cannot handle the inputs is reported as such.
        evals: skill name (an input's name) → held-out (prompt, answer) pairs.
        options: options shared by all variants (rank is set per variant).
        extra: merges made elsewhere (``merging tune``'s), verified and measured as rows after the variants.

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
        model, tokenizer, inputs, candidates, base_name=base_name, fold_approximate=True,
        progress=_after(progress, len(chosen), total, "verified"),
    )  # fmt: skip
    ticks = _after(progress, len(chosen) + len(candidates) + 2, total, "held-out loss")
    skills, merged_skills = _skills(model, tokenizer, inputs, candidates, evals, ticks)
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
            variant(row=row, skills=merged_skills.get(cand.name, {}))
            for cand, variant, row in zip(candidates, measured, report.rows, strict=True)
        ),
        not_applicable=tuple(skipped),
        skills=skills,
        versions=Versions.current(),
        reference_reason=report.reference_reason,
        reference_checks=report.reference_checks,
    )


def _shared_spectra(chosen: Sequence[Variant]) -> dict[Variant, Spectra]:
    """One ``Spectra`` per strategy run at several ranks (svd, TIES, DARE...): each module's SVD once."""
    ranks: dict[str, list[int]] = {}
    for var in chosen:
        if var.rank is not None and var.budget is None and strategies.get(var.strategy).spectrum:
            ranks.setdefault(var.strategy, []).append(var.rank)
    spectra = {name: Spectra(keep=max(rs)) for name, rs in ranks.items() if len(rs) > 1}
    return {v: spectra[v.strategy] for v in chosen if v.budget is None and v.strategy in spectra}


def _steps(chosen: int, candidates: int, evals: dict[str, Pairs]) -> int:
    """Progress steps of ``compare``: each merge, verify's (base, stacked, each candidate), the losses'."""
    return chosen + (2 + candidates) + ((3 + candidates) if evals else 0)


def _after(progress: Progress | None, start: int, total: int, what: str) -> Progress | None:
    """A progress callback for one phase, whose steps count on from ``start`` of ``total``."""
    if progress is None:
        return None
    return lambda done, _total, item: progress(start + done, total, f"{what}: {item}")


def _skills(
    model, tokenizer, inputs, candidates, evals, progress: Progress | None = None
) -> tuple[Skills, dict[str, dict[str, Skill]]]:
    """Held-out losses: base, each adapter alone, all stacked; and each merged candidate's, by name."""
    if not evals:
        return Skills(), {}
    device = next(model.parameters()).device
    batches = {s: answer_batch(tokenizer, p, device) for s, p in evals.items()}  # tokenised once
    return skills_lib.held_out(model, batches, inputs, candidates, progress)


# ------------------------------------------------------------------------------------------ rendering


# what replacing a report folder replaces: its pages and every plot it can draw; other files are kept
REPORT_FILES = ("report.json", "report.md", "report.html", "fidelity_vs_rank.png", "per_layer_error.png",
                "size_vs_fidelity.png", "skill_retention.png", "tune_search.png",
                "tune_retention.png")  # fmt: skip


def write_report(report: Comparison, out: Path, *, force: bool = False) -> Comparison:
    """Write report.json, report.md, report.html and the PNG plots into ``out`` (atomically).

    Returns:
        The report as written, with the plot file names in ``plots``.
    """
    with atomic_folder(Path(out), force=force, owns=REPORT_FILES) as tmp:
        report = replace(report, plots=tuple(_plots(report, tmp)))
        write_text(tmp / "report.json", json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
        write_text(tmp / "report.md", render_markdown(report))
        write_text(tmp / "report.html", render_html(report, tmp))
    return report


def _fmt(v: Any, spec: str = ".2e") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def table_rows(report: Comparison) -> tuple[list[str], list[list[str]]]:
    """The main table: one row per variant (shared by Markdown, HTML and the terminal)."""
    head = [
        "strategy",
        "exact",
        "result",
        "effect-rel err",
        "KL",
        "top-1",
        "greedy",
        "ΔW err max",
        "max rank",
        "params",
    ]
    rows = []
    for v in report.variants:
        r = v.row
        rows.append([
            v.label, "yes" if r.exact else "no", r.verdict, _fmt(r.effect_rel_error), _fmt(r.kl),
            _fmt(r.top1_agreement, ".1%"), _fmt(r.greedy_agreement, ".1%"), _fmt(r.weight_error_max),
            str(v.max_rank), f"{v.params:,}",
        ])  # fmt: skip
    return head, rows


def skill_rows(report: Comparison) -> tuple[list[str], list[list[str]]]:
    """Skill retention: one row per variant (plus stacked), one column per skill."""
    skills = report.skills.names
    head = ["strategy", *skills]
    rows = []
    if skills:
        stack = report.skills.stacked
        rows.append(["stacked inputs", *(_fmt(stack[s].retention, ".0%") for s in skills)])
        for v in report.variants:
            rows.append([v.label, *(_fmt(v.skills[s].retention, ".0%") for s in skills)])
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: Comparison) -> str:
    """The report as Markdown, with the plots as relative image links."""
    parts = [f"# Strategy comparison: {report.title}", ""]
    parts.append(
        f"Base `{report.base}` on {report.device} ({report.dtype}); {len(report.prompts)} prompts. "
        f"Exact strategies pass at effect-relative error ≤ {report.tolerance:g}."
    )
    inputs = [[i.name, ", ".join(i.kinds), f"{i.weight:g}"] for i in report.inputs]
    parts += ["", "## Inputs", "", _md_table(["name", "kinds", "weight"], inputs)]
    parts += ["", "## Fidelity against the stacked inputs", "", _md_table(*table_rows(report))]
    parts += ["", judged(report)]
    if report.not_applicable:
        parts += ["", "Not applicable to these inputs:", ""]
        parts += [f"- `{s.label}`: {s.reason}" for s in report.not_applicable]
    head, rows = skill_rows(report)
    if rows:
        base, alone = report.skills.base, report.skills.alone
        losses = "; ".join(f"{s}: base {base[s]:.3f}, alone {alone[s]:.3f}" for s in base)
        parts += ["", "## Skill retention", "", RETENTION_NOTE, "", _md_table(head, rows), ""]
        parts += [f"Held-out answer loss: {losses}."]
        parts += [f"\n{note}" for note in report.notes]
    if report.plots:
        parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report.plots]
    v = report.versions
    parts += ["", f"Made with merging {v.merging}, torch {v.torch}.", ""]
    return "\n".join(parts)


def judged(report: Comparison) -> str:
    """Who stacked the inputs and who loaded each merged result, in one paragraph."""
    return judge_note(report.reference_reason, report.reference_checks, [v.row for v in report.variants])


def render_html(report: Comparison, folder: Path) -> str:
    """A self-contained HTML page: tables and the plots embedded as data URIs."""

    def table(head, rows):
        h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"

    imgs = []
    for p in report.plots or ():
        b64 = base64.b64encode((folder / p).read_bytes()).decode()
        src = f"data:image/png;base64,{b64}"
        cap = html.escape(p)
        imgs.append(f'<figure><img alt="{cap}" src="{src}"><figcaption>{cap}</figcaption></figure>')
    head, rows = skill_rows(report)
    na = "".join(
        f"<li><code>{html.escape(s.label)}</code>: {html.escape(s.reason)}</li>"
        for s in report.not_applicable
    )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>"
        f"<style>{style}</style></head><body><h1>Strategy comparison: {html.escape(report.title)}</h1>"
        f"<p>Base <code>{html.escape(report.base)}</code> on {report.device} ({report.dtype}). "
        f"Exact strategies pass at effect-relative error ≤ {report.tolerance:g}.</p>"
        f"<h2>Fidelity against the stacked inputs</h2>{table(*table_rows(report))}"
        f"<p>{html.escape(judged(report))}</p>"
        + (f"<p>Not applicable:</p><ul>{na}</ul>" if na else "")
        + (f"<h2>Skill retention</h2>{table(head, rows)}" if rows else "")
        + "".join(f"<p>{html.escape(n)}</p>" for n in report.notes)
        + "<h2>Plots</h2>"
        + "".join(imgs)
        + "</body></html>\n"
    )


def _plots(report: Comparison, folder: Path) -> list[str]:
    """PNG plots with labelled axes; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from merging.export.plots import draw_all

    return draw_all(plt, report, folder)
