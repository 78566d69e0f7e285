"""Benchmarks against PEFT: merge speed, memory, stacked-inference overhead, baking, scaling.

Run with ``make bench`` (not part of ``make test``). Every figure is a ratio against a peer measured in
the same run, so it holds on a noisy machine. Writes reports/benchmarks/benchmarks.json, benchmarks.md
and scaling.png. Memory is the peak RSS of a fresh subprocess doing only that job.

    python -m benchmarks.run [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import busy, real_sizes

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("svd", "cat", "inference", "bake", "scaling", "real", "busy")
OUT = ROOT / "reports" / "benchmarks"
LLAMA = dict(
    hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16, vocab_size=1024
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(fn, repeats: int) -> dict:
    """Median, min and max wall time of fn() over repeats."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": repeats}


def llama_model(layers: int, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, **(LLAMA | over))
    return LlamaForCausalLM(cfg).eval()


def make_adapters(folder: Path, layers: int, n: int, r: int, **over) -> list[Path]:
    """n PEFT LoRA adapters of rank r on every linear module of the Llama-shaped model, saved by PEFT."""
    import peft

    out = []
    for i in range(n):
        model = llama_model(layers, **over)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS,
                                                        init_lora_weights=False))  # fmt: skip
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(folder / f"a{i}")
        out.append(folder / f"a{i}")
    return out


def peft_model_with(paths: list[Path], layers: int, **over):
    from peft import PeftModel

    model = PeftModel.from_pretrained(llama_model(layers, **over), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    return model


def peft_merged_error(model, names, weights, adapters) -> float:
    """Weight-space error of PEFT's merged adapter against the exact weighted sum, per module, max."""
    from merging.core.deltas import LowRank, Target
    from merging.merge.pipeline import weight_space_error

    worst = 0.0
    for mod, d0 in adapters[0].deltas.items():
        layer = model.base_model.model.get_submodule(mod)
        b, a = layer.lora_B["merged"].weight.detach(), layer.lora_A["merged"].weight.detach()
        merged = LowRank(b, a, layer.scaling["merged"], Target("linear", tuple(d0.target.shape)))
        worst = max(worst, weight_space_error(merged, [ad.deltas[mod] for ad in adapters], weights))
    return worst


# ------------------------------------------------------------------------------------------ 1 and 5: svd


def bench_svd(
    tmp: Path, layers: int, n: int, r: int, repeats_ours: int, peft_modes: list[bool], **over
) -> dict:
    from merging.core.adapter import weighted
    from merging.formats import sources
    from merging.merge.pipeline import merge

    paths = make_adapters(tmp / f"svd-{n}-{over.get('hidden_size', 2048)}", layers, n, r, **over)
    adapters = [sources.load(p)[0] for p in paths]
    weights = [1.0] * n
    from merging.strategies import Options

    result = {}
    ours = timed(lambda: merge(weighted(adapters, weights), "svd", Options(rank=r)), repeats_ours)
    merged = merge(weighted(adapters, weights), "svd", Options(rank=r))
    result["ours"] = ours | {"error": max(m.error for m in merged.modules)}
    for full in peft_modes:
        model = peft_model_with(paths, layers, **over)
        names = [f"a{i}" for i in range(n)]

        def run(model=model, names=names, full=full):
            if "merged" in model.peft_config:
                model.delete_adapter("merged")
            model.add_weighted_adapter(names, weights, "merged", combination_type="svd", svd_rank=r,
                                       svd_full_matrices=full)  # fmt: skip

        t = timed(run, 1)
        key = "peft_full_matrices" if full else "peft_thin"
        result[key] = t | {"error": peft_merged_error(model, names, weights, adapters)}
        result[f"speedup_vs_{key}"] = t["median"] / ours["median"]
    return result


# ------------------------------------------------------------------------------------------ subprocess jobs

CHILD = r"""
import json, sys, time, shutil
from pathlib import Path
job, args = sys.argv[1], sys.argv[2:]
if job.startswith("ours"):  # imports are a fixed start-up cost, reported apart from the work
    from click.testing import CliRunner
    from merging_cli.main import cli
    import transformers, merging.base.layout, merging.merge.pipeline, merging.export.bake  # noqa: F401  (as the PEFT jobs import theirs)
    if job == "ours_bake":  # transformers imports lazily: load what `import peft` loads before its clock
        import transformers.modeling_utils  # noqa: F401
if job.startswith("peft"):
    import torch, peft, transformers
def peak():  # VmHWM: the peak RSS of this process image (ru_maxrss would include the parent's, kept across fork/exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def now_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
import resource
def cpu():  # this process's CPU seconds, every thread
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
start_rss = now_rss()
start, cpu0 = time.perf_counter(), cpu()
if job in ("copy", "copy_fsync"):
    import os
    for src in args[1:]:
        shutil.copytree(src, Path(args[0]) / Path(src).name)
    if job == "copy_fsync":  # what our output gets: every file and folder made durable
        for f in sorted(Path(args[0]).rglob("*")) + [Path(args[0])]:
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
elif job == "ours_cat":
    r = CliRunner().invoke(cli, ["merge", *args[1:], "-s", "cat", "-o", args[0]])
    assert r.exit_code == 0, r.output
elif job == "peft_cat":
    import torch
    from benchmarks.run import peft_model_with
    layers = int(args[1]); paths = [Path(p) for p in args[2:]]
    model = peft_model_with(paths, layers)
    names = [f"a{i}" for i in range(len(paths))]
    model.add_weighted_adapter(names, [1.0] * len(paths), "merged", combination_type="cat")
    model.save_pretrained(args[0], selected_adapters=["merged"])
elif job == "ours_bake":
    r = CliRunner().invoke(cli, ["bake", "--base", args[1], args[2], "-o", args[0]])
    assert r.exit_code == 0, r.output
elif job == "peft_bake":
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args[1], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, args[2]).merge_and_unload()
    model.save_pretrained(args[0])
seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu0
print(json.dumps({"seconds": seconds, "cpu": cpu_seconds, "peak_rss": peak(), "start_rss": start_rss, "peak_over_start": peak() - start_rss}))
"""


def child(job: str, *args) -> dict:
    """Run one job in a fresh interpreter: its seconds after imports, its memory, and ``process_seconds``
    (start to exit, imports and interpreter start-up included, as a user waits for it)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, job, *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, check=False)  # fmt: skip
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{job} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"process_seconds": wall}


def baseline_rss() -> int:
    """Peak RSS (VmHWM) of a child that imports what the jobs import and does nothing."""
    code = "import torch, transformers, peft, merging, merging_cli.main\n"
    code += (
        "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])"
    )
    return int(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout)


def bench_cat(tmp: Path, layers: int, repeats: int) -> dict:
    """ours (``merging merge -s cat``) against copy + fsync of the same inputs, in pairs run back to back
    (which goes first alternates), every output removed before the next job, so both sides of a pair see
    the same page cache, disk and load; the plain copy and PEFT run apart, after the pairs (PEFT's 640 MB
    process never runs just before one of ours). The ratio is the median of the pairs' ratios: on a shared
    machine the load drifts between pairs, not within one. ``cpu`` is each job's CPU time (all threads):
    ours is CPU-bound, the floor waits on the disk, so a busier machine raises the ratio."""
    paths = make_adapters(tmp / "cat", layers, 4, 64)
    sizes = [sum(f.stat().st_size for f in p.iterdir()) for p in paths]
    runs: dict[str, list[dict]] = {"copy": [], "copy_fsync": [], "ours": [], "peft": []}
    child("copy_fsync", tmp / "cat-warm-up", *paths)  # untimed: the first job after the inputs are written
    shutil.rmtree(tmp / "cat-warm-up")  # is slow (benchmarks.real_sizes.paired)
    load_before = os.getloadavg()[0]

    def once(key: str, job: str, *extra) -> None:
        out = tmp / f"cat-out-{key}"
        runs[key].append(child(job, out, *extra, *paths))
        shutil.rmtree(out)

    for i in range(repeats):
        pair = [("copy_fsync", "copy_fsync"), ("ours", "ours_cat")]
        for key, job in pair if i % 2 == 0 else pair[::-1]:
            once(key, job)
    load_after = os.getloadavg()[0]
    for _ in range(max(1, repeats // 3)):
        once("copy", "copy")
        once("peft", "peft_cat", layers)
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    pairs = [o["seconds"] / f["seconds"] for o, f in zip(runs["ours"], runs["copy_fsync"], strict=True)]
    peak = {k: max(r["peak_over_start"] for r in v) for k, v in runs.items()}
    module_ws = 4 * 64 * (5632 + 2048) * 4 * 2  # stacked factors of the largest module, float32, with a copy
    return {
        "seconds": {k: {"median": m, "min": min(r["seconds"] for r in runs[k]), "max": max(r["seconds"] for r in runs[k]),
                        "cpu": statistics.median(r["cpu"] for r in runs[k]), "n": len(runs[k])}
                    for k, m in med.items()},  # fmt: skip
        "peak_rss": peak, "largest_input_bytes": max(sizes), "input_bytes": sum(sizes),
        "ratio_vs_copy": med["ours"] / med["copy"], "ratio_vs_peft": med["ours"] / med["peft"],
        "ratio_vs_copy_fsync": statistics.median(pairs), "pair_ratios": pairs,
        "module_working_set": module_ws, "load_1min": load_before, "load_1min_after": load_after,
    }  # fmt: skip


def bench_bake(tmp: Path, layers: int) -> dict:
    base = tmp / "bake-base"
    llama_model(layers).save_pretrained(base, max_shard_size="200MB")
    adapter = make_adapters(tmp / "bake", layers, 1, 16)[0]
    runs: dict[str, list[dict]] = {"ours": [], "peft": []}
    for i in range(3):  # alternating, the median run of each (one run is at the mercy of the disk)
        runs["ours"].append(child("ours_bake", tmp / f"bake-ours{i}", base, adapter))
        runs["peft"].append(child("peft_bake", tmp / f"bake-peft{i}", base, adapter))
    ours, peft = (sorted(runs[k], key=lambda r: r["seconds"])[1] for k in ("ours", "peft"))
    shard = max(f.stat().st_size for f in base.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    return {"ours": ours, "peft": peft, "ratio_time": ours["seconds"] / peft["seconds"],
            "largest_shard": shard, "model_bytes": total}  # fmt: skip


# ------------------------------------------------------------------------------------------ 3: inference


def bench_inference(tmp: Path, which: str, layers: int, repeats: int) -> dict:
    import peft

    from merging.core.adapter import weighted
    from merging.formats import sources
    from merging.runtime.stacked import stacked

    if which == "smollm2":
        from transformers import AutoModelForCausalLM

        from merging.base.example_model import example_base_model

        folder = example_base_model()

        def load():
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

        paths = []
        for i, cfg in enumerate([peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                                 peft.LoHaConfig(r=4, target_modules=["k_proj", "o_proj"], init_weights=False),
                                 peft.LoKrConfig(r=4, target_modules=["up_proj", "down_proj"], init_weights=False),
                                 peft.LoraConfig(r=16, target_modules=["gate_proj"], init_lora_weights=False)]):  # fmt: skip
            pm = peft.get_peft_model(load(), cfg)
            with torch.no_grad():
                for _, p in pm.named_parameters():
                    if p.requires_grad:
                        p.mul_(0.01)
            pm.save_pretrained(tmp / f"inf-{i}")
            paths.append(tmp / f"inf-{i}")
        x = torch.randint(0, 49152, (4, 128))
    else:
        paths = make_adapters(tmp / "inf-llama", layers, 4, 16)

        def load():
            return llama_model(layers)

        x = torch.randint(0, 1024, (4, 128))
    base = load()
    adapters = [sources.load(p, base=base)[0] for p in paths]

    def fwd(model):
        with torch.no_grad():
            model(x)

    bare = timed(lambda: fwd(base), repeats)
    with stacked(base, weighted(adapters)):
        ours = timed(lambda: fwd(base), repeats)
    mixed = peft.PeftMixedModel.from_pretrained(load(), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        mixed.load_adapter(str(p), adapter_name=f"a{i}")
    mixed.set_adapter([f"a{i}" for i in range(len(paths))])
    peft_t = timed(lambda: fwd(mixed.eval()), repeats)
    return {"bare": bare, "ours": ours, "peft_mixed": peft_t, "ratio_vs_bare": ours["median"] / bare["median"],
            "ratio_vs_peft": ours["median"] / peft_t["median"]}  # fmt: skip


# ------------------------------------------------------------------------------------------ report


def bench_scaling(tmp: Path, rep: int) -> dict:
    out = {}
    for n in (2, 4, 8, 16):
        out[f"n={n}"] = bench_svd(tmp, 1, n, 16, rep, [False])
        shutil.rmtree(tmp / f"svd-{n}-2048", ignore_errors=True)
    for width in (1024, 2048, 4096):
        over = {
            "hidden_size": width,
            "intermediate_size": width,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
        }
        out[f"width={width}"] = bench_svd(tmp, 1, 4, 16, rep, [False], **over)
    return out


def machine() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}  # fmt: skip


def render(data: dict) -> str:
    f = lambda v: f"{v:.3g}"  # noqa: E731
    s = data["svd"]
    lines = ["# Benchmarks against PEFT", "", f"Machine: {data['machine']}; a process with torch, transformers,",
             f"peft and merging imported peaks at {data['baseline_rss'] / 2**20:.0f} MiB before any work.", "",
             "## 1. svd merge (4 × rank 16, every linear module, Llama-shaped 2048/5632)", "",
             "| | median s | min–max | max weight-space error |", "|---|---|---|---|"]  # fmt: skip
    for key in ("ours", "peft_full_matrices", "peft_thin"):
        if key in s:
            v = s[key]
            lines.append(f"| {key} | {f(v['median'])} | {f(v['min'])}–{f(v['max'])} | {v['error']:.2e} |")
    lines += ["", f"Speed-up: {f(s.get('speedup_vs_peft_full_matrices', float('nan')))}× against PEFT's default, "
              f"{f(s.get('speedup_vs_peft_thin', float('nan')))}× against svd_full_matrices=False (target ≥ 50×).", ""]  # fmt: skip
    c = data["cat"]
    lines += ["## 2. `merging merge --strategy cat` end to end (4 × rank 64)", "",
              "| | median s (after imports) | min–max | CPU s (all threads) | runs | peak RSS growth during the job |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for k in ("copy", "copy_fsync", "ours", "peft"):
        if k in c["seconds"]:
            v, cpu = c["seconds"][k], f(c["seconds"][k]["cpu"]) if "cpu" in c["seconds"][k] else "–"
            lines.append(f"| {k} | {f(v['median'])} | {f(v['min'])}–{f(v['max'])} | {cpu} | {v.get('n', '–')} | "
                         f"{c['peak_rss'][k] / 2**20:.0f} MiB |")  # fmt: skip
    pairs = c.get("pair_ratios")
    how = (f" (median of {len(pairs)} back-to-back pairs, {f(min(pairs))}–{f(max(pairs))}; every output removed "
           "before the next job)") if pairs else ""  # fmt: skip
    durable = f"Ours / copy + fsync (durable, as our output is): {f(c['ratio_vs_copy_fsync'])}×{how} (target ≤ 2×); " if "ratio_vs_copy_fsync" in c else ""
    after = f" before, {c['load_1min_after']:.1f} after the pairs" if "load_1min_after" in c else ""
    load = f" 1-minute load average {c['load_1min']:.1f}{after}." if "load_1min" in c else ""
    lines += ["", f"{durable}ours / copy: {f(c['ratio_vs_copy'])}×; ours / PEFT: {f(c['ratio_vs_peft'])}×.{load} "
              f"Largest input {c['largest_input_bytes'] / 2**20:.0f} MiB; one module's working set "
              f"{c['module_working_set'] / 2**20:.0f} MiB.", ""]  # fmt: skip
    lines += ["## 3. Stacked-active inference (4 adapters active)", "", "| model | bare s | ours s | PEFT mixed s | ours/bare | ours/PEFT |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, v in data["inference"].items():
        lines.append(f"| {name} | {f(v['bare']['median'])} | {f(v['ours']['median'])} | {f(v['peft_mixed']['median'])} | "
                     f"{f(v['ratio_vs_bare'])} | {f(v['ratio_vs_peft'])} |")  # fmt: skip
    b = data["bake"]
    lines += ["", "## 4. Baking (median of 3 alternating runs)", "", "| | s (after imports) | peak RSS growth during the job |", "|---|---|---|",
              f"| ours | {f(b['ours']['seconds'])} | {b['ours']['peak_over_start'] / 2**20:.0f} MiB |",
              f"| PEFT merge_and_unload + save_pretrained | {f(b['peft']['seconds'])} | "
              f"{b['peft']['peak_over_start'] / 2**20:.0f} MiB |", "",
              f"Model {b['model_bytes'] / 2**20:.0f} MiB in shards of at most {b['largest_shard'] / 2**20:.0f} MiB.", ""]  # fmt: skip
    lines += ["## 5. Scaling of svd (one 2048-wide layer unless noted)", "", "| case | ours s | PEFT thin s | speed-up |",
              "|---|---|---|---|"]  # fmt: skip
    for case, v in data["scaling"].items():
        lines.append(
            f"| {case} | {f(v['ours']['median'])} | {f(v['peft_thin']['median'])} | {f(v['speedup_vs_peft_thin'])}× |"
        )
    lines += ["", "![scaling](scaling.png)", ""]
    if "real" in data:
        lines += real_sizes.render(data["real"])
    if "busy" in data:
        lines += busy.render(data["busy"])
    return "\n".join(lines)


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, prefix, label in ((axes[0], "n=", "number of adapters"), (axes[1], "width=", "hidden width")):
        items = [(int(k.split("=")[1]), v) for k, v in data["scaling"].items() if k.startswith(prefix)]
        items.sort()
        xs = [x for x, _ in items]
        ax.loglog(xs, [v["ours"]["median"] for _, v in items], marker="o", label="merging svd")
        ax.loglog(xs, [v["peft_thin"]["median"] for _, v in items], marker="s", label="PEFT svd (thin)")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds")
        ax.legend()
    fig.suptitle("svd merge time")
    fig.tight_layout()
    fig.savefig(OUT / "scaling.png")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer layers and repeats (a smoke run)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections to (re)measure; the others are kept from benchmarks.json")  # fmt: skip
    args = parser.parse_args()
    only = set(args.only.split(","))
    torch.set_num_threads(2)
    layers = 1 if args.quick else 2
    rep = 2 if args.quick else 5
    OUT.mkdir(parents=True, exist_ok=True)
    old = OUT / "benchmarks.json"
    data = (
        json.loads(old.read_text())
        if old.exists() and only != set(SECTIONS)
        else {}
    )
    data |= {"machine": machine(), "baseline_rss": baseline_rss()}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "svd" in only:
            print("1. svd merge against PEFT ...", flush=True)
            data["svd"] = bench_svd(tmp, layers, 4, 16, rep, [True, False])
        if "cat" in only:
            print("2. cat end to end ...", flush=True)
            data["cat"] = bench_cat(tmp, layers, 3 if args.quick else 9)
        if "inference" in only:
            print("3. stacked inference ...", flush=True)
            data["inference"] = {"smollm2": bench_inference(tmp, "smollm2", layers, rep),
                                 "llama-2048": bench_inference(tmp, "llama", layers, rep)}  # fmt: skip
        if "bake" in only:
            print("4. bake ...", flush=True)
            data["bake"] = bench_bake(tmp, layers)
        if "scaling" in only:
            print("5. scaling ...", flush=True)
            data["scaling"] = bench_scaling(tmp, rep)
        if "real" in only:
            print("6. real sizes ...", flush=True)
            cases = [("llama3-8b", 16)] if args.quick else [(s, r) for s in real_sizes.SHAPES for r in (16, 64)]
            new = real_sizes.bench(tmp, cases)
            if args.quick and "real" in data:  # the rows not re-measured are kept as they were, with their note
                new["cases"] = data["real"]["cases"] | new["cases"]
                new["note"] = data["real"].get("note", "")
            data["real"] = new
        if "busy" in only:
            print("7. busy machine ...", flush=True)
            data["busy"] = busy.measure(full=not args.quick)
    (OUT / "benchmarks.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(data)
    (OUT / "benchmarks.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    sys.exit(main())
