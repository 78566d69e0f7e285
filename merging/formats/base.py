"""What every on-disk format provides: ``detect``, ``read`` and ``write`` with one signature each."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from merging.core.adapter import Adapter
from merging.core.experts import is_param_key
from merging.errors import FormatError, MergingError, UnsupportedError

if TYPE_CHECKING:  # formats only read a BaseLayout's fields; basemodel is not imported at run time
    from merging.base.layout import BaseLayout


@dataclass(frozen=True)
class ReadOptions:
    """Format-specific reading knobs; a format ignores the ones that are not its own."""

    keep_permuted: bool = False  # gguf: without a base, keep llama.cpp's q/k row permutation (display only)
    lazy: bool = False  # peft: read each module's tensors when its delta is asked for (a streaming merge)


@dataclass(frozen=True)
class WriteOptions:
    """Format-specific writing knobs; a format ignores the ones that are not its own."""

    prefix: str = "lora_unet"  # kohya: the lora_name prefix of module paths (lora_unet, lora_te, lycoris...)
    out_type: str = "f32"  # gguf: tensor type, f32, f16 or bf16
    unet_names: str = "diffusers"  # kohya: "sgm" names a UNet in Stability's names (sd-scripts' SDXL files)


# the recipe kept with a written adapter, or a function giving it (called once the weights are written)
Provenance = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None
READ_DEFAULTS = ReadOptions()
WRITE_DEFAULTS = WriteOptions()


class Reader(Protocol):
    def __call__(
        self, path: Path, *, base: BaseLayout | None = None, allow_nonfinite: bool = False,
        options: ReadOptions = READ_DEFAULTS,
    ) -> Adapter:  # fmt: skip
        """Read one adapter; ``base`` names modules and undoes layouts that depend on the base model."""
        ...


class Writer(Protocol):
    def __call__(
        self, adapter: Adapter, path: Path, *, provenance: Provenance = None,
        base: BaseLayout | None = None, force: bool = False, options: WriteOptions = WRITE_DEFAULTS,
    ) -> Path:  # fmt: skip
        """Write one adapter atomically; ``provenance`` is the JSON-able recipe kept with it."""
        ...


def recipe_of(provenance: Provenance) -> Mapping[str, Any] | None:
    """The recipe itself, when ``provenance`` is a function giving it."""
    return provenance() if callable(provenance) else provenance


@dataclass(frozen=True)
class Format:
    """One on-disk adapter format.

    ``detect`` claims a path by its container (a folder with adapter_config.json, a .safetensors or .gguf
    file); ``read`` raises NotAnAdapter when the container holds a model rather than an adapter.
    ``uses_base`` says whether read or write look at ``base`` (callers build a BaseLayout only then).
    """

    name: str
    detect: Callable[[Path], bool]
    read: Reader
    write: Writer
    uses_base: bool


def refuse_gated(adapter: Adapter, fmt: str) -> None:
    """aLoRA gating (invocation tokens) and LoRA on parameters (MoE experts, ``target_parameters``) live in
    PEFT's format only: other formats would drop them or name modules that do not exist."""
    if adapter.invocation is not None:
        raise UnsupportedError(f"{adapter.where}: an aLoRA (alora_invocation_tokens) has no {fmt} form")
    if experts := [m for m in adapter.deltas if is_param_key(m)]:
        raise UnsupportedError(
            f"{adapter.where}: {experts[0]} is an expert of a parameter (PEFT target_parameters), which has "
            f"no {fmt} form; write --format peft"
        )


@contextmanager
def naming(file: Path, where: str) -> Iterator[None]:
    """Prefix a reader's error with the file and the module (``where``); a missing tensor is a FormatError."""
    try:
        yield
    except MergingError as e:
        if str(file) in str(e):
            raise
        raise type(e)(f"{file}: {where}: {e}") from None
    except KeyError as e:
        raise FormatError(f"{file}: {where}: missing tensor {e.args[0]!r}") from None
