"""Slots are parsed once every wave is in, and only those the rules can read (``EpisodeData.finish_slots``, issue 13).

``no-resulting-service`` reads an appointment's own slots and the slots starting between its creation (or now,
without one) and its start (``_slot_verdict``). Every Slot that can be read that way must reach the bag as it would
have without the selection — the same (last) copy, in the same order — whatever the appointments' status,
practitioner or dates; and hook responses must not change. Synthetic data only."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st

import hooks.gather as gather
from cds_service.app import runtime_of
from cds_service.fhir.parse import add_raw
from cds_service.record import ResourceBag
from cds_service.rules.facts import as_datetime, between, key_of, ref_of

NOW = datetime(2026, 11, 18, 15, 40, tzinfo=UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _data(appointments: list[dict[str, Any]], slots: list[Any]) -> gather.EpisodeData:
    data = gather.EpisodeData(bag=ResourceBag(), patient_id="p1")
    add_raw(data.bag, appointments, data.parsed_sources)
    data.deferred_slots = list(slots)
    return data


def _readable(bag: ResourceBag, whole: ResourceBag) -> set[str]:
    """The Slot keys ``_slot_verdict`` can read for any appointment of ``bag``: own slots, and those starting
    between its creation (or now) and its start."""
    keys: set[str] = set()
    slots = whole.of_type("Slot")
    for appointment in bag.of_type("Appointment"):
        keys |= {k for k in (ref_of(s) for s in appointment.slot or ()) if k}
        start = as_datetime(appointment.start, UTC)
        if start is None:
            continue
        created = as_datetime(appointment.created, UTC) or NOW
        keys |= {key_of(s) for s in slots
                 if (when := as_datetime(s.start, UTC)) is not None and between(when, created, start)}
    return keys


_DAY = st.integers(min_value=-400, max_value=60)


@st.composite
def _record(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[Any]]:
    appointments = []
    for n in range(draw(st.integers(0, 3))):
        start = NOW + timedelta(days=draw(_DAY), hours=draw(st.integers(0, 23)))
        appointment: dict[str, Any] = {"resourceType": "Appointment", "id": f"a{n}",
                                       "status": draw(st.sampled_from(["booked", "proposed", "cancelled"])),
                                       "start": _iso(start), "end": _iso(start + timedelta(minutes=30)),
                                       "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}]}
        created = draw(st.sampled_from(["none", "instant", "date", "unreadable"]))
        moment = start - timedelta(days=draw(st.integers(0, 90)), minutes=draw(st.integers(0, 1440)))
        if created == "instant":
            appointment["created"] = _iso(moment)
        elif created == "date":
            appointment["created"] = moment.date().isoformat()
        elif created == "unreadable":
            appointment["created"] = "2026-13"  # invalid: the resource is skipped, as without the selection
        own = draw(st.lists(st.integers(0, 7), max_size=2))
        if own:
            appointment["slot"] = [{"reference": f"Slot/s{i}"} for i in own]
        appointments.append(appointment)
    slots: list[Any] = []
    for _ in range(draw(st.integers(0, 12))):
        start = NOW + timedelta(days=draw(_DAY), minutes=15 * draw(st.integers(0, 96)))
        slot: dict[str, Any] = {"resourceType": "Slot", "schedule": {"reference": "Schedule/sch1"},
                                "status": draw(st.sampled_from(["free", "busy"])),
                                "start": _iso(start), "end": _iso(start + timedelta(minutes=30))}
        kind = draw(st.sampled_from(["id", "id", "id", "no-id", "unreadable", "open"]))
        if kind != "no-id":
            slot["id"] = f"s{draw(st.integers(0, 7))}"  # a small pool: the same Slot twice, in other versions
        if kind == "unreadable":
            slot["start"] = "soon"
        elif kind == "open":
            del slot["end"]
        slots.append(slot)
    return appointments, slots


@settings(max_examples=300, deadline=None)
@given(_record())
def test_every_slot_a_rule_can_read_reaches_the_bag_as_before(record: tuple[list[dict[str, Any]], list[Any]]) -> None:
    appointments, slots = record
    data = _data(appointments, slots)
    data.finish_slots(NOW, lambda: None)
    whole = ResourceBag()
    add_raw(whole, appointments)
    add_raw(whole, slots)
    kept = [key_of(s) for s in data.bag.of_type("Slot")]
    everything = [key_of(s) for s in whole.of_type("Slot")]
    # Same order: the kept slots are the whole bag's, some left out.
    assert kept == [k for k in everything if k in set(kept)]
    for key in _readable(data.bag, whole):
        assert data.bag.get(key) == whole.get(key), key
    assert data.deferred_slots == []


def test_without_appointments_no_slot_is_parsed() -> None:
    slot = {"resourceType": "Slot", "id": "s1", "schedule": {"reference": "Schedule/sch1"}, "status": "free",
            "start": _iso(NOW + timedelta(days=1)), "end": _iso(NOW + timedelta(days=1, minutes=30))}
    data = _data([], [slot])
    data.finish_slots(NOW, lambda: None)
    assert data.bag.of_type("Slot") == []


def test_an_early_creation_keeps_the_slots_since_then_and_a_slot_goes_only_with_every_copy() -> None:
    created = NOW - timedelta(days=30)
    appointment = {"resourceType": "Appointment", "id": "a1", "status": "booked", "created": _iso(created),
                   "start": _iso(NOW + timedelta(days=2)), "end": _iso(NOW + timedelta(days=2, minutes=30)),
                   "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}],
                   "slot": [{"reference": "Slot/own-old"}]}

    def slot(sid: str, days: float) -> dict[str, Any]:
        return {"resourceType": "Slot", "id": sid, "schedule": {"reference": "Schedule/sch1"}, "status": "free",
                "start": _iso(NOW + timedelta(days=days)), "end": _iso(NOW + timedelta(days=days, minutes=30))}

    invalid = {**slot("kept", -10), "status": None}  # no status: skipped by the parser, the first copy stays
    slots = [slot("since", -20), slot("before", -40), slot("own-old", -300),
             slot("moved", -40), slot("moved", -10),      # one copy lies in the window: both parsed, the last wins
             slot("old", -200), slot("old", -90),         # every copy before it: neither parsed
             slot("kept", -10), invalid,
             slot("7", -200), {**slot("7", -200), "id": 7}]  # no string id: kept (and skipped by the parser)
    data = _data([appointment], slots)
    data.finish_slots(NOW, lambda: None)
    assert [key_of(s) for s in data.bag.of_type("Slot")] == ["Slot/since", "Slot/own-old", "Slot/moved", "Slot/kept"]
    assert as_datetime(data.bag.get("Slot/moved").start, UTC) == NOW - timedelta(days=10)
    assert data.bag.get("Slot/kept").status == "free"
    assert len(data.bag.skipped) == 2  # the status-less copy and the numeric id, as without the selection


def test_each_slice_looks_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gather, "_PARSE_SLICE", 2)
    appointment = {"resourceType": "Appointment", "id": "a1", "status": "proposed",
                   "start": _iso(NOW + timedelta(days=2)), "end": _iso(NOW + timedelta(days=2, minutes=30)),
                   "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}]}
    slots = [{"resourceType": "Slot", "id": f"s{n}", "schedule": {"reference": "Schedule/sch1"}, "status": "free",
              "start": _iso(NOW + timedelta(days=1, hours=n)), "end": _iso(NOW + timedelta(days=1, hours=n + 1))}
             for n in range(5)]
    looks: list[int] = []
    data = _data([appointment], slots)
    data.finish_slots(NOW, lambda: looks.append(len(data.bag.of_type("Slot"))))
    assert looks == [0, 2, 4] and len(data.bag.of_type("Slot")) == 5


@pytest.mark.parametrize("size", ["33", "20"])
def test_realistic_records_answer_alike_with_every_slot_parsed(app: Flask, monkeypatch: pytest.MonkeyPatch,
                                                               size: str) -> None:
    """The benchmark's records (appointment-book carries a busy and a free Slot per historical appointment): the
    same answers, card for card, as when every Slot is parsed (a margin of a century leaves none out)."""
    from bench.realistic import shifted_text
    from bench.records import TZ, instantiate
    from hooks import SERVICES

    runtime = runtime_of(app)
    now = datetime.now(TZ)
    monkeypatch.setattr(runtime, "clock", lambda: now)  # both answers at one instant (cards count hours left)
    dropped = 0
    original = gather.EpisodeData.finish_slots

    def counting(self: gather.EpisodeData, now: datetime, check: Any) -> None:
        nonlocal dropped
        before = len(self.deferred_slots), len(self.bag.of_type("Slot"))
        original(self, now, check)
        dropped += before[0] - (len(self.bag.of_type("Slot")) - before[1])

    for service in SERVICES:
        body = json.loads(instantiate(shifted_text(service.hook, size, now), 7))
        monkeypatch.setattr(gather, "_SLOT_MARGIN", timedelta(days=36500))
        whole = runtime.invoke(service.id, json.loads(json.dumps(body)))
        monkeypatch.setattr(gather, "_SLOT_MARGIN", timedelta(days=2))
        monkeypatch.setattr(gather.EpisodeData, "finish_slots", counting)
        selected = runtime.invoke(service.id, json.loads(json.dumps(body)))
        monkeypatch.setattr(gather.EpisodeData, "finish_slots", original)
        assert selected == whole, service.hook
    assert dropped > 0  # the comparison exercised the selection
