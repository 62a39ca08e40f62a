"""Parse FHIR R4 JSON into ``fhir.resources.R4B`` models, tolerating what real servers send.

R4B is wire-compatible with R4 for every resource the service reads, and unlike the package's default (R5) it still
has ``Media`` (fhir-profile.md). Unknown elements are dropped (with a note) rather than failing the resource; a
resource that still does not validate is skipped with a PHI-free reason, never a crash (fhir-profile.md: "treat it
as unusable evidence and say so").
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from functools import cache
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.domainresource import DomainResource
from fhir.resources.R4B.resource import Resource

from cds_service.fhir.lite import read_resource
from cds_service.memo import SeenBefore
from cds_service.record import ResourceBag, SkippedResource

_MAX_REPAIRS = 20
CACHED_LIST_LENGTH = 200  # longest list parsed through the cache (add_raw)


_Parsed = tuple[Resource | None, list[str], SkippedResource | None]


@cache
def _model_class(resource_type: str) -> type[Resource] | None:
    try:
        cls = get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError, ModuleNotFoundError):
        return None
    # get_fhir_model_class also knows data types (HumanName, Reference) and abstract bases: not resources.
    if not (isinstance(cls, type) and issubclass(cls, Resource)) or cls in (Resource, DomainResource):
        return None
    return cls


def _remove_path(data: Any, loc: tuple[Any, ...]) -> bool:
    target = data
    for part in loc[:-1]:
        try:
            target = target[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(target, dict) and loc and loc[-1] in target:
        del target[loc[-1]]
        return True
    return False


def _path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(root)"


def parse_resource(data: Any) -> tuple[Resource | None, list[str], SkippedResource | None]:
    """One resource: ``(model, dropped element paths, None)`` or ``(None, [], SkippedResource)``."""
    try:
        return _parse_resource(data)
    except RecursionError:  # JSON nested deeper than any FHIR resource (copying or validating it recurses)
        reference = None
        if isinstance(data, dict) and isinstance(data.get("resourceType"), str) and isinstance(data.get("id"), str):
            reference = f"{data['resourceType']}/{data['id']}"
        return None, [], SkippedResource(reference, "invalid: nested too deeply")


def _parse_resource(data: Any) -> tuple[Resource | None, list[str], SkippedResource | None]:
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        return None, [], SkippedResource(None, "not a FHIR resource (no resourceType)")
    resource_type = data["resourceType"]
    rid = data.get("id") if isinstance(data.get("id"), str) else None
    reference = f"{resource_type}/{rid}" if rid else None
    cls = _model_class(resource_type)
    if cls is None:
        return None, [], SkippedResource(reference, f"unknown resource type {resource_type!r}")
    # Plainly valid resources (nearly all) are read by the fast reader built from the same model (fhir/lite.py);
    # the rest — unknown elements to drop, values to refuse — go through the full model as always.
    fast = read_resource(cls, data)
    if fast is not None:
        return fast, [], None  # type: ignore[return-value]  # reads like the model: same attributes and values
    working = data
    dropped: list[str] = []
    for _ in range(_MAX_REPAIRS):
        try:
            return cls.model_validate(working), dropped, None
        except pydantic.ValidationError as exc:
            errors = exc.errors()
            extras = [e["loc"] for e in errors if e.get("type") == "extra_forbidden"]
            if not extras or len(extras) != len(errors):
                kinds = sorted({f"{_path(e['loc'])} ({e.get('type')})" for e in errors})
                return None, [], SkippedResource(reference, "invalid: " + "; ".join(kinds[:5]))
            if working is data:
                working = copy.deepcopy(data)
            removed = [loc for loc in extras if _remove_path(working, tuple(loc))]
            if not removed:
                return None, [], SkippedResource(reference, "invalid: unknown elements could not be removed")
            dropped.extend(_path(tuple(loc)) for loc in removed)
        except RecursionError:
            raise
        except Exception as exc:  # validators raising outside pydantic's wrapper: fhir_core's Url
            # validator raises AttributeError for a number. One odd resource is skipped, never a 500.
            return None, [], SkippedResource(reference, f"invalid: {type(exc).__name__}")
    return None, [], SkippedResource(reference, "invalid: too many unknown elements")


class ParseCache:
    """Parsed models by resource identity and content, least recently used first out; a resource is kept only
    from the second time it is seen.

    EHRs send the same resources again and again (every chart opening prefetches the patient's coverage,
    consents and recent encounters); validating them is most of a hook call's CPU. Models are never mutated after
    parsing, so one model may serve many requests and threads. Bounded, so memory stays flat.

    Admission on second sight (issue 13): in an EHR's traffic most resources are seen once (one chart after
    another), and keeping each of them cost a call more than the cache saved: every miss stored the resource's
    JSON and model and pushed out an older pair, whose freeing fell on a later call, and the retained objects made
    the heap larger. A miss therefore records only the resource's key (a tuple of strings the request already
    holds) in a two-generation set of ``max_seen`` keys; a resource is stored when it is parsed again while its
    key is still there, and answered from the cache from its third sight on. Measured on the realistic records
    with a new patient per call: about a tenth of the call's time.

    The key is cheap: ``resourceType``, ``id``, ``meta.versionId`` and ``meta.lastUpdated``. A hit also needs the
    stored JSON to equal the new one (``dict ==``, done in C), so a server that edits a resource without bumping its
    version still gets a fresh parse. Python equality treats ``1``, ``1.0`` and ``true`` alike; pydantic's lax
    validation, which fhir.resources uses, turns them into the same model, so that equality is the right one. A
    resource without an id (rare: contained, or a malformed one) is keyed by its JSON text instead.
    """

    def __init__(self, max_entries: int = 2048, max_seen: int = 8192) -> None:
        self.max_entries = max_entries
        self.max_seen = max_seen
        self._entries: OrderedDict[Any, tuple[Any, _Parsed]] = OrderedDict()
        self._seen = SeenBefore(max_seen)  # keys seen once (under ``_lock``)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(data: Any) -> Any:
        key = _identity(data)
        if key is not None:
            return key
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    def parse(self, data: Any, key: Any = None) -> _Parsed:
        """``data`` parsed, from the cache when it holds an equal resource; ``key``: ``_identity(data)``, when the
        caller has it already."""
        if key is None:
            try:
                key = self._key(data)
            except (TypeError, ValueError, RecursionError):
                return parse_resource(data)
        with self._lock:  # one lock for look-up, comparison (C code, fast) and recency
            found = self._entries.get(key)
            try:
                same = found is not None and found[0] == data
            except RecursionError:
                same = False
            if same:
                self._entries.move_to_end(key)
                self.hits += 1
                return found[1]  # type: ignore[index]
            self.misses += 1
            admit = found is not None or self._seen.check(key)
        parsed = parse_resource(data)
        if admit:
            with self._lock:
                # The caller's dict itself is kept for the comparison: the service never changes a resource it
                # read (a copy per miss would double the cost of a large first read).
                self._entries[key] = (data, parsed)
                self._entries.move_to_end(key)
                if len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return parsed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._seen.clear()


PARSE_CACHE = ParseCache()


def _identity(data: Any) -> tuple[str | None, ...] | None:
    """A resource's type, id, ``meta.versionId`` and ``meta.lastUpdated`` (all strings where present); None for a
    value without a string type and id, or with a ``meta`` of another shape."""
    if type(data) is dict:
        rid, rtype, meta = data.get("id"), data.get("resourceType"), data.get("meta")
        if type(rid) is str and type(rtype) is str:
            if meta is None:
                return rtype, rid
            if type(meta) is dict:
                version, updated = meta.get("versionId"), meta.get("lastUpdated")
                if (version is None or type(version) is str) and (updated is None or type(updated) is str):
                    return rtype, rid, version, updated
    return None


def add_raw(bag: ResourceBag, items: Iterable[dict[str, Any]], earlier: dict[Any, Any] | None = None) -> None:
    """Parse FHIR JSON resources into ``bag``: unknown elements dropped with a note, unusable ones skipped with a
    PHI-free reason (fhir-profile.md: never crash on one odd resource).

    ``earlier``, kept by the caller across its calls for one record, maps what was parsed to its result: a hook
    call's record often holds a resource twice (the context encounter in "encounter" and in "encounters", a
    practitioner in two waves), and a repeat — the same JSON (``==``) under the same key — takes the same result
    without a second parse, added to the bag again as before (the last of a type and id still wins). It holds the
    JSON it was given, so only a caller that keeps that alive anyway (a hook call's request) should pass it."""
    items = list(items)
    # A long list (a patient's whole history page, a server ignoring a search parameter) is parsed without
    # the cache: it would only push out the resources that do recur, and look-ups would cost it time.
    cached = len(items) <= CACHED_LIST_LENGTH
    for item in items:
        model, dropped, skipped = parse_item(item, earlier, cached)
        if skipped is not None:
            bag.skip(skipped)
        elif model is not None:
            bag.add(model, dropped)


def parse_item(item: Any, earlier: dict[Any, Any] | None, cached: bool) -> _Parsed:
    """One resource as :func:`add_raw` parses it: from ``earlier`` (see there) when it holds the same JSON, else
    through the parse cache (``cached``) or not; the result goes into ``earlier``. A caller may parse ahead with
    it (the prefetch selection does) and :func:`add_raw` then finds the result in ``earlier``."""
    if earlier is not None:
        # The very object parsed before (the prefetch selection parses ahead, then add_raw takes the same dicts):
        # found by its id() — ``earlier`` keeps the object alive, so the id is not reused — without its identity
        # key or a comparison. An int never equals an identity key (a tuple).
        same = earlier.get(id(item))
        if same is not None and same[0] is item:
            return same[1]  # type: ignore[no-any-return]
    key = _identity(item) if earlier is not None or cached else None
    before = earlier.get(key) if earlier is not None and key is not None else None
    try:
        repeat = before is not None and before[0] == item
    except RecursionError:
        repeat = False
    if repeat:
        return before[1]  # type: ignore[index,no-any-return]
    parsed = PARSE_CACHE.parse(item, key) if cached else parse_resource(item)
    if earlier is not None:
        earlier[id(item)] = (item, parsed)
        if key is not None:
            earlier[key] = (item, parsed)
    return parsed


def warm_up() -> int:
    """Parse one synthetic resource of each type the service reads; returns how many parsed.

    fhir.resources imports its element models lazily, on first validation: about 0.15 s spread over a worker's
    first calls. ``g2250-cds serve`` calls this in the gunicorn master before forking, so every worker starts with
    the imports done (and shares those pages). The sample resources are synthetic (from ``fhir_fixtures/``).
    """
    from importlib.resources import files

    samples = json.loads(files(__package__).joinpath("warmup.json").read_text("utf-8"))["resources"]
    return sum(parse_resource(sample)[0] is not None for sample in samples)
