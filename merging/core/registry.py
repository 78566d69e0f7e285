"""A registry of named things that fails loudly: the strategies and the formats are kept in one each."""

from __future__ import annotations

from typing import Generic, TypeVar

from merging.errors import MergingError, UnsupportedError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names → items in registration order; a duplicate or malformed name, or a miss, is an error."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> None:
        """Add ``item`` as ``name`` (a lower-case identifier not yet taken)."""
        if not name.isidentifier() or name != name.lower():
            raise MergingError(f"{self.kind} name {name!r} must be a lower-case identifier")
        if name in self._items:
            raise MergingError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item

    def get(self, name: str) -> T:
        """The item called ``name``; a miss lists the valid names."""
        try:
            return self._items[name]
        except KeyError:
            raise UnsupportedError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[T]:
        return list(self._items.values())
