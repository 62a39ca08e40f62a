"""Prefetched history outside every window is left unparsed (issue 13, ``hooks.gather.select_prefetched``): the
responses must be the same as with every prefetched resource parsed — at the scenarios' own clocks and at clocks
moved later, where more and more of each record falls outside the windows."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from flask import Flask
from hypothesis import example, given, settings
from hypothesis import strategies as st

import hooks.gather as gather
from bench.waves import doors_of
from cds_service.app import runtime_of
from cds_service.fhir.lite import references_of
from cds_service.fhir.parse import parse_item
from tests.support.fhir_server import FhirServer
from tests.test_integration_fhir import SERVICE_FOR_HOOK, hook_request, resolve_prefetch, scenarios

NOW = datetime(2026, 11, 18, 15, 40, tzinfo=UTC)
CUTOFFS = gather.prefetch_cutoffs(NOW - gather.EPISODE_LOOKBACK, gather.GLOBAL_PERIOD_LOOKBACK)
OLD = "2020-01-02T10:00:00Z"
RECENT = "2026-11-17T10:00:00Z"


def _parser() -> Callable[[Any], tuple[str, ...] | None]:
    """What ``EpisodeData.record`` passes: parse ahead (results kept for add_raw), give what the reader collected."""
    earlier: dict[Any, Any] = {}
    return lambda raw: references_of(parse_item(raw, earlier, True)[0])


def _select(*resources: dict[str, Any]) -> list[str]:
    kept = gather.select_prefetched({"k": list(resources)}, CUTOFFS)["k"]
    # Parsing ahead (the hook path) keeps the same resources as searching the JSON text.
    assert gather.select_prefetched({"k": list(resources)}, CUTOFFS, _parser())["k"] == kept
    return [f"{r['resourceType']}/{r['id']}" for r in kept]


def test_old_history_is_left_out_and_recent_kept() -> None:
    assert _select({"resourceType": "Communication", "id": "old", "sent": OLD, "received": OLD},
                   {"resourceType": "Communication", "id": "new", "sent": OLD, "received": RECENT},
                   {"resourceType": "Observation", "id": "obs", "effectiveDateTime": OLD},
                   {"resourceType": "Procedure", "id": "p", "performedPeriod": {"start": OLD, "end": OLD}},
                   ) == ["Communication/new"]


def test_undated_open_unreadable_or_unknown_variants_are_kept() -> None:
    kept = [
        {"resourceType": "Communication", "id": "undated"},
        {"resourceType": "Procedure", "id": "open", "performedPeriod": {"start": OLD}},
        {"resourceType": "Procedure", "id": "string", "performedString": "years ago"},
        {"resourceType": "Observation", "id": "bad", "effectiveDateTime": "not a date"},
        {"resourceType": "Observation", "id": "number", "effectiveDateTime": 2020},
        {"resourceType": "Media", "id": "half", "createdDateTime": OLD, "issued": "??"},
        {"resourceType": "Encounter", "id": "enc", "period": {"start": OLD, "end": OLD}},  # never selected on
        {"resourceType": "Condition", "id": "cond", "recordedDate": OLD},
        {"resourceType": "DocumentReference", "id": "ctx", "date": OLD, "context": {"period": {"end": OLD}}},
    ]
    assert _select(*kept) == [f"{r['resourceType']}/{r['id']}" for r in kept]
    odd = ["not a resource", {"id": "x"}, {"resourceType": "Observation", "effectiveDateTime": OLD}]
    assert gather.select_prefetched({"k": odd}, CUTOFFS)["k"] == odd  # add_raw notes or skips them


def test_what_a_kept_resource_refers_to_is_kept_transitively() -> None:
    message = {"resourceType": "Communication", "id": "m", "received": RECENT,
               "payload": [{"contentReference": {"reference": "http://ehr/fhir/Media/photo/_history/2"}}]}
    photo = {"resourceType": "Media", "id": "photo", "createdDateTime": OLD,
             "partOf": [{"reference": "Communication/earlier"}]}
    earlier = {"resourceType": "Communication", "id": "earlier", "sent": OLD}
    unrelated = {"resourceType": "Media", "id": "other", "createdDateTime": OLD}
    assert sorted(_select(unrelated, earlier, photo, message)) == ["Communication/earlier", "Communication/m",
                                                                   "Media/photo"]


_POOL = ["Media/a", "Media/b", "Communication/c", "Communication/d", "Media/e"]
_SPELLINGS = st.sampled_from(["{}", "http://ehr/fhir/{}", "{}/_history/2", "urn:x:{}", "#{}"])


@st.composite
def _linked_resources(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Old and recent messages and photos of one pool of ids, referring to each other in every place and spelling
    a Reference can take (payload, partOf, an extension, a contained resource), some of them odd: an unknown
    element (the full model reads it), an invalid value (skipped), no id."""
    resources = []
    for key in draw(st.lists(st.sampled_from(_POOL), max_size=6)):
        rtype, rid = key.split("/")
        when = draw(st.sampled_from([OLD, RECENT]))
        resource: dict[str, Any] = {"resourceType": rtype, "id": rid}
        resource.update({"sent": when} if rtype == "Communication" else {"createdDateTime": when})
        refs = [{"reference": draw(_SPELLINGS).format(target)}
                for target in draw(st.lists(st.sampled_from(_POOL), max_size=3))]
        for ref in refs:
            if draw(st.booleans()):  # a Reference with an extension: never shared, still read
                ref["extension"] = [{"url": "http://x", "valueString": "y"}]
        for ref in refs:
            place = draw(st.sampled_from(["main", "extension", "contained"]))
            if place == "extension":
                resource.setdefault("extension", []).append({"url": "http://x", "valueReference": ref})
            elif place == "contained":
                resource.setdefault("contained", []).append(
                    {"resourceType": "Media", "id": f"in{len(resource.get('contained', []))}", "status": "completed",
                     "content": {"contentType": "image/png"}, "partOf": [ref]})
            elif rtype == "Communication":
                resource.setdefault("payload", []).append({"contentReference": ref})
            else:
                resource.setdefault("partOf", []).append(ref)
        if rtype == "Communication":
            resource["status"] = "completed"
        else:
            resource.update({"status": "completed", "content": {"contentType": "image/jpeg"}})
        odd = draw(st.sampled_from([None, None, None, "unknown", "invalid", "no-id"]))
        if odd == "unknown":
            resource["madeUp"] = 1
        elif odd == "invalid":
            resource["status"] = 5
        elif odd == "no-id":
            del resource["id"]
        resources.append(resource)
    return resources


@settings(max_examples=400, deadline=None)
@given(_linked_resources())
def test_parsing_ahead_keeps_what_the_json_text_keeps(resources: list[dict[str, Any]]) -> None:
    """The hook path (``EpisodeData.record``) parses what the selection keeps and reads the references the fast
    reader collected; resources it did not read are searched as text. Either way the same resources are kept."""
    by_text = gather.select_prefetched({"k": list(resources)}, CUTOFFS)["k"]
    by_parsing = gather.select_prefetched({"k": list(resources)}, CUTOFFS, _parser())["k"]
    assert [id(r) for r in by_parsing] == [id(r) for r in by_text]


_JSON_KEYS = st.sampled_from(["reference", "display", 'a"reference', "reference\\", 'x","reference', "r", "text",
                             "div"])
_JSON_TEXT = st.lists(st.sampled_from([*'ab/#{},:"\\ \n\u00e9\u2028\ud800', "reference", "Media/m1", "Slot/s",
                                       "http://h/fhir/", "_history/2"]), max_size=6).map("".join)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | _JSON_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_JSON_KEYS | _JSON_TEXT, children, max_size=4),
    max_leaves=30)
_KEYS = st.sets(st.sampled_from(["Media/m1", "Slot/s", "Media/a\"b", "Media/m1/", "Slot/s\u00e9"]), max_size=4)


def _keys_in(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value).union(*(_keys_in(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_keys_in(v) for v in value))
    return set()


@settings(max_examples=500, deadline=None)
@given(st.lists(_JSON, max_size=4), _KEYS)
def test_references_read_from_the_json_text_are_those_of_the_walk(values: list[Any], keys: set[str]) -> None:
    """The text-and-pattern reading (and its fallback) finds every key the walk over the documents finds, and
    nothing more unless a key ending in ``reference`` holds an escaped quote (an old resource kept in vain)."""
    from cds_service.rules.facts import ref_key, references_in

    walked = {key for value in values for r in references_in(value) if (key := ref_key(r)) in keys}
    found = gather._referenced(values, keys)
    assert walked <= found
    if not any('"' in key for key in _keys_in(values)):
        assert found == walked


def test_references_in_tricky_strings() -> None:
    values = [{"note": 'x,"reference":"Media/fake"', "reference": 'Media/a\\"b', "k": {"reference": "Slot/s\u00e9"}},
              [{"reference": "http://h/fhir/Media/m1/_history/3"}, {"display": "reference"}],
              {"x": [{"reference": "Media/fake"}]}]
    keys = {'Media/a\\"b', "Slot/s\u00e9", "Media/m1", "Media/fake", "Media/no", "Media/x"}
    assert gather._referenced(values, keys) == {'Media/a\\"b', "Slot/s\u00e9", "Media/m1",
                                                                      "Media/fake"}
    assert gather._referenced([{"n": 2**70, "reference": "Media/m1"}], {"Media/m1"}) == {"Media/m1"}
    # The narrative's div is left out of the text; a reference in the narrative's extension is still read, and a
    # div of another type than a string (invalid, but JSON) is walked like any value.
    narrated = {"resourceType": "Media", "id": "n", "text": {
        "status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">"reference":"Media/no"</div>',
        "extension": [{"url": "http://x", "valueReference": {"reference": "Media/m1"}}]}}
    odd_div = {"text": {"div": {"reference": "Slot/s"}}}
    assert gather._referenced([narrated, odd_div], {"Media/m1", "Media/no", "Slot/s"}) == {"Media/m1", "Slot/s"}
    assert narrated["text"]["div"].startswith("<div")  # the resource itself is not changed
    # A key ending in "reference" after an escaped quote may be read as one: that only keeps a resource more.
    assert gather._referenced([{'a"reference': "Media/no"}], {"Media/no"}) <= {"Media/no"}


# Daylight-saving changes (UTC instants), where a wall clock and an instant can disagree: New York's fall-back and
# spring-forward, Lord Howe's half hour, Dublin's (negative DST in tzdata), Apia skipping 30 Dec 2011 (UTC-10 to
# UTC+14).
_CHANGES = [("America/New_York", datetime(2026, 11, 1, 6, tzinfo=UTC)),
            ("America/New_York", datetime(2026, 3, 8, 7, tzinfo=UTC)),
            ("Australia/Lord_Howe", datetime(2026, 4, 4, 15, tzinfo=UTC)),
            ("Europe/Dublin", datetime(2026, 10, 25, 1, tzinfo=UTC)),
            ("Pacific/Apia", datetime(2011, 12, 30, 10, tzinfo=UTC)),
            ("UTC", datetime(2026, 6, 1, tzinfo=UTC))]
_MINUTES = st.integers(-90, 90) | st.integers(-4 * 24 * 60, 4 * 24 * 60)


@settings(max_examples=1500, deadline=None)
@example(_CHANGES[0], -30, [(40, -20)])  # cutoff 01:30 EDT, date 01:10 EST: later, with an earlier wall clock
@given(st.sampled_from(_CHANGES), _MINUTES,
       st.lists(st.tuples(_MINUTES, st.integers(-12 * 4, 14 * 4)), min_size=1, max_size=2))
def test_the_wall_clock_comparison_agrees_with_the_instants(change: tuple[str, datetime], shift: int,
                                                            dates: list[tuple[int, int]]) -> None:
    """``_dated_before`` with the cutoff also as a wall clock of the practice zone (the fast comparison) answers
    as with the UTC instant alone, and as the instants do: dates minutes to days around a cutoff minutes to
    hours around a daylight-saving change, written with any UTC offset."""
    from zoneinfo import ZoneInfo

    zone, change_at = change
    tz = ZoneInfo(zone)
    instant = change_at + timedelta(minutes=shift)
    local = instant.astimezone(tz)  # as prefetch_cutoffs gives it: in the practice zone
    values = [(instant + timedelta(minutes=m)).astimezone(timezone(timedelta(minutes=15 * q))).isoformat()
              for m, q in dates]
    raw = {"resourceType": "Communication", "id": "c", "sent": values[0]}
    if len(values) > 1:
        raw["received"] = values[1]
    expected = all(datetime.fromisoformat(v) < instant for v in values)
    assert gather._dated_before(raw, tz, instant) is expected
    assert gather._dated_before(raw, tz, instant, local) is expected


def _dated_before_by_conversion(raw: dict[str, Any], tz: Any, cutoff: datetime) -> bool:
    """``_dated_before``'s answer for a Communication by the plain rule: every date read into the practice zone
    with ``as_datetime`` (None: unreadable, kept) and compared with the cutoff as an instant."""
    from cds_service.rules.facts import as_datetime

    values = [raw[k] for k in ("sent", "received") if k in raw]
    if not values:
        return False
    for value in values:
        moment = as_datetime(value, tz) if isinstance(value, str) else None
        if moment is None or moment >= cutoff:
            return False
    return True


_OFFSETS = st.sampled_from(["Z", "+00:00", "-05:00", "+14:00", "-12:00", "+05:30", "-00:00", ""])
_DATE_TEXTS = st.one_of(
    # the full shape, years across the readable bounds (1900-2200) and around the cutoff
    st.builds(lambda d, s, frac, off: f"{d.date().isoformat()}T{d.hour:02d}:{d.minute:02d}:{s:02d}{frac}{off}",
              st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9998, 12, 30)) |
              st.datetimes(min_value=datetime(1899, 12, 30), max_value=datetime(1901, 1, 2)) |
              st.datetimes(min_value=datetime(2199, 12, 30), max_value=datetime(2200, 1, 2)) |
              st.datetimes(min_value=datetime(2026, 5, 29), max_value=datetime(2026, 6, 3)),
              st.integers(0, 59), st.sampled_from(["", ".5", ".123", ".123456"]), _OFFSETS),
    st.dates().map(lambda d: d.isoformat()),  # date only: local midnight
    st.sampled_from(["2026-05", "2026", "2026-13-01T00:00:00Z", "2026-06-01T25:00:00Z", "not a date", "",
                     "2026-06-01T10:00:00+24:00", "2026-06-01 10:00:00Z", "20260601T100000Z"]),
    st.text(max_size=30),
)


# A date minutes to days from the cutoff (0: the cutoff itself), written with an offset of that many quarter hours,
# "Z" when True.
_NEAR_CUTOFF = st.tuples(_MINUTES | st.just(0), st.integers(-12 * 4, 14 * 4), st.booleans())


@settings(max_examples=2000, deadline=None)
@example(_CHANGES[0], 0, [(0, -20, False)])  # the cutoff itself: not before it
@example(_CHANGES[0], 0, [(0, 0, True)])
@example(_CHANGES[0], 0, ["1900-01-01T00:30:00+14:00"])  # 1899 in New York: unreadable, kept
@example(_CHANGES[0], 0, ["2199-12-31T23:30:00-12:00"])  # 2200 in New York: readable, before
@example(("Pacific/Apia", _CHANGES[4][1]), 0, ["2200-01-01T00:30:00Z"])  # 2200 in Apia: readable, not before
@example(("Pacific/Apia", _CHANGES[4][1]), 0, ["2200-12-31T12:30:00Z"])  # 2201 in Apia: unreadable, kept
@given(st.sampled_from(_CHANGES), _MINUTES, st.lists(_DATE_TEXTS | _NEAR_CUTOFF, min_size=1, max_size=2))
def test_dated_before_reads_strings_as_the_rules_do(change: tuple[str, datetime], shift: int,
                                                     dates: list[str | tuple[int, int, bool]]) -> None:
    """A date string with its own UTC offset is compared as an instant without being read into the practice zone
    (the fast path); every string — that shape or another, readable or not, near the year bounds or not, at the
    cutoff or around it — gets the answer of reading it with ``as_datetime`` as the rules do."""
    from zoneinfo import ZoneInfo

    zone, change_at = change
    tz = ZoneInfo(zone)
    instant = change_at + timedelta(minutes=shift)
    texts = [d if isinstance(d, str) else
             (instant + timedelta(minutes=d[0])).astimezone(timezone(timedelta(minutes=15 * d[1]))).isoformat()
             .replace("+00:00", "Z" if d[2] else "+00:00") for d in dates]
    raw: dict[str, Any] = {"resourceType": "Communication", "id": "c", "sent": texts[0]}
    if len(texts) > 1:
        raw["received"] = texts[1]
    expected = _dated_before_by_conversion(raw, tz, instant)
    assert gather._dated_before(raw, tz, instant) is expected
    assert gather._dated_before(raw, tz, instant, instant.astimezone(tz)) is expected


def test_cutoffs_follow_the_fallback_bounds() -> None:
    episode = NOW - gather.EPISODE_LOOKBACK - timedelta(days=1)
    assert CUTOFFS["Observation"] == CUTOFFS["Communication"] == episode
    assert CUTOFFS["Procedure"] == episode - gather.GLOBAL_PERIOD_LOOKBACK
    assert CUTOFFS["ChargeItem"] == CUTOFFS["Claim"] == episode - gather.CALENDAR_MONTH
    assert "Encounter" not in CUTOFFS


def _respond(app: Flask, hook: str, context: dict[str, Any], item: dict[str, Any], server: FhirServer,
             prefetch: dict[str, Any]) -> Any:
    door_item = {**item, "hook": hook, "context": context, "id": f"{item['id']}-{hook}"}
    body = hook_request(door_item, server)
    body["prefetch"] = prefetch
    return runtime_of(app).invoke(SERVICE_FOR_HOOK[hook], body)


@pytest.mark.parametrize("shift_days", [0, 20, 45, 60, 130, 400])
def test_selection_changes_no_response(fhir_app: Callable[..., Flask], loaded_fhir: FhirServer,
                                       monkeypatch: pytest.MonkeyPatch, shift_days: int) -> None:
    dropped = 0
    original = gather.select_prefetched

    def counting(resources: dict[str, list[Any]], cutoffs: dict[str, datetime],
                 parse: Any = None) -> dict[str, list[Any]]:
        nonlocal dropped
        kept = original(resources, cutoffs, parse)
        dropped += sum(map(len, resources.values())) - sum(map(len, kept.values()))
        return kept

    for item in scenarios():
        app = fhir_app(datetime.fromisoformat(item["now"]) + timedelta(days=shift_days))
        for hook, context in doors_of(item):
            prefetch = resolve_prefetch(app, SERVICE_FOR_HOOK[hook], context, loaded_fhir)
            monkeypatch.setattr(gather, "select_prefetched", lambda resources, cutoffs, parse=None: resources)
            whole = _respond(app, hook, context, item, loaded_fhir, prefetch)
            monkeypatch.setattr(gather, "select_prefetched", counting)
            selected = _respond(app, hook, context, item, loaded_fhir, prefetch)
            assert selected == whole, (item["id"], hook, context, shift_days)
    if shift_days >= 45:
        assert dropped > 0, dropped  # the comparison did exercise the selection
    print(f"shift {shift_days} d: {dropped} prefetched resources left unparsed")
