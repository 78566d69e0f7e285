"""Baking QLoRA adapters: which weights to fold them into, measured against PEFT on the quantised base.

An adapter trained on a 4-bit base acted on dequant(W₄), not on W. Three bakes are possible:

- ``original``: W + ΔW, the float weights (what ``merge_and_unload`` on a float base gives);
- ``dequantized``: dequant(W₄) + ΔW in the base's float dtype (what the adapter saw in training);
- ``requantized``: quant(dequant(W₄) + ΔW), quantised again after folding (a 4-bit model to ship).

``bake_table`` runs each against the reference, PEFT stacking the input folders on the base loaded
through bitsandbytes, so the user reads what each bake keeps before shipping one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from merging.base import quantized
from merging.core.adapter import Pair
from merging.errors import UnsupportedError

INTO = ("original", "dequantized", "requantized")


@dataclass(frozen=True)
class BakeRow:
    """One bake against the reference: effect-relative error, max |Δ| of the logits, top-1 agreement, KL."""

    into: str
    effect_rel_error: float
    max_abs_diff: float
    top1_agreement: float
    kl: float


def _float_base(base: Path, task_type: str | None) -> nn.Module:
    from merging.base.load import load_base

    return load_base(base, device="cpu", dtype="float32", task_type=task_type)[0]


def dequantized_into(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Replace the named modules' weights by the given dequantised ones, in the model's dtype."""
    with torch.no_grad():
        for name, w in weights.items():
            p = model.get_submodule(name).weight
            p.copy_(w.to(p.dtype))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _row(into: str, y: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> BakeRow:
    """The bake's logits ``y`` against the reference's, measured as verify measures a candidate."""
    from merging.eval.verify import compare_outputs

    return BakeRow(into, **compare_outputs(base, ref, y, logits=True))


@dataclass(frozen=True)
class Reference:
    """PEFT stacking the inputs on the quantised base, and what the bakes need from that base."""

    ids: torch.Tensor  # (batch, length) the token ids measured
    base_logits: torch.Tensor  # the quantised base alone
    logits: torch.Tensor  # PEFT's stack on the quantised base
    dequantized: dict[str, torch.Tensor]  # module path → dequant(W₄) float32


def reference(
    base: Path, pairs: Sequence[Pair], quant: str, *, ids: torch.Tensor | None = None,
    task_type: str | None = None,
) -> Reference:  # fmt: skip
    """Load ``base`` in ``quant`` once: its logits alone and under PEFT's stack, and its dequantised weights.

    Args:
        base: a transformers model folder (float weights).
        pairs: PEFT input folders as (Adapter, weight 1), innermost first.
        quant: nf4, fp4 or int8 (bitsandbytes, as the adapters were trained on).
        ids: token ids (batch, length); default 4 seeded rows of 32 over the vocabulary.

    Returns:
        A Reference.
    """
    from merging.eval import judge

    stacker = judge.who_stacks(pairs)
    if stacker.reference != judge.PEFT:
        raise UnsupportedError(f"the QLoRA bake table needs PEFT to stack the inputs: {stacker.reason}")
    qmodel = quantized.load_quantized(base, quant, task_type)
    if ids is None:
        vocab = qmodel.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    y_qbase = _logits(qmodel, ids)
    with judge.peft_stacked(qmodel, stacker):
        y_ref = _logits(qmodel, ids)
    deq = {name: quantized.dequantize(m) for name, m in quantized.quantized_modules(qmodel).items()}
    return Reference(ids, y_qbase, y_ref, deq)


def bake_table(
    base: Path, pairs: Sequence[Pair], quant: str, *, ids: torch.Tensor | None = None,
    task_type: str | None = None, ref: Reference | None = None,
) -> list[BakeRow]:  # fmt: skip
    """The three bakes of ``pairs`` on ``base`` against PEFT stacking them on the base in ``quant``.

    Args:
        base: a transformers model folder (float weights).
        pairs: PEFT input folders as (Adapter, weight 1), innermost first.
        quant: nf4, fp4 or int8 (bitsandbytes, as the adapters were trained on).
        ids: token ids (batch, length); default 4 seeded rows of 32 over the vocabulary.
        ref: ``reference(base, pairs, quant, ids=ids)`` when the caller has it already.

    Returns:
        One BakeRow per bake, in INTO's order.
    """
    from merging.runtime.fold import fold_into, merge_into

    ref = ref or reference(base, pairs, quant, ids=ids, task_type=task_type)
    ids, y_qbase, y_ref = ref.ids, ref.base_logits, ref.logits
    model = _float_base(base, task_type)  # loaded once: each bake is the one before it, changed in place
    undo = merge_into(model, pairs)
    rows = [_row("original", _logits(model, ids), y_ref, y_qbase)]  # W + ΔW
    undo()  # W again, bit for bit
    del undo  # and its copies of W freed
    dequantized_into(model, ref.dequantized)
    fold_into(model, pairs)
    rows.append(_row("dequantized", _logits(model, ids), y_ref, y_qbase))  # dequant(W₄) + ΔW
    requantize(model, list(ref.dequantized), quant)
    rows.append(_row("requantized", _logits(model, ids), y_ref, y_qbase))  # quant(dequant(W₄) + ΔW)
    return rows


def requantize(model: nn.Module, names: Sequence[str], quant: str) -> None:
    """Each named module's (folded) weight as its quantised checkpoint loads: quantised, dequantised."""
    with torch.no_grad():
        for name in names:
            p = model.get_submodule(name).weight
            p.copy_(quantized.roundtrip(p, quant).to(p.dtype))


def dequantized_weights(base: Path, quant: str, task_type: str | None = None) -> dict[str, torch.Tensor]:
    """Module path → dequant(quant(W)) float32 for every module bitsandbytes quantises in ``base``."""
    qmodel = quantized.load_quantized(base, quant, task_type)
    return {name: quantized.dequantize(m) for name, m in quantized.quantized_modules(qmodel).items()}


def prepare_for(
    base: Path, quant: str, into: str, task_type: str | None = None,
    dequantized: dict[str, torch.Tensor] | None = None,
) -> Callable[[nn.Module], None]:  # fmt: skip
    """What ``bake_loaded`` does to the float base before folding, for a bake ``into`` one of INTO
    (``dequantized``: the base's dequant(W₄) when a ``Reference`` has them, else loaded here)."""
    if into not in INTO:
        raise UnsupportedError(f"`into` must be one of {', '.join(INTO)}, got {into!r}")
    if into == "original":
        return lambda model: None
    if into == "requantized":
        raise UnsupportedError("a requantized bake is measured in the table, not written; write dequantized")
    weights = dequantized if dequantized is not None else dequantized_weights(base, quant, task_type)
    return lambda model: dequantized_into(model, weights)
