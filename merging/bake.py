"""Fold adapters into the base weights and write a full model, one tensor at a time.

The base's safetensors shards are streamed tensor by tensor: the header is copied as it is (shapes and
dtypes do not change), untouched tensors are copied as bytes, and the tensors of adapted modules get
their stacked deltas folded in (as PEFT's ``merge_and_unload`` would), so peak memory stays near the
largest tensor, not a shard. Config, tokenizer and the shard index are copied unchanged.
"""

from __future__ import annotations

import fnmatch
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from merging.adapter import Pair, Stacks, stacks
from merging.auxiliary import BaseTensors, ModuleReplacement, TokenRows
from merging.basemodel import module_shapes
from merging.errors import FormatError, UnsupportedError
from merging.fileio import atomic_folder, checkpoint, refuse_overlap
from merging.runtime import effective_bias, effective_weight, refuse_gated
from merging.tensorfiles import LazyWeights, safetensors_header

Progress = Callable[[int, int, str], None]


def bake(
    base: Path,
    pairs: Sequence[Pair],
    out: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write ``base`` with the adapters folded in (stacked semantics, innermost first) to ``out``.

    Args:
        base: a transformers model folder with safetensors weights.
        pairs: (Adapter, weight) in stacking order.
        out: the output folder (atomic; an existing one needs ``force``).
        progress: called as progress(done, total, shard name).

    Returns:
        ``out``.
    """
    base = Path(base)
    refuse_overlap(out, [base, *(ad.source for ad, _ in pairs)])
    shards = sorted(base.glob("*.safetensors"))
    if not shards:
        raise FormatError(f"{base}: no safetensors shards to bake into")
    shapes = module_shapes(base)
    weights = LazyWeights(base)
    # a module tied in the base too shares one stored tensor with its source: it takes the delta once
    refuse_gated(pairs)
    plan = stacks(pairs, expand_tie=lambda mod: f"{mod}.weight" in weights.where)
    if outside := [m for m in plan.modules if m not in shapes]:
        raise FormatError(f"module {outside[0]} is not in the base model")
    for mod in _tied_twins(plan, weights):
        del plan.aux[mod]
    jobs = {f"{m}.weight": m for m in plan.modules}
    jobs |= {f"{m}.bias": m for m in plan.modules if f"{m}.bias" in weights}
    missing = sorted(m for n, m in jobs.items() if n.endswith(".weight") and n not in weights)
    if missing:
        raise UnsupportedError(
            f"{base}: no stored weight for {', '.join(missing)} (a tied weight?); cannot bake it"
        )

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        mod = jobs[name]
        layer, a, stack = shapes[mod][0], plan.aux.get(mod), plan.deltas.get(mod, [])
        if name.endswith(".bias"):
            if isinstance(a, ModuleReplacement | BaseTensors) and "bias" in a.tensors:
                t = a.tensors["bias"]
            return effective_bias(stack, t).to(t.dtype)
        if isinstance(a, ModuleReplacement | BaseTensors) and "weight" in a.tensors:
            t = a.tensors["weight"].clone()  # folded in place below: never into the adapter's own tensor
        elif isinstance(a, TokenRows):
            t = t.clone()
            t[list(a.indices)] = a.rows.to(t.dtype)
        if any(getattr(d, "bias", None) is not None for d, _ in stack) and f"{mod}.bias" not in weights:
            raise UnsupportedError(f"module {mod} has no bias in the base to fold a LoRA bias into")
        new, _ = effective_weight(stack, t, None, layer, inplace=True)
        return new.to(t.dtype)

    with atomic_folder(Path(out), force=force, owns=owned) as tmp:
        for f in sorted(base.iterdir()):
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copyfile(f, tmp / f.name)
                checkpoint(f"copy {f.name}")
        for i, shard in enumerate(shards):
            stream_shard(
                shard, tmp / shard.name, {n: transform for n in jobs if weights.where.get(n) == shard}
            )
            if progress:
                progress(i + 1, len(shards), shard.name)
    return Path(out)


WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json")


def owned(folder: Path) -> set[str]:
    """What replacing a baked model replaces besides the files it writes: every weight file and index
    (a stale shard beside a new index would load); the user's other files are kept."""
    names = [p.name for p in Path(folder).iterdir()]
    return {n for n in names if any(fnmatch.fnmatch(n, pat) for pat in WEIGHT_FILES)}


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}  # fmt: skip
CHUNK = 64 << 20


def stream_shard(src: Path, dst: Path, transforms: dict) -> None:
    """Copy a safetensors file tensor by tensor, replacing the named tensors by transform(name, tensor).

    Shapes and dtypes do not change, so the header (and every offset) is copied as it is; memory stays
    at one tensor however large the shard.
    """
    header = safetensors_header(src)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        (n,) = struct.unpack("<Q", fin.read(8))
        fout.write(struct.pack("<Q", n) + fin.read(n))
        data_start = 8 + n
        entries = sorted(
            (meta["data_offsets"], name) for name, meta in header.items() if name != "__metadata__"
        )
        for (begin, end), name in entries:
            fin.seek(data_start + begin)
            if name in transforms:
                meta = header[name]
                raw = bytearray(fin.read(end - begin))
                t = (
                    torch.frombuffer(raw, dtype=DTYPES[meta["dtype"]]).reshape(meta["shape"])
                    if raw
                    else torch.empty(0)
                )
                new = transforms[name](name, t).contiguous()
                fout.write(new.view(torch.uint8).numpy().tobytes() if new.numel() else b"")
                checkpoint(f"tensor {name}")
                continue
            left = end - begin
            while left:
                block = fin.read(min(CHUNK, left))
                fout.write(block)
                left -= len(block)
            checkpoint(f"tensor {name}")


def _tied_twins(plan: Stacks, weights: LazyWeights) -> list[str]:
    """Tied modules (no stored weight) whose only change is a saved base weight equal to a stored module's:
    PEFT saves a tied embedding twice; the stored one carries it."""
    stored = {
        m: a.tensors["weight"] for m, a in plan.aux.items()
        if isinstance(a, BaseTensors) and "weight" in a.tensors and f"{m}.weight" in weights.where
    }  # fmt: skip
    twins = []
    for mod, a in plan.aux.items():
        if mod in plan.deltas or f"{mod}.weight" in weights.where or not isinstance(a, BaseTensors):
            continue
        w = a.tensors.get("weight")
        if set(a.tensors) == {"weight"} and any(_same(w, s) for s in stored.values()):
            twins.append(mod)
    return twins


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)
