"""Merges at real model sizes: 4 LoRAs on every linear module of Llama-3-8B- and 70B-shaped models.

Adapters only (no base weights are needed to merge): each input is a PEFT folder of float32 factors (PEFT
keeps adapter weights in float32 by default), random, written once. ``merging merge`` runs end to end in a
fresh process per job: wall time after imports, peak RSS growth (VmHWM), and bytes through read/write
system calls (/proc/self/io rchar/wchar, minus what the imports read). PEFT's svd forms each module's dense
ΔW and takes its SVD; it is timed on a few 8B module shapes and extrapolated to whole models by the SVD's
m·n·min(m, n) cost (a lower bound: thin SVD, no clamp, no dense sum of the inputs).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from merging.storage.safetensors_io import SafetensorsWriter, header_room

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # layers, hidden, intermediate, kv width
    "llama3-8b": (32, 4096, 14336, 1024),
    "llama3-70b": (80, 8192, 28672, 1024),
}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def modules(shape: str) -> list[tuple[str, int, int]]:
    """(module path, out, in) of every linear module of a Llama-shaped model."""
    layers, h, i, kv = SHAPES[shape]
    dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # fmt: skip
    part = {p: "self_attn" if p[0] in "qkvo" else "mlp" for p in PROJ}
    return [(f"model.layers.{n}.{part[p]}.{p}", *dims[p]) for n in range(layers) for p in PROJ]


def write_adapter(folder: Path, shape: str, r: int, seed: int) -> int:
    """One PEFT LoRA folder of rank r on every linear module (random float32 factors); returns its bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    mods = modules(shape)
    names = [f"base_model.model.{m}.lora_{x}.weight" for m, _, _ in mods for x in "AB"]
    sink = SafetensorsWriter(folder / "adapter_model.safetensors", header_room(names))
    for m, out, inp in mods:
        sink.add(f"base_model.model.{m}.lora_A.weight", torch.randn(r, inp, generator=g) / inp**0.5)
        sink.add(f"base_model.model.{m}.lora_B.weight", torch.randn(out, r, generator=g) * 0.01)
    sink.close({"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(PROJ),
           "task_type": "CAUSAL_LM", "base_model_name_or_path": f"example/{shape}"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return (folder / "adapter_model.safetensors").stat().st_size


CHILD = r"""
import json, sys, time
from click.testing import CliRunner
from merging_cli.main import cli
import transformers, merging.merge.pipeline  # noqa: F401  (imports: a fixed cost, reported apart)
def status(key):
    return [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key)][0]
def io():
    return {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/io")}
out, strategy, rank, inputs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
rss, before, start = status("VmRSS:"), io(), time.perf_counter()
r = CliRunner().invoke(cli, ["merge", *inputs, "-s", strategy, "--rank", rank, "-o", out])
assert r.exit_code == 0, r.output
seconds, after = time.perf_counter() - start, io()
print(json.dumps({"seconds": seconds, "peak_over_start": status("VmHWM:") - rss,
                  "read": after["rchar"] - before["rchar"], "written": after["wchar"] - before["wchar"]}))
"""


def run_merge(out: Path, strategy: str, rank: int, inputs: list[Path]) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(out), strategy, str(rank), *map(str, inputs)],
                       cwd=ROOT, capture_output=True, text=True, check=False)  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"merge {strategy} failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


COPY = r"""
import os, shutil, sys, time
from pathlib import Path
out, inputs = Path(sys.argv[1]), sys.argv[2:]
start = time.perf_counter()
for src in inputs:
    shutil.copytree(src, out / Path(src).name)
for f in sorted(out.rglob("*")) + [out]:  # durable, as our output is
    fd = os.open(f, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
print(time.perf_counter() - start)
"""


def copy_fsync_seconds(out: Path, inputs: list[Path]) -> float:
    """The durable floor for cat: copy every input folder and fsync it, in a fresh process."""
    p = subprocess.run([sys.executable, "-c", COPY, str(out), *map(str, inputs)], capture_output=True,
                       text=True, check=True)  # fmt: skip
    shutil.rmtree(out)
    return float(p.stdout.strip().splitlines()[-1])


def peft_svd_seconds(out: int, inp: int, n: int, r: int) -> float:
    """PEFT's per-module work for svd: the dense weighted sum of n rank-r deltas and its thin SVD."""
    g = torch.Generator().manual_seed(0)
    bs = [torch.randn(out, r, generator=g) for _ in range(n)]
    as_ = [torch.randn(r, inp, generator=g) for _ in range(n)]
    start = time.perf_counter()
    delta = sum(b @ a for b, a in zip(bs, as_, strict=True))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    _ = (u[:, :r] * s[:r]) @ vh[:r]
    return time.perf_counter() - start


def extrapolate(shape: str, measured: dict[tuple[int, int], float]) -> float:
    """A whole model's PEFT svd time from measured per-module times, scaled by m·n·min(m, n)."""
    (m0, n0), t0 = max(measured.items(), key=lambda kv: kv[0][0] * kv[0][1])
    per_flop = t0 / (m0 * n0 * min(m0, n0))
    return sum(measured.get((o, i), per_flop * o * i * min(o, i)) for _, o, i in modules(shape))


def paired(folder: Path, inputs: list[Path], rank: int, repeats: int) -> tuple[list[float], list[dict]]:
    """cat and its floor (copy + fsync) run back to back, ``repeats`` times each, which goes first alternating
    (each output removed before the next job): both see the same machine, neither always the fresher cache.
    One copy + fsync runs first, untimed: the first job after the inputs were written took 2.8-3.5× the
    later ones (70B r16: 12.7 s then 4.2 and 4.7 s; in another run 6.4 s then 1.8 and 1.8 s)."""
    floors, cats = [], []
    copy_fsync_seconds(folder / "copy", inputs)  # untimed: the first job after the inputs are written is slow
    for i in range(repeats):
        if i % 2 == 0:
            floors.append(copy_fsync_seconds(folder / "copy", inputs))
        cats.append(run_merge(folder / "out-cat", "cat", rank, inputs))
        cats[-1]["output_bytes"] = (folder / "out-cat" / "adapter_model.safetensors").stat().st_size
        shutil.rmtree(folder / "out-cat")
        if i % 2 == 1:
            floors.append(copy_fsync_seconds(folder / "copy", inputs))
    return floors, cats


def bench(tmp: Path, cases: list[tuple[str, int]], n: int = 4, repeats: int = 3) -> dict:
    """Every (shape, rank) case: cat and svd end to end, input and output sizes, PEFT's svd estimated; cat
    and copy + fsync alternate ``repeats`` times (once for inputs over 4 GB), their medians compared."""
    measured = {(o, i): peft_svd_seconds(o, i, n, 16) for o, i in ((4096, 4096), (1024, 4096))}
    out: dict = {"peft_module_seconds": {f"{o}x{i}": t for (o, i), t in measured.items()}, "cases": {}}
    for shape, r in cases:
        folder = tmp / f"{shape}-r{r}"
        sizes = [write_adapter(folder / f"a{k}", shape, r, seed=k) for k in range(n)]
        inputs = [folder / f"a{k}" for k in range(n)]
        row: dict = {"shape": shape, "rank": r, "modules": len(modules(shape)), "input_bytes": sum(sizes),
                     "load_1min": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        floors, cats = paired(folder, inputs, r, repeats if row["input_bytes"] < 4 << 30 else 1)
        row["copy_fsync_seconds"] = statistics.median(floors)
        row["pairs"] = [[f, c["seconds"]] for f, c in zip(floors, cats, strict=True)]
        for strategy in ("cat", "svd"):
            if strategy == "cat":  # the run of median seconds
                res = sorted(cats, key=lambda c: c["seconds"])[len(cats) // 2]
                row[strategy] = res
                res["read_over_input"] = res["read"] / row["input_bytes"]
                continue
            res = run_merge(folder / f"out-{strategy}", strategy, r, inputs)
            res["output_bytes"] = (folder / f"out-{strategy}" / "adapter_model.safetensors").stat().st_size
            res["read_over_input"] = res["read"] / row["input_bytes"]  # 1: each byte read once (issue 35)
            row[strategy] = res
            shutil.rmtree(folder / f"out-{strategy}")
        row["peft_svd_seconds_estimate"] = extrapolate(shape, measured)
        row["cat_over_copy_fsync"] = row["cat"]["seconds"] / row["copy_fsync_seconds"]  # target ≤ 1.3
        out["cases"][f"{shape} r={r}"] = row
        shutil.rmtree(folder)
    return out


def render(data: dict) -> list[str]:
    """The Markdown section for benchmarks.md."""
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    lines = ["## 6. Real sizes: 4 LoRAs on every linear module (Llama-3-8B and 70B shapes), end to end", "",
             "| case | inputs | strategy | s | ÷ copy + fsync | peak RSS growth | read | written "
             "| PEFT svd (est.) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in data["cases"].items():
        for strategy in ("cat", "svd"):
            if strategy not in row:
                continue
            v = row[strategy]
            peft = f"{row['peft_svd_seconds_estimate']:,.0f} s" if strategy == "svd" else ""
            floor = row.get("copy_fsync_seconds")
            ratio = f"{v['seconds'] / floor:.2f}× (of {floor:.3g} s)" if floor and "cat" in strategy else ""
            when = f" ({row['date']}, load {row['load_1min']:.1f})" if "date" in row else ""
            cells = [name + when, mib(row["input_bytes"]), strategy, f"{v['seconds']:.3g}", ratio,
                     mib(v["peak_over_start"]), f"{mib(v['read'])} ({v['read'] / row['input_bytes']:.2f}×)",
                     mib(v["written"]), peft]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    per = ", ".join(f"{k}: {v:.2f} s" for k, v in data["peft_module_seconds"].items())
    lines += ["", f"PEFT's svd measured per module (dense sum of 4 rank-16 deltas + thin SVD) on {per}, and "
              "extrapolated by m·n·min(m, n) over every module (a lower bound: PEFT's default takes full "
              "matrices). Inputs are float32, as PEFT keeps adapter weights; read/written count bytes "
              "through system calls after imports (read ÷ inputs in brackets: 1× is every byte read once, "
              "the sha256 included). The floor for cat is a fresh process copying the input folders and "
              "fsyncing every file and folder (the output is durable too), run alternately with cat "
              "(the median of each; `pairs` in benchmarks.json); target ≤ 1.3×. cat writes its A blocks "
              "from the bytes it read and hashed once (copy_file_range reads them twice).", ""]  # fmt: skip
    return lines + ([data["note"], ""] if data.get("note") else [])
