"""Can rounding rescue a same-type bake? Ways of rounding dequant(W) + ΔW back to Q4_1/Q8_0, in llama.cpp.

    MERGING_CACHE=… MERGING_LLAMA_CPP=/path/to/llama.cpp/bin python -m benchmarks.gguf_rounding

An experiment, not a feature: the bake's chunk writer is swapped here for one that rounds each block of
W + ΔW (SmolLM2-135M Q4_1, and Q8_0 made from it by ``llama-quantize --allow-requantize``; the four
bundled adapters) in one of these ways, then llama-perplexity gives each model's KL against llama.cpp
stacking the adapters on the same base (``--lora``):

- ``fresh nearest``: gguf's own quantiser (new scale/min per block, round to nearest) — what
  ``--outtype same`` does;
- ``grid nearest``: the base's own scale/min kept, values rounded to nearest on that grid (blocks whose
  values leave the grid's range re-quantised fresh);
- ``grid stochastic``: the same grid, seeded unbiased stochastic rounding (E[q] = the exact value);
- ``fresh stochastic``: gguf's new scale/min, then seeded unbiased stochastic rounding.

Writes reports/benchmarks/gguf_rounding.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

from tests.support.llama_cpp import find, perplexity_kl, text_file

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ["add", "sort", "reverse", "translate"]
MODES = {
    "Q4_1": ("fresh nearest", "grid nearest", "grid stochastic", "fresh stochastic"),
    "Q8_0": ("fresh nearest", "grid nearest", "grid stochastic"),
}


def round_q4_1(raw: np.ndarray, w: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """W + ΔW (rows, cols) as Q4_1 bytes shaped like ``raw`` (the base's bytes of those rows)."""
    import gguf

    q41 = gguf.GGMLQuantizationType.Q4_1
    blocks, x = raw.reshape(-1, 20).copy(), w.reshape(-1, 32)
    if mode.startswith("fresh"):
        fresh = gguf.quants.quantize(x, q41).reshape(-1, 20)
        if mode == "fresh nearest":
            return fresh.reshape(raw.shape)
        blocks[:, :4] = fresh[:, :4]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (x - m) / d
    if mode.endswith("stochastic"):
        q = np.floor(t)
        q += rng.random(t.shape, dtype=np.float32) < (t - q)
    else:
        q = np.floor(t + 0.5)
    if mode.startswith("fresh"):
        q = np.clip(np.nan_to_num(q), 0, 15)  # the block's own min/max: in range up to float rounding
    ok = (d[:, 0] > 0) & np.isfinite(t).all(1) & (q.min(1) >= 0) & (q.max(1) <= 15)
    qs = np.where(ok[:, None], q, 0).astype(np.uint8).reshape(-1, 2, 16)
    out = np.concatenate([blocks[:, :4], qs[:, 0, :] | (qs[:, 1, :] << np.uint8(4))], axis=1)
    if (~ok).any():
        out[~ok] = gguf.quants.quantize(x[~ok], q41).reshape(-1, 20)
    return out.reshape(raw.shape)


def round_q8_0(raw: np.ndarray, w: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """W + ΔW (rows, cols) as Q8_0 bytes shaped like ``raw``; grid modes keep each block's scale."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    blocks, x = raw.reshape(-1, 34), w.reshape(-1, 32)
    if mode == "fresh nearest":
        return gguf.quants.quantize(x, q8).reshape(raw.shape)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = x / d
    q = np.floor(t)
    q = q + (rng.random(t.shape, dtype=np.float32) < (t - q)) if mode.endswith("stochastic") else np.round(t)
    ok = (d[:, 0] > 0) & np.isfinite(t).all(1) & (np.abs(q).max(1) <= 127)
    out = np.concatenate([blocks[:, :2], np.where(ok[:, None], q, 0).astype(np.int8).view(np.uint8)], axis=1)
    if (~ok).any():
        out[~ok] = gguf.quants.quantize(x[~ok], q8).reshape(-1, 34)
    return out.reshape(raw.shape)


def bake(base: Path, out: Path, mode: str) -> None:
    """Our same-type bake with the rounding ``mode`` (whole tensors; the seed from the tensor's name)."""
    from merging.core.adapter import weighted
    from merging.export import gguf_bake as gb
    from merging.formats import sources

    def bake_tensor(src, dst, at, t, qtype, rows) -> None:
        n = t.shape[0]
        raw = np.frombuffer(os.pread(src, t.nbytes, at), np.uint8).reshape(n, t.nbytes // n)
        w = gb._dequantized(raw, t.qtype) + rows(np.arange(n))
        rng = np.random.default_rng(zlib.crc32(t.name.encode()))
        rounded = (round_q4_1 if t.qtype == 3 else round_q8_0)(raw, w, mode, rng)  # ggml type 3: Q4_1
        gb.write_all(dst, np.ascontiguousarray(rounded))

    pairs = weighted([ad for a in ADAPTERS for ad in sources.load(ROOT / "examples" / "adapters" / a)])
    saved, gb._bake_tensor = gb._bake_tensor, bake_tensor
    try:
        gb.bake_gguf(base, pairs, out, force=True)
    finally:
        gb._bake_tensor = saved


def main() -> None:
    """Bake the four variants, judge them in llama.cpp, write the report."""
    import subprocess

    from merging.base.example_model import example_base_model, example_gguf

    llama = find()
    if llama is None:
        sys.exit("llama.cpp not found: set MERGING_LLAMA_CPP to the folder of llama-perplexity, export-lora")
    base, folder = example_gguf(), example_base_model()
    rows: list[tuple[str, str, dict]] = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        text = text_file(work / "skills.txt", ADAPTERS)
        loras = []
        for a in ADAPTERS:
            loras.append(work / f"{a}.gguf")
            src = ROOT / "examples" / "adapters" / a
            cmd = [sys.executable, "-m", "merging_cli.main", "convert", str(src), "--to", "gguf", "--base",
                   str(folder), "-o", str(loras[-1])]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True)
        q8 = work / "base-Q8_0.gguf"
        llama.run("llama-quantize", "--allow-requantize", str(base), str(q8), "Q8_0", "1")
        for kind, b in {"Q4_1": base, "Q8_0": q8}.items():
            ref = work / f"stacked-{kind}.kld"
            perplexity_kl(llama, b, text, ref, *loras, save=True)
            for mode in MODES[kind]:
                out = work / f"{kind}-{mode.replace(' ', '-')}.gguf"
                bake(b, out, mode)
                rows.append((kind, mode, perplexity_kl(llama, out, text, ref)))
                out.unlink()
    lines = ["# Rounding a same-type bake: ways of rounding back, judged by llama.cpp", "",
             *__doc__.split("\n\n")[2:4], "", "| base | rounding | KL vs stack | 99% KL | top-1 |",
             "|---|---|---|---|---|"]  # fmt: skip
    for kind, m, k in rows:
        err = f"{k['mean_kld']:.4f} ± {k['mean_kld_err']:.4f}"
        lines.append(f"| {kind} | {m} | {err} | {k['kld_99']:.3f} | {k['same_top_p']:.1f}% |")
    lines += ["", "For scale: the same adapters baked at `--outtype q8_0` and by export-lora (F16): see "
              "reports/benchmarks/gguf_bake.md. `python -m benchmarks.gguf_rounding` remakes this "
              "file."]  # fmt: skip
    (ROOT / "reports" / "benchmarks" / "gguf_rounding.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
