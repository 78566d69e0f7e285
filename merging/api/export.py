"""Bake and publish: the verbs of the public API that write a model or send a folder to the Hub."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from merging.base.pipelines import is_pipeline
from merging.core.progress import Progress
from merging.export import bake as bake_lib
from merging.export import hub
from merging.formats import sources


def bake(
    inputs: Sequence[str | Path], base: str | Path, out: str | Path, *,
    weights: Sequence[float] | None = None, force: bool = False, progress: Progress | None = None,
    base_quant: str | None = None, into: str | None = None, outtype: str = "same",
    measured: Callable[[list], None] | None = None, single_file: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Write the base model with the adapters folded in, a shard (or GGUF tensor) at a time (merging bake).

    Args:
        inputs: the adapters in stacking order (as ``merging.load_inputs`` takes them).
        base: the base model folder, or a ``.gguf`` model (baked at its own quantisation).
        out: the output folder (a ``.gguf`` file for a GGUF base).
        weights: one per adapter (default 1 each).
        force: replace an existing output.
        progress: called as progress(done, total, item).
        base_quant: the adapters were trained on the base in nf4/fp4/int8 (QLoRA): the three bakes are
            measured against PEFT on that base first (``export.qlora``), then ``into`` is written.
        into: with ``base_quant``, "original" (the float weights) or "dequantized" (default).
        outtype: a GGUF base: the adapted tensors' type ("same" keeps each tensor's own).
        measured: called with the QLoRA table before the bake is written (to show it early).
        single_file: an SD1.5/SDXL pipeline base: write ``out`` as one checkpoint file in the original
            (LDM/SGM) layout, which ``from_single_file`` reads, instead of a pipeline folder (SD3: the
            transformer alone, in MMDiT's names).

    Returns:
        What was written (the ``--json`` document, schema merging.bake/1): output, base, inputs, files (and
        base_quant, into, bakes with ``base_quant``).
    """
    from merging.errors import MergingError

    gguf_base = Path(base).suffix == ".gguf"
    if not gguf_base and outtype != "same":
        raise MergingError("--outtype is for a .gguf base (a model folder keeps its dtypes)")
    if gguf_base and base_quant:
        raise MergingError("--base-quant is for a transformers base; a .gguf base keeps its own types")
    if into == "dequantized" and not base_quant:
        raise MergingError("--into dequantized needs --base-quant (the quantisation the adapters saw)")
    if single_file and not is_pipeline(Path(base)):
        raise MergingError(f"{base}: --single-file is for a diffusers pipeline base (SD1.5/SDXL/SD3)")
    pairs = sources.load_inputs([str(s) for s in inputs], base=None if gguf_base else base, weights=weights)
    into, table, deq = into or ("dequantized" if base_quant else "original"), None, None
    if base_quant:
        from merging.export import qlora

        ref = qlora.reference(Path(base), pairs, base_quant)  # the 4-bit base loaded once, for both
        table, deq = qlora.bake_table(Path(base), pairs, base_quant, ref=ref), ref.dequantized
        if measured is not None:
            measured(table)
    if single_file:
        from merging.export.bake_pipeline import bake_single_file

        bake_single_file(Path(base), pairs, Path(out), force=force)
    elif is_pipeline(Path(base)):  # a diffusers pipeline: its denoiser and text encoders, a pipeline folder
        from merging.export.bake_pipeline import bake_pipeline

        bake_pipeline(Path(base), pairs, Path(out), force=force, progress=progress)
    elif gguf_base:
        from merging.export.gguf_bake import bake_gguf

        bake_gguf(Path(base), pairs, Path(out), outtype=outtype, force=force, progress=progress)
    else:
        bake_lib.bake(Path(base), pairs, Path(out), force=force, progress=progress, base_quant=base_quant,
                      into=into, dequantized=deq)
    files = [Path(out)] if gguf_base or single_file else sorted(p for p in Path(out).iterdir() if p.is_file())
    inputs_ = [{"source": str(ad.source), "weight": w} for ad, w in pairs]
    sizes = {p.name: p.stat().st_size for p in files}
    doc: dict[str, Any] = {"output": str(out), "base": str(base), "inputs": inputs_, "files": sizes}
    if table is not None:
        doc |= {"base_quant": base_quant, "into": into, "bakes": [asdict(r) for r in table]}
    return doc


def publish(
    folder: str | Path, repo: str, *, private: bool = False, revision: str | None = None,
    message: str | None = None, verification: str | Path | None = None, base_model: str | None = None,
    token: str | None = None,
) -> str:  # fmt: skip
    """Send a merged folder to the Hub with a model card recording its recipe, as one commit; its URL.

    ``verification`` is a ``merging verify --save`` report for the card (default: FOLDER/verify_report.json).
    """
    check = None if verification is None else Path(verification)
    return hub.publish(Path(folder), repo, private=private, revision=revision, message=message,
                       verification=check, token=token, base_model=base_model)  # fmt: skip


def publish_plan(
    folder: str | Path, repo: str, *, verification: str | Path | None = None, base_model: str | None = None
) -> hub.Plan:
    """What ``publish`` would send: the model card and the file list (nothing is sent)."""
    check = None if verification is None else Path(verification)
    return hub.plan(Path(folder), repo, check, base_model)
