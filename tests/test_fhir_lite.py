"""The fast reader (cds_service/fhir/lite.py) reads exactly what the full fhir.resources model reads, or declines.

Two promises, checked against the full model itself: on every resource of every fixture and of the realistic
benchmark records it accepts and gives the same value for every element; and on resources broken in random places
it never accepts what the full model refuses or repairs, and never gives a different value.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cds_service.fhir.lite import LiteElement, read_resource, references_of, resource_model
from cds_service.fhir.parse import parse_resource

ROOT = Path(__file__).resolve().parent.parent


def _fixture_resources() -> list[dict[str, Any]]:
    found = []
    for path in sorted((ROOT / "fhir_fixtures").glob("*.json")):
        document = json.loads(path.read_text("utf-8"))
        if isinstance(document, dict):
            found += [e["resource"] for e in document.get("entry", []) if isinstance(e.get("resource"), dict)]
    return found


def _bench_resources() -> list[dict[str, Any]]:
    from bench.realistic import shifted_text
    from bench.records import TZ, instantiate

    found = []
    for hook in ("encounter-discharge", "appointment-book"):
        document = json.loads(instantiate(shifted_text(hook, "50", datetime.now(TZ)), 11))
        for value in document["prefetch"].values():
            if isinstance(value, dict) and value.get("resourceType") == "Bundle":
                found += [e["resource"] for e in value.get("entry", []) if isinstance(e.get("resource"), dict)]
            elif isinstance(value, dict):
                found.append(value)
    return found


FIXTURES = _fixture_resources()


def _full(data: dict[str, Any]) -> tuple[Any, list[str], Any]:
    model = resource_model(data["resourceType"])
    assert model is not None
    try:
        return model.model_validate(copy.deepcopy(data)), [], None
    except Exception as exc:
        return None, [], exc


def assert_same(full: Any, lite: Any, path: str) -> None:
    if isinstance(lite, LiteElement):
        assert full is not None and full.get_resource_type() == lite.get_resource_type(), path
        for name in type(full).model_fields:
            if name == "fhir_comments" or name.endswith("__ext"):
                continue
            assert_same(getattr(full, name), getattr(lite, name), f"{path}.{name}")
    elif isinstance(lite, list):
        assert isinstance(full, list) and len(full) == len(lite), path
        for i, (a, b) in enumerate(zip(full, lite, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert type(full) is type(lite) and full == lite, (path, full, lite)


def test_every_fixture_and_benchmark_resource_reads_the_same_both_ways() -> None:
    resources = FIXTURES + _bench_resources()
    assert len(resources) > 1000
    for data in resources:
        model = resource_model(data["resourceType"])
        lite = read_resource(model, data)
        assert lite is not None, f"{data['resourceType']}/{data.get('id')} declined"
        full, _, refused = _full(data)
        assert refused is None
        assert_same(full, lite, data["resourceType"])


def test_the_references_collected_are_those_of_the_json() -> None:
    """``references_of``: every ``reference`` of the resource's JSON (contained resources and extensions too),
    also when its elements come from the shared tables (the second reading)."""
    from cds_service.rules.facts import references_in

    for _reading in range(2):
        for data in FIXTURES + _bench_resources():
            lite = read_resource(resource_model(data["resourceType"]), data)
            assert sorted(references_of(lite) or ()) == sorted(references_in(data)), data.get("id")
    assert references_of(None) is None
    full, _, _ = parse_resource({"resourceType": "Media", "id": "m", "status": "completed", "madeUp": 1,
                                 "content": {"contentType": "image/png"}, "partOf": [{"reference": "Media/x"}]})
    assert full is not None and references_of(full) is None  # a full model: the caller searches the JSON


def test_parse_resource_uses_the_fast_reader_for_valid_and_the_full_model_for_the_rest() -> None:
    valid = {"resourceType": "Communication", "id": "c1", "status": "completed",
             "subject": {"reference": "Patient/p1"}, "sent": "2026-01-05T10:00:00-05:00"}
    model, dropped, skipped = parse_resource(valid)
    assert isinstance(model, LiteElement) and dropped == [] and skipped is None
    assert model.sent == datetime.fromisoformat("2026-01-05T10:00:00-05:00")
    assert model.received is None and model.get_resource_type() == "Communication"
    with pytest.raises(AttributeError):
        _ = model.notAnElement
    with pytest.raises(AttributeError):
        model.status = "stopped"  # read-only: shared across calls and threads
    # An unknown element: the full model drops it with a note, as before.
    model, dropped, skipped = parse_resource({**valid, "madeUp": 1})
    assert model is not None and not isinstance(model, LiteElement) and dropped == ["madeUp"]
    # An invalid value: skipped with a reason, as before.
    model, _, skipped = parse_resource({**valid, "sent": "yesterday"})
    assert model is None and skipped is not None and "sent" in skipped.reason


def test_required_elements_and_choice_groups_are_checked() -> None:
    encounter = {"resourceType": "Encounter", "id": "e1", "status": "finished",
                 "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR"}}
    assert read_resource(resource_model("Encounter"), encounter) is not None
    no_status = {k: v for k, v in encounter.items() if k != "status"}
    no_class = {k: v for k, v in encounter.items() if k != "class"}
    for broken in (no_status, no_class):
        assert read_resource(resource_model("Encounter"), broken) is None
        assert _full(broken)[0] is None  # the full model refuses them too
    observation = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
                   "valueString": "a", "valueBoolean": True}
    assert read_resource(resource_model("Observation"), observation) is None
    assert _full(observation)[0] is None


# Values that break resources in the ways servers do: wrong JSON types, empty strings and arrays, bad dates.
_ODD_VALUES = st.sampled_from([
    None, "", " padded ", "two  spaces", 0, -1, 1.5, True, [], [None], {}, {"reference": 5}, "2026-13-01",
    "2026-02-30", "2026-01-05T10:00:00", "2026-01-05T25:00:00Z", "2026", "2026-01", "yesterday", "x" * 80,
    [{"text": "a"}], {"text": "a"}, ["a"], "Patient/p1",
])


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            if key != "resourceType":
                found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += _paths(child, (*prefix, i))
    return found


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0), st.integers(min_value=0), _ODD_VALUES, st.booleans())
def test_a_broken_resource_is_never_read_differently(which: int, where: int, odd: Any, add: bool) -> None:
    data = copy.deepcopy(FIXTURES[which % len(FIXTURES)])
    paths = _paths(data)
    path = paths[where % len(paths)]
    target = data
    for part in path[:-1]:
        target = target[part]
    if add and isinstance(target, dict):
        target[f"{path[-1]}"] = odd
    elif isinstance(target, list):
        target[path[-1]] = odd
    else:
        target[path[-1]] = odd
    lite = read_resource(resource_model(data["resourceType"]), data)
    if lite is None:
        return  # declined: the full model decides, as before
    full, _, refused = _full(data)
    assert refused is None, f"the fast reader accepted what the full model refuses at {path}: {refused}"
    assert_same(full, lite, data["resourceType"])


def _date_adapters() -> list[tuple[Any, Any]]:
    """(fast reader's validator, fhir_core's own) for dateTime and instant."""
    import pydantic
    from fhir.resources.R4B.meta import Meta
    from fhir.resources.R4B.period import Period

    from cds_service.fhir import lite

    pairs = []
    for model, name in ((Period, "start"), (Meta, "lastUpdated")):
        field = lite._schema(model).fields[name]
        inner, _, _ = lite._unwrap(model.model_fields[name].annotation)
        pairs.append((field.adapter, pydantic.TypeAdapter(inner).validate_python))
    return pairs


_DATE_ADAPTERS = _date_adapters()
_DIGITS = st.sampled_from([*"0123456789", "\u0663"])  # and an Arabic-Indic three: a digit to \\d, not to [0-9]


@settings(max_examples=600, deadline=None)
@example(("2016-12-31T23:59:60Z",))  # a leap second: fhir_core keeps the string
@example(("2024-02-30T10:00:00Z",))  # no such day
@example(("2024-02-29T10:00:00.123456789+14:00",))
@example(("2024-02-28T10:00:00-14:30",))
@example(("0000-01-01T00:00:00Z",))
@example(("2024-01-01T00:00:00",))  # no time zone
@example(("2024-01-0\u0663T00:00:00Z",))
@example(("2024-01-01T24:00:00Z",))
@example(("2024-01-01T23:59:59.5Z",))
@given(st.tuples(st.text(_DIGITS, min_size=4, max_size=4), st.sampled_from(["01", "02", "12", "13", "00", "1"]),
                 st.sampled_from(["01", "28", "29", "30", "31", "32", "00"]), st.sampled_from(["T", "t", " "]),
                 st.sampled_from(["00", "23", "24", "9"]), st.sampled_from([":00", ":59", ":60", ""]),
                 st.sampled_from([":00", ":59", ":60", ":61", ""]), st.sampled_from(["", ".5", ".123456789", "."]),
                 st.sampled_from(["Z", "z", "", "+00:00", "-05:00", "+13:59", "+14:00", "-14:30", "+1400", "+24:00"]))
       | st.text(max_size=30).map(lambda s: (s,)))
def test_dates_of_the_full_shape_read_as_fhir_core_reads_them(parts: tuple[str, ...]) -> None:
    """The fast path for dateTime and instant (``lite._FULL_DATETIME``) gives fhir_core's value, or refuses."""
    value = f"{parts[0]}-{parts[1]}-{parts[2]}{''.join(parts[3:])}" if len(parts) > 1 else parts[0]
    for fast, own in _DATE_ADAPTERS:
        try:
            expected: Any = own(value)
        except Exception as exc:  # either way, both must refuse
            expected = type(exc)
        try:
            got: Any = fast(value)
        except Exception as exc:
            got = type(exc)
        assert got == expected and type(got) is type(expected)
        if isinstance(got, datetime):
            assert got.utcoffset() == expected.utcoffset() and got.isoformat() == expected.isoformat()


def test_codings_references_and_concepts_that_recur_are_kept_from_their_second_sight_and_shared() -> None:
    """Codes, references and who took part recur from chart to chart: elements of those models are kept from
    their second sight and handed out again for the same JSON; one seen once (a patient's own reference) is not
    kept; an element refused is not kept."""
    from uuid import uuid4

    from cds_service.fhir import lite

    tag = uuid4().hex  # values no earlier test has read (the tables live as long as the process)

    def media(code: Any, reference: Any = f"Practitioner/p-{tag}", patient: str = f"Patient/{tag}-1") -> dict[str, Any]:
        return {"resourceType": "Media", "status": "completed", "subject": {"reference": patient},
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/media-type",
                                     "code": code}]},
                "operator": {"reference": reference}, "content": {"contentType": "image/jpeg"}}

    model = resource_model("Media")
    code = f"image-{tag}"
    first, second, third = (read_resource(model, media(code)) for _ in range(3))
    assert first is not None and second is not None and third is not None and second is not third
    assert first.type.coding[0] is not second.type.coding[0]  # a first sight is remembered, not kept
    assert second.type.coding[0] is third.type.coding[0] and second.operator is third.operator
    assert second.type is third.type  # a coded concept, keyed by its JSON text
    assert second.subject is third.subject and third.identifier is None and third.status == "completed"
    references = lite._schema(resource_model("Reference")).shared
    assert references is not None
    read_resource(model, media(code, patient=f"Patient/{tag}-2"))  # another patient's chart, seen once
    assert ((("reference", f"Patient/{tag}-1"),) in references.elements
            and (("reference", f"Patient/{tag}-2"),) not in references.elements)
    # Same text, another JSON type: decided on its own (the full model refuses a number for a code), never shared.
    assert read_resource(model, media(1)) is None
    full, _notes, error = _full(media(1))
    assert full is None and error is not None
    # A refused element is not kept: the same members are refused again.
    for _ in range(3):
        assert read_resource(model, media(code, reference=7)) is None
    # By text, 1 and true are different keys (equal ones in Python): each is read on its own.
    for flag, expected in ((True, True), (1, True), (False, False), (0, False)) * 2:
        flagged = media(code)
        flagged["type"]["coding"][0]["userSelected"] = flag
        full, _notes, _error = _full(flagged)
        got = read_resource(model, flagged)
        assert got.type.coding[0].userSelected is expected is full.type.coding[0].userSelected
    # Only flat elements of string members are kept by their members (1, 1.0 and True are equal keys in Python).
    codings = lite._schema(resource_model("Coding")).shared
    assert codings is not None and codings.elements
    assert all(all(type(v) is str for _k, v in key) for key in codings.elements)


def test_the_tables_of_shared_elements_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from cds_service.fhir import lite

    monkeypatch.setattr(lite, "SHARED_ELEMENTS_MAX", 5)
    model = resource_model("Media")
    table = lite._schema(resource_model("Reference")).shared
    assert table is not None
    monkeypatch.setattr(table.seen, "max_size", 7)
    for n in range(40):
        for _ in range(2):  # each reference twice: kept from its second sight
            data = {"resourceType": "Media", "status": "completed", "content": {"contentType": "image/png"},
                    "subject": {"reference": f"Patient/bounded-{n}"}}
            element = read_resource(model, data)
            assert element is not None and element.subject.reference == f"Patient/bounded-{n}"
        assert len(table.elements) <= 5 and len(table.seen.newer) < 7
    assert len(table.seen.older) == 7  # the newer generation became the older one when full (several times)
