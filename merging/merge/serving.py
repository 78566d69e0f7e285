"""What serving engines need from an adapter folder, said before anyone serves it, and the uniform-rank form.

vLLM pads every LoRA to ``max_lora_rank``, which it accepts only from a fixed list; llama.cpp's
``convert_lora_to_gguf.py``, TGI and LoRAX read only the global ``lora_alpha`` and scale every module by
alpha / its rank, so per-module ranks or alphas (``rank_pattern`` / ``alpha_pattern``) come out wrong there.
A *uniform* folder (one rank, ``lora_alpha`` = r, no patterns) is read right by all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from merging.core.adapter import Adapter
from merging.core.deltas import LowRank
from merging.core.lazy import LazyDeltas
from merging.core.replacements import BaseTensors, ModuleReplacement, TokenRows
from merging.errors import MergingError, UnsupportedError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's accepted max_lora_rank values


@dataclass(frozen=True)
class Serving:
    """An adapter set as serving engines see it."""

    max_rank: int
    uniform: bool  # one rank and one scale everywhere: engines that read only the global alpha scale right
    vllm_rank: int | None  # the smallest max_lora_rank vLLM accepts that holds max_rank (None: none does)
    blockers: tuple[str, ...]  # parts a LoRA server does not load, each with its way out

    def lines(self) -> list[str]:
        """One line per fact, for the merge summary, inspect and the model card."""
        shape = "uniform rank" if self.uniform else "per-module ranks/alphas"
        out = [f"serving: max rank {self.max_rank}, {shape}"]
        if self.vllm_rank is None:
            out.append(f"vLLM: rank {self.max_rank} exceeds its largest max_lora_rank {VLLM_RANKS[-1]}; "
                       "use svd --rank to fit")  # fmt: skip
        else:
            out.append(f"vLLM: pass --max-lora-rank {self.vllm_rank}")
        if not self.uniform:
            out.append("llama.cpp's converter, TGI and LoRAX scale every module by the global lora_alpha / "
                       "its rank: write with --uniform-rank for them")  # fmt: skip
        out += [f"not servable as a LoRA: {b}" for b in self.blockers]
        return out


def vllm_rank(rank: int) -> int | None:
    """The smallest rank vLLM accepts as max_lora_rank that is ≥ rank."""
    return next((r for r in VLLM_RANKS if r >= rank), None)


def of(adapters: Sequence[Adapter], lora: Mapping[str, tuple[int, float]] | None = None) -> Serving:
    """What serving these adapters (a merge result or a folder's set) needs.

    ``lora`` gives the LoRA modules' (rank, scale) of a streamed merge result, whose deltas are not kept.
    """
    ranks, scales, blockers = set(), set(), []
    for ad in adapters:
        kinds = ad.kinds
        if "ia3" in kinds:
            blockers.append(f"{ad.name}: IA³ vectors (vLLM, llama.cpp and TGI load LoRA only): bake them")
        if kinds & {"loha", "lokr"}:
            blockers.append(f"{ad.name}: LoHa/LoKr factors: merge -s cat writes them as an exact LoRA")
        if "dora" in kinds:
            blockers.append(f"{ad.name}: DoRA magnitudes (not loaded by vLLM or llama.cpp): bake it")
        if any(isinstance(a, ModuleReplacement | TokenRows | BaseTensors) for a in ad.aux.values()):
            blockers.append(f"{ad.name}: replaced modules, token rows or trained biases: bake them")
        if ad.invocation is not None:
            blockers.append(f"{ad.name}: aLoRA gating (check that the engine supports activated LoRA)")
        for d in [] if isinstance(ad.deltas, LazyDeltas) else ad.deltas.values():
            if isinstance(d, LowRank):
                ranks.add(d.rank)
                scales.add(round(d.scale, 12))
    for rank, scale in (lora or {}).values():
        ranks.add(rank)
        scales.add(round(scale, 12))
    top = max(ranks, default=0)
    return Serving(top, len(ranks) <= 1 and len(scales) <= 1, vllm_rank(top), tuple(blockers))


def uniform(adapter: Adapter, rank: int | None = None) -> Adapter:
    """Every LoRA module padded with zero directions to one rank, its scale folded into B (lora_alpha = r).

    Args:
        adapter: a LoRA adapter (LowRank deltas).
        rank: the common rank (default: the largest); smaller than a module's rank is an error.

    Returns:
        The same ΔW in every module, written with one rank and no rank/alpha patterns.
    """
    if not all(isinstance(d, LowRank) and d.magnitude is None for d in adapter.deltas.values()):
        raise UnsupportedError(f"{adapter.where}: `uniform_rank` needs plain LoRA modules (use cat first)")
    top = max((d.rank for d in adapter.deltas.values()), default=0)
    r = top if rank is None else rank
    if r < top:
        raise UnsupportedError(f"{adapter.where}: rank {r} is below the largest module rank {top}")
    out = {}
    for mod, d in adapter.deltas.items():
        pad = r - d.rank
        b = torch.cat([d.scale * d.b, d.b.new_zeros(d.b.shape[0], pad)], dim=1)  # (out, r)
        a = torch.cat([d.a, d.a.new_zeros(pad, d.a.shape[1])], dim=0)  # (r, in_flat)
        bias = None if d.bias is None else d.scale * d.bias
        out[mod] = LowRank(b, a, 1.0, d.target, bias=bias)
    return adapter.with_deltas(out)


def for_engine(adapter: Adapter, engine: str | None = None) -> Adapter:
    """A LoRA adapter in uniform form, padded to the engine's smallest accepted rank with ``engine``
    ("vllm"), else to its own largest rank."""
    if engine is None:
        return uniform(adapter)
    if engine != "vllm":
        raise UnsupportedError(f"`serve`: {engine!r} is not a known engine; known: vllm")
    top = of([adapter]).max_rank
    rank = vllm_rank(top)
    if rank is None:
        raise MergingError(f"rank {top} exceeds vLLM's largest max_lora_rank; use svd --rank 512")
    return uniform(adapter, rank)
