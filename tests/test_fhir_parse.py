"""parse_resource / ResourceBag: tolerant R4B parsing, PHI-free skip reasons, reference resolution."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.patient import Patient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.fhir.parse import add_raw, parse_item, parse_resource
from cds_service.record import ResourceBag, SkippedResource

FAKE_NAME = "Zzyzx Testpatient"
BASE = "https://fhir.example.org/r4"


def patient(pid: str = "p1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": "Zzyzx", "given": ["Testpatient"]}],
        **extra,
    }


def communication(cid: str = "c1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Communication",
        "id": cid,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "sender": {"reference": "Patient/p1"},
        "recipient": [{"reference": "Practitioner/dr1"}],
        "received": "2024-03-04T10:00:00Z",
        "payload": [{"contentAttachment": {"contentType": "image/jpeg", "url": "Binary/b1"}}],
        **extra,
    }


def media(mid: str = "m1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Media",
        "id": mid,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "operator": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "createdDateTime": "2024-03-04T09:55:00Z",
        "issued": "2024-03-04T10:00:00Z",
        "content": {"contentType": "video/mp4", "url": "Binary/v1"},
        **extra,
    }


def assert_no_values(reason: str) -> None:
    for fragment in ("Zzyzx", "Testpatient", "555-", "1970", "not-a-date", "@example.org"):
        assert fragment not in reason


# -- parse_resource: valid --


def test_valid_resource_is_parsed() -> None:
    model, dropped, skipped = parse_resource(communication())
    assert model is not None and model.get_resource_type() == "Communication"
    assert dropped == [] and skipped is None
    assert model.id == "c1"
    assert model.status == "completed"
    assert model.subject.reference == "Patient/p1"
    assert model.payload[0].contentAttachment.contentType == "image/jpeg"


def test_media_r4_resource_is_parsed() -> None:
    model, dropped, skipped = parse_resource(media())
    assert model is not None
    assert skipped is None and dropped == []
    assert model.get_resource_type() == "Media"
    assert model.content.contentType == "video/mp4"
    assert model.operator.reference == "Patient/p1"
    assert model.encounter.reference == "Encounter/e1"


def test_minimal_resource_without_id_is_parsed() -> None:
    model, _, skipped = parse_resource({"resourceType": "Patient"})
    assert model is not None and model.get_resource_type() == "Patient" and model.id is None and skipped is None


def test_bundle_with_entries_is_parsed() -> None:
    data = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": communication()}]}
    model, _, skipped = parse_resource(data)
    assert skipped is None
    assert model.entry[0].resource.get_resource_type() == "Communication"


def test_primitive_extensions_are_accepted() -> None:
    data = patient(
        birthDate="1970-01-01", _birthDate={"extension": [{"url": "http://x", "valueString": "y"}]}
    )
    model, dropped, skipped = parse_resource(data)
    assert skipped is None and dropped == []
    assert str(model.birthDate) == "1970-01-01"


# -- parse_resource: unknown elements --


def test_unknown_top_level_and_nested_elements_are_dropped_and_noted() -> None:
    data = patient(
        epicInternalFlag=True,
        name=[{"family": "Zzyzx", "given": ["Testpatient"], "nickname": "Zz"}],
        telecom=[
            {"system": "phone", "value": "555-0100"},
            {"system": "email", "value": "z@example.org", "x": 1},
        ],
        meta={"versionId": "1", "vendorTag": "abc"},
    )
    original = copy.deepcopy(data)
    model, dropped, skipped = parse_resource(data)
    assert isinstance(model, Patient)
    assert skipped is None
    assert sorted(dropped) == ["epicInternalFlag", "meta.vendorTag", "name.0.nickname", "telecom.1.x"]
    assert model.name[0].family == "Zzyzx"
    assert model.telecom[1].value == "z@example.org"
    assert model.meta.versionId == "1"
    assert data == original  # the caller's dict is not modified


def test_unknown_elements_in_contained_and_extension_are_dropped() -> None:
    data = patient(
        contained=[{"resourceType": "Practitioner", "id": "dr", "vendor": 1}],
        extension=[{"url": "http://example.org/x", "valueString": "v", "vendor": 2}],
    )
    model, dropped, skipped = parse_resource(data)
    assert skipped is None
    assert sorted(dropped) == ["contained.0.vendor", "extension.0.vendor"]
    assert model.contained[0].get_resource_type() == "Practitioner"


def test_unknown_choice_type_variant_is_dropped() -> None:
    data = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"text": "x"},
        "valueFancy": {"a": 1},
    }
    _, dropped, skipped = parse_resource(data)
    assert skipped is None and dropped == ["valueFancy"]


def test_many_unknown_elements_are_all_dropped() -> None:
    data = patient(**{f"vendor{i}": i for i in range(30)})
    model, dropped, skipped = parse_resource(data)
    assert skipped is None and model is not None
    assert len(dropped) == 30


def test_unknown_element_plus_invalid_value_is_skipped() -> None:
    data = patient(vendor=1, birthDate="not-a-date")
    model, dropped, skipped = parse_resource(data)
    assert model is None and dropped == []
    assert skipped is not None
    assert "birthDate" in skipped.reason
    assert_no_values(skipped.reason)


# -- parse_resource: invalid resources --


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (patient(name=FAKE_NAME), "name"),
        (patient(gender=[FAKE_NAME]), "gender"),
        (patient(active=FAKE_NAME), "active"),
        (patient(birthDate=FAKE_NAME), "birthDate"),
        (patient(telecom=[{"system": "phone", "value": "555-0100", "rank": FAKE_NAME}]), "telecom.0.rank"),
        (patient(name=[{"family": "Zzyzx", "period": {"start": FAKE_NAME}}]), "name.0.period.start"),
        (patient(meta={"lastUpdated": FAKE_NAME}), "meta.lastUpdated"),
        (communication(sent=FAKE_NAME), "sent"),
        (communication(status={"code": FAKE_NAME}), "status"),
        (
            {
                "resourceType": "Patient",
                "id": "p1",
                "contained": [{"resourceType": "Practitioner", "name": FAKE_NAME}],
            },
            "contained.0.name",
        ),
    ],
    ids=[
        "name-not-list",
        "code-is-list",
        "bool",
        "date",
        "int",
        "nested-date",
        "instant",
        "datetime",
        "code-is-object",
        "contained",
    ],
)
def test_invalid_resource_is_skipped_with_phi_free_reason(data: dict[str, Any], path: str) -> None:
    model, dropped, skipped = parse_resource(data)
    assert model is None and dropped == []
    assert isinstance(skipped, SkippedResource)
    assert skipped.reference == f"{data['resourceType']}/{data['id']}"
    assert skipped.reason.startswith("invalid: ")
    assert path in skipped.reason
    assert FAKE_NAME not in skipped.reason
    assert_no_values(skipped.reason)


def test_missing_required_element_is_skipped() -> None:
    data = communication()
    del data["status"]
    _, _, skipped = parse_resource(data)
    assert skipped is not None and "status" in skipped.reason


def test_conflicting_choice_elements_are_skipped() -> None:
    _, _, skipped = parse_resource(patient(deceasedBoolean=True, deceasedDateTime="2020-01-01"))
    assert skipped is not None and skipped.reason.startswith("invalid: ")


def test_non_string_id_is_skipped_without_reference() -> None:
    _, _, skipped = parse_resource({"resourceType": "Patient", "id": 12345, "name": FAKE_NAME})
    assert skipped is not None
    assert skipped.reference is None
    assert "12345" not in skipped.reason and FAKE_NAME not in skipped.reason


def test_skip_reason_lists_at_most_five_problems() -> None:
    data = patient(active="x", birthDate="x", gender=[1], name="x", telecom="x", multipleBirthInteger="x")
    _, _, skipped = parse_resource(data)
    assert skipped is not None
    assert skipped.reason.count("(") <= 5


def test_code_outside_the_value_set_is_not_rejected_by_fhir_resources() -> None:
    # fhir.resources 8.3 does not enforce required bindings: a status outside the value set parses, so rules
    # must compare codes themselves (e.g. Communication.status == "completed"), never trust "it parsed".
    model, _, skipped = parse_resource(communication(status="bogus-status"))
    assert skipped is None
    assert model.status == "bogus-status"


# -- parse_resource: not a resource --


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"id": "p1", "name": FAKE_NAME},
        {"resourceType": None},
        {"resourceType": 7},
        [patient()],
        FAKE_NAME,
        None,
        3,
    ],
    ids=["empty", "no-type", "null-type", "int-type", "list", "string", "none", "int"],
)
def test_data_without_resource_type_is_skipped(data: Any) -> None:
    model, dropped, skipped = parse_resource(data)
    assert model is None and dropped == []
    assert skipped == SkippedResource(None, "not a FHIR resource (no resourceType)")


@pytest.mark.parametrize(
    "rtype", ["Foo", "patient", "", "Bundle.entry", "fhirtypes", "__init__", "../Patient"]
)
def test_unknown_resource_type_is_skipped(rtype: str) -> None:
    model, dropped, skipped = parse_resource({"resourceType": rtype, "id": "x1", "name": FAKE_NAME})
    assert model is None and dropped == []
    assert skipped is not None
    assert skipped.reason == f"unknown resource type {rtype!r}"
    assert FAKE_NAME not in skipped.reason


@pytest.mark.parametrize("rtype", ["HumanName", "Reference", "Element", "Resource", "DomainResource"])
def test_non_resource_fhir_type_names_are_skipped(rtype: str) -> None:
    model, _, skipped = parse_resource({"resourceType": rtype, "id": "x1"})
    assert model is None
    assert skipped is not None and "unknown resource type" in skipped.reason


# -- parse_resource never raises --

_TYPES = ["Patient", "Communication", "Media", "Encounter", "Observation", "Coverage", "ChargeItem", "Bundle"]
_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=6)
_json = st.recursive(
    _scalar,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)


@st.composite
def _resources(draw: st.DrawFn) -> dict[str, Any]:
    rtype = draw(st.sampled_from(_TYPES))
    fields = sorted(get_fhir_model_class(rtype).model_fields)
    keys = draw(st.lists(st.sampled_from(fields) | st.text(max_size=5), max_size=5))
    data = {key: draw(_json) for key in keys}
    data["resourceType"] = rtype
    return data


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_resources())
def test_parse_resource_never_raises(data: dict[str, Any]) -> None:
    snapshot = copy.deepcopy(data)
    model, dropped, skipped = parse_resource(data)
    assert (model is None) != (skipped is None)
    if skipped is not None:
        assert dropped == []
    assert data == snapshot


# -- ResourceBag --


def test_bag_collects_by_type_and_counts() -> None:
    bag = ResourceBag()
    add_raw(bag, [patient(), communication(), media(), communication("c2")])
    assert len(bag) == 4
    assert sorted(c.id for c in bag.of_type("Communication")) == ["c1", "c2"]
    assert [m.id for m in bag.of_type("Media")] == ["m1"]
    assert bag.of_type("Encounter") == []
    assert sorted(r.get_resource_type() for r in bag) == [
        "Communication",
        "Communication",
        "Media",
        "Patient",
    ]
    assert bag.skipped == [] and bag.notes == []


def test_bag_deduplicates_by_type_and_id() -> None:
    bag = ResourceBag()
    add_raw(bag, [communication(status="in-progress")])
    add_raw(bag, [communication(status="completed"), patient("c1")])  # same id, other type: both kept
    assert len(bag) == 2
    assert [c.status for c in bag.of_type("Communication")] == ["completed"]  # the later copy wins
    assert bag.get("Patient/c1") is not None


def test_a_repeat_within_one_record_is_parsed_once_and_still_wins_as_the_last(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The context encounter comes in "encounter" and in "encounters": one parse per record (``earlier``)."""
    import cds_service.fhir.parse as parse_module

    parsed: list[str] = []
    real = parse_module.PARSE_CACHE.parse

    def counting(data: Any, key: Any = None) -> Any:
        parsed.append(f"{data.get('resourceType')}/{data.get('status')}")
        return real(data, key)

    monkeypatch.setattr(parse_module.PARSE_CACHE, "parse", counting)
    bag: ResourceBag = ResourceBag()
    earlier: dict[Any, Any] = {}
    add_raw(bag, [communication(status="completed")], earlier)
    add_raw(bag, [copy.deepcopy(communication(status="completed")), patient()], earlier)
    assert parsed == ["Communication/completed", "Patient/None"]
    # Same key, other content: parsed, and the later copy wins; a repeat of it: not parsed, and still the last.
    add_raw(bag, [communication(status="in-progress")], earlier)
    assert [c.status for c in bag.of_type("Communication")] == ["in-progress"]
    add_raw(bag, [communication(status="completed"), communication(status="completed")], earlier)
    assert parsed[2:] == ["Communication/in-progress", "Communication/completed"]
    assert [c.status for c in bag.of_type("Communication")] == ["completed"]
    add_raw(bag, [communication(status="in-progress"), communication(status="completed")], earlier)
    assert [c.status for c in bag.of_type("Communication")] == ["completed"]
    # Notes and skips repeat as they did when each copy was parsed.
    add_raw(bag, [patient(vendorNote="x"), patient(vendorNote="x")], earlier)
    assert bag.notes == ["Patient/p1: ignored unknown elements vendorNote"] * 2
    broken = {"resourceType": "Media", "id": "m9", "status": 5}
    add_raw(bag, [broken, dict(broken)], earlier)
    assert [s.reference for s in bag.skipped] == ["Media/m9", "Media/m9"]
    # Without ``earlier`` (the population audit: its JSON is not kept), every copy is parsed.
    before = len(parsed)
    add_raw(bag, [communication(status="completed"), communication(status="completed")])
    assert len(parsed) == before + 2


def test_a_hook_call_parses_the_context_encounter_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a hook: the discharge fixture's encounter is prefetched under "encounter" and in "encounters"."""
    import json
    from datetime import datetime
    from pathlib import Path

    import cds_service.fhir.parse as parse_module
    from cds_service.fhir.source import DataSource
    from hooks.gather import gather_episode

    body = json.loads((Path(__file__).resolve().parents[1] / "fhir_fixtures" / "requests" /
                       "encounter-discharge.json").read_text("utf-8"))
    encounter_id = body["context"]["encounterId"]
    assert any(e["resource"].get("id") == encounter_id for e in body["prefetch"]["encounters"]["entry"])
    parsed: list[str] = []
    real = parse_module.parse_resource

    def counting(data: Any) -> Any:
        parsed.append(f"{data.get('resourceType')}/{data.get('id')}")
        return real(data)

    monkeypatch.setattr(parse_module, "parse_resource", counting)
    parse_module.PARSE_CACHE.clear()
    now = datetime.fromisoformat("2026-11-18T15:40:00-05:00")
    source = DataSource(body["prefetch"], None, None, float("inf"))
    data = gather_episode(source, patient_id=body["context"]["patientId"], now=now, encounter_id=encounter_id)
    assert data.encounter is not None and data.encounter.id == encounter_id
    assert parsed.count(f"Encounter/{encounter_id}") == 1
    assert len(parsed) == len(set(parsed))  # nothing the request holds twice is parsed twice
    assert data.parsed_sources == {}  # the JSON is let go when gathering ends (a fallback's answers go with it)


def test_bag_keeps_resources_without_id_apart() -> None:
    bag = ResourceBag()
    anonymous = communication()
    del anonymous["id"]
    add_raw(bag, [anonymous, copy.deepcopy(anonymous)])
    assert len(bag.of_type("Communication")) == 2


def test_bag_skips_invalid_and_keeps_going() -> None:
    bag = ResourceBag()
    add_raw(bag, [patient(birthDate=FAKE_NAME), {"resourceType": "Nope", "id": "n1"}, "junk", communication()])
    assert len(bag) == 1
    assert [s.reference for s in bag.skipped] == ["Patient/p1", "Nope/n1", None]
    for skipped in bag.skipped:
        assert FAKE_NAME not in skipped.reason


def test_bag_notes_dropped_elements_without_values() -> None:
    bag = ResourceBag()
    add_raw(bag, [patient(vendorNote=FAKE_NAME, name=[{"family": "Zzyzx", "vendorName": FAKE_NAME}])])
    assert bag.notes == ["Patient/p1: ignored unknown elements name.0.vendorName, vendorNote"]
    assert FAKE_NAME not in bag.notes[0]
    assert bag.get("Patient/p1").name[0].family == "Zzyzx"


@pytest.mark.parametrize(
    "reference",
    [
        "Media/m1",
        f"{BASE}/Media/m1",
        "Media/m1/_history/3",
        f"{BASE}/Media/m1/_history/3",
        "Media/m1/",
        "http://other.example.org/fhir/Media/m1",
    ],
)
def test_bag_resolves_relative_absolute_and_history_references(reference: str) -> None:
    bag = ResourceBag()
    add_raw(bag, [media(), communication(payload=[{"contentReference": {"reference": reference}}])])
    comm = bag.get("Communication/c1")
    resolved = bag.get(comm.payload[0].contentReference.reference)
    assert resolved is not None and resolved.get_resource_type() == "Media"
    assert resolved.id == "m1"


@pytest.mark.parametrize(
    "reference",
    [
        None,
        "",
        "Media",
        "m1",
        "Media/unknown",
        "Patient/m1",
        "#m1",
        "urn:uuid:1234",
        "Media?identifier=x",
        "Media/_history/3",
        "/",
    ],
)
def test_bag_returns_none_for_unresolvable_references(reference: str | None) -> None:
    bag = ResourceBag()
    add_raw(bag, [media()])
    assert bag.get(reference) is None


def test_parse_cache_reuses_models_and_stays_bounded() -> None:
    from cds_service.fhir.parse import ParseCache

    cache = ParseCache(max_entries=3)
    media = {"resourceType": "Media", "id": "m1", "status": "completed", "content": {"contentType": "image/png"}}
    cache.parse(media)
    assert not cache._entries  # seen once: only its key is noted
    first = cache.parse(dict(media))  # seen again: kept
    second = cache.parse(dict(media))
    assert first[0] is second[0] and (cache.hits, cache.misses) == (1, 2)
    changed = cache.parse({**media, "status": "entered-in-error"})
    assert changed[0] is not first[0] and changed[0].status == "entered-in-error"
    for _ in range(2):
        for i in range(5):
            cache.parse({**media, "id": f"m{i + 2}"})
    assert len(cache._entries) == 3  # least recently used out
    skipped = cache.parse({"resourceType": "Media", "status": 5})
    assert skipped[0] is None and skipped[2] is not None


def test_parse_cache_needs_equal_content_not_just_the_same_version() -> None:
    from cds_service.fhir.parse import ParseCache

    cache = ParseCache(max_entries=8)
    media = {"resourceType": "Media", "id": "m1", "meta": {"versionId": "1"}, "status": "completed",
             "content": {"contentType": "image/png"}}
    cache.parse(media)
    first = cache.parse(media)
    # A server that edits a resource in place without bumping versionId still gets a fresh parse...
    edited = cache.parse({**media, "status": "entered-in-error"})
    assert edited[0] is not first[0] and edited[0].status == "entered-in-error"
    again = cache.parse(dict(media))  # and back: compared with what was parsed last, not what was seen first
    assert again[0].status == "completed"
    assert cache.hits == 0


def test_parse_cache_keeps_a_resource_only_from_its_second_sight_and_forgets_old_keys() -> None:
    from cds_service.fhir.parse import ParseCache

    cache = ParseCache(max_entries=8, max_seen=4)
    def media(i: int) -> dict:
        return {"resourceType": "Media", "id": f"m{i}", "status": "completed", "content": {"contentType": "image/png"}}

    for i in range(20):  # one chart after another: nothing is kept, the keys stay bounded
        cache.parse(media(i))
    assert not cache._entries and len(cache._seen) <= 2 * 4
    cache.parse(media(0))  # forgotten long ago: noted again, not kept
    assert not cache._entries
    cache.parse(media(19))  # seen recently: kept now, answered from the cache from the next sight on
    assert list(cache._entries) == [("Media", "m19")]
    hit = cache.parse(media(19))
    assert cache.hits == 1 and hit[0].id == "m19"
    cache.clear()
    cache.parse(media(19))
    assert not cache._entries and cache.hits == 1


def test_long_lists_are_parsed_without_the_cache() -> None:
    from cds_service.fhir.parse import CACHED_LIST_LENGTH, PARSE_CACHE

    many = [{"resourceType": "Media", "id": f"bulk-{i}", "status": "completed",
             "content": {"contentType": "image/png"}} for i in range(CACHED_LIST_LENGTH + 1)]
    before = PARSE_CACHE.misses + PARSE_CACHE.hits
    bag = ResourceBag()
    add_raw(bag, many)
    assert len(bag.of_type("Media")) == len(many)
    assert PARSE_CACHE.misses + PARSE_CACHE.hits == before  # the recurring small resources keep their places


def test_parse_cache_keys_resources_without_an_id_by_their_text() -> None:
    from cds_service.fhir.parse import ParseCache

    cache = ParseCache(max_entries=8)
    anonymous = {"resourceType": "Media", "status": "completed", "content": {"contentType": "image/png"}}
    cache.parse(anonymous)
    first = cache.parse(anonymous)
    assert cache.parse(dict(anonymous))[0] is first[0]
    other = cache.parse({**anonymous, "status": "in-progress"})
    assert other[0].status == "in-progress"
    odd_meta = cache.parse({**anonymous, "id": "x", "meta": ["not", "an", "object"]})
    assert odd_meta[0] is None and odd_meta[2] is not None
    assert (cache.hits, cache.misses) == (1, 4)


def test_warm_up_parses_every_sample_resource() -> None:
    import json
    from importlib.resources import files

    from cds_service.fhir.parse import warm_up

    samples = json.loads(files("cds_service.fhir").joinpath("warmup.json").read_text("utf-8"))["resources"]
    assert warm_up() == len(samples) >= 15


def test_a_resource_parsed_ahead_is_taken_by_add_raw_as_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefetch selection parses what it keeps (parse_item); add_raw then takes those very dicts: the same
    model, no second parse and no second comparison — also for a resource without an id (no identity key)."""
    import cds_service.fhir.parse as parse_module

    calls: list[str] = []
    real = parse_module.parse_resource
    monkeypatch.setattr(parse_module, "parse_resource", lambda data: (calls.append(str(data.get("id"))), real(data))[1])
    earlier: dict[Any, Any] = {}
    anonymous = {"resourceType": "Patient", "active": True}
    items = [communication(status="completed"), patient(), anonymous]
    ahead = [parse_item(item, earlier, False)[0] for item in items]
    assert calls == ["c1", "p1", "None"]
    bag: ResourceBag = ResourceBag()
    add_raw(bag, items, earlier)
    assert calls == ["c1", "p1", "None"]
    assert [m for m in bag] == ahead and all(a is b for a, b in zip(bag, ahead, strict=True))
    # An equal copy (another dict) is still found by its identity key and content, as before.
    add_raw(bag, [copy.deepcopy(items[0])], earlier)
    assert calls == ["c1", "p1", "None"]
    # A changed dict under the same key is parsed again.
    add_raw(bag, [communication(status="in-progress")], earlier)
    assert calls == ["c1", "p1", "None", "c1"]
