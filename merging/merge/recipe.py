"""Recipe: how a merged result was made (inputs with their sha256, weights, strategy, options, versions).

Typed and frozen; JSON only at the edges: ``to_dict()`` gives exactly the JSON object written as
``merge_recipe.json`` (and into kohya/GGUF metadata), ``from_dict()`` and ``Recipe.read(folder)`` read it
back. ``Input`` and ``Versions`` are shared with the comparison report (``merging.results``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from merging.core.adapter import Adapter
from merging.errors import MergingError
from merging.formats.peft import RECIPE_FILE
from merging.formats.sources import describe
from merging.strategies import Options


@contextmanager
def malformed(what: str) -> Iterator[None]:
    """Turn a missing key or a value of the wrong type while reading ``what`` into one MergingError."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MergingError(f"{what}: malformed ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class HubSource:
    """Where a Hub input came from: the repo, the resolved commit, the subfolder, the card's license."""

    repo: str
    revision: str | None = None
    subfolder: str | None = None
    license: str | None = None


@dataclass(frozen=True)
class Input:
    """One input adapter as a recipe records it."""

    name: str
    path: str | None
    hub: HubSource | None
    base_model: str | None
    revision: str | None
    kinds: tuple[str, ...]
    sha256: dict[str, str]  # weight file name → sha256
    weight: float

    @classmethod
    def of(cls, adapter: Adapter, weight: float) -> Input:
        """The record of ``adapter`` merged with ``weight`` (sha256 of its weight files included)."""
        return cls.from_dict(describe(adapter) | {"weight": weight})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"kinds": list(self.kinds)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Input:
        with malformed("recipe input"):
            hub = None if d["hub"] is None else HubSource(**d["hub"])
            return cls(
                d["name"], d["path"], hub, d["base_model"], d["revision"], tuple(d["kinds"]),
                dict(d["sha256"]), d["weight"],
            )  # fmt: skip


@dataclass(frozen=True)
class Versions:
    """The versions of merging and of the libraries that shaped the numbers."""

    merging: str
    torch: str
    safetensors: str

    @classmethod
    def current(cls) -> Versions:
        import safetensors
        import torch

        from merging.version import __version__

        return cls(__version__, torch.__version__.split("+")[0], safetensors.__version__)

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> Versions:
        with malformed("versions"):
            return cls(**d)


def options_from_dict(d: dict[str, Any]) -> Options:
    """Options from their JSON object (unknown keys and bad values are errors)."""
    with malformed("options"):
        return Options(**d)


@dataclass(frozen=True)
class Recipe:
    """How a merged result was made."""

    inputs: tuple[Input, ...]
    strategy: str
    additive_strategy: str | None  # what merged the additive deltas (None when there were none)
    ia3_strategy: str | None  # what merged the IA³ vectors (None when there were none)
    options: Options
    outputs: tuple[str, ...]  # the written adapters' names, in stacking order
    versions: Versions
    layer_weights: dict[str, tuple[float, ...]] | None = None  # layer → one weight per input (merging tune)

    @property
    def weights(self) -> list[float]:
        """The inputs' weights, in order."""
        return [i.weight for i in self.inputs]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``merge_recipe.json``."""
        out = {
            "inputs": [i.to_dict() for i in self.inputs],
            "strategy": self.strategy,
            "additive_strategy": self.additive_strategy,
            "ia3_strategy": self.ia3_strategy,
            "options": asdict(self.options),
            "outputs": list(self.outputs),
            "versions": asdict(self.versions),
        }
        if self.layer_weights is None:
            return out
        return out | {"layer_weights": {k: list(v) for k, v in self.layer_weights.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        with malformed("recipe"):
            return cls(
                tuple(Input.from_dict(i) for i in d["inputs"]), d["strategy"], d["additive_strategy"],
                d["ia3_strategy"], options_from_dict(d["options"]), tuple(d["outputs"]),
                Versions.from_dict(d["versions"]), _layer_weights(d.get("layer_weights")),
            )  # fmt: skip

    @classmethod
    def read(cls, folder: Path) -> Recipe | None:
        """The recipe of a merged folder (None when it has none)."""
        f = Path(folder) / RECIPE_FILE
        if not f.is_file():
            return None
        try:
            data = json.loads(f.read_text())
        except ValueError as e:
            raise MergingError(f"{f}: invalid JSON ({e})") from e
        try:
            return cls.from_dict(data)
        except MergingError as e:
            raise MergingError(f"{f}: {e}") from None


def _layer_weights(d: dict[str, list[float]] | None) -> dict[str, tuple[float, ...]] | None:
    return None if d is None else {str(k): tuple(float(w) for w in v) for k, v in d.items()}


def inputs_of(adapters: Sequence[Adapter], weights: Sequence[float]) -> tuple[Input, ...]:
    """The input records of adapters merged with these weights."""
    return tuple(Input.of(ad, w) for ad, w in zip(adapters, weights, strict=True))
