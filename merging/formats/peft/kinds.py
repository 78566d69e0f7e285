"""The layer kind of a module that no factor says, learnt from the base the adapter names (never downloaded).

A flat LoHa/LoKr/AdaLoRA factor, (r, in·k...), does not say whether its module is a Linear or a conv, and
PEFT builds a different LoRA for each. Without ``--base`` the adapter_config's ``base_model_name_or_path``
is looked up where it already is: a local folder or file, else the local Hugging Face cache (offline). Its
layout comes from its config (module tree on the meta device) or, failing that, from its safetensors
headers (a 3-D/4-D/5-D weight is a conv with that kernel; 2-D a Linear, Embedding or Conv1D). Headers do
not record a conv's groups: a flat factor on a conv known only from them is refused in one line
(``shapes.as_built``), as with ``--base model.safetensors``; a 2-D one is written as a Linear's.

A module still of unknown kind is written as a Linear's LoRA only for a transformers text model (PEFT's
``task_type`` CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS: their adapted layers are Linear):
silently when the base's config names the factor's input size (a hidden or intermediate size), with a
warning otherwise. Any other adapter (no task type: a custom torch model, convs likely) is refused in one
line asking for ``--base``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from merging.base.layout import BaseLayout
from merging.base.state_dict import state_dict_modules
from merging.core.adapter import Adapter
from merging.core.deltas import Target
from merging.errors import MergingError, UnsupportedError

log = logging.getLogger(__name__)

TEXT_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
CACHED = ("config.json", "model.safetensors.index.json", "model.safetensors")  # any one finds the snapshot
SIZE_KEYS = ("d_model", "d_ff", "n_embd", "n_inner", "ffn_dim")  # besides every *_size and *_dim


def reachable(name: str | None, revision: str | None = None) -> Path | None:
    """The base a name means, where it already is: a local folder or file, else its snapshot folder in the
    local Hugging Face cache (offline: nothing is downloaded); None when neither holds it."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.exists():
        return path
    from huggingface_hub import try_to_load_from_cache

    for filename in CACHED:
        try:
            found = try_to_load_from_cache(name, filename, revision=revision)
        except ValueError:  # not a Hub id (huggingface_hub's HFValidationError)
            return None
        if isinstance(found, str):
            return Path(found).parent
    return None


def _layout(path: Path, task_type: str | None) -> BaseLayout | None:
    """The base's layout from its config (groups known), else from its safetensors headers (kinds, shapes)."""
    try:
        return BaseLayout.from_folder(path, task_type)
    except Exception as e:  # noqa: BLE001 - any config transformers cannot build: the headers say the kinds
        log.debug("%s: no layout from its config (%s); reading its safetensors headers", path, e)
    try:
        modules, biased = state_dict_modules(path)
    except MergingError:
        return None
    return BaseLayout(modules, _config(path), biased, knows_groups=False)


def _config(path: Path) -> dict[str, Any]:
    """The folder's config.json as a dict ({} when there is none or it does not parse)."""
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    try:
        return json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, ValueError):
        return {}


def sizes(config: Mapping[str, Any]) -> set[int]:
    """The widths a transformers config names: hidden, intermediate and head sizes (nested configs too),
    and the attention widths heads × head_dim."""
    out: set[int] = set()
    for key, value in _items(config):
        if isinstance(value, int) and (key.endswith(("_size", "_dim")) or key in SIZE_KEYS):
            out.add(value)
    heads = {v for k, v in _items(config) if k in ("num_attention_heads", "num_key_value_heads", "num_heads")}
    dims = {v for k, v in _items(config) if k in ("head_dim", "d_kv")}
    return out | {h * d for h in heads for d in dims if isinstance(h, int) and isinstance(d, int)}


def _items(config: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from _items(value)
        else:
            yield key, value


class ImpliedBase:
    """The base an adapter's config names, looked up once, when a module's layer kind is first needed."""

    def __init__(self, adapter: Adapter) -> None:
        self.name, self.revision = adapter.base_model, adapter.revision
        self.task_type = adapter.config.get("task_type")

    @cached_property
    def layout(self) -> BaseLayout | None:
        """Its layout, or None when it is not reachable without downloading."""
        path = reachable(self.name, self.revision)
        return None if path is None else _layout(path, self.task_type)

    def knows(self, mod: str) -> BaseLayout | None:
        """The layout, if it holds this module."""
        return self.layout if self.layout is not None and mod in self.layout.modules else None

    def linear(self, mod: str, target: Target) -> bool:
        """Whether a module of unknown kind is a Linear by its config (True: no warning needed; False:
        a text model's, written as a Linear's with a warning); refused in one line for any other model (the
        caller's ``naming`` puts the module first)."""
        if self.task_type in TEXT_TASKS:
            config = self.layout.config if self.layout is not None else {}
            return target.shape[1] in sizes(config)
        if not self.name:
            why = "adapter_config.json names no base_model_name_or_path"
        elif self.layout is None:
            why = f"its base {self.name!r} is neither a local folder nor in the local Hugging Face cache"
        else:
            why = f"its base {self.name!r} has no module {mod}"
        raise UnsupportedError(
            f"a LoHa/LoKr/AdaLoRA factor (r, {target.shape[1]}) does not say whether the layer is a Linear "
            f"or a conv (PEFT builds a different LoRA for each), {why}, and task_type "
            f"{self.task_type!r} is not a transformers text model's: pass --base"
        )
