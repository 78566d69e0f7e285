"""Base models without their weights: module layout (names, layer kinds, shapes) built on the meta device.

Loading a base for real is ``base.load``; a diffusers pipeline's skeletons are ``base.pipelines``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.base import pipelines
from merging.core.adapter import base_shapes, conv_groups, layer_kind
from merging.core.deltas import Layer
from merging.errors import FormatError, UnsupportedError


def _config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(
            f"{folder}: not a transformers model folder ({first}); a custom model's weights work as "
            "--base model.safetensors"
        ) from None


# PEFT's task_type → the transformers auto class that loads the head its adapters were trained with
TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
                }  # fmt: skip


def auto_classes(task_type: str | None) -> list:
    """The transformers auto classes to try, in order, for adapters of this PEFT task type.

    No task type: a causal LM, else the bare model (as PEFT users load a base for such adapters).
    """
    import transformers

    if task_type is None:
        return [transformers.AutoModelForCausalLM, transformers.AutoModel]
    if task_type not in TASK_CLASSES:
        raise UnsupportedError(f"task_type {task_type!r}: not one of PEFT's {', '.join(TASK_CLASSES)}")
    return [getattr(transformers, TASK_CLASSES[task_type])]


def build_first(classes: list, make):
    """make(cls) for the first auto class that knows this model type (transformers raises ValueError)."""
    for cls in classes[:-1]:
        try:
            return make(cls)
        except ValueError:
            continue
    return make(classes[-1])


def skeleton(folder: Path, task_type: str | None = None) -> torch.nn.Module:
    """The model built from its config on the meta device: module names and shapes, no memory.

    Built once per folder, task type and config file version (bake and its inputs' layout share it); do not
    modify it.
    """
    cfg = Path(folder) / "config.json"
    stamp = cfg.stat().st_mtime_ns if cfg.is_file() else None
    return _skeleton(Path(folder), task_type, stamp)


@functools.lru_cache(maxsize=4)
def _skeleton(folder: Path, task_type: str | None, stamp: int | None) -> torch.nn.Module:
    config = _config(Path(folder))
    with torch.device("meta"):
        try:
            return build_first(auto_classes(task_type), lambda cls: cls.from_config(config))
        except ValueError as e:
            what = task_type or "model"
            raise UnsupportedError(f"{folder}: transformers has no {what} class for it ({e})") from None


def biased_modules(model: torch.nn.Module) -> frozenset[str]:
    """The adaptable modules of a model that have a bias."""
    mods = model.named_modules()
    return frozenset(n for n, m in mods if layer_kind(m) is not None and getattr(m, "bias", None) is not None)


def saved_paths(model: torch.nn.Module) -> dict[str, str]:
    """Module path → the path older checkpoints use, where transformers declares a removed prefix.

    transformers 5 builds CLIPTextModel without its ``text_model.`` level and loads checkpoints with it
    (a PrefixChange in its conversion mapping): every SD checkpoint (transformers 4) has it, and kohya
    names follow them (lora_te_text_model_...), as sd-scripts, ComfyUI, A1111 and diffusers' converter do.
    """
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model
    except ImportError:  # transformers 4: the modules are where the checkpoints put them
        return {}
    if not hasattr(getattr(model, "config", None), "model_type"):
        return {}
    rules = extract_weight_conversions_for_model(model) or []
    prefixes = [p for r in rules if (p := getattr(r, "prefix_to_remove", None)) and not r.model_prefix]
    if len(prefixes) != 1:
        return {}
    return {m: f"{prefixes[0]}.{m}" for m in base_shapes(model)}


class LazyPaths(Mapping):
    """``saved_paths(model)``, computed on first use: transformers builds its whole table of checkpoint
    conversions for it (~0.2 s), and only kohya names and SD checkpoints need it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model, self._paths = model, None

    def _get(self) -> dict[str, str]:
        if self._paths is None:
            self._paths = saved_paths(self._model)
        return self._paths

    def __getitem__(self, key: str) -> str:
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def module_shapes(folder: Path, task_type: str | None = None) -> dict[str, tuple[Layer, tuple[int, ...]]]:
    """Module path → (layer kind, stored weight shape) of a transformers model folder, without its weights."""
    return base_shapes(skeleton(Path(folder), task_type))


@dataclass(frozen=True, eq=False)
class BaseLayout:
    """A base model without its weights: module path → (layer kind, stored weight shape), and its config.

    ``config`` is the transformers config as a dict (``{}`` when there is none); ``biased`` the adaptable
    modules that have a bias (None: not known). A diffusers pipeline names modules ``<component>.<path>``.
    """

    modules: Mapping[str, tuple[Layer, tuple[int, ...]]]
    config: Mapping[str, Any] = field(default_factory=dict)
    biased: frozenset[str] | None = None
    components: tuple[str, ...] = ()  # a diffusers pipeline's: unet, transformer, text_encoder, ...
    saved: Mapping[str, str] = field(default_factory=dict)  # module path → as SD checkpoints name it
    groups: Mapping[str, int] = field(default_factory=dict)  # grouped convolutions: module path → groups
    knows_groups: bool = True  # False for weights alone (a state dict): a conv's groups are not recorded

    def has_bias(self, module: str) -> bool | None:
        """Whether the module has a bias (None when the layout does not know)."""
        return None if self.biased is None or module not in self.modules else module in self.biased

    @classmethod
    def from_folder(cls, folder: str | Path, task_type: str | None = None) -> BaseLayout:
        """From a model folder: transformers, a diffusers component, or a diffusers pipeline (its components).

        The module tree is built from the configs on the meta device (names and shapes, no memory), with
        the head of the adapters' PEFT ``task_type``.
        """
        from merging.base import state_dict

        if state_dict.is_state_dict(Path(folder)):  # weights only: shapes from the headers, no config
            modules, biased = state_dict.state_dict_modules(Path(folder))
            return cls(modules, {}, biased, knows_groups=False)
        if pipelines.is_pipeline(Path(folder)):
            return cls.from_components(pipelines.pipeline_skeletons(Path(folder)))
        if pipelines.is_component(Path(folder)) or pipelines.is_text_encoder(Path(folder)):
            return cls.from_model(pipelines.skeleton(Path(folder)))
        cfg = Path(folder) / "config.json"
        config = json.loads(cfg.read_text()) if cfg.is_file() else {}
        model = skeleton(Path(folder), task_type)
        groups = conv_groups(model)
        return cls(base_shapes(model), config, biased_modules(model), saved=LazyPaths(model), groups=groups)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> BaseLayout:
        """From a loaded torch / transformers model."""
        config = getattr(model, "config", None)
        as_dict = dict(config) if isinstance(config, Mapping) else getattr(config, "to_dict", dict)()
        shapes, groups = base_shapes(model), conv_groups(model)
        return cls(shapes, as_dict, biased_modules(model), saved=saved_paths(model), groups=groups)

    @classmethod
    def from_components(cls, components: Mapping[str, torch.nn.Module]) -> BaseLayout:
        """From a pipeline's loaded components by name (unet, text_encoder, ...): ``<component>.<path>``."""
        layouts = {name: cls.from_model(m) for name, m in components.items()}
        modules = {f"{c}.{m}": v for c, lay in layouts.items() for m, v in lay.modules.items()}
        biased = frozenset(f"{c}.{m}" for c, lay in layouts.items() for m in lay.biased or ())
        saved = {f"{c}.{m}": f"{c}.{s}" for c, lay in layouts.items() for m, s in lay.saved.items()}
        configs = {c: dict(lay.config) for c, lay in layouts.items()}
        groups = {f"{c}.{m}": g for c, lay in layouts.items() for m, g in lay.groups.items()}
        return cls(modules, configs, biased, tuple(layouts), saved, groups)

    @classmethod
    def of(cls, base: BaseLayout | str | Path | torch.nn.Module, task_type: str | None = None) -> BaseLayout:
        """A base given as a layout, a model folder or a loaded model, as a layout."""
        if isinstance(base, BaseLayout):
            return base
        if isinstance(base, (str, Path)):
            return cls.from_folder(base, task_type)
        return cls.from_model(base)
