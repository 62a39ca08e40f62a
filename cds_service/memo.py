"""A bounded memo for pure functions of configuration (business calendar, taxonomy map), and the bounded
"seen before?" test of caches that admit an entry from its second sight (``SeenBefore``).

Thread-safe enough by construction: a race between two threads only computes the same value twice. When full it
starts over rather than tracking recency: the keys are days, instants and code lists that repeat call after call,
so a rare clear costs one recomputation each.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

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


class SeenBefore:
    """Whether a key was seen before, over a bounded recent past: the admission test of caches that keep an entry
    only from its second sight (the parse cache, the fast reader's shared elements).

    Two generations of keys: a key is remembered while it is in either; when the newer one holds ``max_size`` keys
    it becomes the older one, and the oldest keys are forgotten at once (O(1), no recency bookkeeping). Not
    thread-safe by itself: a race only admits a key one sight early or late."""

    __slots__ = ("max_size", "newer", "older")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.newer: set[Hashable] = set()
        self.older: set[Hashable] = set()

    def check(self, key: Hashable) -> bool:
        """True when ``key`` is remembered; otherwise remember it and return False."""
        if key in self.newer or key in self.older:
            return True
        self.newer.add(key)
        if len(self.newer) >= self.max_size:
            self.older, self.newer = self.newer, set()
        return False

    def clear(self) -> None:
        self.newer.clear()
        self.older.clear()

    def __len__(self) -> int:
        return len(self.newer) + len(self.older)


class cached_property(Generic[V]):
    """``functools.cached_property`` without its lock: the value is computed on first access and stored in the
    instance's ``__dict__``, which then answers every later access without calling the descriptor.

    Python 3.11's version takes a re-entrant lock, one per property and shared by every instance of the class,
    around each first computation; Python 3.12 removed it (the functools documentation, ``cached_property``,
    "Changed in version 3.12": per-property, not per-instance, so high lock contention). The rules build a context
    per determination and compute a dozen such values on it, on the hook path. Two threads reading one new instance
    at once may both compute the value; the properties here are pure, so either result is the same."""

    def __init__(self, func: Callable[[Any], V]) -> None:
        self.func = func
        self.attrname: str | None = None
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.attrname = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = self.func(instance)
        instance.__dict__[self.attrname] = value
        return value
