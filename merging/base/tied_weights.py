"""Weights several modules share (an lm_head tied to the input embedding) when adapters change them.

PEFT adapts modules, not tensors: a LoRA on ``embed_tokens`` of a tied model changes the input embedding
only, while the tied ``lm_head`` keeps computing with the base weight; trainable token rows on a tied
embedding reach ``lm_head`` too (PEFT ties a TrainableTokensWrapper to it). Folding deltas into one
stored tensor must follow that: modules whose change equals the stored one's keep sharing it, an output
embedding whose change differs is written apart and the config unties it, any other tie is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from merging.core.adapter import Stacks
from merging.core.deltas import TokenRows
from merging.errors import UnsupportedError

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TiedWrites:
    """How the tied modules a plan touches are written."""

    shared: frozenset[str] = frozenset()  # modules whose change is the stored tensor's: nothing to write
    apart: Mapping[str, str] = field(default_factory=dict)  # module → tied source: its own tensor, untied
    aux: Mapping[str, TokenRows] = field(default_factory=dict)  # token rows a module sees through its source


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Modules sharing one weight tensor, in module order (e.g. ``[model.embed_tokens, lm_head]``)."""
    groups: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter):
            groups.setdefault(id(w), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def tied_writes(base: Path, model: nn.Module, plan: Stacks, stored: set[str]) -> TiedWrites:
    """Which tied modules keep their shared tensor and which are written apart (see the module docstring).

    Args:
        base: the base folder (named in errors; its config.json says whether ties can be undone).
        model: the base model's skeleton (module tree with its ties).
        plan: the stacked deltas and auxiliary modules, ties expanded.
        stored: the tensor names the base's shards store.
    """
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_name = next((n for n, m in model.named_modules() if out_emb is not None and m is out_emb), None)
    shared, apart, aux = set(), {}, {}
    touched = set(plan.modules)
    for group in tied_groups(model):
        if not touched & set(group):
            continue
        src = next((m for m in group if f"{m}.weight" in stored), None)
        if src is None:
            raise UnsupportedError(f"{base}: no stored weight for {', '.join(group)}; cannot bake them")
        rows = _rows(plan, group)
        aux |= {m: rows for m in group if rows is not None and m not in plan.aux}
        for m in group:
            if m == src:
                continue
            if _change(plan, m, rows) == _change(plan, src, rows):
                shared.add(m)
            elif m == out_name and can_untie(base):
                apart[m] = src
            else:
                raise UnsupportedError(
                    f"{base}: {m} shares its weight with {src} and the adapters change them differently; "
                    "transformers cannot untie them for this model, so it cannot be baked"
                )
    return TiedWrites(frozenset(shared), apart, aux)


def _rows(plan: Stacks, group: list[str]) -> TokenRows | None:
    """The token rows one module of a tied group takes (PEFT ties them to the others)."""
    return next((plan.aux[m] for m in group if isinstance(plan.aux.get(m), TokenRows)), None)


def _change(plan: Stacks, mod: str, rows: TokenRows | None) -> tuple:
    """What the adapters do to a module, by identity: its stacked deltas and its replacement."""
    return [(id(d), w) for d, w in plan.deltas.get(mod, [])], id(plan.aux.get(mod, rows))


def differing(model: nn.Module, plan: Stacks) -> list[tuple[str, str]]:
    """(module, module) pairs that share one weight tensor but that the adapters change differently."""
    out = []
    for group in tied_groups(model):
        if set(plan.modules) & set(group):
            rows = _rows(plan, group)
            first = _change(plan, group[0], rows)
            out += [(group[0], m) for m in group[1:] if _change(plan, m, rows) != first]
    return out


def can_untie(base: Path) -> bool:
    """Whether the model's config honours ``tie_word_embeddings: false`` (T5 in transformers 5 does not)."""
    from transformers import AutoConfig

    try:
        cfg = json.loads((Path(base) / "config.json").read_text())
        kind = cfg.pop("model_type")
        untied = AutoConfig.for_model(kind, **(cfg | {"tie_word_embeddings": False}))
        return untied.tie_word_embeddings is False
    except (OSError, ValueError, KeyError, TypeError):
        return False


def untie_files(folder: Path, added: Mapping[str, str]) -> None:
    """config.json says ``tie_word_embeddings: false``; the shard index (if any) names the added tensors.

    Args:
        added: new tensor name → the shard file name it was written to.
    """
    cfg_file = Path(folder) / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tie_word_embeddings"] = False
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    index_file = Path(folder) / INDEX
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        index["weight_map"] = dict(index.get("weight_map", {})) | dict(added)
        index_file.write_text(json.dumps(index, indent=2) + "\n")
