"""Fold adapters into the base weights and write a full model, one tensor at a time.

The base's safetensors shards are streamed: each shard is read tensor by tensor, the tensors of adapted
modules get their stacked deltas folded in (as PEFT's ``merge_and_unload`` would), and the shard is
written before the next is opened, so peak memory stays near one shard. Config, tokenizer and the
shard index are copied unchanged.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from merging.adapter import Adapter
from merging.basemodel import module_shapes
from merging.deltas import Delta, ModuleReplacement, TokenRows
from merging.errors import FormatError, IncompatibleAdapters, UnsupportedError
from merging.fileio import atomic_folder
from merging.runtime import effective_weight
from merging.tensorfiles import list_tensors

Progress = Callable[[int, int, str], None]


def bake(
    base: Path,
    adapters: Sequence[Adapter | tuple[Adapter, float]],
    out: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write ``base`` with the adapters folded in (stacked semantics, innermost first) to ``out``.

    Args:
        base: a transformers model folder with safetensors weights.
        adapters: Adapters or (Adapter, weight) pairs.
        out: the output folder (atomic; an existing one needs ``force``).
        progress: called as progress(done, total, shard name).

    Returns:
        ``out``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = Path(base)
    shards = sorted(base.glob("*.safetensors"))
    if not shards:
        raise FormatError(f"{base}: no safetensors shards to bake into")
    pairs = [(a, 1.0) if isinstance(a, Adapter) else (a[0], float(a[1])) for a in adapters]
    shapes = module_shapes(base)
    stored = {t.name for t in list_tensors(base)}
    stacks, aux = _plan(pairs, shapes, stored)
    pending = set(stacks) | set(aux)
    with atomic_folder(Path(out), force=force) as tmp:
        for f in base.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        for i, shard in enumerate(shards):
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(shard), framework="pt") as src:
                metadata = src.metadata()
                names = list(src.keys())
                for name in names:
                    tensors[name] = src.get_tensor(name)
            for mod in sorted(pending):
                if f"{mod}.weight" in tensors:
                    _fold(mod, tensors, stacks.get(mod, []), aux.get(mod), shapes[mod][0])
                    pending.discard(mod)
            save_file(tensors, str(tmp / shard.name), metadata=metadata or {"format": "pt"})
            del tensors
            if progress:
                progress(i + 1, len(shards), shard.name)
        if pending:
            raise UnsupportedError(
                f"{base}: no stored weight for {', '.join(sorted(pending))} (a tied weight?); cannot bake it"
            )
    return Path(out)


def _plan(pairs, shapes, stored):
    stacks: dict[str, list[tuple[Delta, float]]] = {}
    aux: dict[str, ModuleReplacement | TokenRows] = {}
    for ad, w in pairs:
        for mod, d in ad.deltas.items():
            stacks.setdefault(mod, []).append((d, w))
        for mod, src in ad.tied.items():
            if f"{mod}.weight" not in stored:  # tied in the base too: the shared weight gets the delta once
                continue
            stacks.setdefault(mod, []).append((ad.deltas[src], w))
        for mod, a in ad.aux.items():
            if mod in aux:
                raise IncompatibleAdapters(f"module {mod} is replaced by more than one adapter")
            aux[mod] = a
    for mod in set(stacks) | set(aux):
        if mod not in shapes:
            raise FormatError(f"module {mod} is not in the base model")
    return stacks, aux


def _fold(mod, tensors, stack, aux, kind) -> None:
    w_key, b_key = f"{mod}.weight", f"{mod}.bias"
    w, b = tensors[w_key], tensors.get(b_key)
    if isinstance(aux, ModuleReplacement):
        w = aux.tensors.get("weight", w)
        b = aux.tensors.get("bias", b)
    elif isinstance(aux, TokenRows):
        w = w.clone()
        w[list(aux.indices)] = aux.rows.to(w.dtype)
    new_w, new_b = effective_weight(stack, w, b, kind)
    tensors[w_key] = new_w.to(w.dtype).contiguous()
    if new_b is not None:
        if b is None:
            raise UnsupportedError(f"module {mod} has no bias in the base to fold a LoRA bias into")
        tensors[b_key] = new_b.to(b.dtype).contiguous()
