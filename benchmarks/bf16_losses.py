"""How far `make example`'s held-out figures move in bfloat16 against float32, and what it saves.

The bundled example as `make example` runs it: every strategy at ranks 4, 16, 64 (the ranks sharing each
module's SVD, as compare does), svd under the budgets of ranks 4 and 16, and the tuned cat (its weights read
from reports/example/report.json, not learnt again), on the evals' reporting split. One pass, each loss the
way ``skills.held_out`` takes it in each dtype: float32 (base, alone, stack and exact rows stacked,
approximate rows folded; all packed: the model's own loss within ~1e-6) and bfloat16 (every one folded,
packed, under autocast).
Each distinct approximate row runs float32 and bfloat16 back to back under one fold, the order alternating
row by row, so a changing load affects both alike: the loss part's time ratio (sums, and the median of the
per-row ratios) and the peak resident memory the bfloat16 forwards add. Then every loss and retention (with
``retention``, ``retention_interval`` and ``lead`` as held_out uses them): the largest absolute and relative
movement, each skill's order of rows and best row (with its significance), and, for any pair of rows
swapped, the paired bootstrap interval of their retention difference in float32: whether float32 itself
tells them apart. ``--held-out`` also runs ``skills.held_out`` in both dtypes and checks it gives the same.

    python -m benchmarks.bf16_losses [--held-out]
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
from merging.eval.compare import _shared_spectra, variants
from merging.eval.intervals import lead, retention_interval
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
F32, LOW = torch.float32, torch.bfloat16


def setup():
    """The base model, the inputs, the reporting split's batches and every row of `make example`."""
    specs = [f"{s}={ROOT / 'examples/adapters' / s}" for s in SKILLS]
    model, tok = load_base(example_base_model(), "cpu", "float32", task_type=sources.task_type(specs))
    pairs = sources.load_inputs(specs, base=model)
    evals = {s: data.read_eval(ROOT / "examples/data" / f"{s}.jsonl") for s in SKILLS}
    batches = {s: data.answer_batch(tok, e) for s, e in split_evals(evals, seed=0).report.items()}
    cands = []
    chosen = variants(strategies.names(), RANKS)
    shared = _shared_spectra(chosen)
    for v in chosen:
        try:
            rank = v.rank if v.rank is not None else Options().rank
            res = merge_lib.merge(pairs, v.strategy, Options(rank=rank), base_weights=base_weights(model),
                                  spectra=shared.get(v))  # fmt: skip
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


def measure(model, pairs, batches, cands) -> dict:
    """Every loss in both dtypes as ``held_out`` takes it, per-example sums too; the approximate rows'
    float32 and bfloat16 forwards timed back to back under one fold."""
    packed = data.pack(batches)
    out: dict = {F32: {}, LOW: {}}  # dtype → row ("base", "alone:s", "stacked", candidate) → (means, sums)
    out[F32]["base"] = data.answer_losses_by_example(model, packed)
    with evaluated(model, []):
        out[LOW]["base"] = data.answer_losses_by_example(model, packed, LOW)
    for s in SKILLS:
        mine = [p for p in pairs if p[0].name == s]
        with stacked(model, mine):
            out[F32][f"alone:{s}"] = data.answer_losses_by_example(model, data.pack({s: batches[s]}))
        with evaluated(model, mine):
            out[LOW][f"alone:{s}"] = data.answer_losses_by_example(model, data.pack({s: batches[s]}), LOW)
    rows = [("stacked", list(pairs), True)] + [(c.name, weighted(c.adapters), c.exact) for c in cands]
    times: dict[torch.dtype, list[float]] = {F32: [], LOW: []}
    rss, seen = [], {}
    for i, (name, ps, exact) in enumerate(rows):
        digest = content_digest([a for a, _ in ps]) if name != "stacked" else None
        if digest in seen:
            out[F32][name], out[LOW][name] = out[F32][seen[digest]], out[LOW][seen[digest]]
            continue
        if digest is not None:
            seen[digest] = name
        if exact:
            with stacked(model, ps):
                out[F32][name] = data.answer_losses_by_example(model, packed)
            with evaluated(model, ps):
                out[LOW][name] = data.answer_losses_by_example(model, packed, LOW)
            continue
        with evaluated(model, ps):
            for dtype in (F32, LOW) if i % 2 == 0 else (LOW, F32):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                started = time.perf_counter()
                out[dtype][name] = data.answer_losses_by_example(model, packed, dtype)
                times[dtype].append(time.perf_counter() - started)
                if dtype == LOW:
                    rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        print(f"{name}: float32 {times[F32][-1]:.2f} s, bfloat16 {times[LOW][-1]:.2f} s", flush=True)
    f32, low = times[F32], times[LOW]
    timed = {"rows": len(f32), "float32_s": sum(f32), "bfloat16_s": sum(low), "ratio": sum(f32) / sum(low),
             "median_ratio": statistics.median(a / b for a, b in zip(f32, low, strict=True)),
             "rss_growth_kib": max(rss, default=0)}  # fmt: skip
    return {"losses": out, "time": timed}


def assemble(got: dict, names: list[str]) -> dict:
    """Losses, retentions (95% intervals) and each skill's lead, as ``held_out`` assembles them."""
    np_ = {k: ({s: float(v) for s, v in m.items()}, {s: t.double().numpy() for s, t in sums.items()})
           for k, (m, sums) in got.items()}  # fmt: skip
    base, base_sums = np_["base"]
    alone = {s: np_[f"alone:{s}"][0][s] for s in SKILLS}
    alone_sums = {s: np_[f"alone:{s}"][1][s] for s in SKILLS}
    fig: dict = {"base": base, "alone": alone, "rows": {}, "leads": {}, "sums": {}}
    for name in ["stacked", *names]:
        means, sums = np_[name]
        fig["rows"][name] = {s: (means[s], data.retention(base[s], alone[s], means[s]),
                                 retention_interval(base_sums[s], alone_sums[s], sums[s])) for s in SKILLS}
        fig["sums"][name] = sums
    for s in SKILLS:
        fig["leads"][s] = lead(base_sums[s], alone_sums[s], {c: fig["sums"][c][s] for c in names})
    fig["base_sums"], fig["alone_sums"] = base_sums, alone_sums
    return fig


def swaps(order_hi: list[str], order_lo: list[str]) -> list[tuple[str, str]]:
    """Pairs of rows in another order in the second ranking than in the first."""
    at = {c: i for i, c in enumerate(order_lo)}
    return [(a, b) for i, a in enumerate(order_hi) for b in order_hi[i + 1 :] if at[a] > at[b]]


def report(hi: dict, lo: dict, names: list[str]) -> None:
    """The table of every figure, the largest movements, the orders, the leads and any swap's interval."""
    print("\n| figure | skill | float32 | bfloat16 | abs | rel |\n|---|---|---|---|---|---|")
    worst: dict[str, tuple[float, float, str]] = {"loss": (0.0, 0.0, ""), "retention": (0.0, 0.0, "")}
    moves = [(f"{k} loss", s, hi[k][s], lo[k][s]) for k in ("base", "alone") for s in SKILLS]
    for name in ["stacked", *names]:
        for s in SKILLS:
            (la, ra, _), (lb, rb, _) = hi["rows"][name][s], lo["rows"][name][s]
            moves += [(f"{name} loss", s, la, lb), (f"{name} retention", s, ra, rb)]
    for what, s, a, b in moves:
        if a is None or b is None:
            continue
        d, kind = abs(b - a), "retention" if what.endswith("retention") else "loss"
        rel = d / max(abs(a), 1e-12)
        if d > worst[kind][0]:
            worst[kind] = (d, max(rel, worst[kind][1]), f"{what} / {s}")
        else:
            worst[kind] = (worst[kind][0], max(rel, worst[kind][1]), worst[kind][2])
        print(f"| {what} | {s} | {a:.5f} | {b:.5f} | {d:.2e} | {rel:.2e} |")
    for kind, (d, rel, where) in worst.items():
        print(f"largest {kind} movement: {d:.2e} absolute ({where}), largest relative {rel:.2e}")
    for s in SKILLS:
        order = [sorted(names, key=lambda c, f=f: -f["rows"][c][s][1]) for f in (hi, lo)]  # noqa: B023
        bad = swaps(*order)
        a, b = hi["leads"][s], lo["leads"][s]
        same = (a.best, a.significant) == (b.best, b.significant)
        print(f"{s}: order of {len(names)} rows {'unchanged' if not bad else f'{len(bad)} pairs swapped'}; "
              f"best {a.best} (significant {a.significant}) in float32, {b.best} "
              f"(significant {b.significant}) in bfloat16: {'same' if same else 'CHANGED'}")  # fmt: skip
        for x, y in bad:
            pair = lead(hi["base_sums"][s], hi["alone_sums"][s], {x: hi["sums"][x][s], y: hi["sums"][y][s]})
            told = pair is not None and pair.difference is not None and pair.difference.excludes(0.0)
            gap = hi["rows"][x][s][1] - hi["rows"][y][s][1]
            print(f"  swapped: {x} / {y}: float32 retention gap {gap:+.4f}, its 95% interval "
                  f"{pair.difference if pair else None}: {'EXCLUDES 0' if told else 'contains 0'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held-out", action="store_true", help="also run skills.held_out in both dtypes")
    args = ap.parse_args()
    model, pairs, batches, cands = setup()
    names = [c.name for c in cands]
    print(f"{len(cands)} rows, {sum(len(b['input_ids']) for b in batches.values())} texts", flush=True)
    got = measure(model, pairs, batches, cands)
    t = got["time"]
    print(f"\nloss forwards of {t['rows']} distinct approximate rows, interleaved: "
          f"float32 {t['float32_s']:.1f} s, bfloat16 {t['bfloat16_s']:.1f} s: ratio {t['ratio']:.2f} "
          f"(median per row {t['median_ratio']:.2f}); peak RSS added by the bfloat16 forwards "
          f"{t['rss_growth_kib'] / 1024:.0f} MiB")  # fmt: skip
    hi, lo = assemble(got["losses"][F32], names), assemble(got["losses"][LOW], names)
    report(hi, lo, names)
    if args.held_out:
        for dtype, fig in ((F32, hi), (LOW, lo)):
            m = skills.held_out(model, batches, pairs, cands, dtype=dtype)
            worst = max(abs(m.merged[c][s].loss - fig["rows"][c][s][0]) for c in names for s in SKILLS)
            print(f"skills.held_out in {dtype}: largest difference from this pass {worst:.2e}")


if __name__ == "__main__":
    main()
