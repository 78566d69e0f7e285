"""Load, merge, convert: the adapter-level verbs of the public API (``merging.load`` ...)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from merging import formats, strategies
from merging.base import pipelines
from merging.base.example_model import example_base_model
from merging.base.layout import BaseLayout
from merging.base.weights import weights as base_weights_of
from merging.core.adapter import Adapter, Pair
from merging.core.progress import Progress
from merging.errors import MergingError
from merging.export.hub import hub_id as _hub_id
from merging.formats import sources
from merging.merge import pipeline, serving
from merging.merge.result import MergeResult, summary
from merging.merge.spectra import Spectra
from merging.storage.atomic import Replacement, collect_replaced
from merging.storage.files import refuse_overlap
from merging.strategies import Options as Options
from merging.strategies.base import INNER as INNER  # the public API names them

BaseWeights = Callable[[str], Any]  # module path → its base weight (a tensor, stored layout)
OPTION_FIELDS = ("rank", "energy", "clamp", "density", "majority_sign", "seed", "signed", "inner", "alpha",
                 "common_fraction", "budget")  # fmt: skip


def options_given(**given: Any) -> Options:
    """Strategy options from keyword values, None standing for the strategies' default."""
    return Options(**{k: v for k, v in given.items() if v is not None})


def strategy_names() -> list[str]:
    """The registered strategy names, in the registry's order."""
    return strategies.names()


def is_ranked(strategy: str) -> bool:
    """Whether a strategy takes ``rank``."""
    return strategies.get(strategy).ranked


def replaced_outputs() -> AbstractContextManager[list[Replacement]]:
    """A context collecting what the writes inside it replaced (for telling the user)."""
    return collect_replaced()


def hub_id(name: str | None) -> str | None:
    """The name when it is a Hub repo id (user/name, not a local path), else None."""
    return _hub_id(name)


def is_pipeline(folder: str | Path) -> bool:
    """Whether a base folder is a diffusers pipeline (it has model_index.json)."""
    return pipelines.is_pipeline(Path(folder))


def task_type(specs: Sequence[str]) -> str | None:
    """The PEFT ``task_type`` the inputs name (the head a base is loaded with); None when none does."""
    return sources.task_type(specs)


def example_base(progress: Callable[[str], None] | None = None) -> Path:
    """The example base model's folder (SmolLM2-135M-Instruct), downloaded and converted on first use."""
    return example_base_model(progress=progress)


def load(
    spec: str | Path, *, base: Any = None, revision: str | None = None, allow_nonfinite: bool = False,
    lazy: bool = False,
) -> Adapter:  # fmt: skip
    """One adapter: a PEFT folder, a kohya/LyCORIS or GGUF file, ``name=path``, or a Hub id.

    Args:
        spec: the adapter; ``name=path`` renames it; ``user/repo[:subfolder]`` reads it from the Hub.
        base: the base model (a folder, a layout or a loaded model): names kohya/GGUF modules and
            refines the deltas' layer kinds and shapes.
        revision: the Hub revision (a branch, tag or commit) of a Hub id.
        allow_nonfinite: accept NaN/Inf values.
        lazy: read a PEFT folder's tensors module by module as a merge uses them.

    Returns:
        The adapter; a merged IA³ + LoRA folder holds two, so ``load_inputs`` reads it.
    """
    spec = str(spec)
    if revision is not None:
        spec = f"{spec}@{revision}"
    found = [ad for ad, _ in load_inputs([spec], base=base, allow_nonfinite=allow_nonfinite, lazy=lazy)]
    if len(found) != 1:
        raise MergingError(f"{spec}: holds {len(found)} adapters ({', '.join(a.name for a in found)}); "
                           "read it with merging.load_inputs")  # fmt: skip
    return found[0]


def load_inputs(
    specs: Sequence[str | Path], *, base: Any = None, weights: Sequence[float] | None = None,
    allow_nonfinite: bool = False, lazy: bool = False,
) -> list[Pair]:  # fmt: skip
    """The adapters named by ``specs`` in stacking order, with their weights (default 1 each); a merged
    IA³ + LoRA folder gives two. ``base`` as in ``load``."""
    return sources.load_inputs([str(s) for s in specs], base=base, weights=weights,
                               allow_nonfinite=allow_nonfinite, lazy=lazy)  # fmt: skip


def merge(
    adapters: Sequence[Adapter | Pair], weights: Sequence[float] | None = None, strategy: str = "cat",
    rank: int | None = None, *, aux: str = "error", base: str | Path | BaseWeights | None = None,
    stream: bool = False, layer_weights: Mapping[str, Sequence[float]] | None = None,
    spectra: Spectra | None = None, progress: Progress | None = None, **options: Any,
) -> MergeResult:  # fmt: skip
    """Merge adapters with a strategy, module by module (``merging merge``).

    Args:
        adapters: in stacking order (innermost first); adapters, or (adapter, weight) pairs.
        weights: one per adapter (default: the pairs' weights, else 1 each).
        strategy: a registered strategy (``merging.strategy_names()``).
        rank: the rank of svd, TIES, DARE and friends (default: the largest input rank).
        aux: overlapping modules_to_save / token rows: "error", or "sum" them against the base.
        base: the base model folder (or module path → weight): DoRA inputs and ``aux="sum"`` need it.
        stream: build each module as the writer asks for it (PEFT output, plain additive inputs).
        layer_weights: layer → one weight per input, replacing ``weights`` on that layer.
        spectra: shared by merges of these inputs that differ only in rank.
        progress: called as progress(done, total, module).
        options: the strategies' options (energy, clamp, density, majority_sign, seed, signed, inner,
            alpha, common_fraction, budget).

    Returns:
        The MergeResult; ``.save(out)`` writes it.
    """
    if unknown := sorted(set(options) - set(OPTION_FIELDS)):
        raise MergingError(f"merge: unknown option {unknown[0]!r}; known: {', '.join(OPTION_FIELDS)}")
    pairs = [a if isinstance(a, tuple) else (a, 1.0) for a in adapters]
    if weights is not None:
        if len(weights) != len(pairs):
            raise MergingError(f"`weights`: {len(weights)} weights for {len(pairs)} input adapters")
        pairs = [(ad, float(w)) for (ad, _), w in zip(pairs, weights, strict=True)]
    opts = Options(rank=rank, **options)
    base_weights = base_weights_of(Path(base)).module_weight if isinstance(base, str | Path) else base
    return pipeline.merge(pairs, strategy, opts, aux=aux, base_weights=base_weights, progress=progress,
                          stream=stream, layer_weights=layer_weights, spectra=spectra)  # fmt: skip


def convert(
    source: str, out: str | Path, to: str, *, base: str | Path | None = None, outtype: str = "f32",
    prefix: str = "lora_unet", force: bool = False, uniform_rank: bool = False, serve: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Convert an adapter between formats (``merging convert``); returns what was written (merging.convert/1).

    Args:
        source: the adapter (as ``load`` takes it); one adapter only.
        out: the output folder (peft) or file (kohya, gguf).
        to: "peft", "kohya" or "gguf".
        base: the base model folder: names kohya modules, gives GGUF its architecture (needed for gguf).
        outtype: GGUF tensor type: f32, f16 or bf16.
        prefix: kohya's lora_name prefix.
        force: replace an existing output.
        uniform_rank: one rank and lora_alpha = r in every module.
        serve: pad to the smallest rank the engine accepts ("vllm").
    """
    layout = BaseLayout.from_folder(base) if base is not None else None
    adapters = sources.load_spec(source, base=layout)
    if len(adapters) != 1:
        raise MergingError(f"{source}: holds {len(adapters)} adapters; convert them one at a time")
    ad = adapters[0]
    refuse_overlap(Path(out), [ad.source, base])
    if layout is not None:
        ad = ad.refine_targets(layout.modules)
    if to == "gguf" and layout is None:
        raise MergingError("`to` gguf needs `base` (the architecture, block and head counts)")
    if uniform_rank or serve:
        ad = serving.for_engine(ad, serve)
    options = formats.WriteOptions(prefix=prefix, out_type=outtype)
    formats.get(to).write(ad, Path(out), base=layout, force=force, options=options)
    written = [Path(out)] if Path(out).is_file() else sorted(p for p in Path(out).rglob("*") if p.is_file())
    return {"source": source, "output": str(out), "format": to, "modules": len(ad.deltas), "params": ad.numel,
            "bytes": sum(p.stat().st_size for p in written), "serving": serving.of([ad]).lines()}  # fmt: skip


def merge_summary(result: MergeResult, out: str | Path, seconds: float) -> dict[str, Any]:
    """What a saved merge wrote (the ``merging merge --json`` document, schema merging.merge/1)."""
    return summary(result, out, seconds)
