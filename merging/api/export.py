"""Bake and publish: the verbs of the public API that write a model or send a folder to the Hub."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from merging.export import bake as bake_lib
from merging.export import hub
from merging.formats import sources

Progress = Callable[[int, int, str], None]  # progress(done, total, item)


def bake(
    inputs: Sequence[str | Path], base: str | Path, out: str | Path, *,
    weights: Sequence[float] | None = None, force: bool = False, progress: Progress | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write the base model with the adapters folded in, one shard at a time (``merging bake``).

    Args:
        inputs: the adapters in stacking order (as ``merging.load_inputs`` takes them).
        base: the base model folder.
        out: the output folder.
        weights: one per adapter (default 1 each).
        force: replace an existing output folder.
        progress: called as progress(done, total, item).

    Returns:
        What was written (the ``--json`` document, schema merging.bake/1): output, base, inputs, files.
    """
    pairs = sources.load_inputs([str(s) for s in inputs], base=base, weights=weights)
    bake_lib.bake(Path(base), pairs, Path(out), force=force, progress=progress)
    files = sorted(p for p in Path(out).iterdir() if p.is_file())
    return {"output": str(out), "base": str(base), "inputs": [{"source": str(ad.source), "weight": w}
            for ad, w in pairs], "files": {p.name: p.stat().st_size for p in files}}  # fmt: skip


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
