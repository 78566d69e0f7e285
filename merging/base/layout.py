"""Base models: their module layout without loading weights, and loading them for real."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.core.adapter import base_shapes, conv_groups, layer_kind
from merging.core.deltas import Layer
from merging.errors import DeviceError, FormatError, SourceError, UnsupportedError
from merging.storage.files import cache_dir, sha256_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")  # fmt: skip


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


def _build(classes: list, make):
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
            return _build(auto_classes(task_type), lambda cls: cls.from_config(config))
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


def resolve_device(device: str = "auto") -> torch.device:
    """auto → CUDA when available, else CPU; cuda without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"`device` {device}: no CUDA device is available (torch {torch.__version__}); use cpu or auto"
        )
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f"`device` {device}: {e}") from None


def load_base(
    spec: str | Path,
    device: str = "auto",
    dtype: str = "float32",
    device_map: str | None = None,
    task_type: str | None = None,
):
    """Load a base model and its tokenizer from a folder, a ``.gguf`` file or a Hub id (from the cache).

    Args:
        task_type: the adapters' PEFT task type: picks the head (``TASK_CLASSES``); a head the base does
            not store is initialised from a fixed seed, so every run sees the same one.
        device: auto, cpu or cuda (ignored with ``device_map``).
        device_map: e.g. "auto": spread a base larger than one device over the GPUs and CPU memory
            (transformers + accelerate); the runtime's deltas follow each module's device.

    Returns:
        (model in eval mode, tokenizer or None when the folder has none).
    """
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise SourceError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dev = resolve_device(device) if device_map is None else None
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        path = _gguf_folder(path)
    where = str(path) if path.exists() else str(spec)
    from merging.base import pipelines as sdbase

    if path.is_dir() and (sdbase.is_pipeline(path) or sdbase.is_component(path)):
        raise SourceError(
            f"{spec}: a diffusers folder; verify takes the pipeline folder (model_index.json), bake loads "
            "transformers bases only (convert and merge take either as --base)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise SourceError(f"{spec}: not a transformers model folder (no config.json)")
    extra = {"device_map": device_map} if device_map else {}
    classes = auto_classes(task_type)
    try:
        with torch.random.fork_rng(devices=[]):  # a head the base lacks (a fresh classifier): same every run
            torch.manual_seed(0)
            model = _build(classes, lambda cls: cls.from_pretrained(where, dtype=DTYPES[dtype], **extra))
    except (OSError, ValueError, KeyError) as e:  # missing, no weights, unknown model_type: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{spec}: cannot load the base model ({first})") from None
    tokenizer = None
    if not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError, TypeError, RuntimeError):
            tokenizer = None  # verify then runs on seeded token ids
    if dev is not None:
        model = model.to(dev)
    return model.eval(), tokenizer


def _gguf_folder(gguf_file: Path) -> Path:
    """The transformers folder converted (once, cached by sha256) from a GGUF model file."""
    out = cache_dir() / "models" / f"{gguf_file.stem}-{sha256_file(gguf_file)[:12]}"
    if (out / "config.json").exists():
        return out
    return convert_gguf_model(gguf_file, out)


def convert_gguf_model(gguf_file: Path, out: Path) -> Path:
    """Convert a GGUF causal LM into a transformers folder (float32 safetensors, config, tokenizer).

    Args:
        gguf_file: a llama.cpp model file transformers can read (``gguf_file=`` support).
        out: destination folder; written to a temporary sibling and renamed into place.

    Returns:
        ``out``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{gguf_file}: transformers cannot load this GGUF model ({e})") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf_file.name}\nsha256 {sha256_file(gguf_file)}\n")
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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

    def has_bias(self, module: str) -> bool | None:
        """Whether the module has a bias (None when the layout does not know)."""
        return None if self.biased is None or module not in self.modules else module in self.biased

    @classmethod
    def from_folder(cls, folder: str | Path, task_type: str | None = None) -> BaseLayout:
        """From a model folder: transformers, a diffusers component, or a diffusers pipeline (its components).

        The module tree is built from the configs on the meta device (names and shapes, no memory), with
        the head of the adapters' PEFT ``task_type``.
        """
        from merging.base import pipelines as sdbase
        from merging.base import state_dict

        if state_dict.is_state_dict(Path(folder)):  # weights only: shapes from the headers, no config
            modules, biased = state_dict.state_dict_modules(Path(folder))
            return cls(modules, {}, biased)
        if sdbase.is_pipeline(Path(folder)):
            return cls.from_components(sdbase.pipeline_skeletons(Path(folder)))
        if sdbase.is_component(Path(folder)) or sdbase.is_text_encoder(Path(folder)):
            return cls.from_model(sdbase.skeleton(Path(folder)))
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
