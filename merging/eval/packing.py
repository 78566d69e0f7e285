"""Held-out texts packed into rows for one forward: no padding, each text attending only to itself.

Texts of several skills are laid end to end in rows of about ``ROW`` tokens (first fit, longest first);
position ids restart at every text, which transformers reads as packed sequences (attention stays within
each text, with no 2-D attention mask given). One forward then serves every skill, with no pad tokens and
no per-skill batch. The output layer runs at the answer positions only. A model that does not read packed
sequences this way gives other losses: callers check the losses against the model's own first
(``skills.head_only_agrees``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROW = 128  # tokens per packed row: attention costs rows·ROW², the linear layers only the tokens


@dataclass(frozen=True)
class Packed:
    """Texts packed into rows; ``target`` and ``group`` say which positions are scored for which skill."""

    input_ids: torch.Tensor  # (rows, L)
    position_ids: torch.Tensor  # (rows, L), restarting at 0 for every text (and for the tail padding)
    target: torch.Tensor  # (rows, L) the next token each position predicts, -100 where none is scored
    group: torch.Tensor  # (rows, L) the skill index of each scored position, -1 elsewhere
    names: tuple[str, ...]  # skill index → name


def pack(batches: Mapping[str, Mapping[str, torch.Tensor]], pad_id: int = 0, row: int = ROW) -> Packed:
    """Every row of every skill's right-padded ``answer_batch`` (input_ids, attention_mask, labels), packed.

    Args:
        batches: skill → its batch; labels are -100 off the answer tokens.
        pad_id: the id filling the end of a row (its positions score nothing).
        row: a row's length target; a text longer than it has a row of its own.

    Returns:
        The packed rows, on the batches' device.
    """
    names = tuple(batches)
    texts = []  # (skill index, ids (n,), labels (n,))
    for i, batch in enumerate(batches.values()):
        rows = zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True)
        texts += [(i, ids[: int(mask.sum())], labels[: int(mask.sum())]) for ids, mask, labels in rows]
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
    for r, members in enumerate(bins):
        at = 0
        for t in sorted(members):  # in the order given, for a reproducible layout
            skill, x, y = texts[t]
            n = len(x)
            ids[r, at : at + n] = x
            pos[r, at : at + n] = torch.arange(n, device=device)
            target[r, at : at + n - 1] = y[1:]  # position p predicts token p + 1, as the model's loss shifts
            group[r, at : at + n - 1] = torch.where(y[1:] != -100, skill, -1)
            at += n
        pos[r, at:] = torch.arange(width - at, device=device)  # the tail: a text of its own, never scored
    return Packed(ids, pos, target, group, names)


def packed_losses(model, packed: Packed) -> dict[str, torch.Tensor]:
    """Mean answer-token cross-entropy per skill from one forward of the packed rows (0-d tensors; NaN for
    a skill with no scored token). Differentiable: ``merging tune`` steps through it."""
    body, head = model.get_decoder(), model.get_output_embeddings()
    out = body(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)  # no 2-D mask
    hidden = out.last_hidden_state  # (rows, L, d)
    keep = packed.target != -100
    ce = F.cross_entropy(head(hidden[keep]).float(), packed.target[keep], reduction="none")
    group = packed.group[keep]
    return {name: ce[group == i].mean() for i, name in enumerate(packed.names)}
