"""Two more ways to take `make example`'s held-out losses in bfloat16, and whether either keeps the order.

``benchmarks.bf16_losses`` measures the way ``--loss-dtype bfloat16`` takes them (each row folded into the
float32 weights, the body under autocast) and finds pairs of rows swapped. Two ways that might round less
per row, on the same rows and texts:

- **unfolded**: each row stacked on the base (``runtime.stacked``) under autocast, so every row shares one
  rounding of the base weights and only its own activations round differently;
- **anchored**: the unfolded losses moved, per example, by the stack's float32 − bfloat16 difference (a
  control variate: whatever bfloat16 does to every row alike cancels).

For each way (and fold, and fold anchored alike): the pairs of rows swapped per skill against float32 with
their float32 and bfloat16 retention gaps, any changed best row, and the largest movement of a loss and of a
retention. References (base, each input alone) stay float32 in the anchored ways::

    python -m benchmarks.bf16_variants
"""

from __future__ import annotations

from benchmarks.bf16_losses import LOW, SKILLS, assemble, setup, swaps
from merging.core.adapter import content_digest, weighted
from merging.eval import data
from merging.runtime.fold import evaluated
from merging.runtime.stacked import stacked


def measure(model, pairs, batches, cands) -> dict[str, dict]:
    """Every row's (means, per-example sums) in float32 (as held_out), folded bf16 and unfolded bf16."""
    packed = data.pack(batches)
    got: dict[str, dict] = {"float32": {}, "fold": {}, "unfolded": {}}
    rows = [("base", [], packed)]
    rows += [(f"alone:{s}", [p for p in pairs if p[0].name == s], data.pack({s: batches[s]})) for s in SKILLS]
    rows += [("stacked", list(pairs), packed)] + [(c.name, weighted(c.adapters), packed) for c in cands]
    exact = {c.name for c in cands if c.exact} | {"base", "stacked"} | {r[0] for r in rows[1:6]}
    seen: dict[str | None, str] = {}
    for name, ps, pk in rows:
        digest = content_digest([a for a, _ in ps]) if name in {c.name for c in cands} else None
        if digest is not None and digest in seen:
            for way in got.values():
                way[name] = way[seen[digest]]
            continue
        seen.setdefault(digest, name)
        with stacked(model, ps) if name in exact else evaluated(model, ps):
            got["float32"][name] = data.answer_losses_by_example(model, pk)
        with evaluated(model, ps):
            got["fold"][name] = data.answer_losses_by_example(model, pk, LOW)
        with stacked(model, ps):
            got["unfolded"][name] = data.answer_losses_by_example(model, pk, LOW)
    for way in ("fold", "unfolded"):
        got[f"{way} anchored"] = anchored(got["float32"], got[way])
    return got


def anchored(f32: dict, low: dict) -> dict:
    """``low``'s rows moved by the stack's float32 − low difference (means and per-example sums); the
    references (base, alone) float32's own."""
    (fm, fs), (lm, ls) = f32["stacked"], low["stacked"]
    out = {}
    for name, (m, s) in low.items():
        if name == "base" or name.startswith("alone:"):
            out[name] = f32[name]
        else:
            out[name] = ({k: m[k] + fm[k] - lm[k] for k in m}, {k: s[k] + fs[k] - ls[k] for k in s})
    return out


def main() -> None:
    model, pairs, batches, cands = setup()
    names = [c.name for c in cands]
    got = measure(model, pairs, batches, cands)
    hi = assemble(got["float32"], names)
    for way in ("fold", "unfolded", "fold anchored", "unfolded anchored"):
        lo = assemble(got[way], names)
        moved = [(abs(hi["rows"][c][s][0] - lo["rows"][c][s][0]),
                  abs((hi["rows"][c][s][1] or 0.0) - (lo["rows"][c][s][1] or 0.0)))
                 for c in ["stacked", *names] for s in SKILLS]  # fmt: skip
        lines, count = [], 0
        for s in SKILLS:
            order = [sorted(names, key=lambda c, f=f: -f["rows"][c][s][1]) for f in (hi, lo)]  # noqa: B023
            for x, y in swaps(*order):
                count += 1
                gap_hi = hi["rows"][x][s][1] - hi["rows"][y][s][1]
                gap_lo = lo["rows"][x][s][1] - lo["rows"][y][s][1]
                lines.append(f"  {s}: {x} / {y}: float32 gap {gap_hi:+.4f}, bfloat16 {gap_lo:+.4f}")
            if hi["leads"][s].best != lo["leads"][s].best:
                lines.append(f"  {s}: best row {hi['leads'][s].best} -> {lo['leads'][s].best}")
        print(f"{way}: {count} pairs swapped; largest |Δloss| {max(m[0] for m in moved):.3f} nats, "
              f"|Δretention| {max(m[1] for m in moved):.3f}", *lines, sep="\n")  # fmt: skip


if __name__ == "__main__":
    main()
