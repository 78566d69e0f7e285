"""Fold adapters into a diffusers pipeline folder: the UNet/transformer and text encoders they adapt.

Modules are named ``<component>.<path>`` (as every pipeline-based reader names them). Each adapted
component's safetensors files are streamed tensor by tensor (``bake.stream_shard``: headers, shapes and
dtypes unchanged, untouched tensors copied as bytes) with the stacked deltas folded into the weights they
adapt, under the names its checkpoints use (``text_model.*`` for CLIP, or without it as transformers 5
saves). Every other file of the pipeline — model_index.json, the scheduler, tokenizers, the VAE, the
components no adapter touches — is hard-linked (copied byte for byte across file systems). The output folder
is written atomically.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from merging.base import pipelines as sdbase
from merging.base.layout import BaseLayout
from merging.core import dora
from merging.core.adapter import Pair, Stacks, stacks
from merging.core.alora import refuse_gated
from merging.errors import FormatError, UnsupportedError
from merging.export.bake import Progress, stream_shard
from merging.formats import ldm_checkpoint, mmdit_names
from merging.runtime.effective import effective_bias, effective_weight
from merging.storage.atomic import atomic_file, atomic_folder, checkpoint, link_tree
from merging.storage.files import refuse_overlap, save_safetensors
from merging.storage.tensorfiles import LazyWeights


def bake_pipeline(
    base: Path, pairs: Sequence[Pair], out: Path, *, force: bool = False, progress: Progress | None = None
) -> Path:
    """Write the pipeline folder ``base`` with the adapters folded in (stacked, innermost first) to ``out``.

    Args:
        base: a diffusers pipeline folder (model_index.json) with safetensors components.
        pairs: (Adapter, weight) in stacking order, read with the pipeline as base.
        out: the output folder (atomic; an existing one needs ``force``).
        progress: called as progress(done, total, component).

    Returns:
        ``out``.
    """
    base = Path(base)
    plan, layout = _planned(base, pairs, out)
    if outside := [m for m in plan.deltas if m not in layout.modules]:
        raise FormatError(f"module {outside[0]} is not in the pipeline {base}")
    adapted = sorted({m.partition(".")[0] for m in plan.deltas})
    with atomic_folder(Path(out), force=force) as tmp:
        for entry in sorted(base.iterdir()):
            if entry.name not in adapted:
                link_tree(entry, tmp / entry.name)
        for i, comp in enumerate(adapted):
            _bake_component(base / comp, tmp / comp, comp, plan.deltas, layout)
            if progress:
                progress(i + 1, len(adapted), comp)
    return Path(out)


def _planned(base: Path, pairs: Sequence[Pair], out: Path) -> tuple[Stacks, BaseLayout]:
    """The checks every pipeline bake makes first, then the stacked deltas and the pipeline's layout."""
    if not sdbase.is_pipeline(base):
        raise FormatError(f"{base}: not a diffusers pipeline folder (no model_index.json)")
    refuse_overlap(out, [base, *(ad.source for ad, _ in pairs)])
    refuse_gated(pairs)
    plan = stacks(pairs)
    if plan.aux:
        raise UnsupportedError(f"module {min(plan.aux)}: replaced modules are not baked into a pipeline")
    return plan, BaseLayout.from_folder(base)


def _folding(src: Path, comp: str, deltas: dict, layout: BaseLayout):
    """A component's lazy weights, the stored tensors the deltas change (→ module), and the fold."""
    weights = LazyWeights(src)
    jobs: dict[str, str] = {}  # tensor name in the component's files → module
    for mod in (m for m in deltas if m.partition(".")[0] == comp):
        names = (layout.saved.get(mod, mod).partition(".")[2], mod.partition(".")[2])  # checkpoints', live
        stored = next((n for n in names if f"{n}.weight" in weights), None)
        if stored is None:
            raise UnsupportedError(f"{src}: no stored weight {names[0]}.weight for {mod}; cannot bake it")
        jobs[f"{stored}.weight"] = mod
        if f"{stored}.bias" in weights:
            jobs[f"{stored}.bias"] = mod

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        mod = jobs[name]
        stack = deltas[mod]
        if name.endswith(".bias"):
            return effective_bias(stack, t).to(t.dtype)
        if any(getattr(d, "bias", None) is not None for d, _ in stack) and f"{name[:-7]}.bias" not in weights:
            raise UnsupportedError(f"module {mod} has no bias in the base to fold a LoRA bias into")
        dora.check(mod, stack)  # as the folder bake: DoRA with a LoRA bias, over IA³, on an unknown layer
        new, _ = effective_weight(stack, t, None, layout.modules[mod][0], inplace=True)
        return new.to(t.dtype)

    return weights, jobs, transform


def _bake_component(src: Path, dst: Path, comp: str, deltas: dict, layout: BaseLayout) -> None:
    """One component folder with its modules' deltas folded into the stored weights."""
    weights, jobs, transform = _folding(src, comp, deltas, layout)
    dst.mkdir()
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix == ".safetensors":
            stream_shard(f, dst / f.name, {n: transform for n in jobs if weights.where.get(n) == f})
        elif f.is_file():
            shutil.copyfile(f, dst / f.name)
        else:
            link_tree(f, dst / f.name)
        checkpoint(f"bake {comp}/{f.name}")


def bake_single_file(base: Path, pairs: Sequence[Pair], out: Path, *, force: bool = False) -> Path:
    """A pipeline with the adapters folded in, as one checkpoint file in the original layout, which
    ``from_single_file`` reads: SD1.5 / SDXL whole (UNet, VAE, text encoders: ``ldm_checkpoint``), SD3's
    transformer alone in MMDiT's names (``mmdit_names.checkpoint_tensors``).

    Flux is refused (diffusers 0.42's reader splits linear1 at the full model's width): bake the folder.
    Each component is held in memory in turn, and the whole file once, as safetensors writes it.
    """
    base = Path(base)
    plan, layout = _planned(base, pairs, out)
    dit = (base / "transformer").is_dir()
    if dit and not mmdit_names.is_sd3(layout.modules):
        why = "diffusers 0.42 reads Flux's at the full model's widths only"
        raise UnsupportedError(f"{base}: --single-file writes SD1.5/SDXL/SD3 files ({why}); bake a folder")
    if not dit and not (base / "unet").is_dir():
        raise FormatError(f"{base}: a single-file bake needs a UNet or SD3 transformer (unet/, transformer/)")
    kind = "sd3" if dit else "sdxl" if (base / "text_encoder_2").is_dir() else "sd"
    comps = ["transformer"] if dit else [c for c in ldm_checkpoint.COMPONENTS if (base / c).is_dir()]
    if other := sorted(m for m in plan.deltas if m.partition(".")[0] not in comps):
        raise UnsupportedError(f"module {other[0]}: not in an {kind.upper()} single file; bake a folder")
    tensors: dict[str, torch.Tensor] = {}
    for comp in comps:
        weights, jobs, transform = _folding(base / comp, comp, plan.deltas, layout)
        own = {n: weights.get(n) for n in sorted(weights.where)}
        own |= {n: transform(n, own[n]) for n in jobs}
        if kind == "sd3":
            tensors |= mmdit_names.checkpoint_tensors(own, layout.modules)
        else:
            tensors |= ldm_checkpoint.component_tensors(kind, comp, own)
    with atomic_file(Path(out), force=force) as tmp:
        save_safetensors(tensors, tmp, metadata={"format": "pt"})
    return Path(out)
