"""What measuring a tuning search's candidates together buys: evaluations per second, one run.

On the bundled example (five adapters, SmolLM2-135M, the tuning half of the eval files), the first
Nelder-Mead simplex of a gradient-free ``iso_c`` tune (the start and one step along each weight: 6 merges)
is measured five ways, interleaved, ``--repeats`` times: each merge stacked alone (``runtime.stacked``,
the search's code before), each folded into the weights alone (``runtime.evaluated``, one at a time, the
float32 search), all six in one grouped forward (``eval.batched``, ``Settings.group = 6``), and the two
ways of a bfloat16 search (``--tune-dtype bfloat16``): each folded into the float32 weights and run under
autocast (``candidate_losses(..., dtype=bfloat16)``, the search's way: no copy of the model), or folded and
copied into a bfloat16 model made once (270 MB more for SmolLM2-135M). Prints seconds per evaluation and
the ratios::

    python -m benchmarks.tune_batching [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from merging.base.example_model import example_base_model
from merging.base.load import load_base
from merging.core.adapter import weighted
from merging.eval import data, tune
from merging.eval.batched import candidate_losses
from merging.eval.verify import base_weights
from merging.formats import sources
from merging.merge import pipeline
from merging.runtime.fold import evaluated
from merging.runtime.stacked import stacked
from merging.strategies import Options

SKILLS = ("add", "sort", "reverse", "translate", "sentiment")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.3, help="the simplex's step along each weight")
    args = ap.parse_args()
    specs = [f"{s}=examples/adapters/{s}" for s in SKILLS]
    model, tok = load_base(example_base_model(), "auto", "float32", task_type=sources.task_type(specs))
    pairs = sources.load_inputs(specs, base=model)
    evals = {s: data.read_eval(f"examples/data/{s}.jsonl") for s in SKILLS}  # type: ignore[arg-type]
    split = tune.split_evals(evals, seed=0)
    batch = data.skill_batch(tok, split.tune, "cpu", SKILLS, packed=data.plain_head(model))
    points = [[1.0] * len(SKILLS)] + [[1.0 + args.lr * (i == j) for i in range(len(SKILLS))]
                                      for j in range(len(SKILLS))]  # fmt: skip
    bw = base_weights(model)
    cands = [weighted(pipeline.merge([(a, w) for (a, _), w in zip(pairs, p, strict=True)], "iso_c",
                                     Options(), base_weights=bw).adapters) for p in points]  # fmt: skip
    took: dict[str, list[float]] = {"stacked, one at a time": [], "folded, one at a time": [],
                                    f"grouped, {len(cands)} per forward": [], "folded, bf16 autocast": [],
                                    "folded, copied into bf16": []}  # fmt: skip
    low = copy.deepcopy(model).to(torch.bfloat16)  # the copy's storage, made once
    for _ in range(args.repeats):
        with torch.no_grad():
            started = time.perf_counter()
            for c in cands:
                with stacked(model, c):
                    data.skill_losses(model, batch)
            took["stacked, one at a time"].append((time.perf_counter() - started) / len(cands))
            started = time.perf_counter()
            for c in cands:
                candidate_losses(model, batch, [c])
            took["folded, one at a time"].append((time.perf_counter() - started) / len(cands))
            started = time.perf_counter()
            candidate_losses(model, batch, cands, check=False)
            took[f"grouped, {len(cands)} per forward"].append((time.perf_counter() - started) / len(cands))
            started = time.perf_counter()
            for c in cands:
                candidate_losses(model, batch, [c], dtype=torch.bfloat16)
            took["folded, bf16 autocast"].append((time.perf_counter() - started) / len(cands))
            started = time.perf_counter()
            for c in cands:
                with evaluated(model, c):
                    for q, p in zip(low.parameters(), model.parameters(), strict=True):
                        q.copy_(p)  # (rounded to bfloat16)
                    data.skill_losses(low, batch, torch.bfloat16)
            took["folded, copied into bf16"].append((time.perf_counter() - started) / len(cands))
    tokens = int(batch.packed.input_ids.numel()) if batch.packed is not None else batch.labels.numel()
    print(f"{len(cands)} iso_c merges, {tokens} tokens per pass, best of {args.repeats}")
    before = min(took["stacked, one at a time"])
    for how, seconds in took.items():
        rate = before / min(seconds)
        print(f"{how:>28}: {min(seconds):6.2f} s per evaluation, {rate:.2f}× the stacked rate")


if __name__ == "__main__":
    main()
