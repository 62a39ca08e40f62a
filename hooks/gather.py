"""What a hook reads, and in which order: the data plan of fhir-profile.md, as prefetch keys and fallback queries.

Every piece of data has one prefetch key (the discovery document offers the template) and one fallback query.
Fallback queries are patient-scoped and bounded by date on the server side so their cost stays flat as a record
grows (fhir-profile.md "Queries"); prefetch templates cannot carry dates in CDS Hooks 2.0, so whatever arrives by
either path is filtered again by the rules, which look only at their own windows. A server that ignores a search
parameter therefore cannot change the answer.

Dependent data (roles, schedules, slots, payers, conditions) has no prefetch template — CDS Hooks 2.0 templates
cannot depend on other data — but the keys ``practitionerRoles``, ``practitioners``, ``schedules``, ``slots``,
``payers`` and ``conditions`` are honoured when a client (or a self-contained request file) supplies them.

Waves (each wave's queries run concurrently):
1. what the context alone names: the encounter, consents, coverages (with payers), the user's roles, and the
   patient's episode data in a window anchored on *now*;
2. what depends on wave 1: the billing practitioners' roles and schedules, payer organizations not included, and
   — when the encounter starts before the now-anchored window — the episode data anchored on the encounter;
3. free Slots between a candidate appointment's creation and its start, and roles of colleagues who saw the
   patient (same specialty, same organization counts for ``established-patient``).

One round trip where the server allows it (issue 13): when the FHIR server's CapabilityStatement declares the
includes and chained parameters it takes (``cds_service/fhir/capabilities.py``), wave 1 also asks for what wave 2
would ask: the practitioners of the patient's encounters with their roles, organizations and schedules
(``_include`` / ``_revinclude:iterate``), and the user's schedules and slots over the window an appointment
resulting from the review can fall in (``SLOT_HORIZON``). Those answers are used only when complete and when their
self link shows every include used (``source.py``); each one *covers* a set of people (or actors and a slot
window), and wave 2 asks only for what is not covered — the same queries as without them. Whatever a server does
with them, the rules read a superset of what the two-wave plan gathers, so the answer cannot change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any
from urllib.parse import quote as _url_quote

import orjson

from cds_service.fhir.lite import references_of, resource_model
from cds_service.fhir.parse import CACHED_LIST_LENGTH, add_raw, parse_item
from cds_service.fhir.source import DataSource, Fetched, Query
from cds_service.record import ResourceBag
from cds_service.rules.episode import is_review_encounter, practitioner_of
from cds_service.rules.facts import (
    as_datetime,
    offset_instant,
    period_start,
    ref_key,
    ref_of,
    ref_type,
    references_in,
    utc,
    wall_clock_order,
)

# A role's organization says whether it is an RHC/FQHC (billing-rules.md §7) and which group a colleague is in.
_ROLE_INCLUDE = "&_include=PractitionerRole:organization"
_PARSE_SLICE = 500  # resources parsed between two looks at the deadline (~10 ms of pydantic)

# Windows (billing-rules.md): 3-year lookback for established patient, 7 days prior for related services,
# 30 days of open submissions for patient-view. The episode window adds margin for a photo taken days before it
# was sent and a review opened days after.
EPISODE_LOOKBACK = timedelta(days=38)
ESTABLISHED_LOOKBACK = timedelta(days=3 * 366 + 38)
# Wave 1 cannot know the encounter's date; its window reaches this much further back so that a review closed
# within two weeks of its start needs no second round of episode queries.
ENCOUNTER_AGE_MARGIN = timedelta(days=14)
# billing-rules.md §7: a surgery in the 90 days before receipt may open a global period the review falls in; care
# management or remote monitoring billed in the same calendar month may have counted the review's time.
GLOBAL_PERIOD_LOOKBACK = timedelta(days=90)  # the default of the rules setting global_period_lookback_days
CALENDAR_MONTH = timedelta(days=31)
MAX_IDS_PER_QUERY = 50
# One round trip (issue 13): the user's slots are asked in wave 1 up to this far after *now*; an appointment that
# starts later needs its slots asked in wave 2, as without the capability.
SLOT_HORIZON = timedelta(days=14)
PEOPLE_FEATURE = "encounter-people-includes"
USER_SLOTS_FEATURE = "user-schedule-chains"
# Encounter → its participants (Practitioner, or PractitionerRole and through it the Practitioner) → every role of
# those practitioners with its organization → the schedules naming any of them. FHIR R4 search.html: ":iterate"
# applies an include to the included resources too.
_PEOPLE_INCLUDES: tuple[tuple[str, str], ...] = (
    ("_include:iterate", "PractitionerRole:practitioner"),
    ("_revinclude:iterate", "PractitionerRole:practitioner"),
    ("_include:iterate", "PractitionerRole:organization"),
)
_SCHEDULE_REVINCLUDE = ("_revinclude:iterate", "Schedule:actor")

# Prefetch templates (CDS Hooks 2.0: root-level context tokens and user tokens only, no date arithmetic).
PREFETCH_TEMPLATES: dict[str, str] = {
    "encounter": "Encounter/{{context.encounterId}}",
    "consents": "Consent?patient={{context.patientId}}",
    "coverages": "Coverage?beneficiary=Patient/{{context.patientId}}&status=active&_include=Coverage:payor",
    "userRoles": "PractitionerRole?practitioner={{userPractitionerId}}&_include=PractitionerRole:organization",
    "encounters": "Encounter?patient={{context.patientId}}&_include=Encounter:service-provider",
    "communications": "Communication?subject=Patient/{{context.patientId}}",
    "media": "Media?subject=Patient/{{context.patientId}}",
    "documents": "DocumentReference?subject=Patient/{{context.patientId}}",
    "procedures": "Procedure?patient={{context.patientId}}",
    "appointments": "Appointment?patient={{context.patientId}}",
    "observations": "Observation?subject=Patient/{{context.patientId}}",
    "reports": "DiagnosticReport?subject=Patient/{{context.patientId}}",
    "impressions": "ClinicalImpression?subject=Patient/{{context.patientId}}",
    "chargeItems": "ChargeItem?patient={{context.patientId}}",
    "claims": "Claim?patient={{context.patientId}}",
}


# Characters urllib's quote() never escapes (RFC 3986 unreserved). FHIR ids (``[A-Za-z0-9\-.]{1,64}``) are made of
# them, so nearly every id of a query goes through unchanged: a regular expression says so in a quarter of
# quote()'s time (it encodes, strips and decodes in Python), and only what it refuses is quoted.
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch
_UNRESERVED_OR_SLASH = re.compile(r"[A-Za-z0-9_.~/-]*").fullmatch


def quote(text: str, safe: str = "/") -> str:
    """``urllib.parse.quote(text, safe)`` for ``safe`` "" or "/", the two this module uses."""
    plain = _UNRESERVED_OR_SLASH if safe == "/" else _UNRESERVED
    return text if plain(text) else _url_quote(text, safe=safe)


def prefetch_for(keys: Iterable[str]) -> dict[str, str]:
    return {key: PREFETCH_TEMPLATES[key] for key in keys}


def fhir_instant(moment: datetime) -> str:
    """A search date value; ``+`` of an offset must be percent-encoded in a query string. ``isoformat`` writes
    only digits, ``-``, ``T``, ``:`` and ``+``: the two replacements give what ``quote(..., safe="")`` gives."""
    return moment.isoformat(timespec="seconds").replace(":", "%3A").replace("+", "%2B")


def _id_of(reference: str | None, resource_type: str) -> str | None:
    """The id of a (relative, absolute or versioned) reference to ``resource_type``."""
    key = ref_key(reference)
    if key is None or ref_type(key) != resource_type:
        return None
    return key.split("/", 1)[1]


@dataclass
class EpisodeData:
    """Everything gathered for one hook call, parsed; what the rules and cards consume."""

    bag: ResourceBag
    patient_id: str
    encounter: Any | None = None
    window_start: datetime | None = None
    origins: dict[str, str] = field(default_factory=dict)
    truncated: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    user_practitioner_id: str | None = None
    # What wave 2 already asked for, so wave 3 asks only about people discovered since.
    asked: dict[str, set[str]] = field(default_factory=lambda: {
        "roles": set(), "role_ids": set(), "actors": set(), "conditions": set(), "payers": set(),
        "practitioners": set()})
    organization_scope: bool = False  # prior services of same-specialty colleagues count (billing-rules.md §6)
    # One round trip: actors whose schedules a first-wave include brought (their slots are still to be asked), and
    # each actor's slot windows already asked, so a later wave asks only outside them.
    schedules_included: set[str] = field(default_factory=set)
    slot_windows: dict[str, list[tuple[datetime, datetime]]] = field(default_factory=dict)
    # What this call parsed (``add_raw``'s ``earlier``): a resource the request holds twice is parsed once.
    parsed_sources: dict[Any, Any] = field(default_factory=dict, repr=False)
    # The Slots of every wave, raw, in the order they came: parsed when gathering is done (``finish_slots``), and
    # only those the rules can read.
    deferred_slots: list[Any] = field(default_factory=list, repr=False)

    def slots_asked(self, actor: str, lo: datetime, hi: datetime) -> bool:
        return any(a_lo <= lo and hi <= a_hi for a_lo, a_hi in self.slot_windows.get(actor, ()))

    def record(self, fetched: dict[str, Fetched], check_deadline: Callable[[], None],
               cutoffs: dict[str, datetime] | None = None) -> None:
        """Take in a wave's results. Parsing a large record takes time: ``check_deadline`` is called between
        slices of it, so a call answers on time (412) rather than finish parsing past its deadline.

        ``cutoffs`` (resource type → instant): prefetched resources of those types whose every date lies before
        the cutoff are left unparsed (``select_prefetched``)."""
        resources = {key: item.resources for key, item in fetched.items()}
        parsed = 0  # slices parsed so far
        if cutoffs:
            prefetched = {key: item.resources for key, item in fetched.items() if item.origin.startswith("prefetch")}
            # The selection parses what it keeps as it goes (into ``parsed_sources``, where add_raw below finds
            # it), looking at the deadline as add_raw does; a long list goes around the parse cache, as there.
            uncached = {id(raw) for items in prefetched.values() if len(items) > CACHED_LIST_LENGTH for raw in items}
            ahead = 0

            def parse(raw: Any) -> tuple[str, ...] | None:
                nonlocal ahead, parsed
                if type(raw) is dict and raw.get("resourceType") == "Slot":
                    return None  # parsed, if at all, by finish_slots: its references are searched as text
                if ahead % _PARSE_SLICE == 0 and ahead:
                    check_deadline()
                    parsed += 1
                ahead += 1
                return references_of(parse_item(raw, self.parsed_sources, id(raw) not in uncached)[0])

            resources.update(select_prefetched(prefetched, cutoffs, parse))
        for key, item in fetched.items():
            self.origins[key] = item.origin
            if item.truncated or item.degraded:
                self.truncated.append(key)  # incomplete either way: the rules may not conclude "met" from it
            if item.origin == "unavailable" and item.note:
                self.unavailable[key] = item.note
            raw = resources[key]
            slots = [r for r in raw if type(r) is dict and r.get("resourceType") == "Slot"]
            if slots:
                self.deferred_slots.extend(slots)
                raw = [r for r in raw if not (type(r) is dict and r.get("resourceType") == "Slot")]
            for start in range(0, len(raw), _PARSE_SLICE):
                if parsed:
                    check_deadline()
                add_raw(self.bag, raw[start:start + _PARSE_SLICE], self.parsed_sources)
                parsed += 1

    def finish_slots(self, now: datetime, check_deadline: Callable[[], None]) -> None:
        """Parse the Slots every wave brought (``deferred_slots``) that the rules can read, into the bag.

        Only ``no-resulting-service`` reads Slots (billing-rules.md §6, ``_slot_verdict``): an appointment's own
        slots (by reference), and the slots starting between the appointment's creation — ``created``, or now when
        it has none — and its start. So a Slot no appointment of the record refers to, dated entirely before the
        earliest creation of any appointment of the record (less ``_SLOT_MARGIN``), is never read, whatever the
        appointment's status, practitioner or reason; it is left unparsed. Decided here, once every wave is in:
        an appointment a later wave brings can reach back further than the first wave could know. A Slot the call
        holds twice is left out only when every copy is (the bag keeps the last *valid* copy, known only by
        parsing), and the kept ones are added in the order they came (the order ``_slot_verdict`` lists evidence
        in). A Slot without a string id, or whose dates cannot be read, is kept. A record without appointments
        (most hook calls) parses no Slot."""
        slots, self.deferred_slots = self.deferred_slots, []
        if not slots:
            return
        appointments = self.bag.of_type("Appointment")
        if not appointments:
            return  # no appointment, no question a Slot answers
        tz = now.tzinfo
        earliest = now
        referenced: set[str] = set()
        for appointment in appointments:
            created = as_datetime(appointment.created, tz)
            if created is not None and utc(created) < utc(earliest):
                earliest = created
            # The rule's own reading of an appointment's slots (``_slot_verdict``: ``ref_of``).
            referenced.update(key for key in (ref_of(slot) for slot in appointment.slot or ()) if key is not None)
        cutoff = earliest - _SLOT_MARGIN
        needed: dict[str, bool] = {}  # "Slot/id" → whether any copy of it can be read
        for raw in slots:
            key = _slot_key(raw)
            if key is None or needed.get(key):
                continue
            try:
                needed[key] = key in referenced or not _dated_before(raw, tz, utc(cutoff), cutoff)
            except (TypeError, AttributeError, ValueError, OverflowError):
                needed[key] = True
        kept = [raw for raw in slots if (key := _slot_key(raw)) is None or needed[key]]
        for start in range(0, len(kept), _PARSE_SLICE):
            check_deadline()
            add_raw(self.bag, kept[start:start + _PARSE_SLICE], self.parsed_sources)


def _slot_key(raw: dict[str, Any]) -> str | None:
    """``Slot/id`` of a raw Slot with a string id (None otherwise: such a Slot is always kept)."""
    rid = raw.get("id")
    return f"Slot/{rid}" if type(rid) is str and rid else None


# Slots a margin earlier than the earliest appointment creation are left out (finish_slots): date-only values and a
# practice zone other than ``now``'s (UTC offsets differ by up to 26 hours) cannot bring one back into a window.
_SLOT_MARGIN = timedelta(days=2)



# --- select on the raw JSON first, validate what remains (issue 13) ----------------------------------------------
# Prefetch templates cannot carry dates, so a prefetched key holds the patient's whole history, while the fallback
# queries ask the server only for what lies inside the rules' windows (``_episode_queries``). Validating a resource
# with fhir.resources costs ~0.25 ms; history outside every window is never read by the rules, so the prefetched
# resources of these types are selected on their raw dates with the fallback queries' bounds before parsing.
# Conservative everywhere: a resource is left out only when it is a JSON object of one of these types, has at least
# one date element the rules or the search parameter read, every such element is readable and lies before the
# cutoff (an open Period, an unreadable value or an unknown [x] variant keeps it), and no kept resource of the same
# wave refers to it. Types resolved by reference (Encounter, Condition, Organization, PractitionerRole, Practitioner,
# Schedule, Slot, Consent, Coverage) are never selected on.
_DATE_ELEMENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # type: (dateTime/instant elements, Period elements, [x] prefixes whose other variants keep the resource)
    "Communication": (("sent", "received"), (), ()),
    "Media": (("createdDateTime", "issued"), ("createdPeriod",), ("created",)),
    "DocumentReference": (("date",), (), ()),
    "Observation": (("effectiveDateTime", "effectiveInstant", "issued"), ("effectivePeriod",), ("effective",)),
    "DiagnosticReport": (("effectiveDateTime", "issued"), ("effectivePeriod",), ("effective",)),
    "ClinicalImpression": (("date", "effectiveDateTime"), ("effectivePeriod",), ("effective",)),
    "Appointment": (("start", "end"), (), ()),
    "Procedure": (("performedDateTime",), ("performedPeriod",), ("performed",)),
    "ChargeItem": (("enteredDate", "occurrenceDateTime"), ("occurrencePeriod",), ("occurrence",)),
    "Claim": (("created",), ("billablePeriod",), ()),
    # Not selected on in a wave (no cutoff): EpisodeData.finish_slots reads their dates once every wave is in.
    "Slot": (("start", "end"), (), ()),
}
_SELECTION_MARGIN = timedelta(days=1)  # date-only values, time zones: a day more than any window


def prefetch_cutoffs(window_start: datetime, procedures_lookback: timedelta) -> dict[str, datetime]:
    """The fallback queries' lower bounds (``_episode_queries``) by resource type, less a day of margin.
    Encounters are not selected on: the established-patient look-back is a rules setting."""
    episode = window_start - _SELECTION_MARGIN
    cutoffs = {rtype: episode for rtype in ("Communication", "Media", "DocumentReference", "Observation",
                                             "DiagnosticReport", "ClinicalImpression", "Appointment")}
    cutoffs["Procedure"] = episode - procedures_lookback
    cutoffs["ChargeItem"] = cutoffs["Claim"] = episode - CALENDAR_MONTH
    return cutoffs


_KNOWN_DATE_ELEMENTS = {rtype: frozenset(instants) | frozenset(periods)
                        for rtype, (instants, periods, _prefixes) in _DATE_ELEMENTS.items()}


@cache
def _plain_elements(rtype: str) -> frozenset[str]:
    """The JSON names of ``rtype``'s declared elements (R4B model) that start with none of its ``[x]`` prefixes.
    Computed at first use: importing the models at import time would add them to every CLI command's start."""
    prefixes = _DATE_ELEMENTS[rtype][2]
    model = resource_model(rtype)
    if model is None or not prefixes:
        return frozenset()
    names = {info.alias or name for name, info in model.model_fields.items()}
    return frozenset(name for name in names if not name.startswith(prefixes))


def _dated_before(raw: dict[str, Any], tz: Any, cutoff: datetime, local_cutoff: datetime | None = None) -> bool:
    """Whether every date the rules (or the search parameter) read of a raw resource lies before ``cutoff`` (a UTC
    instant) — False when it has none, or one cannot be read, or an unknown [x] variant or an open period is there.
    Stops at the first date on or after the cutoff (most resources of a chart's recent part). ``local_cutoff``: the
    same instant as a wall clock, compared by ``wall_clock_order`` when it is in ``tz`` (dates are read into it)."""
    rtype = raw["resourceType"]
    instants, periods, prefixes = _DATE_ELEMENTS[rtype]
    if prefixes:
        known = _KNOWN_DATE_ELEMENTS[rtype]
        # Only keys outside the type's other declared elements can be an [x] variant: one set difference in C
        # instead of a prefix test per key.
        for key in raw.keys() - _plain_elements(rtype):
            if key not in known and key.startswith(prefixes):
                return False  # another [x] variant (performedString, effectiveTiming...): not read here
    values: list[Any] = [raw[k] for k in instants if k in raw]
    for name in periods:
        if name in raw:
            period = raw[name]
            if not isinstance(period, dict) or "end" not in period:
                return False  # an open (ongoing) period, or not a period at all
            values.append(period["end"])
            if "start" in period:
                values.append(period["start"])
    if rtype == "DocumentReference":
        context = raw.get("context")
        if context is not None and (not isinstance(context, dict) or "period" in context):
            return False  # rarely present; not worth reading
        for content in raw.get("content") or ():
            attachment = content.get("attachment") if isinstance(content, dict) else None
            if isinstance(attachment, dict) and "creation" in attachment:
                values.append(attachment["creation"])
    if not values:
        return False
    for value in values:
        if type(value) is str:
            # A value with its own UTC offset (nearly every one) is compared as the instant it names: as_datetime
            # would read it into the practice zone only to compare the same instant, and its cache answers only a
            # string seen before — in an EHR's traffic, each patient's own dates are new.
            instant = offset_instant(value)
            if instant is not None:
                if instant >= cutoff:
                    return False
                continue
        moment = as_datetime(value, tz) if isinstance(value, str) else None
        if moment is None:
            return False
        if local_cutoff is not None:
            # In one zone object (the cutoffs are the practice zone's, as the dates read here), the wall clocks
            # decide when days apart (facts.wall_clock_order), in C, without either UTC offset; an aware comparison
            # across two zones looks both up (about 1.3 µs, most of this function's time). Closer ones, or another
            # zone, are compared as instants below.
            order = wall_clock_order(moment, local_cutoff)
            if order > 0:
                return False
            if order < 0:
                continue
        # ``cutoff`` is in UTC and ``moment`` in the practice zone: an aware comparison across two time zones
        # compares the instants (it subtracts each one's UTC offset), as utc() would, without a new datetime.
        if moment >= cutoff:
            return False
    return True


# A "reference" member with a string value, in compact JSON text as orjson writes it; the value runs to the first
# unescaped quote. The pattern starts with its literal so that the search runs at C speed. It may also match where
# "reference" ends a longer key holding an escaped quote (`"a\"reference":"..."`): an extra value found only keeps
# an old resource more (as without any selection), and none is ever missed.
_REFERENCE_MEMBER = re.compile(rb'"reference":"([^"\\]*(?:\\.[^"\\]*)*)"')


def _without_narrative(raw: Any) -> Any:
    """``raw`` with its ``text.div`` string left out (a shallow copy), or ``raw`` itself when it has none."""
    if type(raw) is dict:
        narrative = raw.get("text")
        if type(narrative) is dict and type(narrative.get("div")) is str:
            copy = dict(raw)
            copy["text"] = {k: v for k, v in narrative.items() if k != "div"}
            return copy
    return raw


def _referenced(values: list[Any], keys: Collection[str]) -> set[str]:
    """Which of ``keys`` (``Type/id``) the raw JSON values refer to (``reference`` strings at any depth), or may.

    The values are written once as JSON text by orjson (C) and their ``reference`` members found by one regular
    expression; plain relative references (one slash, no escape: nearly all) are matched against the keys as
    bytes, in one set intersection; anything else is read by ``ref_key``. Falls back to walking the documents
    (``references_in``) for what orjson does not write (an integer beyond 64 bits, a lone surrogate, nesting past
    its limit).

    A resource's narrative (a ``text.div`` string) is left out of the text: a string holds no member (its quotes
    are escaped), so no match can start or end in it, and narratives are most of a chart's JSON (about two
    thirds of the benchmark records')."""
    try:
        text = orjson.dumps([_without_narrative(value) for value in values])
    except TypeError:
        found: set[str] = set()
        for value in values:
            for reference in references_in(value):
                if (key := ref_key(reference)) is not None and key in keys:
                    found.add(key)
        return found
    members = set(_REFERENCE_MEMBER.findall(text))
    plain = {key.encode("utf-8"): key for key in keys}
    found = {plain[raw] for raw in members & plain.keys()}
    for raw in members:
        if raw.count(b"/") == 1 and b"\\" not in raw:
            continue  # a relative reference is its own key (or none): matched above or not one of ``keys``
        reference = orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode("utf-8")
        if (key := ref_key(reference)) is not None and key in keys:
            found.add(key)
    return found


def _referenced_by_parsing(values: list[Any], keys: Collection[str],
                           parse: Callable[[Any], tuple[str, ...] | None]) -> set[str]:
    """What ``_referenced`` finds, with each value parsed by ``parse`` (which keeps the result for the caller):
    the fast reader collected the ``reference`` of every Reference element as it built them, so nothing is
    written out again. A value it did not read (a full model, a skipped resource, not a resource) is searched
    as JSON text, as before."""
    found: set[str] = set()
    unread: list[Any] = []
    for raw in values:
        refs = parse(raw)
        if refs is None:
            unread.append(raw)
            continue
        for reference in refs:
            if reference in keys:
                found.add(reference)
            elif reference.count("/") != 1 and (key := ref_key(reference)) is not None and key in keys:
                found.add(key)  # absolute, versioned or otherwise spelled: its Type/id, as ref_key reads it
    if unread:
        found |= _referenced(unread, keys)
    return found


def select_prefetched(resources: dict[str, list[Any]], cutoffs: dict[str, datetime],
                      parse: Callable[[Any], tuple[str, ...] | None] | None = None) -> dict[str, list[Any]]:
    """The raw resources of each key the rules may read: those dated entirely before their type's cutoff are left
    out, unless a kept resource refers to them. Everything else, valid or not, is kept for parsing.

    ``parse`` (``EpisodeData.record`` passes it): parses a kept resource ahead (the caller keeps the result) and
    gives the references the fast reader collected in it (``lite.references_of``), or None when it did not read
    it; without it, the kept resources are searched as JSON text (``_referenced``)."""
    tz = next(iter(cutoffs.values())).tzinfo
    instants = {rtype: utc(cutoff) for rtype, cutoff in cutoffs.items() if rtype in _DATE_ELEMENTS}
    old: dict[int, str] = {}  # id() of a raw resource outside every window → its Type/id
    for items in resources.values():
        for raw in items:
            if type(raw) is not dict:
                continue
            rtype = raw.get("resourceType")
            if type(rtype) is not str or rtype not in instants:
                continue
            rid = raw.get("id")
            if type(rid) is not str or not rid:
                continue
            try:
                if _dated_before(raw, tz, instants[rtype], cutoffs[rtype]):
                    old[id(raw)] = f"{rtype}/{rid}"
            except (TypeError, AttributeError, ValueError, OverflowError):
                continue
    if not old:
        return resources
    # Keep whatever a kept resource refers to (a message's photo taken weeks before it was sent, a report's
    # results), and so on until nothing more is kept.
    pending = [raw for items in resources.values() for raw in items if id(raw) not in old]
    while pending:
        keys = set(old.values())
        referenced = _referenced(pending, keys) if parse is None else _referenced_by_parsing(pending, keys, parse)
        if not referenced:
            break
        pending = [raw for items in resources.values() for raw in items
                   if id(raw) in old and old[id(raw)] in referenced]
        for raw in pending:
            del old[id(raw)]
    if not old:
        return resources
    return {key: [raw for raw in items if id(raw) not in old] for key, items in resources.items()}


def _episode_queries(patient_id: str, since: datetime, tag: str,
                     procedures_lookback: timedelta = GLOBAL_PERIOD_LOOKBACK) -> list[Query]:
    p = quote(patient_id, safe="")
    lo = fhir_instant(since)
    established_lo = fhir_instant(since - (ESTABLISHED_LOOKBACK - EPISODE_LOOKBACK))
    procedures_lo = fhir_instant(since - procedures_lookback)
    charges_lo = fhir_instant(since - CALENDAR_MONTH)
    return [
        # The service provider comes along: an RHC/FQHC bills under its own rules (billing-rules.md §7).
        Query("encounters", f"Encounter?patient={p}&date=ge{established_lo}&_include=Encounter:service-provider",
              name=f"encounters{tag}"),
        # A patient's message may carry only `received`, a follow-up only `sent`: ask for both windows.
        Query("communications", f"Communication?subject=Patient/{p}&sent=ge{lo}", name=f"communications:sent{tag}"),
        Query("communications", f"Communication?subject=Patient/{p}&received=ge{lo}",
              name=f"communications:received{tag}"),
        Query("media", f"Media?subject=Patient/{p}&created=ge{lo}", name=f"media{tag}"),
        Query("documents", f"DocumentReference?subject=Patient/{p}&date=ge{lo}", name=f"documents{tag}"),
        Query("procedures", f"Procedure?patient={p}&date=ge{procedures_lo}", name=f"procedures{tag}"),
        Query("appointments", f"Appointment?patient={p}&date=ge{lo}", name=f"appointments{tag}"),
        Query("observations", f"Observation?subject=Patient/{p}&date=ge{lo}", name=f"observations{tag}"),
        Query("reports", f"DiagnosticReport?subject=Patient/{p}&date=ge{lo}", name=f"reports{tag}"),
        # Optional: some servers (SEKMET 0.1.1) define no ClinicalImpression search parameters at all.
        Query("impressions", f"ClinicalImpression?subject=Patient/{p}&date=ge{lo}", required=False,
              name=f"impressions{tag}"),
        # Optional: a Claim draft is the alternative some EHRs use for charges (fhir-profile.md "Already billed").
        Query("claims", f"Claim?patient={p}&created=ge{charges_lo}", required=False, name=f"claims{tag}"),
        Query("chargeItems", f"ChargeItem?patient={p}&entered-date=ge{charges_lo}",
              name=f"chargeItems:entered{tag}"),
        Query("chargeItems", f"ChargeItem?patient={p}&occurrence=ge{charges_lo}",
              name=f"chargeItems:occurrence{tag}"),
    ]


def gather_episode(
    source: DataSource,
    *,
    patient_id: str,
    now: datetime,
    encounter_id: str | None = None,
    user_practitioner_id: str | None = None,
    proposed: Iterable[dict[str, Any]] = (),
    organization_scope: bool = False,
    procedures_lookback: timedelta = GLOBAL_PERIOD_LOOKBACK,
) -> EpisodeData:
    """Fetch (or take from prefetch) everything the rules of billing-rules.md §3 read for this patient."""
    data = EpisodeData(bag=ResourceBag(), patient_id=patient_id, user_practitioner_id=user_practitioner_id,
                       organization_scope=organization_scope)
    try:
        _gather_waves(data, source, now, encounter_id, user_practitioner_id, proposed, procedures_lookback)
        data.finish_slots(now, source.check_deadline)
    finally:
        # The JSON fetched from a FHIR server goes with its wave's results, as before: only gathering needs it.
        data.parsed_sources.clear()
    return data


def _gather_waves(data: EpisodeData, source: DataSource, now: datetime, encounter_id: str | None,
                  user_practitioner_id: str | None, proposed: Iterable[dict[str, Any]],
                  procedures_lookback: timedelta) -> None:
    patient_id = data.patient_id
    p = quote(patient_id, safe="")
    window_start = now - EPISODE_LOOKBACK - (ENCOUNTER_AGE_MARGIN if encounter_id else timedelta(0))

    # Wave 1: what the context names.
    wave1 = [
        Query("consents", f"Consent?patient={p}"),
        Query("coverages", f"Coverage?beneficiary=Patient/{p}&status=active&_include=Coverage:payor"),
        *_episode_queries(patient_id, window_start, "", procedures_lookback),
    ]
    if encounter_id:
        wave1.append(Query("encounter", f"Encounter/{quote(encounter_id, safe='')}"))
    if user_practitioner_id:
        # The user is usually the practitioner who bills: ask for their roles and Practitioner resource now, so
        # that the common case needs no second wave.
        uid = quote(user_practitioner_id, safe="")
        wave1.append(Query("userRoles", f"PractitionerRole?practitioner={uid}{_ROLE_INCLUDE}"))
        wave1.append(Query("practitioners", f"Practitioner?_id={uid}", required=False, name="practitioners@1"))
        data.asked["roles"].add(user_practitioner_id)
        data.asked["practitioners"].add(user_practitioner_id)
    # appointment-book: the proposed appointments are known before anything is fetched, and so is the question
    # they raise (was the booked slot the soonest?): their practitioners' schedules and slots join wave 1.
    proposed = list(proposed)
    add_raw(data.bag, proposed, data.parsed_sources)
    wave1.extend(_proposed_slot_queries(data, now, window_start))
    ahead = _one_round_trip_queries(source, patient_id, user_practitioner_id, now, window_start, bool(proposed))
    fetched = source.fetch(wave1 + ahead)
    ahead_names = {q.result_name for q in ahead}
    # Answers of the first-wave look-ahead are taken only when they can be trusted whole (_take_ahead).
    ahead_fetched = {name: fetched.pop(name) for name in ahead_names if name in fetched}
    data.record(fetched, source.check_deadline,
                _wave1_cutoffs(fetched, encounter_id, proposed, window_start, now.tzinfo, procedures_lookback))
    _take_ahead(data, ahead, ahead_fetched, patient_id, user_practitioner_id, window_start, now,
                source.check_deadline)
    source.check_deadline()
    if encounter_id:
        data.encounter = data.bag.get(f"Encounter/{encounter_id}")

    # Wave 2: who took part (roles decide the code and "same specialty"), their schedules and slots, payers,
    # coded conditions; and — for an encounter older than wave 1's window — its episode data.
    wave2: list[Query] = []
    anchor = _encounter_anchor(data.encounter, now.tzinfo)
    if anchor is not None and anchor - EPISODE_LOOKBACK < window_start:
        window_start = anchor - EPISODE_LOOKBACK
        # Prefetched keys already hold the whole (undated) result: only re-query what was fetched by date.
        prefetched = {v.key for v in fetched.values() if v.origin.startswith("prefetch")}
        wave2.extend(q for q in _episode_queries(patient_id, window_start, "@encounter", procedures_lookback)
                     if q.key not in prefetched)
    data.window_start = window_start
    wave2.extend(_people_queries(data, now, window_start, "@2"))
    wave2.extend(_reference_queries(data, "@2"))
    if not wave2:
        return  # nothing new was read, so a third look would find nothing new either
    answers = source.fetch(wave2)
    data.record(answers, source.check_deadline)
    source.check_deadline()
    if not any(item.resources for item in answers.values()):
        return  # the record is as it was when wave 2 was planned: a third look would ask nothing new

    # Wave 3, only when wave 2 brought new people (a PractitionerRole reference resolved to its practitioner,
    # or an older encounter's episode): their roles, schedules and slots.
    wave3 = _people_queries(data, now, window_start, "@3") + _reference_queries(data, "@3")
    if wave3:
        data.record(source.fetch(wave3), source.check_deadline)
        source.check_deadline()


def _wave1_cutoffs(fetched: dict[str, Fetched], encounter_id: str | None, proposed: list[dict[str, Any]],
                   window_start: datetime, tz: Any, procedures_lookback: timedelta) -> dict[str, datetime] | None:
    """Cutoffs for the prefetched keys of wave 1. An encounter older than the now-anchored window moves the
    window back in wave 2 (``_encounter_anchor``); prefetched keys are not asked again then, so the selection
    reaches back to the encounter's own window now, read from its raw JSON. A proposed appointment (created or
    starting before that window) may result from an earlier review: the selection reaches back from it too.
    None (no selection) when one of those dates cannot be read."""
    if tz is None or not any(item.origin.startswith("prefetch") for item in fetched.values()):
        return None
    start = window_start
    for appointment in proposed:
        if not isinstance(appointment, dict):
            continue
        for name in ("created", "start"):
            value = appointment.get(name)
            if value is None:
                continue
            moment = as_datetime(value, tz) if isinstance(value, str) else None
            if moment is None:
                return None
            if utc(moment - EPISODE_LOOKBACK) < utc(start):
                start = moment - EPISODE_LOOKBACK
    if encounter_id:
        for raw in (r for item in fetched.values() for r in item.resources
                    if isinstance(r, dict) and r.get("resourceType") == "Encounter" and r.get("id") == encounter_id):
            if raw.get("period") is None:
                continue
            period = raw["period"]
            if not isinstance(period, dict):
                return None
            values = [period.get("start"), period.get("end")]
            if any(v is not None and (not isinstance(v, str) or as_datetime(v, tz) is None) for v in values):
                return None
            anchor = next((as_datetime(v, tz) for v in values if v is not None), None)
            if anchor is not None and utc(anchor - EPISODE_LOOKBACK) < utc(start):
                start = anchor - EPISODE_LOOKBACK
    return prefetch_cutoffs(start, procedures_lookback)


def _people_queries(data: EpisodeData, now: datetime, window_start: datetime, tag: str) -> list[Query]:
    """What the rules will read about people, and only that (so the common case needs no second wave):
    roles and the Practitioner resource of whoever may bill; roles of colleagues only when "same specialty"
    can matter (nobody who may bill saw the patient before, or the organization scope is configured);
    PractitionerRoles referenced by id; schedules of whoever may bill, and their slots only when an appointment
    could be the soonest available one."""
    bag = data.bag
    asked = data.asked
    queries: list[Query] = []
    candidates = _episode_practitioners(data)
    wanted = set(candidates)
    if data.organization_scope or not _seen_by_a_candidate(data, candidates):
        wanted |= _all_practitioners(bag)
    people = sorted(wanted - _practitioners_with_roles(bag) - asked["roles"])
    asked["roles"].update(people)
    for n, chunk in enumerate(_chunks(people)):
        ids = ",".join(quote(i, safe="") for i in chunk)
        queries.append(Query("practitionerRoles", f"PractitionerRole?practitioner={ids}{_ROLE_INCLUDE}", required=False,
                             name=f"practitionerRoles{tag}.{n}"))
    role_ids = sorted(_unresolved_ids(bag, "PractitionerRole") - asked["role_ids"])
    asked["role_ids"].update(role_ids)
    for n, chunk in enumerate(_chunks(role_ids)):
        ids = ",".join(quote(i, safe="") for i in chunk)
        queries.append(Query("practitionerRoles", f"PractitionerRole?_id={ids}{_ROLE_INCLUDE}", required=False,
                             name=f"roles{tag}.{n}"))
    # The Practitioner resources of whoever may bill: Practitioner.qualification may carry the NUCC code.
    unread = sorted(c for c in candidates - asked["practitioners"] if data.bag.get(f"Practitioner/{c}") is None)
    asked["practitioners"].update(unread)
    for n, chunk in enumerate(_chunks(unread)):
        ids = ",".join(quote(i, safe="") for i in chunk)
        queries.append(Query("practitioners", f"Practitioner?_id={ids}", required=False,
                             name=f"practitioners{tag}.{n}"))
    window = _slot_window(bag, now, window_start)
    if window is None:
        return queries  # schedules and slots only decide "soonest available": no appointment, no question
    actors = {f"Practitioner/{i}" for i in candidates} | {
        f"PractitionerRole/{role.id}" for role in bag.of_type("PractitionerRole")
        if _id_of(role.practitioner.reference if role.practitioner else None, "Practitioner") in candidates
    }
    # A schedule may name the practitioner or one of their roles: once one is in hand, the other is not asked.
    scheduled = {practitioner_id(a.reference, bag) for sch in bag.of_type("Schedule") for a in sch.actor or ()}
    new_actors = sorted(a for a in actors - asked["actors"] if practitioner_id(a, bag) not in scheduled)
    asked["actors"].update(new_actors)
    lo, hi = window
    for n, chunk in enumerate(_chunks(new_actors)):
        ids = ",".join(quote(a, safe="/") for a in chunk)
        queries.append(Query("schedules", f"Schedule?actor={ids}", required=False, name=f"schedules{tag}.{n}"))
    # Slots of the actors whose schedules were just asked, and of those whose schedules came with a first-wave
    # include, unless a wave already asked their slots over a window containing this one.
    # As for schedules, a practitioner one of whose actors had its slots asked is not asked again for the others.
    covered = {practitioner_id(a, bag) for a in actors if data.slots_asked(a, lo, hi)}
    included = {a for a in actors & data.schedules_included if practitioner_id(a, bag) not in covered}
    slot_actors = sorted(a for a in set(new_actors) | included if not data.slots_asked(a, lo, hi))
    for actor in slot_actors:
        data.slot_windows.setdefault(actor, []).append((lo, hi))
    for n, chunk in enumerate(_chunks(slot_actors)):
        ids = ",".join(quote(a, safe="/") for a in chunk)
        # All statuses, not only free: whether there is Slot data at all decides between a verdict and
        # `unknown` (billing-rules.md §6 "without Slot data"). A server ignoring the chained parameter returns
        # more slots; the rules keep only those of the practitioner's schedules.
        queries.append(Query(
            "slots",
            f"Slot?schedule.actor={ids}&start=ge{fhir_instant(lo)}&start=le{fhir_instant(hi)}",
            required=False,
            name=f"slots{tag}.{n}",
        ))
    return queries


def _seen_by_a_candidate(data: EpisodeData, candidates: set[str]) -> bool:
    """Whether every practitioner who may bill had a finished encounter with the patient that is not a remote
    review: then established-patient is settled without asking about colleagues' specialties. Review encounters
    (class VR) are left out whichever hook asks — the assessment's own review never makes the patient established
    (billing-rules.md §7), and without an ``encounterId`` (patient-view) the service cannot know which one is
    "own" before the rules run."""
    if not candidates:
        return False
    seen: set[str] = set()
    for encounter in data.bag.of_type("Encounter"):
        if encounter.status != "finished" or is_review_encounter(encounter):
            continue
        seen.update(pid for ref in _participant_refs(encounter) if (pid := practitioner_id(ref, data.bag)))
    return candidates <= seen


def _proposed_slot_queries(data: EpisodeData, now: datetime, window_start: datetime) -> list[Query]:
    window = _slot_window(data.bag, now, window_start)
    if window is None:
        return []
    people = {pid for appointment in data.bag.of_type("Appointment") for p in appointment.participant or ()
              if p.actor is not None and (pid := _id_of(p.actor.reference, "Practitioner"))}
    if data.user_practitioner_id:
        people.add(data.user_practitioner_id)
    actors = sorted(f"Practitioner/{pid}" for pid in people)
    data.asked["actors"].update(actors)
    lo, hi = window
    for actor in actors:
        data.slot_windows.setdefault(actor, []).append((lo, hi))
    queries = []
    for n, chunk in enumerate(_chunks(actors)):
        ids = ",".join(quote(a, safe="/") for a in chunk)
        queries.append(Query("schedules", f"Schedule?actor={ids}", required=False, name=f"schedules@1.{n}"))
        queries.append(Query("slots", f"Slot?schedule.actor={ids}&start=ge{fhir_instant(lo)}"
                             f"&start=le{fhir_instant(hi)}", required=False, name=f"slots@1.{n}"))
    return queries


# --- one round trip where the server allows it (issue 13) ---------------------------------------------------------
def _one_round_trip_queries(source: DataSource, patient_id: str, user_practitioner_id: str | None, now: datetime,
                            window_start: datetime, proposing: bool) -> list[Query]:
    """What wave 1 can also ask, given what the server declares (and has not refused or ignored before): nothing
    while its CapabilityStatement is not known yet — it is then being read, concurrently with this wave. Only on
    the fallback path (the encounters come from the server): with a prefetched record the FHIR server is asked
    only what the prefetch lacks, and no statement is read for it."""
    if source.client is None or source.prefetched("encounters"):
        return []
    capabilities, refused = source.server_capabilities()
    if capabilities is None:
        return []
    p = quote(patient_id, safe="")
    queries: list[Query] = []
    people_declared = (
        capabilities.supports_include("Encounter", "Encounter:participant")
        and capabilities.supports_include("PractitionerRole", "PractitionerRole:practitioner")
        and capabilities.supports_revinclude("Practitioner", "PractitionerRole:practitioner")
        and capabilities.supports_include("PractitionerRole", "PractitionerRole:organization"))
    if people_declared and PEOPLE_FEATURE not in refused:
        common = list(_PEOPLE_INCLUDES)
        if (capabilities.supports_revinclude("Practitioner", "Schedule:actor")
                and capabilities.supports_revinclude("PractitionerRole", "Schedule:actor")):
            common.append(_SCHEDULE_REVINCLUDE)
        # The encounters and messages of wave 1's own queries (same windows), this time with who took part.
        lo = fhir_instant(window_start)
        searches = [("people@1", f"Encounter?patient={p}&date=ge{fhir_instant(window_start - ESTABLISHED_LOOKBACK)}",
                     [("_include", "Encounter:participant")])]
        if (capabilities.supports_include("Communication", "Communication:sender")
                and capabilities.supports_include("Communication", "Communication:recipient")):
            senders = [("_include", "Communication:sender"), ("_include", "Communication:recipient")]
            searches += [("people@1.sent", f"Communication?subject=Patient/{p}&sent=ge{lo}", senders),
                         ("people@1.received", f"Communication?subject=Patient/{p}&received=ge{lo}", senders)]
        for name, search, own in searches:
            includes = (*own, *common)
            params = "&".join(f"{key}={value}" for key, value in includes)
            queries.append(Query("people", f"{search}&{params}", required=False, name=name, verify=includes,
                                 feature=PEOPLE_FEATURE))
    # appointment-book asks the proposal's slots in wave 1 already (_proposed_slot_queries).
    user_slots_declared = (
        capabilities.supports_chain(("Schedule", "actor"), ("PractitionerRole", "practitioner"))
        and capabilities.supports_chain(("Slot", "schedule"), ("Schedule", "actor"), ("PractitionerRole",
                                                                                     "practitioner"))
        and capabilities.supports_param("Slot", "start")
        and capabilities.supports_include("Slot", "Slot:schedule"))
    if (user_practitioner_id and not proposing and user_slots_declared and USER_SLOTS_FEATURE not in refused
            and not source.prefetched("slots") and not source.prefetched("schedules")):
        uid = quote(user_practitioner_id, safe="")
        lo, hi = fhir_instant(window_start), fhir_instant(now + SLOT_HORIZON)
        dates = f"start=ge{lo}&start=le{hi}&_include=Slot:schedule"
        verify = (("_include", "Slot:schedule"),)
        for n, (schedule_actor, slot_actor) in enumerate((
                (f"actor=Practitioner/{uid}", f"schedule.actor=Practitioner/{uid}"),
                (f"actor:PractitionerRole.practitioner={uid}",
                 f"schedule.actor:PractitionerRole.practitioner={uid}"))):
            queries.append(Query("userSchedules", f"Schedule?{schedule_actor}", required=False,
                                 name=f"userSchedules@1.{n}", feature=USER_SLOTS_FEATURE))
            queries.append(Query("userSlots", f"Slot?{slot_actor}&{dates}", required=False,
                                 name=f"userSlots@1.{n}", verify=verify, feature=USER_SLOTS_FEATURE))
    return queries


def _trusted(item: Fetched | None) -> bool:
    """A look-ahead answer usable whole: fetched, complete, and (when checked) with every include used."""
    return (item is not None and item.origin == "fhir" and not item.truncated and not item.degraded
            and item.honored is not False)


def _take_ahead(data: EpisodeData, queries: list[Query], fetched: dict[str, Fetched], patient_id: str,
                user_practitioner_id: str | None, window_start: datetime, now: datetime,
                check_deadline: Callable[[], None]) -> None:
    """Record the trusted look-ahead answers and mark what each covers as asked, so that wave 2 asks only the rest.
    An answer that is incomplete, failed, or shows an include unused is left out entirely — its part of the data
    is asked in wave 2 as without the capability (part of an answer could make a practitioner look as if their
    roles were all in hand)."""
    for query in queries:
        people = fetched.get(query.result_name)
        if query.key == "people" and _trusted(people) and people is not None and people.honored:
            _take_people(data, query.result_name, people, patient_id, _SCHEDULE_REVINCLUDE in query.verify,
                         check_deadline)
    user_parts = [fetched.get(f"{kind}@1.{n}") for kind in ("userSchedules", "userSlots") for n in (0, 1)]
    if user_practitioner_id and all(_trusted(item) for item in user_parts):
        data.record({f"{kind}@1.{n}": item for kind, n, item in zip(
            ("userSchedules", "userSchedules", "userSlots", "userSlots"), (0, 1, 0, 1), user_parts, strict=True)
            if item is not None}, check_deadline)
        # Every role of the user was asked by chain, so every role in hand (userRoles, wave 1) is covered.
        actors = {f"Practitioner/{user_practitioner_id}"} | {
            f"PractitionerRole/{role.id}" for role in data.bag.of_type("PractitionerRole")
            if _id_of(role.practitioner.reference if role.practitioner else None, "Practitioner")
            == user_practitioner_id}
        data.asked["actors"].update(actors)
        for actor in actors:
            data.slot_windows.setdefault(actor, []).append((window_start, now + SLOT_HORIZON))


def _people_of(raw: dict[str, Any]) -> list[Any]:
    """The reference objects of who took part in a raw Encounter or Communication."""
    if raw.get("resourceType") == "Encounter":
        return [p.get("individual") for p in raw.get("participant") or () if isinstance(p, dict)]
    recipients = raw.get("recipient")
    return [raw.get("sender"), *(recipients if isinstance(recipients, list) else ())]


def _take_people(data: EpisodeData, name: str, people: Fetched, patient_id: str, with_schedules: bool,
                 check_deadline: Callable[[], None]) -> None:
    """Whoever took part in the answer's encounters or messages and whose Practitioner came with it has had their
    roles, Practitioner resource and (when asked) schedules asked: exactly what wave 2 would ask about them."""
    found = {f"{r.get('resourceType')}/{r.get('id')}": r for r in people.resources if isinstance(r, dict)}
    patient = f"Patient/{patient_id}"
    covered: set[str] = set()
    for raw in found.values():
        if raw.get("resourceType") not in ("Encounter", "Communication") or not isinstance(raw.get("subject"), dict):
            continue
        if ref_key(raw["subject"].get("reference")) != patient:
            continue
        for individual in _people_of(raw):
            key = ref_key(individual.get("reference")) if isinstance(individual, dict) else None
            if key is None or key not in found:
                continue
            if ref_type(key) == "PractitionerRole":
                practitioner = found[key].get("practitioner")
                key = ref_key(practitioner.get("reference")) if isinstance(practitioner, dict) else None
                if key is None or key not in found:
                    continue
            if ref_type(key) == "Practitioner":
                covered.add(key.split("/", 1)[1])
    data.record({name: people}, check_deadline)
    data.asked["roles"].update(covered)
    data.asked["practitioners"].update(covered)
    if with_schedules:
        actors = {f"Practitioner/{pid}" for pid in covered} | {
            f"PractitionerRole/{role.id}" for role in data.bag.of_type("PractitionerRole")
            if _id_of(role.practitioner.reference if role.practitioner else None, "Practitioner") in covered}
        data.asked["actors"].update(actors)
        data.schedules_included.update(actors)


def _reference_queries(data: EpisodeData, tag: str) -> list[Query]:
    """Conditions coding a diagnosis by reference, and payer Organizations the Coverage include did not bring."""
    queries: list[Query] = []
    for kind, resource_type, missing in (("conditions", "Condition", _missing_conditions(data.bag)),
                                         ("payers", "Organization", _missing_payers(data.bag))):
        ids = sorted(missing - data.asked[kind])
        data.asked[kind].update(ids)
        for n, chunk in enumerate(_chunks(ids)):
            joined = ",".join(quote(i, safe="") for i in chunk)
            queries.append(Query(kind, f"{resource_type}?_id={joined}", required=False, name=f"{kind}{tag}.{n}"))
    return queries


def _slot_window(bag: ResourceBag, now: datetime, window_start: datetime) -> tuple[datetime, datetime] | None:
    """From the earliest creation to the latest start of the appointments that may result from a review."""
    lows: list[datetime] = []
    highs: list[datetime] = []
    for appointment in bag.of_type("Appointment"):
        start = as_datetime(appointment.start, now.tzinfo)
        if start is None or start < window_start:
            continue
        created = as_datetime(appointment.created, now.tzinfo)
        if created is not None:
            lows.append(max(created, window_start))
        else:  # a proposed appointment without `created` is created now (billing-rules.md §6)
            lows.append(min(now, start))
        highs.append(start)
    if not highs:
        return None
    return min(lows), max(highs)


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i:i + MAX_IDS_PER_QUERY] for i in range(0, len(items), MAX_IDS_PER_QUERY)]


def _encounter_anchor(encounter: Any | None, tz: Any) -> datetime | None:
    """The encounter's start (or end) as an aware datetime; partial or out-of-range dates give None."""
    if encounter is None:
        return None
    return period_start(encounter.period, tz)


def practitioner_id(reference: str | None, bag: ResourceBag) -> str | None:
    """The Practitioner id behind a Practitioner or (resolvable) PractitionerRole reference — the rules' own
    resolution (``episode.practitioner_of``), so gathering asks about exactly the people the rules will see."""
    key = practitioner_of(ref_key(reference), bag)
    return key.split("/", 1)[1] if key else None


def _participant_refs(encounter: Any) -> list[str]:
    return [
        p.individual.reference
        for p in encounter.participant or ()
        if p.individual is not None and p.individual.reference
    ]


def _episode_practitioners(data: EpisodeData) -> set[str]:
    """Practitioners who may bill (as the engine chooses them): the context encounter's participants when it
    names any; otherwise review encounters' participants, whom patients wrote to, who answered — and the user."""
    ids: set[str] = set()
    if data.encounter is not None:
        ids = {pid for ref in _participant_refs(data.encounter) if (pid := practitioner_id(ref, data.bag))}
        if ids:
            if data.user_practitioner_id:
                ids.add(data.user_practitioner_id)
            return ids
    encounters = [data.encounter] if data.encounter is not None else [
        e for e in data.bag.of_type("Encounter") if e.class_fhir is not None and e.class_fhir.code == "VR"
    ]
    for encounter in encounters:
        for ref in _participant_refs(encounter):
            if (pid := practitioner_id(ref, data.bag)) is not None:
                ids.add(pid)
    for comm in data.bag.of_type("Communication"):
        for ref in [comm.sender, *(comm.recipient or ())]:
            if ref is not None and (pid := practitioner_id(ref.reference, data.bag)) is not None:
                ids.add(pid)
    if data.user_practitioner_id:
        ids.add(data.user_practitioner_id)
    return ids


def _people_refs(bag: ResourceBag) -> frozenset[str]:
    """Every Practitioner/PractitionerRole reference of the episode's resources."""
    return bag.memo("people_refs", lambda: _collect_people_refs(bag))


def _collect_people_refs(bag: ResourceBag) -> frozenset[str]:
    refs: list[str | None] = []
    for encounter in bag.of_type("Encounter"):
        refs.extend(_participant_refs(encounter))
    for comm in bag.of_type("Communication"):
        refs.append(comm.sender.reference if comm.sender else None)
        refs.extend(r.reference for r in comm.recipient or ())
    for appointment in bag.of_type("Appointment"):
        refs.extend(p.actor.reference for p in appointment.participant or () if p.actor is not None)
    for resource_type in ("Procedure", "ChargeItem"):
        for resource in bag.of_type(resource_type):
            refs.extend(p.actor.reference for p in resource.performer or () if p.actor is not None)
    for resource_type in ("Observation", "DiagnosticReport"):
        for resource in bag.of_type(resource_type):
            refs.extend(r.reference for r in resource.performer or ())
    for impression in bag.of_type("ClinicalImpression"):
        refs.append(impression.assessor.reference if impression.assessor else None)
    return frozenset(r for r in refs if r and r.split("/")[-2:-1] in (["Practitioner"], ["PractitionerRole"]))


def _all_practitioners(bag: ResourceBag) -> set[str]:
    """Practitioner ids taking part anywhere in the episode (directly, or behind a known PractitionerRole)."""
    return {pid for ref in _people_refs(bag) if (pid := practitioner_id(ref, bag)) is not None}


def _unresolved_ids(bag: ResourceBag, resource_type: str) -> set[str]:
    return {rid for ref in _people_refs(bag)
            if (rid := _id_of(ref, resource_type)) is not None and bag.get(f"{resource_type}/{rid}") is None}


def _practitioners_with_roles(bag: ResourceBag) -> set[str]:
    return {
        pid
        for role in bag.of_type("PractitionerRole")
        if role.practitioner is not None and (pid := _id_of(role.practitioner.reference, "Practitioner"))
    }


def _missing_conditions(bag: ResourceBag) -> set[str]:
    """Conditions that code a diagnosis by reference (Encounter.diagnosis, reasonReference) but were not fetched."""
    refs: list[str | None] = []
    for encounter in bag.of_type("Encounter"):
        refs.extend(d.condition.reference for d in encounter.diagnosis or () if d.condition is not None)
        refs.extend(r.reference for r in encounter.reasonReference or ())
    for resource_type in ("Procedure", "Appointment"):
        for resource in bag.of_type(resource_type):
            refs.extend(r.reference for r in resource.reasonReference or ())
    return {cid for ref in refs if (cid := _id_of(ref, "Condition")) and bag.get(f"Condition/{cid}") is None}


def _missing_payers(bag: ResourceBag) -> set[str]:
    missing: set[str] = set()
    for coverage in bag.of_type("Coverage"):
        for payor in coverage.payor or ():
            oid = _id_of(payor.reference, "Organization")
            if oid and bag.get(f"Organization/{oid}") is None:
                missing.add(oid)
    return missing
