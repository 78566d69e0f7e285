"""Baking adapters into a quantised GGUF: ours (at the base's own types) against llama.cpp's export-lora.

    MERGING_CACHE=/work/main/.cache MERGING_LLAMA_CPP=/path/to/llama.cpp/bin python -m benchmarks.gguf_bake

Bases: the example base's GGUF (SmolLM2-135M-Instruct, Q4_1), and a Q8_0 base made from it by llama.cpp's
own ``llama-quantize --allow-requantize`` (Q4_1 → Q8_0). Two cases on each: the bundled ``add`` LoRA alone,
and ``add`` + ``sort`` + ``reverse`` (LoHa) + ``translate`` (LoKr). For each, in one run:

- ours: ``merging.export.gguf_bake.bake_gguf`` at ``--outtype`` same (Q4_1), q8_0, f16 and f32, each in a
  fresh process: seconds of the bake, the process's peak RSS (GNU time), and that peak over its RSS once
  Python, torch and gguf are imported;
- llama.cpp's ``llama-export-lora`` (dequantises to F32, writes F16): seconds and peak RSS. It refuses
  adapters whose tensor lists differ, so several adapters reach it as their exact ``cat`` merge converted to
  one GGUF LoRA (``merging merge -s cat --format gguf``, timed apart);
- the judge, llama.cpp itself: ``llama-perplexity`` stacks the adapters (converted with ``merging convert``)
  on the same Q4_1 base (``--lora a,b,…``) and saves its logits on the skills' texts; every baked model's
  KL-divergence against them follows (``--kl-divergence``), and again against the float bake (ours at f32:
  dequant(W) + ΔW, what the stack computes, written in F32).

Memory at scale: a ~1.07B-parameter llama-shaped Q4_1 model with random weights and a rank-16 LoRA on every
linear (``benchmarks.gguf_large``), baked by ours (``same``) and by export-lora: time and peak RSS only.

Writes reports/benchmarks/gguf_bake.json and gguf_bake.md; without the llama.cpp tools it stops and says so.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.support.llama_cpp import LlamaCpp, find, measured, perplexity_kl, text_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "reports" / "benchmarks"
ADAPTERS = ROOT / "examples" / "adapters"
CASES = {"add": ["add"], "add+sort+reverse+translate": ["add", "sort", "reverse", "translate"]}
OUTTYPES = {"Q4_1": ("same", "q8_0", "f16", "f32"), "Q8_0": ("same", "f16", "f32")}
CHILD = r"""
import json, sys, time
from pathlib import Path
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from merging.core.adapter import weighted
from merging.export.gguf_bake import bake_gguf
from merging.formats import sources
start = status('VmRSS:')
base, out, outtype, *adapters = sys.argv[1:]
pairs = weighted([ad for a in adapters for ad in sources.load(a)])
t = time.perf_counter()
bake_gguf(Path(base), pairs, Path(out), outtype=outtype, force=True)
print(json.dumps({"seconds": time.perf_counter() - t, "rss_over_imports": status('VmHWM:') - start}))
"""


def ours(base: Path, adapters: list[Path], out: Path, outtype: str) -> dict:
    """Our bake in a fresh process: bake seconds, peak RSS and peak RSS over the imported libraries."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stdout, _, peak = measured(
        [sys.executable, "-c", CHILD, str(base), str(out), outtype, *map(str, adapters)], env
    )
    row = json.loads(stdout.strip().splitlines()[-1])
    return {"seconds": row["seconds"], "peak_rss": peak, "rss_over_imports": row["rss_over_imports"],
            "bytes": out.stat().st_size}  # fmt: skip


def cli(*args: str) -> float:
    """Run ``merging ARGS`` to success; its wall seconds."""
    return measured([sys.executable, "-m", "merging_cli.main", *args], cwd=ROOT)[1]


def gguf_loras(folder: Path, names: list[str], work: Path) -> tuple[list[Path], Path, float]:
    """The adapters as GGUF LoRAs (for the stack); the one file export-lora gets and its merge seconds."""
    work.mkdir(parents=True, exist_ok=True)
    adapters, loras = [ADAPTERS / n for n in names], []
    for a in adapters:
        loras.append(work / f"{a.name}.gguf")
        cli("convert", str(a), "--to", "gguf", "--base", str(folder), "-o", str(loras[-1]), "--force")
    single, merge_seconds = loras[0], 0.0
    if len(loras) > 1:
        single = work / "cat.gguf"
        merge_seconds = cli("merge", *map(str, adapters), "-s", "cat", "--format", "gguf",
                            "--base", str(folder), "-o", str(single), "--force")  # fmt: skip
    return loras, single, merge_seconds


def export_lora(llama: LlamaCpp, base: Path, lora: Path, out: Path) -> dict:
    """llama.cpp's export-lora on one thread: seconds, peak RSS, bytes."""
    t = time.perf_counter()
    _, peak = llama.run("llama-export-lora", "-m", str(base), "--lora", str(lora), "-o", str(out), "-t", "1")
    return {"seconds": time.perf_counter() - t, "peak_rss": peak, "bytes": out.stat().st_size}


def case(llama: LlamaCpp, base: Path, kind: str, names: list[str], lora_set: tuple[list[Path], Path, float],
         work: Path, text: Path, kl: bool = True) -> dict:  # fmt: skip
    """Every figure of one set of adapters on one base (``kl`` False: time and memory only)."""
    adapters = [ADAPTERS / n for n in names]
    loras, single, merge_seconds = lora_set
    bakes = {t: ours(base, adapters, work / f"ours-{t}.gguf", t) for t in OUTTYPES[kind]}
    exported = work / "export-lora.gguf"
    export = export_lora(llama, base, single, exported) | {"cat_merge_seconds": merge_seconds}
    if not kl:
        return {"adapters": names, "ours": bakes, "export_lora": export}
    stacked, flt = work / "stacked.kld", work / "float.kld"
    perplexity_kl(llama, base, text, stacked, *loras, save=True)
    perplexity_kl(llama, work / "ours-f32.gguf", text, flt, save=True)
    models = {f"ours {t}": work / f"ours-{t}.gguf" for t in OUTTYPES[kind]} | {"export-lora (F16)": exported}
    vs_stacked = {"base, no adapters": perplexity_kl(llama, base, text, stacked)}
    vs_stacked |= {k: perplexity_kl(llama, m, text, stacked) for k, m in models.items()}
    vs_float = {k: perplexity_kl(llama, m, text, flt) for k, m in models.items() if k != "ours f32"}
    for m in models.values():
        m.unlink()
    return {"adapters": names, "ours": bakes, "export_lora": export, "kl_vs_stacked": vs_stacked,
            "kl_vs_float_bake": vs_float}  # fmt: skip


def large_case(llama: LlamaCpp, template: Path, work: Path) -> dict:
    """Memory at scale: the synthetic ~1B Q4_1 model and its rank-16 LoRA, ours (same) against export-lora."""
    from benchmarks.gguf_large import RANK, make_lora, make_model

    work.mkdir()
    base, lora = work / "large-Q4_1.gguf", work / "lora.gguf"
    params = make_model(template, base)
    make_lora(work / "lora", lora)
    mine = ours(base, [work / "lora"], work / "ours.gguf", "same")
    (work / "ours.gguf").unlink()  # the disk holds one output at a time
    export = export_lora(llama, base, lora, work / "export-lora.gguf")
    (work / "export-lora.gguf").unlink()
    adapter = (work / "lora" / "adapter_model.safetensors").stat().st_size
    return {"params": params, "base_bytes": base.stat().st_size, "rank": RANK, "adapter_bytes": adapter,
            "ours": mine, "export_lora": export}  # fmt: skip


def run(kl: bool = True) -> dict:
    """Both cases on both bases, the large model, with the machine's facts (``kl`` False: no KL)."""
    from merging.base.example_model import example_base_model, example_gguf

    llama = find()
    if llama is None:
        sys.exit("llama.cpp not found: set MERGING_LLAMA_CPP to the folder of llama-perplexity, export-lora")
    q41, folder = example_gguf(), example_base_model()
    bases = {}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        text = text_file(work / "skills.txt", ["add", "sort", "reverse", "translate"])
        q8 = work / q41.name.replace("Q4_1", "Q8_0")
        llama.run("llama-quantize", "--allow-requantize", str(q41), str(q8), "Q8_0", "1")
        sets = {name: gguf_loras(folder, names, work / "loras" / name) for name, names in CASES.items()}
        for kind, base in {"Q4_1": q41, "Q8_0": q8}.items():
            cases = {}
            for name, names in CASES.items():
                sub = work / kind / name
                sub.mkdir(parents=True)
                cases[name] = case(llama, base, kind, names, sets[name], sub, text, kl)
            bases[kind] = {"file": base.name, "bytes": base.stat().st_size, "cases": cases}
        large = large_case(llama, q41, work / "large")
    text = "examples/data/{add,sort,reverse,translate}.jsonl prompts+answers, 18 chunks of 128 tokens"
    return {"bases": bases, "large": large, "text": text, "threads": 1,
            "q8_0_base": "llama-quantize --allow-requantize, from the Q4_1 file"}  # fmt: skip


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def _row(name: str, r: dict, over: str, k: dict, f: dict | None) -> str:
    """One model's line of the table."""
    vs_float = "—" if f is None else f"{f['mean_kld']:.4f}"
    return (f"| {name} | {r['bytes']:,} | {r['seconds']:.1f} | {_mib(r['peak_rss'])} | {over} | "
            f"{k['mean_kld']:.4f} ± {k['mean_kld_err']:.4f} | {k['kld_99']:.3f} | {k['same_top_p']:.1f}% | "
            f"{vs_float} |")  # fmt: skip


HEAD = "| model | bytes | bake s | peak RSS | over imports | KL vs stack | 99% KL | top-1 | vs float |"


def _table(kind: str, name: str, c: dict) -> list[str]:
    """One case's table on one base, and its line comparing ours at the base's type with export-lora."""
    e, kb = c["export_lora"], c["kl_vs_stacked"]["base, no adapters"]
    lines = [
        "",
        f"### {name}",
        "",
        HEAD,
        "|---|---|---|---|---|---|---|---|---|",
        f"| base, no adapters | | | | | {kb['mean_kld']:.4f} | {kb['kld_99']:.3f} | "
        f"{kb['same_top_p']:.1f}% | |",
    ]
    for t, r in c["ours"].items():
        k, f = c["kl_vs_stacked"][f"ours {t}"], c["kl_vs_float_bake"].get(f"ours {t}")
        lines.append(_row(f"ours {t}", r, _mib(r["rss_over_imports"]), k, f))
    k = c["kl_vs_stacked"]["export-lora (F16)"]
    lines.append(_row("llama-export-lora (F16)", e, "—", k, c["kl_vs_float_bake"]["export-lora (F16)"]))
    same, ex, o = c["kl_vs_stacked"]["ours same"]["mean_kld"], k["mean_kld"], c["ours"]["same"]
    over = o["rss_over_imports"] / e["peak_rss"]
    lines += ["", f"Ours at the base's own type ({kind}) against export-lora (F16): KL vs the stack "
              f"{same:.4f} vs {ex:.4f} ({same / ex:.2f}×), file {o['bytes'] / e['bytes']:.2f}×, peak RSS "
              f"{o['peak_rss'] / e['peak_rss']:.1f}× (over imports {over:.1f}×), "
              f"time {o['seconds'] / e['seconds']:.1f}×."]  # fmt: skip
    if e["cat_merge_seconds"]:
        lines += ["", "export-lora refuses adapters whose tensor lists differ: it got their exact `cat` "
                  f"merge as one GGUF LoRA ({e['cat_merge_seconds']:.1f} s for `merging merge`, not counted "
                  "above)."]  # fmt: skip
    return lines


def _large(g: dict) -> list[str]:
    """The memory-at-scale section."""
    o, e = g["ours"], g["export_lora"]
    return [
        "", f"## Memory at scale: {g['params'] / 1e9:.2f}B parameters, Q4_1, rank-{g['rank']} LoRA on "
        "every linear",
        "", "A llama-shaped model (TinyLlama's shape: 22 blocks, hidden 2048, FFN 5632, 32/4 heads) with "
        f"random Q4_1 weights ({_mib(g['base_bytes'])}), the SmolLM2 GGUF's metadata and tokenizer; a PEFT "
        f"LoRA of {_mib(g['adapter_bytes'])} (float32) on q/k/v/o/gate/up/down of every block, the same "
        "factors as a GGUF LoRA for export-lora (`benchmarks/gguf_large.py`). Bake only, no KL.",
        "", "| model | bytes | bake s | peak RSS | over imports |", "|---|---|---|---|---|",
        f"| ours same (Q4_1) | {o['bytes']:,} | {o['seconds']:.1f} | {_mib(o['peak_rss'])} | "
        f"{_mib(o['rss_over_imports'])} |",
        f"| llama-export-lora (F16) | {e['bytes']:,} | {e['seconds']:.1f} | {_mib(e['peak_rss'])} | — |",
        "", f"Over its imports (Python, torch, gguf: {_mib(o['peak_rss'] - o['rss_over_imports'])}) ours "
        f"holds {_mib(o['rss_over_imports'])}, the adapter's own tensors included; export-lora's whole "
        f"process {_mib(e['peak_rss'])} ({o['rss_over_imports'] / e['peak_rss']:.2f}×); time "
        f"{o['seconds'] / e['seconds']:.1f}×, file {o['bytes'] / e['bytes']:.2f}×.",
    ]  # fmt: skip


def render(data: dict) -> str:
    """The Markdown report."""
    lines = [
        "# Baking into a quantised GGUF: ours against llama.cpp's export-lora",
        "",
        f"Judge: llama.cpp's `llama-perplexity` (KL-divergence mode, {data['text']}, 1 thread). "
        "`python -m benchmarks.gguf_bake` remakes this file (set MERGING_LLAMA_CPP to the llama.cpp tools).",
        "",
        "KL is the mean KL-divergence of each model's next-token distribution against llama.cpp stacking "
        "the adapters on the same base (`--lora`), and against the float bake (ours at f32: dequant(W)+ΔW). "
        "Even the float bake is not 0 against the stack: llama.cpp multiplies quantised weights with "
        "activations rounded to 8 bits, F32 weights in float, so ≈ the float bake's figure is the floor. "
        "Peak RSS by GNU time; "
        "'over imports' is our process's peak over its RSS once Python, torch and gguf are imported.",
    ]
    if data.get("kl_from_earlier_run"):
        lines += ["", "Time and memory re-measured with `--reuse-kl`; the KL columns are the previous full "
                  "run's, on the same bytes (the bake is deterministic)."]  # fmt: skip
    for kind, b in data["bases"].items():
        made = f", made by {data['q8_0_base']}" if kind == "Q8_0" else ""
        lines += ["", f"## Base {b['file']} ({_mib(b['bytes'])}{made})"]
        for name, c in b["cases"].items():
            lines += _table(kind, name, c)
    lines += _large(data["large"])
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    """``--reuse-kl``: re-measure time and memory, keep the KL figures of the last gguf_bake.json."""
    reuse = "--reuse-kl" in argv
    data = run(kl=not reuse)
    if reuse:
        old = json.loads((OUT / "gguf_bake.json").read_text())
        for kind, b in data["bases"].items():
            for name, c in b["cases"].items():
                c |= {k: v for k, v in old["bases"][kind]["cases"][name].items() if k.startswith("kl_")}
        data["kl_from_earlier_run"] = True
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gguf_bake.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (OUT / "gguf_bake.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main(sys.argv[1:])
