"""A bounded memo for pure functions of configuration (business calendar, taxonomy map).

Thread-safe enough by construction: a race between two threads only computes the same value twice. When full it
starts over rather than tracking recency: the keys are days, instants and code lists that repeat call after call,
so a rare clear costs one recomputation each.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")
_MISSING = object()


class BoundedMemo(Generic[V]):
    def __init__(self, max_entries: int = 8192) -> None:
        self.max_entries = max_entries
        self._values: dict[Hashable, V] = {}

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The value kept for ``key``, computed (and kept) on first use. An unhashable key is computed and not
        kept; an exception from ``compute`` is raised and nothing is kept."""
        try:
            found = self._values.get(key, _MISSING)  # a miss without raising KeyError (the common first look)
        except TypeError:
            return compute()
        if found is not _MISSING:
            return found  # type: ignore[return-value]
        value = compute()
        if len(self._values) >= self.max_entries:
            self._values.clear()
        self._values[key] = value
        return value

    def clear(self) -> None:
        self._values.clear()

    def __len__(self) -> int:
        return len(self._values)
