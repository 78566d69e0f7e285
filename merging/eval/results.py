"""What ``verify`` and ``compare`` measured, typed: the verification Report and its Rows, the Comparison.

Frozen dataclasses; JSON only at the edges: ``to_dict()`` gives exactly the objects written as
``verify_report.json`` and ``report.json``, ``from_dict()`` reads them back. They live low in the
dependency order so that ``publish`` can read a verification report without importing ``verify``.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from merging.errors import MergingError
from merging.eval.intervals import Interval, Lead
from merging.merge.recipe import Input, Versions, malformed, options_from_dict
from merging.strategies import Options

Verdict = Literal["PASS", "FAIL", "approx."]
# Our runtime against PEFT evaluates the same deltas in another order (factored vs PEFT's dense LoHa/LoKr
# weights): over SmolLM2's 30 layers that is up to 1.4e-4 effect-relative in float32, so the check allows 10×.
CHECK_SLACK = 10


@dataclass(frozen=True)
class Row:
    """The verification figures of one candidate."""

    name: str
    strategy: str | None
    exact: bool
    effect_rel_error: float
    max_abs_diff: float
    kl: float | None
    top1_agreement: float | None
    greedy_agreement: float | None
    weight_error_max: float
    weight_error_mean: float
    passed: bool | None  # None for a candidate that does not claim exactness
    module_errors: dict[str, float] = field(default_factory=dict)
    reference: str = "merging.runtime"  # who stacked the inputs: "peft" (the files' own runtime) or ours
    loaded_by: str = "merging.runtime"  # who loaded the merged result: "peft" (as users load it) or ours

    @property
    def verdict(self) -> Verdict:
        """PASS or FAIL for an exact candidate (at the report's tolerance), approx. for the others."""
        return "approx." if self.passed is None else ("PASS" if self.passed else "FAIL")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        with malformed("verification row"):
            return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d or f.default is MISSING})


@dataclass(frozen=True)
class Report:
    """Everything ``verify`` measured."""

    base: str
    device: str
    dtype: str
    prompts: list[str]
    tolerance: float
    rows: list[Row]
    reference_reason: str | None = None  # why PEFT could not stack the inputs (our runtime did)
    reference_checks: dict[str, float] = field(default_factory=dict)  # ours vs PEFT on the parts it stacks

    @property
    def failed(self) -> bool:
        """True when an exact candidate failed, or our runtime disagreed with PEFT where it was checked."""
        checks_failed = any(e > CHECK_SLACK * self.tolerance for e in self.reference_checks.values())
        return checks_failed or any(r.passed is False for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        with malformed("verification report"):
            rows = [Row.from_dict(r) for r in d["rows"]]
            return cls(
                d["base"], d["device"], d["dtype"], list(d["prompts"]), d["tolerance"], rows,
                d.get("reference_reason"), dict(d.get("reference_checks") or {}),
            )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Report:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise MergingError(f"invalid JSON ({e})") from e
        return cls.from_dict(data)


def judge_note(reason: str | None, checks: dict[str, float], rows: list[Row]) -> str:
    """One paragraph naming who stacked the inputs and who loaded each merged result."""
    if reason is None:
        text = "Reference: the input files stacked active by PEFT itself."
    else:
        checked = "; ".join(f"{part} {err:.1e}" for part, err in checks.items()) or "no part PEFT can stack"
        text = f"Reference: merging.runtime ({reason}), checked against PEFT (effect-rel err): {checked}."
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r.loaded_by, []).append(r.name)
    loaded = "; ".join(f"by {who}: {', '.join(names)}" for who, names in by.items())
    return f"{text} Merged results loaded {loaded}." if rows else text


# ------------------------------------------------------------------------------------------ compare


@dataclass(frozen=True)
class Skill:
    """Held-out answer loss on one skill, and the share of the adapter's own gain that survives."""

    loss: float
    retention: float | None
    interval: Interval | None = None  # the retention's 95% bootstrap interval over the examples

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Skill:
        with malformed("skill"):
            got = d.get("interval")
            return cls(d["loss"], d["retention"], None if got is None else Interval(got["low"], got["high"]))


def _skills_from(d: dict[str, Any]) -> dict[str, Skill]:
    return {name: Skill.from_dict(s) for name, s in d.items()}


def _skills_to(skills: dict[str, Skill]) -> dict[str, dict[str, Any]]:
    """Each skill as JSON; a retention without an interval (no bootstrap ran) is written as before."""
    return {name: {k: v for k, v in asdict(s).items() if k != "interval" or v is not None}
            for name, s in skills.items()}  # fmt: skip


@dataclass(frozen=True)
class Skills:
    """The reference losses per skill: base model, each adapter alone, all inputs stacked."""

    base: dict[str, float] = field(default_factory=dict)
    alone: dict[str, float] = field(default_factory=dict)
    stacked: dict[str, Skill] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.base)

    def to_dict(self) -> dict[str, Any]:
        return {"base": dict(self.base), "alone": dict(self.alone), "stacked": _skills_to(self.stacked)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Skills:
        with malformed("skills"):
            return cls(dict(d["base"]), dict(d["alone"]), _skills_from(d["stacked"]))


@dataclass(frozen=True)
class VariantResult:
    """One compared variant: its verification row, cost, size, and skills."""

    label: str
    rank: int | None
    row: Row
    seconds: float
    params: int
    max_rank: int
    parts: tuple[str, ...]  # the strategies that merged the additive deltas and the IA³ vectors
    skills: dict[str, Skill] = field(default_factory=dict)

    @property
    def strategy(self) -> str | None:
        return self.row.strategy

    @property
    def bytes(self) -> int:
        """The merged adapter's size in float32."""
        return 4 * self.params

    def to_dict(self) -> dict[str, Any]:
        return self.row.to_dict() | {
            "rank": self.rank,
            "seconds": self.seconds,
            "params": self.params,
            "max_rank": self.max_rank,
            "parts": list(self.parts),
            "label": self.label,
            "bytes": self.bytes,
            "skills": _skills_to(self.skills),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantResult:
        with malformed("variant"):
            return cls(
                d["label"], d["rank"], Row.from_dict(d), d["seconds"], d["params"], d["max_rank"],
                tuple(d["parts"]), _skills_from(d["skills"]),
            )  # fmt: skip


@dataclass(frozen=True)
class Skipped:
    """A variant that cannot handle the inputs, and why."""

    label: str
    strategy: str
    rank: int | None
    reason: str


@dataclass(frozen=True)
class Comparison:
    """The comparison report: every figure ``compare`` measured, the inputs, the options, the versions."""

    title: str
    base: str
    device: str
    dtype: str
    tolerance: float
    prompts: tuple[str, ...]
    inputs: tuple[Input, ...]
    options: Options
    variants: tuple[VariantResult, ...]
    not_applicable: tuple[Skipped, ...]
    skills: Skills
    versions: Versions
    plots: tuple[str, ...] | None = None  # the PNG files, once written
    reference_reason: str | None = None  # why PEFT could not stack the inputs (our runtime did)
    reference_checks: dict[str, float] = field(default_factory=dict)  # ours vs PEFT on the parts it stacks
    notes: tuple[str, ...] = ()  # said under the skill table (which split the retentions are measured on)
    search: dict[str, Any] | None = None  # the tuned row's search: label, trace, weights (``merging tune``)
    leads: dict[str, Lead] = field(
        default_factory=dict
    )  # skill → the best row, and whether it leads significantly
    loss_dtype: str | None = None  # what the held-out losses were computed in (None: a report from before)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``report.json``."""
        out = {
            "title": self.title,
            "base": self.base,
            "device": self.device,
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "prompts": list(self.prompts),
            "inputs": [i.to_dict() for i in self.inputs],
            "options": asdict(self.options),
            "variants": [v.to_dict() for v in self.variants],
            "not_applicable": [asdict(s) for s in self.not_applicable],
            "skills": self.skills.to_dict(),
            "versions": asdict(self.versions),
            "reference_reason": self.reference_reason,
            "reference_checks": dict(self.reference_checks),
        }
        out |= {"loss_dtype": self.loss_dtype} if self.loss_dtype is not None else {}
        out |= {"notes": list(self.notes)} if self.notes else {}
        out |= {"search": self.search} if self.search is not None else {}
        out |= {"leads": {s: asdict(x) | {"significant": x.significant} for s, x in self.leads.items()}
                } if self.leads else {}  # fmt: skip
        return out if self.plots is None else out | {"plots": list(self.plots)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Comparison:
        with malformed("comparison report"):
            return cls(
                d["title"], d["base"], d["device"], d["dtype"], d["tolerance"], tuple(d["prompts"]),
                tuple(Input.from_dict(i) for i in d["inputs"]), options_from_dict(d["options"]),
                tuple(VariantResult.from_dict(v) for v in d["variants"]),
                tuple(Skipped(**s) for s in d["not_applicable"]), Skills.from_dict(d["skills"]),
                Versions.from_dict(d["versions"]), None if d.get("plots") is None else tuple(d["plots"]),
                d.get("reference_reason"), dict(d.get("reference_checks") or {}), tuple(d.get("notes", ())),
                d.get("search"), {s: _lead_from(x) for s, x in (d.get("leads") or {}).items()},
                d.get("loss_dtype"),
            )  # fmt: skip


def _lead_from(d: dict[str, Any]) -> Lead:
    diff = d["difference"]
    return Lead(d["best"], d["runner_up"], None if diff is None else Interval(diff["low"], diff["high"]))
