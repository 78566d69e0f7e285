"""Deltas built when asked for and never kept, so that a merge holds one module at a time.

A reader gives an Adapter ``LazyDeltas`` when it is asked to stream (``ReadOptions(lazy=True)``); a
streaming merge gives its result one too, and the writer that iterates it once writes each module as it
is built. Every access builds the delta again: code that needs the deltas more than once should take
``dict(adapter.deltas)`` first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from merging.core.deltas import Delta


class LazyDeltas(Mapping[str, Delta]):
    """Module path → delta, built by ``build(module)`` on each access.

    Args:
        modules: the module paths, in the order iteration gives them.
        build: makes one module's delta (reads its tensors, or merges the inputs' deltas).
        kind: the adapter type every delta has ("lora", "dora", "loha", "lokr", "ia3"), when known without
            building them; None when it is not.
    """

    def __init__(self, modules: Sequence[str], build: Callable[[str], Delta], kind: str | None = None):
        self._modules = list(modules)
        self._known = set(self._modules)
        self._build = build
        self.kind = kind

    def __getitem__(self, module: str) -> Delta:
        if module not in self._known:
            raise KeyError(module)
        return self._build(module)

    def __contains__(self, module: object) -> bool:
        return module in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def mapped(self, fn: Callable[[str, Delta], Delta]) -> LazyDeltas:
        """The same modules with ``fn(module, delta)`` applied to each delta as it is built."""
        build = self._build
        return LazyDeltas(self._modules, lambda m: fn(m, build(m)), self.kind)


def is_lazy(deltas: Mapping[str, Delta]) -> bool:
    return isinstance(deltas, LazyDeltas)
