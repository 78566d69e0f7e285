"""Held-out data and its losses, shared by ``compare``, ``tune`` and ``skills``.

Eval files (``read_eval``) hold (prompt, answer) examples per skill; ``answer_batch`` tokenises them into a
right-padded batch whose labels cover the answers only. The losses are mean cross-entropy per answer token:
the model's own (``losses``), or from every skill's texts packed into rows with no padding and the output
layer applied at the answer positions only (``pack``, ``packed_losses``): texts laid end to end in rows of
about ``ROW`` tokens (first fit, longest first), position ids restarting at every text, which transformers
reads as packed sequences (attention stays within each text). A model that does not read packed sequences
this way gives other losses, so callers check ``packed_agrees`` against the model's own first.
``retention`` is the share of an adapter's own gain that survives a merge.

The packed losses take a ``dtype``: float32 (the weights' own arithmetic), or bfloat16 on float32 weights:
the body under ``torch.autocast`` (matrix products on bfloat16 copies of weights and inputs, accumulated in
float32; norms, softmax and the residual stream stay float32), the output layer in float32. The weights
themselves are never changed (``runtime.evaluated``'s bit-for-bit undo stands). ``loss_dtype`` resolves
the user's choice ("auto": bfloat16 where the device multiplies it natively, ``native_bf16``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

from merging.core.adapter import Pair
from merging.errors import MergingError
from merging.runtime.stacked import stacked

Examples = list[tuple[str, str]]  # one skill's held-out (prompt, answer) examples
EvalSets = Mapping[str, Examples]  # skill name (an input's name) → its examples
Batches = dict[str, dict[str, torch.Tensor]]  # skill → its ``answer_batch``
T = TypeVar("T")
ROW = 128  # tokens per packed row: attention costs rows·ROW², the linear layers only the tokens
AGREEMENT_FAILURES = (AttributeError, TypeError, NotImplementedError, RuntimeError, ValueError)
LOSS_DTYPES = ("auto", "float32", "bfloat16")  # the choices ``loss_dtype`` resolves
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bfloat16 matrix instructions
CPUINFO = Path("/proc/cpuinfo")  # where ``native_bf16`` reads the CPU's flags unless given a file


def native_bf16(device: torch.device | str = "cpu", cpuinfo: Path | None = None) -> bool:
    """Whether the device multiplies bfloat16 natively: a CUDA GPU that supports it, or a CPU whose
    ``cpuinfo`` flags (default ``CPUINFO``) name AVX-512 BF16 or AMX-BF16 (False where it cannot be read)."""
    device, cpuinfo = torch.device(device), cpuinfo or CPUINFO
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
                 for f in line.partition(":")[2].split()}  # fmt: skip
    except OSError:
        return False
    return any(f in flags for f in BF16_FLAGS)


def loss_dtype(choice: str, device: torch.device | str, weights: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype held-out losses are computed in: "float32", "bfloat16", or "auto" (bfloat16 where the
    device has native bfloat16 units, else float32). Weights stored below float32 compute in their own dtype
    whatever the choice (there is no float32 arithmetic to lower)."""
    if choice not in LOSS_DTYPES:
        raise MergingError(f"`loss_dtype` must be one of {', '.join(LOSS_DTYPES)}, got {choice!r}")
    if weights != torch.float32:
        return weights
    if choice == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return torch.bfloat16 if choice == "bfloat16" else torch.float32


def _lowered(model, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to ``dtype`` where it is below the weights' own dtype (float32 accumulation), else nothing.
    Without autocast's cache: each weight is cast when its layer runs and freed after, instead of a
    bfloat16 copy of the whole model held for the forward (each weight is read once per forward anyway)."""
    weight = next(model.parameters())
    if dtype == weight.dtype or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(weight.device.type, dtype=dtype, cache_enabled=False)


def read_eval(path: Path) -> Examples:
    """Held-out (prompt, answer) examples from a JSONL file with "prompt" and "answer" keys."""
    examples = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            examples.append((str(row["prompt"]), str(row["answer"])))
        except (ValueError, KeyError, TypeError) as e:
            raise MergingError(
                f'{path}: line {i + 1}: expected {{"prompt": ..., "answer": ...}} ({e})'
            ) from e
    if not examples:
        raise MergingError(f"{path}: no evaluation examples")
    return examples


def answer_batch(tokenizer, examples: Examples, device="cpu") -> dict[str, torch.Tensor]:
    """A right-padded batch of prompt + answer + EOS whose labels cover the answer only (-100 elsewhere)."""
    ids, labels = [], []
    for prompt, answer in examples:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    n = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (n - len(x)) for x in ids], device=device),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids], device=device),
        "labels": torch.tensor([y + [-100] * (n - len(y)) for y in labels], device=device),
    }


@torch.no_grad()
def answer_loss(model, tokenizer, examples: Examples) -> float:
    """Mean cross-entropy per answer token given its prompt (the skill's held-out loss)."""
    return float(model(**answer_batch(tokenizer, examples, next(model.parameters()).device)).loss)


def retention(base: float, alone: float, loss: float) -> float | None:
    """(L_base − L) / (L_base − L_alone): the share of the adapter's own improvement that survives; None
    when the adapter alone does not improve on the base."""
    gain = base - alone
    return None if gain <= 0 else (base - loss) / gain


def alone_losses(
    model, inputs: Sequence[Pair], skills: Iterable[str], loss_of: Callable[[str], T]
) -> dict[str, T]:
    """Each skill's loss (``loss_of(skill)``) with only its own input stacked: the adapter alone."""
    out = {}
    for skill in skills:
        with stacked(model, [(a, w) for a, w in inputs if a.name == skill]):
            out[skill] = loss_of(skill)
    return out


@torch.no_grad()
def losses(model, batches: Batches) -> dict[str, float]:
    """Mean cross-entropy per answer token of each skill's batch (the model's own loss)."""
    return {skill: float(model(**batch).loss) for skill, batch in batches.items()}


@torch.no_grad()
def losses_by_example(
    model, batches: Batches, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """``losses`` and, from the same forward, each example's answer cross-entropy sum (n,) per skill (the
    model run in ``dtype``: autocast below its weights' dtype)."""
    means, sums = {}, {}
    for skill, batch in batches.items():
        with _lowered(model, dtype):
            out = model(**batch)
        means[skill] = float(out.loss)
        labels = batch["labels"][:, 1:]  # (n, t - 1)
        logits = out.logits[:, :-1].float()  # (n, t - 1, V): rows of V (an (n, V, t) layout lost 1e-4)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        sums[skill] = ce.view(labels.shape).sum(1)  # (n,); a -100 label adds 0
    return means, sums


@torch.no_grad()
def answer_losses(model, packed: Packed, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The same losses from one forward of every skill's texts packed: no pad tokens, and the output layer
    only at the answer positions (the prompts' logits, most of them, are never made); the body in
    ``dtype``."""
    return {skill: float(v) for skill, v in packed_losses(model, packed, dtype).items()}


def packed_agrees(model, packed: Packed, own: Mapping[str, float], rtol: float = 1e-5) -> bool:
    """Whether the packed losses reproduce the model's own loss on every skill (one whose head does more
    than its output layer, e.g. logit soft-capping, or that does not read packed sequences, does not: it
    keeps its own loss)."""
    try:
        got = answer_losses(model, packed)
    except AGREEMENT_FAILURES:
        return False
    return all(abs(got[s] - own[s]) <= rtol * abs(own[s]) for s in own)


# ------------------------------------------------------------------------------------------ packing


@dataclass(frozen=True)
class Packed:
    """Texts packed into rows; ``target`` and ``group`` say which positions are scored for which skill."""

    input_ids: torch.Tensor  # (rows, L)
    position_ids: torch.Tensor  # (rows, L), restarting at 0 for every text (and for the tail padding)
    target: torch.Tensor  # (rows, L) the next token each position predicts, -100 where none is scored
    group: torch.Tensor  # (rows, L) the skill index of each scored position, -1 elsewhere
    names: tuple[str, ...]  # skill index → name
    example: torch.Tensor | None = None  # (rows, L) each scored position's example (its row in its skill)


def pack(batches: Mapping[str, Mapping[str, torch.Tensor]], pad_id: int = 0, row: int = ROW) -> Packed:
    """Every row of every skill's right-padded ``answer_batch`` (input_ids, attention_mask, labels), packed:
    each text up to the token before its last scored one (``_scored_part``).

    Args:
        batches: skill → its batch; labels are -100 off the answer tokens.
        pad_id: the id filling the end of a row (its positions score nothing).
        row: a row's length target; a text longer than it has a row of its own.

    Returns:
        The packed rows, on the batches' device.
    """
    names = tuple(batches)
    texts = []  # (skill index, ids (n,), labels (n,), example index)
    for i, batch in enumerate(batches.values()):
        rows = zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True)
        texts += [(i, *_scored_part(ids[: int(mask.sum())], labels[: int(mask.sum())]), j)
                  for j, (ids, mask, labels) in enumerate(rows)]  # fmt: skip
    bins: list[list[int]] = []  # first fit, longest first
    room: list[int] = []
    for t in sorted(range(len(texts)), key=lambda t: -len(texts[t][1])):
        n = len(texts[t][1])
        slot = next((b for b, free in enumerate(room) if free >= n), None)
        if slot is None:
            slot = len(bins)
            bins.append([])
            room.append(max(row, n))
        bins[slot].append(t)
        room[slot] -= n
    width = max(sum(len(texts[t][1]) for t in b) for b in bins)
    device = texts[0][1].device
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long, device=device)
    pos = torch.zeros_like(ids)
    target = torch.full_like(ids, -100)
    group = torch.full_like(ids, -1)
    example = torch.full_like(ids, -1)
    for r, members in enumerate(bins):
        at = 0
        for t in sorted(members):  # in the order given, for a reproducible layout
            skill, x, y, j = texts[t]
            n, k = len(x), len(y) - 1  # k ≤ n positions predict a next token
            ids[r, at : at + n] = x
            pos[r, at : at + n] = torch.arange(n, device=device)
            target[r, at : at + k] = y[1:]  # position p predicts token p + 1, as the model's loss shifts
            group[r, at : at + k] = torch.where(y[1:] != -100, skill, -1)
            example[r, at : at + k] = torch.where(y[1:] != -100, j, -1)
            at += n
        pos[r, at:] = torch.arange(width - at, device=device)  # the tail: a text of its own, never scored
    return Packed(ids, pos, target, group, names, example)


def _scored_part(ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A text up to the token before its last scored one: the tokens after it feed no scored position (a
    causal model's position p reads tokens ≤ p), so the packed forward skips them (the EOS of every text).
    A text with nothing scored stays whole."""
    scored = torch.nonzero(labels[1:] != -100)
    if len(scored) == 0:
        return ids, labels
    n = int(scored[-1]) + 2  # position n - 2 predicts the last scored token, n - 1
    return ids[: n - 1], labels[:n]


def packed_losses(
    model, packed: Packed, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Mean answer-token cross-entropy per skill from one forward of the packed rows (0-d tensors; NaN for
    a skill with no scored token), the body computed in ``dtype``. Differentiable: ``merging tune`` steps
    through it."""
    ce, keep = _packed_ce(model, packed, dtype)
    group = packed.group[keep]
    return {name: ce[group == i].mean() for i, name in enumerate(packed.names)}


def _packed_ce(
    model, packed: Packed, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k,) the cross-entropy at every scored position, and (rows, L) where those positions are; the body
    in ``dtype`` (autocast below the weights' dtype: then the output layer runs in float32)."""
    body, head = model.get_decoder(), model.get_output_embeddings()
    lowered = _lowered(model, dtype)
    with lowered:  # no 2-D mask: the position ids say where each text starts
        out = body(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    hidden = out.last_hidden_state  # (rows, L, d)
    keep = packed.target != -100
    scored = hidden[keep] if isinstance(lowered, nullcontext) else hidden[keep].float()  # (k, d)
    return F.cross_entropy(head(scored).float(), packed.target[keep], reduction="none"), keep


@torch.no_grad()
def answer_losses_by_example(
    model, packed: Packed, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """``answer_losses`` and, from the same forward, each example's answer cross-entropy sum per skill; the
    body computed in ``dtype``."""
    ce, keep = _packed_ce(model, packed, dtype)
    group, example = packed.group[keep], packed.example[keep]
    means, sums = {}, {}
    for i, name in enumerate(packed.names):
        mine = group == i
        means[name] = float(ce[mine].mean())
        n = int(example[mine].max()) + 1 if bool(mine.any()) else 0
        sums[name] = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add_(0, example[mine], ce[mine])
    return means, sums


# --------------------------------------------------------------------- several skills in one batch


@dataclass(frozen=True)
class SkillBatch:
    """Some skills' examples in one right-padded batch, and which skill each row belongs to."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # (n, t - 1) next-token labels, -100 off the answers
    skill: torch.Tensor  # (n,) skill index per row
    names: tuple[str, ...]
    packed: Packed | None = None  # the same texts packed (no padding): one forward, where the model agrees


def skill_batch(
    tokenizer, evals: EvalSets, device, names: Sequence[str] | None = None, packed: bool = False
) -> SkillBatch:
    """Every skill's examples in one batch (skill indices follow ``names``); packed too when asked."""
    names = tuple(names or evals)
    rows = [(names.index(n), p) for n in evals for p in evals[n]]
    b = answer_batch(tokenizer, [p for _, p in rows], device)
    skill = torch.tensor([i for i, _ in rows], device=device)
    packs = None
    if packed:  # pack reads each skill's rows as its own batch
        mine = {n: skill == i for i, n in enumerate(names) if evals.get(n)}
        packs = pack({n: {k: v[rows_of] for k, v in b.items()} for n, rows_of in mine.items()})
    labels = b.pop("labels")[:, 1:]
    return SkillBatch(b, labels, skill, names, packs)


def plain_head(model) -> bool:
    """Whether the model's logits are its output layer on the body's last hidden states (no soft-capping,
    no forward pre-hook such as an aLoRA gate, which reads the ids at the top model)."""
    head, body = model.get_output_embeddings(), getattr(model, "base_model", None)
    plain = getattr(model.config, "final_logit_softcapping", None) is None and body is not model
    return head is not None and body is not None and plain and not model._forward_pre_hooks


def _logits_at(
    model, batch: SkillBatch, where: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The logits at the answer positions only (the head runs on those rows; the rest are not needed)."""
    lowered = _lowered(model, dtype)
    if not plain_head(model):
        with lowered:
            return model(**batch.inputs).logits[:, :-1][where].float()
    with lowered:
        hidden = model.base_model(**batch.inputs).last_hidden_state[:, :-1]  # (n, t - 1, d)
    scored = hidden[where] if isinstance(lowered, nullcontext) else hidden[where].float()
    return model.get_output_embeddings()(scored).float()


def skill_losses(model, batch: SkillBatch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(skills,) mean answer-token cross-entropy per skill (as ``losses`` computes it per batch); NaN for a
    skill with no row in the batch. From the packed texts when the batch carries them; the body in
    ``dtype``. Differentiable."""
    if batch.packed is not None and plain_head(model):  # (an aLoRA gate, stacked later, is a pre-hook)
        got = packed_losses(model, batch.packed, dtype)
        nan = torch.tensor(float("nan"), device=batch.skill.device)
        return torch.stack([got.get(n, nan) for n in batch.names])
    return _per_skill(*_padded_ce(model, batch, dtype)[:2], len(batch.names))


def _padded_ce(
    model, batch: SkillBatch, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k,) the cross-entropy at every answer position of the padded batch, and each one's skill and row."""
    where = batch.labels != -100
    ce = F.cross_entropy(_logits_at(model, batch, where, dtype), batch.labels[where], reduction="none")
    skill = batch.skill[:, None].expand_as(batch.labels)[where]
    row = torch.arange(len(batch.labels), device=ce.device)[:, None].expand_as(batch.labels)[where]
    return ce, skill, row


def _per_skill(ce: torch.Tensor, skill: torch.Tensor, n: int) -> torch.Tensor:
    out = []
    for i in range(n):
        mine = skill == i
        out.append(ce[mine].mean() if bool(mine.any()) else ce.new_tensor(float("nan")))
    return torch.stack(out)


@torch.no_grad()
def skill_losses_by_example(model, batch: SkillBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``skill_losses`` of the padded batch and, from the same forward, each row's answer cross-entropy sum
    (n,) (its skill: ``batch.skill``)."""
    ce, skill, row = _padded_ce(model, batch)
    sums = torch.zeros(len(batch.labels), dtype=ce.dtype, device=ce.device).index_add_(0, row, ce)
    return _per_skill(ce, skill, len(batch.names)), sums
