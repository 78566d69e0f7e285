"""Fold adapters into the base weights and write a full model, one tensor at a time.

The base's safetensors shards are streamed tensor by tensor: the header is copied as it is (shapes and
dtypes do not change), untouched tensors are copied as bytes, and the tensors of adapted modules get
their stacked deltas folded in (as PEFT's ``merge_and_unload`` would), so peak memory stays near the
largest tensor, not a shard. Config, tokenizer and the shard index are copied unchanged.
"""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from merging.base.layout import skeleton
from merging.base.tied_weights import tied_writes, untie_files
from merging.core import dora
from merging.core.adapter import Pair, Stack, Stacks, base_shapes, stacks
from merging.core.alora import refuse_gated
from merging.core.deltas import LowRank
from merging.core.experts import is_param_key
from merging.core.progress import Progress
from merging.core.replacements import BaseTensors, ModuleReplacement, TokenRows
from merging.errors import FormatError, IncompatibleAdapters, UnsupportedError
from merging.export import qlora
from merging.export.bake_params import bake_loaded
from merging.runtime.effective import effective_bias, effective_weight
from merging.storage.atomic import atomic_folder, checkpoint
from merging.storage.files import refuse_overlap
from merging.storage.safetensors_io import stream_shard
from merging.storage.tensorfiles import LazyWeights
from merging.storage.threads import serial


def bake(
    base: Path,
    pairs: Sequence[Pair],
    out: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
    base_quant: str | None = None,
    into: str = "original",
    dequantized: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``base`` with the adapters folded in (stacked semantics, innermost first) to ``out``.

    A module tied to another in the base (an lm_head sharing the input embedding's tensor) that the adapters
    change differently from it is written apart, and config.json says ``tie_word_embeddings: false``, as
    PEFT's forward would have it; a tie transformers cannot undo is refused in one line.

    Args:
        base: a transformers model folder with safetensors weights.
        pairs: (Adapter, weight) in stacking order.
        out: the output folder (atomic; an existing one needs ``force``).
        progress: called as progress(done, total, shard name).
        base_quant: the adapters were trained on the base in nf4/fp4/int8 (QLoRA); with ``into``
            "dequantized" they are folded into dequant(W₄) in the base's float dtype (``export.qlora``).
        dequantized: those dequant(W₄) when the caller has them (``qlora.Reference``), else loaded here.

    Returns:
        ``out``.
    """
    base = Path(base)
    refuse_overlap(out, [base, *(ad.source for ad, _ in pairs)])
    prepare = None if base_quant is None else qlora.prepare_for(
        base, base_quant, into, task_type(pairs), dequantized
    )
    if prepare is not None or any(is_param_key(m) for ad, _ in pairs for m in ad.deltas):  # via transformers
        return bake_loaded(base, pairs, out, task_type=task_type(pairs), force=force, progress=progress,
                           owns=owned, prepare=prepare)  # fmt: skip
    shards = sorted(base.glob("*.safetensors"))
    if not shards:
        raise FormatError(f"{base}: no safetensors shards to bake into")
    model = skeleton(base, task_type(pairs))
    shapes = base_shapes(model)
    weights = LazyWeights(base)
    refuse_gated(pairs)
    plan = stacks(pairs)  # every module as PEFT runs it, ties expanded
    if outside := [m for m in plan.modules if m not in shapes]:
        raise FormatError(f"module {outside[0]} is not in the base model")
    for mod in _tied_twins(plan, weights):  # PEFT saves a tied embedding's base weight twice
        del plan.aux[mod]
    tied = tied_writes(base, model, plan, set(weights.where))
    aux = dict(plan.aux) | tied.aux
    modules = [m for m in sorted(set(plan.modules) | set(tied.aux) | set(tied.apart)) if m not in tied.shared]
    jobs = {f"{m}.weight": m for m in modules}
    jobs |= {f"{m}.bias": m for m in modules if f"{m}.bias" in weights}
    missing = sorted(
        m for n, m in jobs.items() if n.endswith(".weight") and n not in weights and m not in tied.apart
    )
    if missing:
        raise UnsupportedError(
            f"{base}: no stored weight for {', '.join(missing)} (a tied weight?); cannot bake it"
        )

    def transform(name: str, stored: torch.Tensor) -> torch.Tensor:
        return fold(name, stored).to(stored.dtype)  # a replacement's own dtype must not reach the shard

    def fold(name: str, t: torch.Tensor) -> torch.Tensor:
        mod = jobs[name]
        layer, a, stack = shapes[mod][0], aux.get(mod), plan.deltas.get(mod, [])
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
        dora.check(mod, stack)
        with serial() if memory_bound(stack) else nullcontext():
            new, _ = effective_weight(stack, t, None, layer, inplace=True)
        return new.to(t.dtype)

    with atomic_folder(Path(out), force=force, owns=owned) as tmp:
        for f in sorted(base.iterdir()):
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copyfile(f, tmp / f.name)
                checkpoint(f"copy {f.name}")
        extra = {f"{m}.weight": (f"{src}.weight", transform) for m, src in tied.apart.items()}
        for i, shard in enumerate(shards):
            mine = {n: transform for n in jobs if weights.where.get(n) == shard}
            added = {n: e for n, e in extra.items() if weights.where.get(e[0]) == shard}
            stream_shard(shard, tmp / shard.name, mine, added)
            if progress:
                progress(i + 1, len(shards), shard.name)
        if tied.apart:
            untie_files(tmp, {n: weights.where[src].name for n, (src, _) in extra.items()})
    return Path(out)


def task_type(pairs: Sequence[Pair]) -> str | None:
    """The PEFT task type the adapters were made for (names the head the base's module paths include)."""
    kinds = {ad.config.get("task_type") for ad, _ in pairs if isinstance(ad.config, dict)} - {None}
    if len(kinds) > 1:
        raise IncompatibleAdapters(f"the inputs are for different task types: {', '.join(sorted(kinds))}")
    return next(iter(kinds), None)


SERIAL_RANK = 64  # a fold of rank r does 2r flops per weight entry against 8 bytes moved: memory-bound


def memory_bound(stack: Stack) -> bool:
    """Whether folding a module's stack only streams its weight through memory (plain LoRAs of small total
    rank): it then runs on one thread (merging.threads)."""
    lowrank = [d for d, _ in stack if isinstance(d, LowRank) and not dora.is_dora(d)]
    return len(lowrank) == len(stack) and sum(d.a.shape[0] for d in lowrank) <= SERIAL_RANK


WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json")


def owned(folder: Path) -> set[str]:
    """What replacing a baked model replaces besides the files it writes: every weight file and index
    (a stale shard beside a new index would load); the user's other files are kept."""
    names = [p.name for p in Path(folder).iterdir()]
    return {n for n in names if any(fnmatch.fnmatch(n, pat) for pat in WEIGHT_FILES)}


def _tied_twins(plan: Stacks, weights: LazyWeights) -> list[str]:
    """Tied modules (no stored weight) whose only change is a saved base weight equal to a stored module's:
    PEFT saves a tied embedding twice; the stored one carries it."""
    stored = {
        m: a.tensors["weight"] for m, a in plan.aux.items()
        if isinstance(a, BaseTensors) and "weight" in a.tensors and f"{m}.weight" in weights.where
    }  # fmt: skip
    twins = []
    for mod, a in plan.aux.items():
        if f"{mod}.weight" in weights.where or not isinstance(a, BaseTensors):
            continue
        w = a.tensors.get("weight")
        if set(a.tensors) == {"weight"} and any(_same(w, s) for s in stored.values()):
            twins.append(mod)
    return twins


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)
