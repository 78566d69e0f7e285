"""Bake adapters that reach parameters (MoE experts, PEFT ``target_parameters``) into a full model.

transformers 5 runs the experts as 3-D parameters but saves Mixtral's and Qwen3-MoE's checkpoints one
tensor per expert and projection (``experts.3.gate_proj.weight``, gate and up split apart), through its
conversion mapping. So this bake loads the base with transformers, folds every delta into the live
parameters (as PEFT's ``merge_and_unload`` does) and lets ``save_pretrained`` write the checkpoint layout
back: exact, at the cost of holding the model once (the module-only bake streams tensor by tensor
instead). The experts are folded one at a time, in place, with no undo copy: beyond the model, the fold
holds one expert's ΔW in float32, not a whole 3-D parameter's.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from merging.core.adapter import Pair
from merging.core.progress import Progress
from merging.errors import FormatError
from merging.storage.atomic import atomic_folder, checkpoint

WRITTEN = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json")


def bake_loaded(
    base: Path, pairs: Sequence[Pair], out: Path, *, task_type: str | None, force: bool = False,
    progress: Progress | None = None, owns=(), prepare: Callable[[torch.nn.Module], None] | None = None,
) -> Path:  # fmt: skip
    """Write ``base`` with the adapters folded in, through transformers (load, fold, save_pretrained).

    Args:
        base: a transformers model folder.
        pairs: (Adapter, weight) in stacking order.
        out: the output folder (atomic; an existing one needs ``force``).
        task_type: the adapters' PEFT task type (picks the head class).
        owns: what replacing ``out`` replaces besides what is written (bake's weight files).
        prepare: called on the loaded float base before folding (a QLoRA bake puts dequant(W₄) there).

    Returns:
        ``out``.
    """
    from merging.base.layout import auto_classes, build_first
    from merging.runtime.fold import fold_into

    def load(cls):
        return cls.from_pretrained(str(base), dtype="auto")

    try:
        model = build_first(auto_classes(task_type), load).eval()
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FormatError(f"{base}: cannot load the base model to bake into ({first})") from None
    with torch.no_grad():
        if prepare is not None:
            prepare(model)
        fold_into(model, pairs)  # the experts one by one, then the modules; no undo kept
    with atomic_folder(Path(out), force=force, owns=owns) as tmp:
        model.save_pretrained(tmp)
        written = {p.name for p in tmp.iterdir()}
        for f in sorted(Path(base).iterdir()):
            skip = any(f.match(pat) for pat in WRITTEN) or f.name in written
            if f.is_file() and not skip:  # tokenizer, chat template, README...
                shutil.copyfile(f, tmp / f.name)
                checkpoint(f"copy {f.name}")
        if progress:
            progress(1, 1, "model")
    return Path(out)

