"""How far `make example`'s held-out figures move in bfloat16 against float32, and what it saves.

The bundled example as `make example` runs it: every strategy at ranks 4, 16, 64, svd under the budgets of
ranks 4 and 16, and the tuned cat (its weights read from reports/example/report.json, not learnt again),
on the evals' reporting split. Three measurements in one process:

1. figures: ``skills.held_out`` (what compare reports) in float32 and in bfloat16: every loss and retention
   (base, each input alone, the stack, every row, every skill), the largest absolute and relative movement,
   every skill's order of rows, and the best row per skill with its significance;
2. a swap in a skill's order, if any: the paired bootstrap interval of the two rows' retention difference
   in float32 (``intervals.lead``), i.e. whether float32 itself tells them apart;
3. time: each distinct row's loss forward in float32 and in bfloat16 back to back under one fold (the
   order alternating row by row, so a load that changes affects both alike): the ratio of the sums and the
   median of the per-row ratios; and the peak resident memory the bfloat16 forwards add.

    python -m benchmarks.bf16_losses [--skip-figures] [--skip-timing]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from merging import strategies
from merging.api.comparison import budget_sizes
from merging.base.example_model import example_base_model
from merging.base.load import load_base
from merging.core.adapter import content_digest, weighted
from merging.errors import UnsupportedError
from merging.eval import data, skills
from merging.eval.compare import variants
from merging.eval.intervals import lead
from merging.eval.objective import split_evals
from merging.eval.verify import Candidate, base_weights
from merging.formats import sources
from merging.merge import pipeline as merge_lib
from merging.runtime.fold import evaluated
from merging.runtime.stacked import stacked
from merging.strategies import Options

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ["add", "sort", "reverse", "translate", "sentiment"]
RANKS = [4, 16, 64]
BUDGETS = ["r4", "r16"]
LOW = torch.bfloat16


def setup():
    """The base model, the inputs, the reporting split's batches and every row of `make example`."""
    specs = [f"{s}={ROOT / 'examples/adapters' / s}" for s in SKILLS]
    model, tok = load_base(example_base_model(), "cpu", "float32", task_type=sources.task_type(specs))
    pairs = sources.load_inputs(specs, base=model)
    evals = {s: data.read_eval(ROOT / "examples/data" / f"{s}.jsonl") for s in SKILLS}
    batches = {s: data.answer_batch(tok, e) for s, e in split_evals(evals, seed=0).report.items()}
    cands = []
    for v in variants(strategies.names(), RANKS):
        try:
            rank = v.rank if v.rank is not None else Options().rank
            res = merge_lib.merge(pairs, v.strategy, Options(rank=rank), base_weights=base_weights(model))
        except UnsupportedError:
            continue
        cands.append(Candidate(v.label, res.adapters, v.strategy, res.exact))
    for b in budget_sizes(BUDGETS, pairs):
        res = merge_lib.merge(pairs, "svd", Options(budget=b))
        cands.append(Candidate(f"svd budget={b:,}", res.adapters))
    tuned = json.loads((ROOT / "reports/example/report.json").read_text())["search"]["weights"]
    res = merge_lib.merge([(ad, tuned[ad.name]) for ad, _ in pairs], "cat")
    cands.append(Candidate("tuned cat", res.adapters, "cat", False))
    return model, pairs, batches, cands


def figures(model, pairs, batches, cands) -> dict:
    """Every held-out figure in float32 and in bfloat16, and how far each moved."""
    got = {}
    for dtype in (torch.float32, LOW):
        started = time.perf_counter()
        got[dtype] = skills.held_out(model, batches, pairs, cands, dtype=dtype)
        print(f"held_out {dtype}: {time.perf_counter() - started:.1f} s", flush=True)
    hi, lo = got[torch.float32], got[LOW]
    moves = []  # (what, skill, float32, bfloat16)
    for s in SKILLS:
        moves += [("base loss", s, hi.skills.base[s], lo.skills.base[s]),
                  ("alone loss", s, hi.skills.alone[s], lo.skills.alone[s]),
                  ("stacked loss", s, hi.skills.stacked[s].loss, lo.skills.stacked[s].loss),
                  ("stacked retention", s, hi.skills.stacked[s].retention, lo.skills.stacked[s].retention)]
        for c in cands:
            a, b = hi.merged[c.name][s], lo.merged[c.name][s]
            moves += [(f"{c.name} loss", s, a.loss, b.loss),
                      (f"{c.name} retention", s, a.retention, b.retention)]
    orders = {}
    for s in SKILLS:
        orders[s] = [sorted(g.merged, key=lambda c, g=g: g.merged[c][s].loss) for g in (hi, lo)]  # noqa: B023
    leads = {s: (hi.leads.get(s), lo.leads.get(s)) for s in SKILLS}
    return {"moves": moves, "orders": orders, "leads": leads}


def swaps(order_hi: list[str], order_lo: list[str]) -> list[tuple[str, str]]:
    """Pairs of rows whose order differs between the two rankings (a before b in float32, after in bf16)."""
    at = {c: i for i, c in enumerate(order_lo)}
    return [(a, b) for i, a in enumerate(order_hi) for b in order_hi[i + 1 :] if at[a] > at[b]]


def timing(model, pairs, batches, cands) -> dict:
    """Each distinct row's loss forward in float32 and bfloat16, alternating order, under one fold; also the
    float32 per-example sums of every row and reference (for the swaps' intervals)."""
    packed = data.pack(batches)
    sums: dict[str, dict] = {}
    base = data.losses_by_example(model, batches)[1]
    alone = {}
    for s in SKILLS:
        with stacked(model, [p for p in pairs if p[0].name == s]):
            alone[s] = data.losses_by_example(model, {s: batches[s]})[1][s]
    times: dict[torch.dtype, list[float]] = {torch.float32: [], LOW: []}
    rss: list[int] = []
    seen: dict[str, str] = {}
    for i, c in enumerate(cands):
        digest = content_digest(c.adapters)
        if digest in seen:
            sums[c.name] = sums[seen[digest]]
            continue
        seen[digest] = c.name
        with evaluated(model, weighted(c.adapters)):
            for dtype in ((torch.float32, LOW) if i % 2 == 0 else (LOW, torch.float32)):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                started = time.perf_counter()
                _, got = data.answer_losses_by_example(model, packed, dtype)
                times[dtype].append(time.perf_counter() - started)
                if dtype == LOW:
                    rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
                    continue
                sums[c.name] = got
        f32, low = times[torch.float32][-1], times[LOW][-1]
        print(f"{c.name}: float32 {f32:.2f} s, bfloat16 {low:.2f} s", flush=True)
    f32, low = times[torch.float32], times[LOW]
    return {"rows": len(f32), "float32_s": sum(f32), "bfloat16_s": sum(low), "ratio": sum(f32) / sum(low),
            "median_ratio": statistics.median(a / b for a, b in zip(f32, low, strict=True)),
            "rss_growth_kib": max(rss, default=0), "sums": sums, "base": base, "alone": alone}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-figures", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    model, pairs, batches, cands = setup()
    print(f"{len(cands)} rows, {sum(len(b['input_ids']) for b in batches.values())} texts", flush=True)
    timed = None if args.skip_timing else timing(model, pairs, batches, cands)
    if timed:
        print(f"\nloss forwards, {timed['rows']} distinct rows interleaved: "
              f"float32 {timed['float32_s']:.1f} s, "
              f"bfloat16 {timed['bfloat16_s']:.1f} s: ratio {timed['ratio']:.2f} (median per row "
              f"{timed['median_ratio']:.2f}); peak RSS added by the bf16 forwards "
              f"{timed['rss_growth_kib'] / 1024:.0f} MiB")  # fmt: skip
    if args.skip_figures:
        return
    got = figures(model, pairs, batches, cands)
    print("\n| figure | skill | float32 | bfloat16 | abs | rel |\n|---|---|---|---|---|---|")
    worst = {"loss": (0.0, 0.0), "retention": (0.0, 0.0)}
    for what, s, a, b in got["moves"]:
        if a is None or b is None:
            continue
        d = abs(b - a)
        rel = d / max(abs(a), 1e-12)
        kind = "retention" if what.endswith("retention") else "loss"
        worst[kind] = (max(worst[kind][0], d), max(worst[kind][1], rel))
        print(f"| {what} | {s} | {a:.5f} | {b:.5f} | {d:.2e} | {rel:.2e} |")
    for kind, (d, rel) in worst.items():
        print(f"largest {kind} movement: {d:.2e} absolute, {rel:.2e} relative")
    for s in SKILLS:
        hi, lo = got["orders"][s]
        bad = swaps(hi, lo)
        l_hi, l_lo = got["leads"][s]
        same = l_hi and l_lo and (l_hi.best, l_hi.significant) == (l_lo.best, l_lo.significant)
        best = "same" if same else f"CHANGED: {l_hi} -> {l_lo}"
        print(f"{s}: order of {len(hi)} rows {'unchanged' if not bad else f'{len(bad)} swapped pairs'}; "
              f"best row {l_hi.best if l_hi else None} "
              f"(significant: {l_hi.significant if l_hi else None}): {best}")
        for a, b in bad:
            if timed is None:
                print(f"  swapped: {a} / {b}")
                continue
            pair = lead(timed["base"][s].double().numpy(), timed["alone"][s].double().numpy(),
                        {a: timed["sums"][a][s].double().numpy(), b: timed["sums"][b][s].double().numpy()})
            inside = pair is not None and pair.difference is not None and not pair.difference.excludes(0.0)
            print(f"  swapped: {a} / {b}: float32 difference interval {pair.difference if pair else None}"
                  f" {'contains 0 (not told apart in float32)' if inside else 'EXCLUDES 0'}")


if __name__ == "__main__":
    main()
