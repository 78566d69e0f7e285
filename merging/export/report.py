"""The comparison report rendered: report.json, report.md, a self-contained report.html and PNG plots
(matplotlib, the ``plots`` extra), and the table rows the terminal shares."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from merging.eval.results import Comparison, Skill, judge_note
from merging.export.plots import draw_all, pyplot
from merging.storage.atomic import atomic_folder
from merging.storage.files import write_text

RETENTION_NOTE = (
    "Share of each adapter's own held-out loss gain that survives: (L_base − L) / (L_base − L_alone). "
    "The references and the exact rows run stacked; the approximate rows run folded into the weights "
    "(equal up to float32 rounding)."
)
LEAD_NOTE = (
    "In brackets: 95% bootstrap intervals over the examples (2,000 seeded resamples, BCa). * marks each "
    "skill's best row, ** when its lead is significant: the paired interval of its retention minus the "
    "runner-up's (the same resampled examples for both) lies above 0."
)

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


def retention_cell(skill: Skill, mark: str = "") -> str:
    """A retention with its 95% interval when it has one, e.g. ``41% [30%, 52%]``; ``mark`` after it."""
    cell = _fmt(skill.retention, ".0%")
    if skill.interval is not None:
        cell += f" [{_fmt(skill.interval.low, '.0%')}, {_fmt(skill.interval.high, '.0%')}]"
    return cell + mark


def best_mark(report: Comparison, label: str, skill: str) -> str:
    """ " *" on the best row of a skill, " **" when its lead over the runner-up is significant."""
    found = report.leads.get(skill)
    if found is None or found.best != label:
        return ""
    return " **" if found.significant else " *"


def skill_rows(report: Comparison) -> tuple[list[str], list[list[str]]]:
    """Skill retention: one row per variant (plus stacked), one column per skill."""
    skills = report.skills.names
    head = ["strategy", *skills]
    rows = []
    if skills:
        stack = report.skills.stacked
        rows.append(["stacked inputs", *(retention_cell(stack[s]) for s in skills)])
        for v in report.variants:
            rows.append(
                [v.label, *(retention_cell(v.skills[s], best_mark(report, v.label, s)) for s in skills)]
            )
    return head, rows


def lead_rows(report: Comparison) -> tuple[list[str], list[list[str]]]:
    """Per skill: the best row, the runner-up, and the paired 95% interval of their retentions' difference."""
    head = ["skill", "best", "runner-up", "lead (95% interval)", "significant"]
    rows = []
    for skill, x in report.leads.items():
        diff = "–" if x.difference is None else f"[{x.difference.low:+.0%}, {x.difference.high:+.0%}]"
        rows.append([skill, x.best, x.runner_up or "–", diff, "yes" if x.significant else "no"])
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
        if report.leads:
            parts += ["", LEAD_NOTE, "", _md_table(*lead_rows(report))]
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
        + (f"<p>{html.escape(LEAD_NOTE)}</p>{table(*lead_rows(report))}" if report.leads else "")
        + "".join(f"<p>{html.escape(n)}</p>" for n in report.notes)
        + "<h2>Plots</h2>"
        + "".join(imgs)
        + "</body></html>\n"
    )


def _plots(report: Comparison, folder: Path) -> list[str]:
    """PNG plots with labelled axes; [] when matplotlib is not installed."""
    plt = pyplot()
    return [] if plt is None else draw_all(plt, report, folder)
