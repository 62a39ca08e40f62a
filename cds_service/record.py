"""A patient's record as the rules read it: parsed FHIR resources by type and id.

The neutral type between the FHIR access layer (which fills it from prefetch, FHIR searches or — for the
population audit — Bulk export files) and the rules (which only read it). It knows nothing of how resources are
fetched or parsed: ``cds_service.fhir.parse.add_raw`` parses JSON into it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cds_service.memo import BoundedMemo


@dataclass(frozen=True)
class SkippedResource:
    """A resource the service could not use. ``reason`` names element paths and error kinds, never values."""

    reference: str | None
    reason: str


@dataclass
class ResourceBag:
    """Every resource gathered for one hook call, by type and id, de-duplicated across queries."""

    by_type: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[SkippedResource] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _anonymous: int = 0
    _memo: BoundedMemo[Any] = field(default_factory=BoundedMemo)
    # Types whose dictionary is another bag's (``layered``): copied before this bag first adds to it.
    _borrowed: set[str] = field(default_factory=set, repr=False)
    # ``layered(base=...)``: the bag whose memo holds values derived only from types still borrowed from it.
    _base: ResourceBag | None = field(default=None, repr=False)

    @classmethod
    def layered(cls, shared: Mapping[str, dict[str, Any]], own: Mapping[str, dict[str, Any]] | None = None,
                anonymous: int = 0, *, base: ResourceBag | None = None) -> ResourceBag:
        """A bag that reads ``shared``'s dictionaries without copying them (the population audit's shared
        resources, read by every patient of a worker); a type is copied only when this bag adds a resource of
        it, so ``shared`` never changes. ``own`` types are this bag's from the start; ``anonymous`` continues the
        numbering of id-less resources. ``base``, the bag ``shared`` belongs to (and which no longer changes),
        lends its memo for values derived only from borrowed types (``memo(..., types=...)``)."""
        own = dict(own or {})
        bag = cls(by_type={**shared, **own}, _anonymous=anonymous)
        bag._borrowed = set(shared) - set(own)
        if base is not None and all(base.by_type.get(t) is shared[t] for t in bag._borrowed):
            bag._base = base
        return bag

    def memo(self, key: Any, compute: Callable[[], Any], types: tuple[str, ...] | None = None) -> Any:
        """A value derived from the bag's contents (an index the rules read several times), computed once.
        Adding resources forgets every derived value.

        ``types``, when given, are the only resource types the value is derived from. A layered bag that still
        borrows each of them from its base unchanged (or, like its base, has none) takes the value from the
        base's memo: computed once for every patient of a population audit worker, not once per patient."""
        base = self._base
        if types is not None and base is not None and all(
                t in self._borrowed or (t not in self.by_type and t not in base.by_type) for t in types):
            return base._memo.get(key, compute)
        return self._memo.get(key, compute)

    def add(self, model: Any, dropped: Iterable[str] = ()) -> None:
        """Take in one parsed resource (the last of the same type and id wins); ``dropped`` names the unknown
        elements left out when it was parsed, noted without their values."""
        self._memo.clear()
        rtype = model.get_resource_type()
        rid = model.id
        if not rid:
            self._anonymous += 1
            rid = f"#anonymous-{self._anonymous}"
        if dropped:
            self.notes.append(f"{rtype}/{rid}: ignored unknown elements {', '.join(sorted(set(dropped)))}")
        if rtype in self._borrowed:
            self._borrowed.discard(rtype)
            self.by_type[rtype] = dict(self.by_type[rtype])
        self.by_type.setdefault(rtype, {})[rid] = model

    def skip(self, skipped: SkippedResource) -> None:
        """Note a resource that could not be used (its reason names paths and error kinds, never values)."""
        self.skipped.append(skipped)

    def of_type(self, resource_type: str) -> list[Any]:
        return list(self.by_type.get(resource_type, {}).values())

    def get(self, reference: str | None) -> Any | None:
        """Resolve a relative (``Type/id``) or absolute reference ending in ``Type/id``."""
        if not reference:
            return None
        parts = reference.rstrip("/").split("/")
        if len(parts) >= 4 and parts[-2] == "_history":
            parts = parts[:-2]
        if len(parts) < 2:
            return None
        return self.by_type.get(parts[-2], {}).get(parts[-1])

    def __iter__(self) -> Iterator[Any]:
        for models in self.by_type.values():
            yield from models.values()

    def __len__(self) -> int:
        return sum(len(m) for m in self.by_type.values())
