"""The literature's merges (knots, core, tsv, iso_c, iso_cts): factored against the authors' dense path.

Not part of ``make test``. Four random rank-16 LoRAs per module on Llama-3-8B's module shapes (q/o 4096×4096,
k/v 1024×4096, gate/up 14336×4096, down 4096×14336; 32 layers). Ours is measured on every shape. The dense
path (each method's SVDs on dense (out, in) matrices in float64, as the authors' code runs them, with the
issue's numerical-rank rule so the results are comparable) is measured on the k/v shape, where each
method runs in a minute on 2 CPU cores, and extrapolated to the other shapes by the cost of its SVDs,
m·n·min(m, n) per (m, n) matrix; Core Space's reference path has no large SVD and is measured on every
shape. The whole-model figures add up 32 layers of the seven modules. Writes
reports/benchmarks/literature.json and literature.md.

    python -m benchmarks.literature [--anchor]   # --anchor: also time iso_c's dense path on 4096×4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.run import OUT, machine
from merging import strategies
from merging.core.deltas import LowRank, Target
from merging.strategies import Options
from merging.strategies.inner import merge_inner

T, R, LAYERS = 4, 16, 32
SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
          "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}  # fmt: skip
MEASURED = (1024, 4096)  # the shape on which the dense path is timed
NAMES = ["knots", "core", "tsv", "iso_c", "iso_cts"]
OPTS = Options(inner="ties", density=0.5)  # knots/core inner; tsv/iso ignore it


def inputs(shape: tuple[int, int], seed: int = 0) -> list[LowRank]:
    """Four rank-16 LoRAs with LoRA-like magnitudes (α/r = 2)."""
    g = torch.Generator().manual_seed(seed)
    t = Target("linear", shape)
    return [LowRank(0.01 * torch.randn(shape[0], R, generator=g), torch.randn(R, shape[1], generator=g) / 64,
                    2.0, t) for _ in range(T)]  # fmt: skip


# ------------------------------------------------------------------ the dense path, as the authors' code runs


def _rank(s: torch.Tensor, ref: float) -> int:
    return int((s > 1e-9 * ref).sum())


def _polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def dense_knots(tasks, bs, as_):
    u, s, vh = torch.linalg.svd(torch.cat(tasks, 1), full_matrices=False)  # (out, T·in)
    keep = s > 1e-5
    g = torch.stack([s[keep, None] * v for v in vh[keep].split(tasks[0].shape[1], dim=1)])
    return u[:, keep] @ merge_inner(g, OPTS, "m")


def dense_core(tasks, bs, as_):
    ub = torch.linalg.svd(torch.cat(bs, 1), full_matrices=False)[0]
    vha = torch.linalg.svd(torch.cat(as_, 0), full_matrices=False)[2]
    cores = []
    for b, a in zip(bs, as_, strict=True):  # their per-task SVDs of A and B, then the aligned core
        ua, sa, vhaa = torch.linalg.svd(a, full_matrices=False)
        ubb, sb, vhb = torch.linalg.svd(b, full_matrices=False)
        cores.append((ub.T @ ubb) @ torch.diag(sb) @ (vhb @ ua) @ torch.diag(sa) @ (vhaa @ vha.T))
    return ub @ merge_inner(torch.stack(cores), OPTS, "m") @ vha  # ΔW (out, in)


def _top(t, n_max, ref=None):
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    n = min(n_max, _rank(s, float(s[0]) if ref is None else ref))
    return u[:, :n], s[:n], vh[:n]


def _joined(parts):
    """Kept triplets side by side: U (m, K), s (K,), V (n, K)."""
    us, ss, vhs = zip(*parts, strict=True)
    return torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0).T


def dense_tsv(tasks, bs, as_):
    parts = [_top(t, min(t.shape) // len(tasks)) for t in tasks]
    u, s, v = _joined(parts)
    return _polar(u) @ torch.diag(s) @ _polar(v).T


def dense_iso_c(tasks, bs, as_):
    u, s, vh = torch.linalg.svd(sum(tasks), full_matrices=False)
    rho = _rank(s, float(s[0]))
    return s[:rho].mean() * u[:, :rho] @ vh[:rho]


def dense_iso_cts(tasks, bs, as_):
    u, s, vh = torch.linalg.svd(sum(tasks), full_matrices=False)
    p = _rank(s, float(s[0]))
    c0 = int(p * 0.8)
    c = p - round((p - c0) / len(tasks)) * len(tasks)
    d = (p - c) // len(tasks)
    uc = u[:, :c]
    parts = [(uc, s[:c], vh[:c])] + [_top(t - uc @ (uc.T @ t), d, float(s[0])) for t in tasks]
    uu, ss, vv = _joined(parts)
    return ss.mean() * _polar(uu) @ _polar(vv).T


DENSE = {"knots": dense_knots, "core": dense_core, "tsv": dense_tsv, "iso_c": dense_iso_c,
         "iso_cts": dense_iso_cts}  # fmt: skip


def svd_cost(name: str, shape: tuple[int, int]) -> float:
    """The dense path's SVD work for one module, Σ m·n·min(m, n) over its large SVDs."""
    out, inn = shape
    one = out * inn * min(out, inn)
    costs = {"knots": out * T * inn * min(out, T * inn), "tsv": T * one, "iso_c": one,
             "iso_cts": (1 + T) * one}  # fmt: skip
    return costs[name]


# ------------------------------------------------------------------ measurement


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_ours(threads: int) -> dict:
    """Our time per method and distinct shape (median of 5)."""
    torch.set_num_threads(threads)
    out = {}
    for name in NAMES:
        fn = strategies.get(name).fn
        out[name] = {}
        for shape in dict.fromkeys(SHAPES.values()):
            ds = inputs(shape)
            out[name][str(shape)] = timed(lambda fn=fn, ds=ds: fn(ds, [1.0] * T, OPTS, "m"), 5)
            print("ours", name, shape, out[name][str(shape)], flush=True)
    return out


def measure_dense(anchor: bool, threads: int) -> dict:
    """The dense path's time (once) and our relative difference from it, on MEASURED (core: every shape)."""
    torch.set_num_threads(threads)
    seconds, diff = {}, {}
    for name in NAMES:
        seconds[name], diff[name] = {}, {}
        for shape in dict.fromkeys(SHAPES.values()):
            if name != "core" and shape != MEASURED:
                continue
            ds = inputs(shape)
            lrs = [d.low_rank() for d in ds]
            bs = [lr.scale * lr.b.double() for lr in lrs]
            as_ = [lr.a.double() for lr in lrs]
            tasks = [b @ a for b, a in zip(bs, as_, strict=True)]
            start = time.perf_counter()
            ref = DENSE[name](tasks, bs, as_)
            seconds[name][str(shape)] = time.perf_counter() - start
            got = strategies.get(name).fn(ds, [1.0] * T, OPTS, "m")
            diff[name][str(shape)] = float((got.b.double() @ got.a.double() - ref).norm() / ref.norm())
            print("dense", name, shape, seconds[name][str(shape)], flush=True)
    out = {"seconds": seconds, "rel_diff": diff}
    if anchor:  # one true-shape check of the extrapolation law
        shape = (4096, 4096)
        tasks = [lr.scale * lr.b.double() @ lr.a.double() for lr in (d.low_rank() for d in inputs(shape))]
        start = time.perf_counter()
        dense_iso_c(tasks, None, None)
        out["anchor"] = {"method": "iso_c", "shape": str(shape), "measured_s": time.perf_counter() - start}
    return out


def summarise(data: dict) -> dict:
    """Per method: the dense path on every shape (measured, or extrapolated by the SVD cost law scaled by
    the anchor's measured/predicted ratio), the model totals and the speed-ups."""
    dense, ours = data["dense"], data["ours"]
    calibration = 1.0
    if "anchor" in dense:
        a = dense["anchor"]
        growth = svd_cost("iso_c", (4096, 4096)) / svd_cost("iso_c", MEASURED)
        law = dense["seconds"]["iso_c"][str(MEASURED)] * growth
        calibration = a["measured_s"] / law
        a["law_predicted_s"] = law
    out = {"calibration": calibration}
    for name in NAMES:
        measured = dense["seconds"][name]
        est = {}
        for shape in SHAPES.values():
            key = str(shape)
            law = svd_cost(name, shape) / svd_cost(name, MEASURED) if name != "core" else 1.0
            est[key] = measured[key] if key in measured else measured[str(MEASURED)] * law * calibration
        model_ours = LAYERS * sum(ours[name][str(s)] for s in SHAPES.values())
        model_dense = LAYERS * sum(est[str(s)] for s in SHAPES.values())
        out[name] = {"dense_s": est, "model_ours_s": model_ours, "model_dense_s": model_dense,
                     "speedup_model": model_dense / model_ours,
                     "speedup_measured": measured[str(MEASURED)] / ours[name][str(MEASURED)],
                     "max_rel_diff": max(dense["rel_diff"][name].values())}  # fmt: skip
    return out


def render(data: dict) -> str:
    f = lambda v: f"{v:.3g}"  # noqa: E731
    summary, m = data["summary"], str(MEASURED)
    lines = ["# The literature's merges: factored against the dense path", "",
             f"Machine: {data['machine']}, shared with other jobs (timings are noisy; ratios are of runs in "
             f"one process). Inputs: {data['inputs']}, Llama-3-8B module shapes. Ours: median of 5 on every "
             f"shape, {data['ours_threads']} thread(s) (on this loaded machine 2 threads make every BLAS "
             "call several times slower). Dense path: each method's SVDs on dense (out, in) float64 matrices "
             "as the authors' code runs them (with the numerical-rank rule, so the results are comparable), "
             f"{data['dense_threads']} thread(s), timed once on the k/v shape (1024×4096); Core Space's "
             "reference code has no large SVD and is timed on every shape.", "",
             "**Measured** on 1024×4096 (and, for core, every shape):", "",
             "| method | ours | dense path | speed-up | max relative difference |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name in NAMES:
        r = summary[name]
        lines.append(f"| {name} | {f(data['ours'][name][m])} s | {f(data['dense']['seconds'][name][m])} s | "
                     f"{f(r['speedup_measured'])}× | {r['max_rel_diff']:.1e} |")  # fmt: skip
    lines += ["", "**Extrapolated** to the whole model (32 layers × q, k, v, o, gate, up, down): the dense "
              "time on the other shapes is the measured one × the SVD cost law m·n·min(m, n) × a "
              f"calibration of {summary['calibration']:.3g} (the anchor below: the law over-predicts the "
              "growth on this machine); ours is measured on every shape.", "",
              "| method | ours, model | dense path, model (extrapolated) | speed-up |",
              "|---|---|---|---|"]  # fmt: skip
    for name in NAMES:
        r = summary[name]
        lines.append(f"| {name} | {f(r['model_ours_s'])} s | {f(r['model_dense_s'])} s | "
                     f"{f(r['speedup_model'])}× |")  # fmt: skip
    if "anchor" in data["dense"]:
        a = data["dense"]["anchor"]
        lines += ["", f"Anchor: {a['method']}'s dense path on {a['shape']} (q/o shape) took "
                  f"{f(a['measured_s'])} s; the law alone predicted {f(a['law_predicted_s'])} s from the "
                  "1024×4096 measurement."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--anchor", action="store_true", help="also time iso_c's dense path on 4096×4096")
    parser.add_argument("--only", choices=["ours", "dense", "all"], default="all",
                        help="re-measure one side; the other is kept from literature.json")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    args = parser.parse_args()
    old = OUT / "literature.json"
    data = json.loads(old.read_text()) if args.only != "all" and old.exists() else {}
    data |= {"machine": machine(), "inputs": f"{T} × rank {R} per module, {LAYERS} layers"}
    if args.only in ("ours", "all"):
        data |= {"ours": measure_ours(args.threads), "ours_threads": args.threads}
    if args.only in ("dense", "all"):
        data |= {"dense": measure_dense(args.anchor, args.threads), "dense_threads": args.threads}
    data["summary"] = summarise(data)
    OUT.mkdir(parents=True, exist_ok=True)
    old.write_text(json.dumps(data, indent=2) + "\n")
    (OUT / "literature.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
