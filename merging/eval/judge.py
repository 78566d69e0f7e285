"""The independent judge: PEFT itself stacks the original input files and loads the merged output.

``verify`` must not share its reference with the code it judges. Where PEFT can stack the inputs —
PEFT folders, all of weight 1, either several IA³ adapters (``base_model.set_adapter([...])``) or
LoRA/LoHa/LoKr adapters (``PeftMixedModel``) — PEFT loads the ORIGINAL files onto the base model and
its stacked forward is the reference; a merged PEFT folder is loaded with ``PeftModel.from_pretrained``.
Elsewhere (IA³ mixed with additive adapters, kohya or GGUF inputs, weights ≠ 1) ``merging.runtime`` is
the reference, and ``parts`` names the subsets PEFT can stack so that verify cross-checks it there.

PEFT injects its layers into the model in place; every context here unloads them on exit
(``unload()`` without merging), so the base model's parameters are left as they were.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from merging.core.adapter import Adapter, Pair
from merging.errors import FormatError, UnsupportedError

PEFT = "peft"
RUNTIME = "merging.runtime"
ADDITIVE_TYPES = {"LORA", "LOHA", "LOKR"}


@dataclass(frozen=True)
class Stacker:
    """Who stacks a set of adapters: PEFT ("mixed" or "multi" loading of these folders) or our runtime."""

    reference: str  # PEFT or RUNTIME
    mode: str | None = None  # "mixed" (PeftMixedModel) or "multi" (PeftModel + set_adapter([...]))
    folders: tuple[Path, ...] = ()
    reason: str | None = None  # why PEFT cannot stack them (RUNTIME only)


def peft_type(adapter: Adapter) -> str | None:
    """The PEFT type of an adapter read from a PEFT folder on disk (None for kohya, GGUF, merged results)."""
    cfg = adapter.config if isinstance(adapter.config, dict) else {}
    folder = adapter.source
    if folder is None or not (Path(folder) / "adapter_config.json").is_file():
        return None
    return cfg.get("peft_type")


def who_stacks(pairs: Sequence[Pair]) -> Stacker:
    """How these (adapter, weight) pairs can be stacked by PEFT itself, or why they cannot."""
    if not pairs:
        return Stacker(RUNTIME, reason="no adapters")
    types = [peft_type(ad) for ad, _ in pairs]
    if None in types:
        what = next(ad.where for (ad, _), t in zip(pairs, types, strict=True) if t is None)
        return Stacker(RUNTIME, reason=f"{what} is not a PEFT folder")
    if any(w != 1.0 for _, w in pairs):
        return Stacker(RUNTIME, reason="PEFT stacks adapters at weight 1 only")
    folders = tuple(Path(ad.source) for ad, _ in pairs)
    if len(set(folders)) != len(folders):
        return Stacker(RUNTIME, reason="an adapter is stacked twice")
    kinds = set(types)
    if len(kinds) == 1:
        return Stacker(PEFT, "multi", folders)
    if kinds <= ADDITIVE_TYPES:
        return Stacker(PEFT, "mixed", folders)
    return Stacker(RUNTIME, reason="PEFT cannot stack IA³ with additive adapters")


def parts(pairs: Sequence[Pair]) -> list[tuple[str, list[Pair]]]:
    """The subsets PEFT can stack when it cannot stack them all: the IA³ inputs, the additive inputs."""
    ia3 = [p for p in pairs if peft_type(p[0]) == "IA3"]
    add = [p for p in pairs if peft_type(p[0]) in ADDITIVE_TYPES]
    return [(name, sub) for name, sub in (("ia3 inputs", ia3), ("additive inputs", add))
            if sub and who_stacks(sub).reference == PEFT]  # fmt: skip


PEFT_REFUSALS = (ValueError, TypeError, KeyError, RuntimeError, AttributeError)


def _require_peft():
    try:
        import peft
    except ImportError:
        raise UnsupportedError(
            "verify judges PEFT adapters with PEFT itself: install it (pip install 'merging[verify]')"
        ) from None
    return peft


@contextmanager
def peft_stacked(model: nn.Module, stacker: Stacker) -> Iterator[nn.Module]:
    """The PEFT folders loaded by PEFT onto ``model``, all active at once; unloaded on exit.

    Yields:
        ``model`` itself, with PEFT's layers injected (call it as usual; ``generate`` works).
    """
    peft = _require_peft()
    names = [f"input{i}" for i in range(len(stacker.folders))]
    cls = peft.PeftMixedModel if stacker.mode == "mixed" else peft.PeftModel
    wrapped = cls.from_pretrained(model, str(stacker.folders[0]), adapter_name=names[0])
    try:
        for name, folder in zip(names[1:], stacker.folders[1:], strict=True):
            wrapped.load_adapter(str(folder), adapter_name=name)
        if stacker.mode == "mixed":
            wrapped.set_adapter(names)
        else:
            wrapped.base_model.set_adapter(names)
        wrapped.eval()
        yield model
    finally:
        _unload(wrapped, model)


@contextmanager
def peft_loaded(model: nn.Module, folder: Path) -> Iterator[nn.Module]:
    """A merged PEFT folder loaded as users load it (``PeftModel.from_pretrained``); unloaded on exit."""
    peft = _require_peft()
    wrapped = peft.PeftModel.from_pretrained(model, str(folder))
    try:
        wrapped.eval()
        yield model
    finally:
        _unload(wrapped, model)


def _unload(wrapped, model: nn.Module) -> None:
    """Take PEFT's layers out again (no merging) and forget its config on the base model."""
    wrapped.base_model.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)


@contextmanager
def reference(model: nn.Module, pairs: Sequence[Pair]) -> Iterator[Stacker]:
    """The inputs stacked active by their own runtime (PEFT) where it can, else by ``merging.runtime``.

    Yields:
        Who stacked them (``.reference``: PEFT or our runtime); the model runs stacked meanwhile.
    """
    from merging.runtime.stacked import stacked

    stacker = who_stacks(pairs)
    with ExitStack() as stack:
        if stacker.reference == PEFT:
            try:
                stack.enter_context(peft_stacked(model, stacker))
            except PEFT_REFUSALS as e:  # e.g. modules_to_save active in two adapters at once
                stacker = Stacker(RUNTIME, reason=f"PEFT refused to stack them ({_first_line(e)})")
        if stacker.reference == RUNTIME:
            stack.enter_context(stacked(model, pairs))
        yield stacker


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextmanager
def loaded(model: nn.Module, adapters: Sequence[Adapter], folder: Path | None) -> Iterator[str]:
    """A merged result loaded as users load it: a PEFT folder through PEFT, else through our runtime.

    Yields:
        Who loaded it: PEFT or RUNTIME.
    """
    from merging.core.adapter import weighted
    from merging.runtime.stacked import stacked

    if folder is not None and (Path(folder) / "adapter_config.json").is_file():
        with ExitStack() as stack:
            try:
                stack.enter_context(peft_loaded(model, Path(folder)))
            except PEFT_REFUSALS as e:  # our output must load where users load it: that is a failure
                why = _first_line(e)
                raise FormatError(f"{folder}: PEFT cannot load this merged adapter ({why})") from None
            yield PEFT
    else:
        with stacked(model, weighted(adapters)):
            yield RUNTIME
