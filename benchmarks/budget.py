"""svd under one global parameter budget against uniform rank at the same parameter count (ΔW error).

The bundled example's four additive adapters (add: LoRA, sort: LoRA, reverse: LoHa, translate: LoKr) on
SmolLM2-135M's module shapes; no model is run. For each uniform rank r, the budget is the parameter count
the uniform svd keeps (its factors); the figures are the whole-adapter relative ΔW error
‖ΔW_merged − ΣΔW‖ / ‖ΣΔW‖ over all modules together, and the worst module's. Writes
reports/benchmarks/budget.json and budget.md.

    python -m benchmarks.budget
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from benchmarks.run import OUT, machine
from merging.core import linalg
from merging.core.adapter import weighted
from merging.core.deltas import stack_factors
from merging.formats import sources
from merging.merge import pipeline as merge_lib
from merging.merge.result import MergeResult
from merging.strategies import Options

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ["add", "sort", "reverse", "translate"]
RANKS = [1, 2, 4, 8, 16, 32]


def whole_error(result: MergeResult, norms: dict[str, float]) -> float:
    """‖ΔW_merged − ΣΔW‖ / ‖ΣΔW‖ over every module at once, from the per-module relative errors."""
    num = sum((r.error if r.error is not None else 0.0) ** 2 * norms[r.module] ** 2 for r in result.modules)
    return math.sqrt(num / sum(n**2 for n in norms.values()))


def lora_params(result: MergeResult) -> int:
    return sum(a.numel for a in result.adapters if a.name == "lora")


def run() -> dict:
    pairs = weighted([ad for spec in SKILLS for ad in sources.load(ROOT / "examples/adapters" / spec)])
    norms = {}
    for mod in sorted({m for ad, _ in pairs for m in ad.deltas}):
        b, a = stack_factors([(ad.deltas[mod], w) for ad, w in pairs if mod in ad.deltas])
        norms[mod] = math.sqrt(max(float(linalg.gram_norm_sq(b, a)), 0.0))
    rows = []
    for r in RANKS:
        started = time.perf_counter()
        uniform = merge_lib.merge(pairs, "svd", Options(rank=r))
        t_uniform = time.perf_counter() - started
        params = lora_params(uniform)
        started = time.perf_counter()
        budgeted = merge_lib.merge(pairs, "svd", Options(budget=params))
        t_budget = time.perf_counter() - started
        ranks = [m.rank for m in budgeted.modules]
        rows.append({
            "rank": r, "params": params, "budget_params": lora_params(budgeted),
            "uniform_error": whole_error(uniform, norms), "budget_error": whole_error(budgeted, norms),
            "uniform_max_module_error": max(m.error for m in uniform.modules),
            "budget_max_module_error": max(m.error for m in budgeted.modules),
            "budget_ranks": {"min": min(ranks), "max": max(ranks), "modules": len(ranks),
                             "left_out": sum(k == 0 for k in ranks)},
            "seconds": {"uniform": t_uniform, "budget": t_budget},
        })  # fmt: skip
    return {"machine": machine(), "inputs": SKILLS, "modules": len(norms), "rows": rows}


def render(data: dict) -> str:
    lines = [
        "# svd: one global parameter budget against uniform rank",
        "",
        f"Inputs: the bundled example's {', '.join(data['inputs'])} (weights 1), {data['modules']} modules "
        "of SmolLM2-135M. ΔW error is ‖ΔW_merged − ΣΔW‖ / ‖ΣΔW‖ over all modules together; the budget is "
        "the parameter count uniform rank r keeps. `python -m benchmarks.budget` remakes this table.",
        "",
        "| uniform rank | parameters | uniform ΔW err | budget ΔW err | budget params | budget ranks "
        "(min–max, left out) | worst module: uniform / budget | seconds: uniform / budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        k = r["budget_ranks"]
        lines.append(
            f"| {r['rank']} | {r['params']:,} | {r['uniform_error']:.4f} | {r['budget_error']:.4f} | "
            f"{r['budget_params']:,} | {k['min']}–{k['max']}, {k['left_out']} | "
            f"{r['uniform_max_module_error']:.3f} / {r['budget_max_module_error']:.3f} | "
            f"{r['seconds']['uniform']:.1f} / {r['seconds']['budget']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    data = run()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "budget.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (OUT / "budget.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
