"""merging: adapter arithmetic and merging workbench (LoRA, LoHa, LoKr, IA³).

The public API, imported lazily (PEP 562): ``import merging`` loads no torch until a function is used.

    import merging
    adapters = merging.load_inputs(["examples/adapters/add", "examples/adapters/sort"])
    result = merging.merge(adapters, strategy="svd", rank=16)
    result.save("out/", serve="vllm")
    merging.inspect("out/")
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from merging.errors import (
    DeviceError,
    FormatError,
    IncompatibleAdapters,
    MergingError,
    NonFiniteError,
    NotAnAdapter,
    ShapeMismatch,
    SourceError,
    UnsupportedError,
)
from merging.version import __version__

_LAZY = {  # public name → the module defining it
    **dict.fromkeys(["load", "load_inputs", "merge", "convert", "example_base", "strategy_names", "is_ranked",
                     "is_pipeline", "task_type", "hub_id", "replaced_outputs", "Options", "INNER"],
                    "merging.api.adapters"),  # fmt: skip
    "inspect": "merging.api.inspection",
    **dict.fromkeys(["settle_threads", "describe_threads"], "merging.api.threads"),
    "tune": "merging.api.tuning",
    "Tuned": "merging.api.tuning",
    "TUNE_RECIPE": "merging.api.tuning",
    "TUNE_RECORD": "merging.api.tuning",
    "compare": "merging.api.comparison",
    "compare_judged": "merging.api.comparison",
    "compare_pipeline": "merging.api.comparison",
    "compare_best_mark": "merging.api.comparison",
    **dict.fromkeys(["verify", "verify_pipeline", "judged_by"], "merging.api.verification"),
    **dict.fromkeys(["bake", "publish", "publish_plan"], "merging.api.export"),
    "MergeResult": "merging.merge.result",
    "merge_summary": "merging.api.adapters",
    "Adapter": "merging.core.adapter",
}

__all__ = [
    "DeviceError", "FormatError", "IncompatibleAdapters", "MergingError", "NonFiniteError", "NotAnAdapter",
    "ShapeMismatch", "SourceError", "UnsupportedError", "__version__", *_LAZY,
]  # fmt: skip

if TYPE_CHECKING:  # what the type checker sees of the lazy names
    from merging.api.adapters import INNER as INNER
    from merging.api.adapters import Options as Options
    from merging.api.adapters import convert as convert
    from merging.api.adapters import example_base as example_base
    from merging.api.adapters import hub_id as hub_id
    from merging.api.adapters import is_pipeline as is_pipeline
    from merging.api.adapters import is_ranked as is_ranked
    from merging.api.adapters import load as load
    from merging.api.adapters import load_inputs as load_inputs
    from merging.api.adapters import merge as merge
    from merging.api.adapters import merge_summary as merge_summary
    from merging.api.adapters import replaced_outputs as replaced_outputs
    from merging.api.adapters import strategy_names as strategy_names
    from merging.api.adapters import task_type as task_type
    from merging.api.comparison import compare as compare
    from merging.api.comparison import compare_best_mark as compare_best_mark
    from merging.api.comparison import compare_judged as compare_judged
    from merging.api.comparison import compare_pipeline as compare_pipeline
    from merging.api.export import bake as bake
    from merging.api.export import publish as publish
    from merging.api.export import publish_plan as publish_plan
    from merging.api.inspection import inspect as inspect
    from merging.api.threads import describe_threads as describe_threads
    from merging.api.threads import settle_threads as settle_threads
    from merging.api.tuning import TUNE_RECIPE as TUNE_RECIPE
    from merging.api.tuning import TUNE_RECORD as TUNE_RECORD
    from merging.api.tuning import Tuned as Tuned
    from merging.api.tuning import tune as tune
    from merging.api.verification import judged_by as judged_by
    from merging.api.verification import verify as verify
    from merging.api.verification import verify_pipeline as verify_pipeline
    from merging.core.adapter import Adapter as Adapter
    from merging.merge.result import MergeResult as MergeResult


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'merging' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    if name != "merge":  # cached; merge is read through _Package's property
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The ``merging`` module, whose ``merge`` is the function although ``merging/merge/`` is a subpackage.

    Importing ``merging.merge.<module>`` the first time makes the import system bind the subpackage as the
    attribute ``merge`` of this package; the setter leaves the function in place (the subpackage stays in
    ``sys.modules``, where ``from merging.merge import pipeline`` finds it).
    """

    @property
    def merge(self) -> Any:
        return __getattr__("merge")

    @merge.setter
    def merge(self, value: Any) -> None:
        if not isinstance(value, types.ModuleType):
            raise AttributeError("merging.merge is the merge function; it cannot be replaced")


sys.modules[__name__].__class__ = _Package
