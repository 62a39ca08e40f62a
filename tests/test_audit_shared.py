"""The population audit's shared record (issue 14, memory): Slots kept as compact JSON by schedule and parsed per
patient, only for the schedules the rules can read for that patient; every patient's bag reads the other shared
resources without copying them.

The lazy record must change nothing the rules see: the bundled fixtures (every scenario at its own clock, and the
whole export at one clock) and a generated population give exactly the rows the former eager record gives
(``build_shared(..., lazy_slots=False)``: every slot parsed, every dictionary copied per patient). Then the
reference walk that picks a patient's schedules is pinned case by case. Synthetic data only.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.population import generate, load_expected
from cds_service.audit import engine, keys, patient, sources
from cds_service.audit.patient import AuditSettings, SharedRecord, audit_patient, build_shared
from cds_service.fhir.parse import add_raw
from cds_service.record import ResourceBag
from cds_service.rules.facts import references_in
from tests.test_audit_patient import patient_resources, scenarios, settings_at

SPEC = engine.SettingsSpec(config_path=None, as_of="2026-12-01T12:00:00-05:00")


# ------------------------------------------------------------------------------------------------- equivalence
def _fixture_resources() -> list[dict[str, Any]]:
    return list(sources.bundle_resources(sources.fixture_bundles()))


def _shared_pair(resources: list[dict[str, Any]]) -> tuple[SharedRecord, SharedRecord]:
    shared = [r for r in resources if r.get("resourceType") in keys.SHARED_TYPES]
    return build_shared(copy.deepcopy(shared), lazy_slots=False), build_shared(copy.deepcopy(shared))


def _groups(resources: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for resource in resources:
        pid = keys.patient_of(resource)
        if pid is not None:
            groups.setdefault(pid, []).append(resource)
    return groups


def _slot_rows(rows: list[dict[str, Any]]) -> int:
    return sum(1 for row in rows for ref in row["evidence"] if ref.startswith("no-resulting-service=Slot/"))


@pytest.fixture(scope="module")
def fixture_records() -> tuple[SharedRecord, SharedRecord]:
    return _shared_pair(_fixture_resources())


def test_the_lazy_record_validates_like_the_eager_one(fixture_records: tuple[SharedRecord, SharedRecord]) -> None:
    eager, lazy = fixture_records
    assert lazy.skipped == eager.skipped and lazy.resources == eager.resources
    assert lazy.lazy_slots and "Slot" not in lazy.bag.by_type and eager.bag.by_type["Slot"]
    # Every slot is still there, in the same order, when the whole bag is asked for.
    assert list(lazy.patient_bag().by_type["Slot"]) == list(eager.bag.by_type["Slot"])
    assert {t: list(m) for t, m in lazy.bag.by_type.items()} == {
        t: list(m) for t, m in eager.bag.by_type.items() if t != "Slot"}


def test_every_fixture_scenario_gets_the_same_rows(fixture_records: tuple[SharedRecord, SharedRecord]) -> None:
    """Each scenario at its own clock (where its slots decide "soonest available"), eager and lazy alike."""
    eager, lazy = fixture_records
    slot_decided = 0
    for item in scenarios():
        pid = item["context"]["patientId"]
        settings = settings_at(item["now"])
        old = audit_patient(pid, patient_resources(item), shared=eager, settings=settings)
        new = audit_patient(pid, patient_resources(item), shared=lazy, settings=settings)
        assert new.rows == old.rows, item["id"]
        assert (new.skipped, new.resources) == (old.skipped, old.resources), item["id"]
        slot_decided += _slot_rows(new.rows)
    assert slot_decided > 0  # the equivalence covers verdicts that slots decide


def test_the_fixture_export_gets_the_same_rows(tmp_path: Path) -> None:
    """Every fixture patient of the export the engines read (fixtures_to_ndjson), at one clock."""
    resources = _read_ndjson(sources.fixtures_to_ndjson(tmp_path / "export"))
    eager, lazy = _shared_pair(resources)
    settings = AuditSettings.from_spec(SPEC)
    groups = _groups(resources)
    for pid in sorted(groups):
        old = audit_patient(pid, copy.deepcopy(groups[pid]), shared=eager, settings=settings)
        new = audit_patient(pid, copy.deepcopy(groups[pid]), shared=lazy, settings=settings)
        assert new.rows == old.rows and new.skipped == old.skipped, pid


def test_a_generated_population_gets_the_same_rows(tmp_path: Path) -> None:
    population = generate(tmp_path / "pop", patients=80, seed=11, submission_rate=0.35)
    resources = _read_ndjson(population.files)
    expected = load_expected(population.out_dir)
    settings = AuditSettings.from_spec(engine.SettingsSpec(config_path=None, as_of=expected["as_of"],
                                                           since=expected["since"], until=expected["until"]))
    eager, lazy = _shared_pair(resources)
    groups = _groups(resources)
    rows = slots_eager = slots_lazy = 0
    for pid in sorted(groups):
        raw = groups[pid]
        if not any(keys.marks_candidate(r) for r in raw):
            continue
        old = audit_patient(pid, copy.deepcopy(raw), shared=eager, settings=settings)
        new = audit_patient(pid, copy.deepcopy(raw), shared=lazy, settings=settings)
        assert new.rows == old.rows and new.skipped == old.skipped, pid
        rows += len(new.rows)
        slots_eager += len(eager.patient_bag(raw).of_type("Slot"))
        slots_lazy += len(lazy.patient_bag(raw).of_type("Slot"))
    assert rows > 20
    assert slots_lazy < slots_eager / 5  # the point of it: a patient's bag holds a few schedules' slots


def _read_ndjson(paths: list[Path]) -> list[dict[str, Any]]:
    found = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            found += [json.loads(line) for line in handle if line.strip()]
    return found


# ----------------------------------------------------------------------------------------------- reference walk
def _practitioner(pid: str) -> dict[str, Any]:
    return {"resourceType": "Practitioner", "id": pid, "active": True}


def _role(rid: str, practitioner: str) -> dict[str, Any]:
    return {"resourceType": "PractitionerRole", "id": rid, "practitioner": {"reference": practitioner}}


def _schedule(sid: str, *actors: str) -> dict[str, Any]:
    return {"resourceType": "Schedule", "id": sid, "active": True, "actor": [{"reference": a} for a in actors]}


def _slot(sid: str, schedule: str, hour: int, status: str = "free") -> dict[str, Any]:
    return {"resourceType": "Slot", "id": sid, "schedule": {"reference": schedule}, "status": status,
            "start": f"2026-12-0{1 + hour % 5}T{9 + hour % 8:02d}:00:00-05:00",
            "end": f"2026-12-0{1 + hour % 5}T{9 + hour % 8:02d}:30:00-05:00"}


def _world() -> list[dict[str, Any]]:
    """p1 with a schedule of their own (sch-p1) and one through their role (sch-r1); p2, p3 with one each; a room
    schedule (Location actor, sch-room); slots interleaved across schedules, so order is tested too."""
    world: list[dict[str, Any]] = [
        _practitioner("p1"), _practitioner("p2"), _practitioner("p3"), _role("r1", "Practitioner/p1"),
        _role("r2", "https://ehr.example.org/fhir/Practitioner/p2"),
        {"resourceType": "Location", "id": "room", "status": "active"},
        _schedule("sch-p1", "Practitioner/p1"), _schedule("sch-r1", "PractitionerRole/r1"),
        _schedule("sch-p2", "Practitioner/p2"), _schedule("sch-p3", "Practitioner/p3"),
        _schedule("sch-room", "Location/room"),
    ]
    schedules = ["sch-p1", "sch-p2", "sch-r1", "sch-p3", "sch-room"]
    for n in range(15):
        world.append(_slot(f"slot-{n:02d}", f"Schedule/{schedules[n % 5]}", n))
    return world


def _encounter(*individuals: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Encounter", "id": "e1", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR"},
            "subject": {"reference": "Patient/pat"},
            "participant": [{"individual": {"reference": i}} for i in individuals], **extra}


def _slot_ids(record: SharedRecord, raw: list[dict[str, Any]]) -> list[str]:
    return list(record.patient_bag(raw).by_type.get("Slot", {}))


def _of(*schedules: str) -> list[str]:
    order = ["sch-p1", "sch-p2", "sch-r1", "sch-p3", "sch-room"]
    return [f"slot-{n:02d}" for n in range(15) if order[n % 5] in schedules]


@pytest.fixture
def world() -> SharedRecord:
    return build_shared(_world())


def test_a_practitioner_brings_their_schedules_and_those_of_their_roles(world: SharedRecord) -> None:
    assert _slot_ids(world, [_encounter("Practitioner/p1")]) == _of("sch-p1", "sch-r1", "sch-room")


def test_a_role_brings_its_practitioners_schedules(world: SharedRecord) -> None:
    assert _slot_ids(world, [_encounter("PractitionerRole/r1")]) == _of("sch-p1", "sch-r1", "sch-room")
    # r2 names p2 by an absolute reference: resolved as the rules resolve it (ref_key)
    assert _slot_ids(world, [_encounter("PractitionerRole/r2")]) == _of("sch-p2", "sch-room")


def test_absolute_and_versioned_references_resolve(world: SharedRecord) -> None:
    raw = [_encounter("https://ehr.example.org/fhir/Practitioner/p3/_history/2")]
    assert _slot_ids(world, raw) == _of("sch-p3", "sch-room")


def test_references_anywhere_in_the_record_count(world: SharedRecord) -> None:
    """A contained resource, an extension and any resource type of the patient: a superset is harmless."""
    raw = [{"resourceType": "Communication", "id": "c1", "status": "completed",
            "subject": {"reference": "Patient/pat"},
            "contained": [{"resourceType": "Provenance", "id": "prov",
                           "agent": [{"who": {"reference": "Practitioner/p2"}}]}],
            "extension": [{"url": "https://example.org/x", "valueReference": {"reference": "PractitionerRole/r1"}}]}]
    assert _slot_ids(world, raw) == _of("sch-p1", "sch-p2", "sch-r1", "sch-room")


def test_odd_references_name_no_practitioner(world: SharedRecord) -> None:
    raw = [_encounter("#contained-1", "urn:uuid:0b8c3e0a-1111-4222-8333-444455556666", "Practitioner/",
                      "PractitionerRole/unknown", "Patient/pat"),
           {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/pat"}, "performer": [{"reference": 17}, {"display": "Dr P1"}],
            "note": [{"text": "Practitioner/p1 wrote this"}]}]
    assert _slot_ids(world, raw) == _of("sch-room")  # no practitioner: only the schedule of a non-practitioner
    assert _slot_ids(world, []) == _of("sch-room")


def test_a_slot_the_record_names_brings_its_schedule(world: SharedRecord) -> None:
    raw = [{"resourceType": "Appointment", "id": "a1", "status": "booked", "slot": [{"reference": "Slot/slot-03"}],
            "participant": [{"actor": {"reference": "Patient/pat"}, "status": "accepted"}]}]
    assert _slot_ids(world, raw) == _of("sch-p3", "sch-room")


@pytest.mark.parametrize("rtype", ["Slot", "Schedule", "PractitionerRole"])
def test_a_record_holding_a_shared_type_gets_every_slot(world: SharedRecord, rtype: str) -> None:
    extra = {"Slot": _slot("own-slot", "Schedule/sch-p1", 1), "Schedule": _schedule("own", "Practitioner/p9"),
             "PractitionerRole": _role("own-role", "Practitioner/p9")}[rtype]
    assert world.slot_schedules_for([_encounter(), extra]) is None
    assert _slot_ids(world, [_encounter(), extra]) == _of("sch-p1", "sch-p2", "sch-r1", "sch-p3", "sch-room")


def test_references_in_walks_deep_documents_without_recursion() -> None:
    deep: dict[str, Any] = {"reference": "Practitioner/bottom"}
    for _ in range(5000):
        deep = {"x": [deep]}
    assert list(references_in(deep)) == ["Practitioner/bottom"]


def test_invalid_duplicate_and_anonymous_slots_match_the_eager_bag() -> None:
    world = [*_world(),
             {"resourceType": "Slot", "id": "bad", "schedule": {"reference": "Schedule/sch-p1"}, "status": "maybe"},
             _slot("slot-00", "Schedule/sch-p2", 9, status="busy"),  # later copy wins, keeps the first position
             {k: v for k, v in _slot("x", "Schedule/sch-p1", 2).items() if k != "id"},  # anonymous
             {"resourceType": "Organization", "id": "o-anon-next"}, {"resourceType": "Organization"}]
    eager, lazy = build_shared(copy.deepcopy(world), lazy_slots=False), build_shared(copy.deepcopy(world))
    assert lazy.skipped == eager.skipped and [ref for ref, _ in lazy.skipped] == ["Slot/bad"]
    assert lazy.bag._anonymous == eager.bag._anonymous == 2
    full = lazy.patient_bag()
    assert list(full.by_type["Slot"]) == list(eager.bag.by_type["Slot"])
    assert full.by_type["Slot"]["slot-00"].status == "busy"
    raw = [_encounter("Practitioner/p2")]
    expected = [k for k, s in eager.bag.by_type["Slot"].items()
                if s.schedule.reference in ("Schedule/sch-p2", "Schedule/sch-room")]
    assert _slot_ids(lazy, raw) == expected and "slot-00" in expected
    assert lazy.patient_bag(raw)._anonymous == eager.patient_bag()._anonymous


def test_the_parsed_slot_cache_is_bounded(monkeypatch: pytest.MonkeyPatch, world: SharedRecord) -> None:
    monkeypatch.setattr(patient, "SLOT_CACHE_SIZE", 4)
    for practitioner in ("Practitioner/p1", "Practitioner/p2", "Practitioner/p3", "Practitioner/p1"):
        assert _slot_ids(world, [_encounter(practitioner)]) == _of(
            *{"Practitioner/p1": ("sch-p1", "sch-r1"), "Practitioner/p2": ("sch-p2",),
              "Practitioner/p3": ("sch-p3",)}[practitioner], "sch-room")
        assert world._parsed_count <= 4 or len(world._parsed_slots) == 1
    # The same models are handed out while cached: parsed once, not once per patient.
    monkeypatch.setattr(patient, "SLOT_CACHE_SIZE", 100)
    first = world.patient_bag([_encounter("Practitioner/p3")]).by_type["Slot"]
    again = world.patient_bag([_encounter("Practitioner/p3")]).by_type["Slot"]
    assert all(first[k] is again[k] for k in first)


def test_patient_bags_share_the_shared_dictionaries_and_never_change_them(world: SharedRecord) -> None:
    before = {t: dict(m) for t, m in world.bag.by_type.items()}
    bag = world.patient_bag([_encounter("Practitioner/p1")])
    assert bag.by_type["Practitioner"] is world.bag.by_type["Practitioner"]  # read, not copied
    own = [_encounter("Practitioner/p1"), _practitioner("p-own"), _role("r-own", "Practitioner/p1")]
    audit_patient("pat", own, shared=world, settings=AuditSettings.from_spec(SPEC))
    assert {t: dict(m) for t, m in world.bag.by_type.items()} == before
    assert "Encounter" not in world.bag.by_type


def test_a_layered_bag_copies_a_borrowed_type_on_its_first_add() -> None:
    shared = ResourceBag()
    add_raw(shared, [_practitioner("p1"), {"resourceType": "Organization", "id": "o1"}])
    layered = ResourceBag.layered(shared.by_type, anonymous=3)
    add_raw(layered, [_practitioner("p2"), {"resourceType": "Organization"}])
    assert sorted(layered.by_type["Practitioner"]) == ["p1", "p2"] and list(shared.by_type["Practitioner"]) == ["p1"]
    assert list(layered.by_type["Organization"]) == ["o1", "#anonymous-4"] and list(
        shared.by_type["Organization"]) == ["o1"]
    assert layered.get("Practitioner/p1") is shared.get("Practitioner/p1")
    assert Counter(r.get_resource_type() for r in layered) == {"Practitioner": 2, "Organization": 2}


def test_a_layered_bag_shares_its_base_memo_only_while_it_borrows_every_type_the_value_reads() -> None:
    shared = ResourceBag()
    add_raw(shared, [_practitioner("p1"), _role("r1", "Practitioner/p1")])
    calls: list[str] = []

    def roles(bag: ResourceBag) -> Callable[[], list[str]]:
        return lambda: calls.append("computed") or sorted(bag.by_type.get("PractitionerRole", {}))

    one = ResourceBag.layered(shared.by_type, base=shared)
    two = ResourceBag.layered(shared.by_type, base=shared)
    types = ("PractitionerRole",)
    assert one.memo("roles", roles(one), types=types) == ["r1"]
    assert two.memo("roles", roles(two), types=types) == ["r1"] and calls == ["computed"]  # once for both
    assert two.memo("absent", lambda: calls.append("absent") or 0, types=("Schedule",)) == 0
    assert one.memo("absent", lambda: calls.append("absent") or 0, types=("Schedule",)) == 0
    assert calls.count("absent") == 1  # neither the bags nor their base hold a Schedule: still the same value
    add_raw(two, [_role("r2", "Practitioner/p1")])  # two now has roles of its own: its own memo
    assert two.memo("roles", roles(two), types=types) == ["r1", "r2"]
    assert one.memo("roles", roles(one), types=types) == ["r1"] and calls.count("computed") == 2
    add_raw(one, [{"resourceType": "Schedule", "id": "s1", "actor": [{"reference": "Practitioner/p1"}]}])
    assert one.memo("absent", lambda: calls.append("absent") or 1, types=("Schedule",)) == 1
    assert one.memo("nothing said", lambda: 5) == 5  # no types: never shared
    assert ResourceBag.layered(shared.by_type, {"PractitionerRole": {}}, base=shared)._base is shared
    assert ResourceBag.layered({**shared.by_type, "Practitioner": {}}, base=shared)._base is None  # not its dicts
