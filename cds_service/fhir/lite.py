"""A fast reader for plainly valid FHIR R4 resources, built from the ``fhir.resources.R4B`` model definitions.

Why: validating a resource with ``fhir.resources`` costs about 0.2 ms (a Python ``__init__`` and several Python
model validators for every nested element: 100–200 of them per resource of an ordinary chart), which made the
prefetch path cost 2.6–3.5× a bare echo of the same request on realistic records (issue 13). Most resources an
EHR sends are plainly valid; for those this module checks the same things the models check and builds light,
read-only objects with the same attribute names and the same Python values, at a fraction of the cost:

- every element is one the R4B model declares (by its JSON name); otherwise → the full parser (which drops the
  unknown element with a note, as before);
- complex elements are objects (arrays where the model has a list), checked recursively; no ``null`` inside an
  array of complex elements (fhir_core ``reject_null_complex_elements``);
- every primitive value is validated and converted by a pydantic ``TypeAdapter`` of the model field's own
  annotation (the same pydantic-core schema and fhir_core validators the model uses, so a dateTime becomes the same
  ``datetime`` / ``date`` / partial-date string, a decimal the same ``Decimal``);
- required elements are present (a non-optional complex element; a primitive marked ``element_required`` with its
  value or its ``_element`` extension: fhir_core ``_validate_required_primitive_elements``) and at most one — or,
  where required, exactly one — element of each choice group ``[x]`` (fhir_core ``_validate_one_of_many``).

Anything else — an unknown element, a value the adapter refuses, a shape this reader does not take (a null in a
primitive list, an empty array) — gives ``None`` and the caller parses the resource with the full model, which
accepts, repairs or skips it exactly as before. So the fast path never accepts what the full one refuses and never
changes a value; ``tests/test_fhir_lite.py`` compares both on every fixture and benchmark resource.

The objects: ``getattr`` of a declared element gives its value, or ``None`` when absent (as the models do);
``get_resource_type()`` gives the resource or element type; equality compares type and values. They are never
mutated after building, so they may be shared across threads and calls like the models.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import orjson
import pydantic
import pydantic_core
from fhir.resources.R4B import get_fhir_model_class
from fhir_core import types as fhir_types
from fhir_core.types import FhirBase

from cds_service.memo import SeenBefore

_NONE = type(None)


class LiteElement:
    """A read-only FHIR element or resource: declared elements as attributes, absent ones read as ``None``.

    ``__fhir_refs__`` (a slot, outside the element values): for a resource read by :func:`read_resource` and for a
    shared element, the ``reference`` strings of the Reference elements inside it, in document order — what the
    prefetch selection asks of a kept resource (``hooks.gather.select_prefetched``) without writing it out again."""

    __slots__ = ("__dict__", "__fhir_refs__")
    __fhir_type__: str = "Element"
    __fhir_names__: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not set on the instance: a declared but absent element reads as None.
        if name in type(self).__fhir_names__:
            return None
        raise AttributeError(f"{type(self).__fhir_type__} has no element {name!r}")

    def get_resource_type(self) -> str:
        return type(self).__fhir_type__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LiteElement):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # like pydantic models: mutable-looking, so not hashable

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("FHIR elements read by the rules are read-only")

    def __repr__(self) -> str:
        return f"{type(self).__fhir_type__}({', '.join(sorted(self.__dict__))})"


# Field kinds
_MODEL, _RESOURCE, _PRIMITIVE, _EXTENSION, _IGNORED = range(5)


@dataclass(frozen=True, slots=True)
class _Field:
    name: str                 # Python attribute (class_fhir)
    kind: int
    many: bool
    model: type | None        # the R4B model class of a complex element
    adapter: Any              # validates a primitive by its annotation (the item's, for a list)
    required: bool            # a complex element the model does not mark optional
    element_required: bool    # a primitive with minimum cardinality 1 (its value or its _extension)
    choice: str | None        # the choice group ("value" of value[x]) and whether one is required
    choice_required: bool


@dataclass(frozen=True, slots=True)
class _Schema:
    cls: type[LiteElement]
    fields: dict[str, _Field]           # by JSON key
    required: tuple[_Field, ...]
    element_required: tuple[tuple[str, str], ...]   # (JSON key, its "_key")
    required_choices: tuple[tuple[str, ...], ...]   # JSON keys of each choice group that must have one
    # By JSON key, what ``_build`` needs of a field as one tuple: (kind, attribute, many, adapter or model, choice).
    specs: dict[str, tuple[int, str, bool, Any, str | None]]
    # The one "resourceType" value an object of this model may carry: its own type name (the models accept it on
    # elements too); None for the abstract Resource and DomainResource.
    resource_type: str | None
    checks: bool                        # any required element, required primitive or required choice group
    # Built elements of this model, for the models whose elements recur from chart to chart (``_SHARED_BY_MEMBERS``
    # and ``_SHARED_BY_TEXT``); None for every other model.
    shared: _SharedTable | None


def _unwrap(annotation: Any) -> tuple[Any, bool, bool]:
    """(inner type, optional, list) of a model field's annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not _NONE]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    many = typing.get_origin(annotation) in (list, typing.List)  # noqa: UP006
    if many:
        annotation = typing.get_args(annotation)[0]
    return annotation, optional, many




# A dateTime or instant with date, time to the second and a time zone, whose second is not a leap second: the shape
# of nearly every date an EHR sends. Each part is within fhir_core's DateTime and Instant patterns (year 0001-9999,
# hours 00-23, offsets up to +-13:59 or +-14:00), in [0-9] only, as theirs.
_FULL_DATETIME = re.compile(
    r"(?!0000)[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]+)?(Z|[+\-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))")


def _with_datetime_fast_path(inner: Any, type_adapter: Any, adapter: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """For fhir_core's DateTime and Instant: a value of the full shape (``_FULL_DATETIME``) is read by
    ``datetime.fromisoformat``, or (when that refuses it) by the pydantic-core datetime validator those types wrap;
    everything else goes to the type's own validator.

    For such a value fhir_core's Python validator (about 3 µs a date: its pattern, partial-date and leap-second
    checks) ends in exactly that inner call: the pattern matches, it is no partial date and no leap second, and
    with its time zone the result is aware, as both types require. The inner validator (0.9 µs) and the stdlib
    (0.3 µs) read such a string as the same instant with the same wall clock and UTC offset; only the tzinfo's
    class differs (``datetime.timezone``, not pydantic's ``TzInfo``), which compares, converts and prints the same.
    What the stdlib refuses (a 30 February) the inner validator refuses too, with its own error. So the fast
    reader stays exact; ``tests/test_fhir_lite.py`` compares both on many strings."""
    metadata = typing.get_args(inner)[1:] if typing.get_origin(inner) is typing.Annotated else ()
    if len(metadata) != 1 or type(metadata[0]) not in (fhir_types.DateTime, fhir_types.Instant):
        return adapter
    core = type_adapter.core_schema
    if core.get("type") != "function-wrap" or core.get("schema", {}).get("type") != "datetime":
        return adapter  # not the shape this was written for (another fhir_core version): the type's own validator
    inner_validator = pydantic_core.SchemaValidator(core["schema"]).validate_python
    full = _FULL_DATETIME.fullmatch
    from_iso = datetime.fromisoformat

    def validate(value: Any) -> Any:
        if type(value) is str and full(value):
            # For this shape the stdlib's reading in C is the same instant, wall clock and UTC offset as the
            # inner validator's (its tzinfo a datetime.timezone rather than pydantic's TzInfo, which compare,
            # convert and print alike) in a third of the time; a value it refuses (a 30 February) goes to the
            # inner validator, which refuses it with its own error. tests/test_fhir_lite.py checks both ways.
            try:
                return from_iso(value)
            except ValueError:
                return inner_validator(value)
        return adapter(value)

    return validate


# Names a FHIR element could share with LiteElement's own attributes: never shadowed by a class attribute None.
_RESERVED_NAMES = frozenset(name for name in dir(LiteElement) if not name.startswith("__fhir"))

# Codes, references and who took part recur from chart to chart: the same codings and coded concepts in every
# record, the same practitioners, organizations and locations named by every patient's encounters and appointments
# (about 300 of the 500 elements of a 51-resource record). Elements of these models are built once and shared: the
# objects are read-only, and the same JSON gives the same object. Flat ones (Coding, Reference) are keyed by their
# members when all are strings (a str equals only an equal str, so an equal key is the same JSON); nested ones by
# their JSON text as orjson writes it (one text per JSON value: 1, 1.0 and true are different texts). A record's
# own dates, identifiers, narrative and attachments do not recur, so their models are not kept.
_SHARED_BY_MEMBERS = frozenset({"Coding", "Reference"})
_SHARED_BY_TEXT = frozenset({"CodeableConcept", "EncounterParticipant", "AppointmentParticipant"})
SHARED_ELEMENTS_MAX = 4096  # elements kept per model; the table is emptied if it ever fills
SHARED_SEEN_MAX = 8192  # keys' hashes remembered per model and generation (``SeenBefore``)


class _SharedTable:
    """The shared elements of one model, kept from their second sight: a patient's own references and concepts
    (seen once, in one chart) are never stored, so the table holds only what recurs and does not churn; a first
    sight costs the hash of its key in ``seen`` (a set of ints). Two keys of one hash only admit an element early:
    look-ups compare whole keys."""

    __slots__ = ("by_text", "elements", "is_reference", "seen")

    def __init__(self, by_text: bool, is_reference: bool = False) -> None:
        self.by_text = by_text
        self.is_reference = is_reference  # its elements' own "reference" goes to the references collected
        self.elements: dict[Any, LiteElement] = {}
        self.seen = SeenBefore(SHARED_SEEN_MAX)

    def offer(self, key: Any, element: LiteElement) -> None:
        """``element`` was built for ``key`` (not found): kept when ``key`` was seen before."""
        if self.seen.check(hash(key)):
            if len(self.elements) >= SHARED_ELEMENTS_MAX:
                self.elements.clear()
            self.elements[key] = element


_SCHEMAS: dict[type, _Schema] = {}  # _schema's answers, read directly on the hot path (a plain dict look-up)


def _schema(model: type) -> _Schema:
    found = _SCHEMAS.get(model)
    if found is None:  # two threads may build it at once: the first one stored is the one every caller gets
        found = _SCHEMAS.setdefault(model, _make_schema(model))
    return found


def _make_schema(model: type) -> _Schema:
    fields: dict[str, _Field] = {}
    required: list[_Field] = []
    element_required: list[tuple[str, str]] = []
    groups: dict[str, tuple[list[str], bool]] = {}
    names: set[str] = set()
    for name, info in model.model_fields.items():
        key = info.alias or name
        names.add(name)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        inner, optional, many = _unwrap(info.annotation)
        if name == "fhir_comments":
            kind, sub, adapter = _IGNORED, None, None
        elif name.endswith("__ext"):
            kind, sub, adapter = _EXTENSION, None, None
        elif isinstance(inner, type) and issubclass(inner, FhirBase):
            sub = inner.get_model_klass()
            kind = _RESOURCE if sub.__name__ in ("Resource", "DomainResource") else _MODEL
            adapter = None
        else:
            kind, sub = _PRIMITIVE, None
            type_adapter = pydantic.TypeAdapter(inner)
            # The pydantic-core validator itself (TypeAdapter.validate_python adds a Python frame per value).
            adapter = getattr(type_adapter, "validator", type_adapter).validate_python
            adapter = _with_datetime_fast_path(inner, type_adapter, adapter)
        choice = extra.get("one_of_many")
        field = _Field(name, kind, many, sub, adapter, kind in (_MODEL, _RESOURCE) and not optional,
                       bool(extra.get("element_required")), choice, bool(extra.get("one_of_many_required")))
        fields[key] = field
        if field.required:
            required.append(field)
        if field.element_required:
            element_required.append((key, f"_{key}"))
        if choice:
            keys, _ = groups.get(choice, ([], False))
            groups[choice] = ([*keys, key], field.choice_required)
    fhir_type = getattr(model, "__resource_type__", None) or model.__name__
    # Every declared element is also a class attribute None: an absent one then reads as None by the ordinary
    # look-up (about 35 ns) rather than through __getattr__ after a failed one (about 390 ns); the rules read
    # absent elements often (diagnosis, partOf, reasonReference...). Values set on an instance shadow them.
    namespace: dict[str, Any] = dict.fromkeys(names - _RESERVED_NAMES)
    namespace.update({"__fhir_type__": fhir_type, "__fhir_names__": frozenset(names), "__slots__": ()})
    lite = type(f"Lite{model.__name__}", (LiteElement,), namespace)
    specs = {key: (f.kind, f.name, f.many, f.adapter if f.kind == _PRIMITIVE else f.model, f.choice)
             for key, f in fields.items()}
    required_choices = tuple(tuple(keys) for keys, req in groups.values() if req)
    resource_type = None if model.__name__ in ("Resource", "DomainResource") else fhir_type
    return _Schema(lite, fields, tuple(required), tuple(element_required), required_choices, specs, resource_type,
                   bool(required or element_required or required_choices),
                   _SharedTable(model.__name__ in _SHARED_BY_TEXT, model.__name__ == "Reference")
                   if model.__name__ in _SHARED_BY_MEMBERS | _SHARED_BY_TEXT else None)


class _Refused(Exception):
    """This reader does not take the value; the full model decides."""


_CONTAINERS = (list, dict)
_STR_ONLY = {str}
# What a primitive's validator raises on a value it refuses (anything else: see read_resource).
_INVALID = (pydantic.ValidationError, ValueError, TypeError)


def _build(model: type, data: Any, refs: list[Any]) -> LiteElement:
    """One element (or resource) of ``model``; ``_Refused`` when the full model must decide. The ``reference``
    of every Reference element built or shared is appended to ``refs``.

    The hot loop of the fast reader (about 500 elements and 900 primitive values in a 51-resource record), written
    for CPython's speed: one tuple per field, one ``try`` around the whole walk (free in 3.11 until it raises), no
    per-value type unions."""
    if not isinstance(data, dict):
        raise _Refused
    schema = _SCHEMAS.get(model) or _schema(model)
    shared = table = schema.shared
    if table is not None:
        first_ref = len(refs)
        try:
            # orjson refuses what it cannot write exactly (an integer beyond 64 bits) with a TypeError; a member
            # that is a list (an extension) is unhashable: either way the element is built, not shared.
            members = orjson.dumps(data) if shared.by_text else tuple(data.items())
            found = shared.elements.get(members)
        except TypeError:
            shared = None
        else:
            if found is not None:
                refs += found.__fhir_refs__  # a shared element skips its walk: what the walk would have added
                return found
    values: dict[str, Any] = {}
    specs = schema.specs
    chosen: set[str] | None = None
    try:
        for key, raw in data.items():
            spec = specs.get(key)
            if spec is None:
                # "resourceType" is no element: accepted when it names the model's own type
                if key == "resourceType" and schema.resource_type is not None and raw == schema.resource_type:
                    continue
                raise _Refused  # unknown element: the full parser notes it
            if raw is None:
                raise _Refused
            kind, name, many, target, choice = spec
            if choice is not None:  # value[x]: at most one element of the group (fhir_core _validate_one_of_many)
                if chosen is None:
                    chosen = {choice}
                elif choice in chosen:
                    raise _Refused
                else:
                    chosen.add(choice)
            if kind == _PRIMITIVE:
                if many:
                    if not isinstance(raw, list) or not raw:
                        raise _Refused
                    items = []
                    for item in raw:
                        if item is None:
                            raise _Refused
                        items.append(target(item))
                    values[name] = items
                else:
                    if isinstance(raw, _CONTAINERS):
                        raise _Refused
                    values[name] = target(raw)
            elif kind == _MODEL:
                if many:
                    if not isinstance(raw, list) or not raw:
                        raise _Refused
                    values[name] = [_build(target, item, refs) for item in raw]
                else:
                    values[name] = _build(target, raw, refs)
            elif kind == _RESOURCE:
                if many:
                    if not isinstance(raw, list) or not raw:
                        raise _Refused
                    values[name] = [_build_resource(item, refs) for item in raw]
                else:
                    values[name] = _build_resource(raw, refs)
            elif kind == _EXTENSION:
                raise _Refused  # primitive extensions (_status): rare; the full model reads them
            # _IGNORED (fhir_comments): not read
    except _INVALID:
        raise _Refused from None
    if schema.checks:
        for field in schema.required:
            if field.name not in values:
                raise _Refused
        for key, ext in schema.element_required:
            if key not in data and ext not in data:
                raise _Refused
        for keys in schema.required_choices:
            if not any(k in data for k in keys):
                raise _Refused
    element = object.__new__(schema.cls)
    object.__setattr__(element, "__dict__", values)
    if table is not None:  # a model whose elements may be shared (even when this one cannot be: a list member)
        if table.is_reference and "reference" in values:
            refs.append(values["reference"])
        object.__setattr__(element, "__fhir_refs__", tuple(refs[first_ref:]))
        if shared is not None and (shared.by_text or set(map(type, data.values())) == _STR_ONLY):
            shared.offer(members, element)
    return element


def _build_resource(item: Any, refs: list[Any]) -> LiteElement:
    """A contained resource (or a Bundle entry's): its own type's model, by its ``resourceType``."""
    if not isinstance(item, dict) or not isinstance(item.get("resourceType"), str):
        raise _Refused
    model = resource_model(item["resourceType"])
    if model is None:
        raise _Refused
    return _build(model, item, refs)


@cache
def resource_model(resource_type: str) -> type | None:
    try:
        cls = get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError, ModuleNotFoundError):
        return None
    return cls if getattr(cls, "__resource_type__", None) == resource_type else None


def read_resource(model: type, data: dict[str, Any]) -> LiteElement | None:
    """The resource as a light read-only object when it is plainly valid for ``model``; None when the full model
    must decide (unknown elements, invalid or unusual values)."""
    refs: list[Any] = []
    try:
        resource = _build(model, data, refs)
    except (_Refused, RecursionError):
        return None
    except Exception:  # a validator's own error on an odd value (fhir_core's Url validator raises AttributeError
        return None    # for a number): the full model decides, and skips it
    object.__setattr__(resource, "__fhir_refs__", tuple(refs))
    return resource


def references_of(resource: Any) -> tuple[str, ...] | None:
    """The ``reference`` strings of the Reference elements in a resource :func:`read_resource` gave (contained
    resources and extensions included), or None for anything else: a full model, or no resource."""
    return getattr(resource, "__fhir_refs__", None) if isinstance(resource, LiteElement) else None
