"""One patient's raw resources in, finding rows out (billing-rules.md §8): parse → ``evaluate_record`` → §8 class.

Every engine (local, Spark) calls :func:`audit_patient` for each candidate patient, with the shared resources
(practitioners, roles, organizations, schedules, slots) parsed once per worker by :func:`build_shared`. The verdict
is the hooks' own: ``cds_service.rules.engine.evaluate_record`` with ``own_charges="ignore"`` — the one option the
audit adds, because §8 judges an assessment *as if its own G2250/G2010 charge were absent* and lets the charge
decide the class. Nothing here re-decides a criterion: the classes, OIG screens, money and timely-filing flags are
read from the determinations, their criteria's evidence and facts, the charges themselves and the rates table.

Decisions this module makes (and ``reason`` says in words on each row):

- **Own charges** are the ones ``not-already-billed`` finds for the assessment (ChargeItem linked by context or
  supportingInformation; Claim line for its review encounter or naming a submission/the follow-up; void ones do
  not count). A ChargeItem and the Claim line that bills it are one charge at two stages; two ChargeItems, or two
  Claim lines, are a duplicate (at-risk).
- **A pending assessment whose deadline passed with no follow-up** is no longer pending: at ``as_of`` the rules say
  ``follow-up-within-24-business-hours`` not-met ("no reply"), so the verdict is ``not-billable`` — class ``ok``
  when nothing was charged, ``at-risk-charge`` when it was. It is ``needs-review`` instead when the record is
  incomplete in a way that could hide the reply (a Communication of the patient, or a resource whose type could not
  be read, was skipped as invalid). ``pending`` rows are only those whose deadline is still ahead at ``as_of``.
- **OIG screens** are flagged on charged rows only (the OIG counted paid claims): a row nothing was billed for
  cannot be an improper payment.
- **Date of service** (timely filing, 42 CFR 424.44): the charge's service date, else the follow-up, else the
  receipt, else the review encounter's start.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

from cds_service.fhir.parse import parse_resource
from cds_service.record import ResourceBag, SkippedResource
from cds_service.rules.calendar import BusinessCalendar
from cds_service.rules.criteria import no_resulting_service, not_already_billed
from cds_service.rules.engine import AssessedEpisode, evaluate_record
from cds_service.rules.episode import practitioner_of
from cds_service.rules.facts import as_datetime, key_of, period_start, ref_key, ref_of, ref_type, references_in, utc
from cds_service.rules.model import CriterionResult, Determination
from cds_service.rules.rules_data import RulesData, load_rules_data

from . import engine, findings, keys
from .findings import AT_RISK_CHARGE, MISSED_REVENUE, NEEDS_REVIEW, OK, PENDING

# The ChargeItem extension carrying claim modifiers (fhir-profile.md "ChargeItem"; written by hooks/cards.py).
MODIFIER_EXTENSION_URL = "https://g2250-cds.example.org/fhir/StructureDefinition/claim-modifier"
_NOTE_MODIFIERS = re.compile(r"modifiers?(?:\(s\))?\s*:?\s*((?:[A-Z0-9]{2}\b(?:\s*,\s*|\s+and\s+|\s*)?)+)",
                             re.IGNORECASE)
_MAX_COUNTED_SPAN = timedelta(days=400)  # business hours are counted day by day: never over a mistyped year


class AuditSettingsError(ValueError):
    """An --as-of / --since / --until value that cannot be read (the command reports it as a usage error)."""


# ------------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class AuditSettings:
    """What every patient is judged with: the clock, the calendar and the rules data, plus the receipt window.
    Built once per worker process from the picklable :class:`engine.SettingsSpec`."""

    as_of: datetime  # aware
    calendar: BusinessCalendar
    rules: RulesData
    since: datetime | None = None  # receipt window [since, until), aware
    until: datetime | None = None

    @classmethod
    def from_spec(cls, spec: engine.SettingsSpec) -> AuditSettings:
        """Load the config the way the CLI does (``calendar`` → :class:`BusinessCalendar`, ``rules`` → rules data
        with the config's overrides); ``config_path`` None is the embedded defaults (the command resolves
        ``$G2250_CDS_CONFIG`` before it builds the spec, so every worker reads the same file). Raises
        ``ConfigError`` / ``RulesDataError`` / :class:`AuditSettingsError`."""
        from cds_service.config import config_from_mapping, load_config

        config = load_config(spec.config_path) if spec.config_path else config_from_mapping(None, "embedded defaults")
        calendar = BusinessCalendar.from_config(config.calendar)
        rules = load_rules_data(config.raw.get("rules"))
        tz = calendar.tz
        return cls(as_of=parse_moment(spec.as_of, tz, "--as-of"), calendar=calendar, rules=rules,
                   since=parse_moment(spec.since, tz, "--since") if spec.since else None,
                   until=parse_moment(spec.until, tz, "--until") if spec.until else None)

    def in_window(self, moment: datetime | None) -> bool:
        """Whether a receipt (or charge) instant falls in [since, until); without a window everything does, and an
        assessment that cannot be placed in time is reported only when no window is asked for."""
        if self.since is None and self.until is None:
            return True
        if moment is None:
            return False
        instant = utc(moment)
        return (self.since is None or instant >= utc(self.since)) and (self.until is None or instant < utc(self.until))


def parse_moment(text: str, tz: Any, option: str = "value") -> datetime:
    """An ISO 8601 date (local midnight in the practice zone) or date-time (with offset, else practice time)."""
    value = text.strip() if isinstance(text, str) else ""
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(0), tzinfo=tz)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise AuditSettingsError(f"{option}: not an ISO 8601 date or date-time (e.g. 2026-12-01 or "
                                 "2026-12-01T17:00:00-05:00)") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=tz)


# --------------------------------------------------------------------------------------------------- shared record
# Slots are most of the shared resources and grow with the population (issue 14: 3.8k of 4.2k at 10k patients,
# 12.9k of 13.3k at 100k), yet the rules read only the billing practitioner's (no-resulting-service §6). They are
# kept as compact JSON by schedule and parsed per patient, only for the schedules the patient can need.
LAZY_SLOTS_TYPE = "Slot"
# A patient record holding one of these (never, from an engine: they are shared types) could change which slots
# the rules read or their order in the bag: such a patient gets every slot, as before.
_EVERY_SLOT_TYPES = frozenset({"Slot", "Schedule", "PractitionerRole"})
SLOT_CACHE_SIZE = 4096  # parsed slots kept per worker (least recently used schedules dropped first)


@dataclass
class SharedRecord:
    """The shared resources (``keys.SHARED_TYPES``), validated once per worker.

    Everything but the Slots is parsed into ``bag``, which every patient's bag reads without copying
    (``ResourceBag.layered``: the models are never mutated). Slots are kept as compact JSON under their schedule
    (``lazy_slots``); a patient's bag gets, parsed, only the slots of the schedules whose actor is a practitioner
    the patient's own resources name (directly or through a PractitionerRole) — a superset of the billing
    practitioner's, whose schedules are the only ones ``no-resulting-service`` reads — plus every schedule of an
    actor that is no practitioner, and the schedule of any Slot the record names. ``lazy_slots=False`` (built by
    ``build_shared(..., lazy_slots=False)``) is the former eager record: every slot parsed in ``bag`` and every
    dictionary copied per patient; the tests compare the two row for row."""

    bag: ResourceBag = field(default_factory=ResourceBag)
    # (Type/id or None, reason) of the shared resources that could not be parsed: the same pairs, in the same
    # words (``skip_reason``), as ``PatientAudit.skipped``, so every engine counts them alike.
    skipped: list[tuple[str | None, str]] = field(default_factory=list)
    resources: int = 0
    lazy_slots: bool = False
    # schedule key ("Schedule/id", as the slot names it) → [(position among all slots, bag key, compact JSON)]
    slots_by_schedule: dict[str | None, list[tuple[int, str, bytes]]] = field(default_factory=dict)
    slot_schedule: dict[str, str | None] = field(default_factory=dict)  # "Slot/id" → its schedule key
    # practitioner key ("Practitioner/id"; None: an actor that resolves to no practitioner) → schedule keys
    schedules_of_practitioner: Mapping[str | None, frozenset[str]] = field(default_factory=dict)
    role_practitioner: dict[str, str | None] = field(default_factory=dict)  # "PractitionerRole/id" → practitioner
    # Practitioners named by shared resources of patient-scoped types (only when a caller passes such resources
    # as shared; the rules could take the billing practitioner from them).
    named_practitioners: set[str | None] = field(default_factory=set)
    _parsed_slots: OrderedDict[str | None, list[tuple[int, str, Any]]] = field(default_factory=OrderedDict,
                                                                              repr=False)
    _parsed_count: int = 0

    def patient_bag(self, raw: Sequence[Any] | None = None) -> ResourceBag:
        """A fresh bag holding the shared resources the rules can read for the patient whose raw resources are
        ``raw`` (None: every shared resource, each dictionary copied, as the hooks' comparison in the tests wants
        it). No parsing but the lazily kept slots the patient needs."""
        shared = self.bag
        if not self.lazy_slots or raw is None:
            by_type = {rtype: dict(models) for rtype, models in shared.by_type.items()}
            if self.lazy_slots and self.slots_by_schedule:
                by_type[LAZY_SLOTS_TYPE] = self._slot_models(self.slots_by_schedule, cache=False)
            return ResourceBag(by_type=by_type, _anonymous=shared._anonymous)
        own: dict[str, dict[str, Any]] = {}
        if self.slots_by_schedule:
            schedules = self.slot_schedules_for(raw)
            own[LAZY_SLOTS_TYPE] = self._slot_models(self.slots_by_schedule if schedules is None else schedules)
        return ResourceBag.layered(shared.by_type, own, anonymous=shared._anonymous, base=shared)

    def slot_schedules_for(self, raw: Iterable[Any]) -> set[str | None] | None:
        """The schedules whose slots the rules can read for this patient (None: every schedule)."""
        named = set(self.named_practitioners)
        named.add(None)  # a schedule whose actor is no practitioner matches a review with no billing practitioner
        schedules: set[str | None] = set()
        for resource in raw:
            if not isinstance(resource, dict):
                continue
            if resource.get("resourceType") in _EVERY_SLOT_TYPES:
                return None
            for reference in references_in(resource):
                key = ref_key(reference)
                kind = ref_type(key)
                if kind == "Practitioner":
                    named.add(key)
                elif kind == "PractitionerRole":
                    named.add(self.role_practitioner.get(key))  # type: ignore[arg-type]
                elif kind == LAZY_SLOTS_TYPE and key in self.slot_schedule:
                    schedules.add(self.slot_schedule[key])  # type: ignore[index]
        for practitioner in named:
            schedules.update(self.schedules_of_practitioner.get(practitioner, ()))
        return schedules

    def _slot_models(self, schedules: Iterable[str | None], *, cache: bool = True) -> dict[str, Any]:
        """The slots of ``schedules`` by bag key, in the order the eager bag holds them."""
        found = [entry for schedule in schedules for entry in (self._parsed(schedule) if cache else [
            (seq, rid, _parse_compact(data)) for seq, rid, data in self.slots_by_schedule.get(schedule, ())])]
        found.sort(key=lambda entry: entry[0])
        return {rid: model for _, rid, model in found}

    def _parsed(self, schedule: str | None) -> list[tuple[int, str, Any]]:
        cached = self._parsed_slots.get(schedule)
        if cached is not None:
            self._parsed_slots.move_to_end(schedule)
            return cached
        parsed = [(seq, rid, _parse_compact(data)) for seq, rid, data in self.slots_by_schedule.get(schedule, ())]
        self._parsed_slots[schedule] = parsed
        self._parsed_count += len(parsed)
        while self._parsed_count > SLOT_CACHE_SIZE and len(self._parsed_slots) > 1:
            _, dropped = self._parsed_slots.popitem(last=False)
            self._parsed_count -= len(dropped)
        return parsed


def _compact(resource: dict[str, Any]) -> bytes:
    # ASCII escapes: a lone surrogate the JSON parser let through cannot break the encoding.
    return json.dumps(resource, separators=(",", ":")).encode("ascii")


def _parse_compact(data: bytes) -> Any:
    model, _, skipped = parse_resource(json.loads(data))
    if model is None:  # validated when the record was built; parsing is deterministic
        raise RuntimeError(f"a shared Slot no longer parses: {skipped}")
    return model


def build_shared(raw: Iterable[dict[str, Any]], *, lazy_slots: bool = True) -> SharedRecord:
    """Validate the shared resources once (per worker); invalid ones are kept in ``skipped`` with their reason.
    Slots are kept as compact JSON by schedule (``lazy_slots``), the rest parsed."""
    if not lazy_slots:
        record = SharedRecord()
        record.resources = _parse_into(record.bag, raw)
        record.skipped = [(s.reference, skip_reason(s)) for s in record.bag.skipped]
        record.bag.skipped.clear()
        return record
    record = SharedRecord(lazy_slots=True)
    bag = record.bag
    slots: dict[str, tuple[str | None, bytes]] = {}  # bag key → (schedule, JSON): the bag's order and last-wins
    count = 0
    for item in raw:
        count += 1
        model, dropped, skipped = parse_resource(item)
        if skipped is not None:
            bag.skip(skipped)
            continue
        if model is None:
            continue
        if model.get_resource_type() == LAZY_SLOTS_TYPE:
            rid = model.id
            if not rid:  # numbered as ResourceBag.add numbers it
                bag._anonymous += 1
                rid = f"#anonymous-{bag._anonymous}"
            slots[rid] = (ref_of(model.schedule), _compact(item))
        else:
            bag.add(model, dropped)
        if item.get("resourceType") not in keys.SHARED_TYPES:
            record.named_practitioners.update(_practitioner_refs(item))
    record.resources = count
    record.skipped = [(s.reference, skip_reason(s)) for s in bag.skipped]
    bag.skipped.clear()
    for seq, (rid, (schedule, data)) in enumerate(slots.items()):
        record.slots_by_schedule.setdefault(schedule, []).append((seq, rid, data))
        record.slot_schedule[f"{LAZY_SLOTS_TYPE}/{rid}"] = schedule
    for rid, role in bag.by_type.get("PractitionerRole", {}).items():
        record.role_practitioner[f"PractitionerRole/{rid}"] = ref_of(role.practitioner)
    # The criterion's own index (computed here into the shared bag's memo, which every patient's bag borrows).
    record.schedules_of_practitioner = no_resulting_service.schedules_by_practitioner(bag)
    for who in list(record.named_practitioners):
        if ref_type(who) == "PractitionerRole":
            record.named_practitioners.add(record.role_practitioner.get(who))  # type: ignore[arg-type]
    return record


def _practitioner_refs(resource: dict[str, Any]) -> set[str | None]:
    return {key for key in (ref_key(r) for r in references_in(resource))
            if ref_type(key) in ("Practitioner", "PractitionerRole")}


def _parse_into(bag: ResourceBag, raw: Iterable[dict[str, Any]]) -> int:
    """``add_raw``'s tolerant parsing (unknown elements dropped, invalid resources skipped with a PHI-free reason),
    without its cache: in a population every resource is seen once, so caching would only cost time and keep
    each patient's JSON alive."""
    count = 0
    for item in raw:
        count += 1
        model, dropped, skipped = parse_resource(item)
        if skipped is not None:
            bag.skip(skipped)
        elif model is not None:
            bag.add(model, dropped)
    return count


def skip_reason(skipped: SkippedResource) -> str:
    """The engines' words for an invalid resource: ``"invalid-resource: <paths and error kinds>"``, never values."""
    reason = skipped.reason.removeprefix("invalid: ")
    return f"{engine.SKIP_INVALID_PREFIX}: {reason}"


# --------------------------------------------------------------------------------------------------------- audit
@dataclass
class PatientAudit:
    rows: list[dict[str, Any]]                 # finding rows, keys = findings.COLUMN_NAMES exactly
    skipped: list[tuple[str | None, str]]      # (Type/id or None, reason); invalid ones start with SKIP_INVALID_PREFIX
    resources: int                             # the patient's raw resources read


@dataclass(frozen=True)
class _Line:
    """One G2250/G2010 charge: a ChargeItem, or one line of a Claim."""

    ref: str          # "ChargeItem/1" or "Claim/2"
    kind: str         # "ChargeItem" | "Claim"
    index: int        # position of the line in Claim.item (0 for a ChargeItem)
    codes: tuple[str, ...]
    modifiers: tuple[str, ...]
    modifiers_recorded: bool  # False: a ChargeItem that records no modifiers at all (cannot lack one)
    pos: tuple[str, ...]
    service_date: date | None
    practitioner: str | None
    organization: str | None

    @property
    def key(self) -> tuple[str, int]:
        return self.ref, self.index


def audit_patient(patient_id: str, raw: Iterable[dict[str, Any]], *, shared: SharedRecord,
                  settings: AuditSettings) -> PatientAudit:
    """Every assessment of one patient, judged at ``settings.as_of`` exactly as the hooks would judge it (own charge
    set aside, §8), classed; plus a row for each G2250/G2010 charge that no assessment claims. Rows only for the
    receipt window; the order is the record's (assessments oldest first, then unclaimed charges)."""
    raw = raw if isinstance(raw, list) else list(raw)
    bag = shared.patient_bag(raw)
    resources = _parse_into(bag, raw)
    skipped = [(s.reference, skip_reason(s)) for s in bag.skipped]
    tz = settings.calendar.tz
    rules = settings.rules
    remote = frozenset(rules.settings.remote_assessment_codes)
    episodes = evaluate_record(bag, patient_id, now=settings.as_of, calendar=settings.calendar, rules=rules,
                               own_charges="ignore")
    patient_key = f"Patient/{patient_id}"
    all_lines = _remote_lines(bag, patient_key, remote, tz)
    incomplete = any(ref is None or ref_type(ref) == "Communication" for ref, _ in skipped)
    rows: list[dict[str, Any]] = []
    claimed: set[tuple[str, int]] = set()
    for episode in episodes:
        lines = _own_lines(episode.determination, bag, remote, tz)
        claimed.update(line.key for line in lines)  # outside the window too: never an orphan
        if settings.in_window(_placed_at(episode, lines, tz)):
            rows.append(_assessment_row(episode, lines, bag, settings, patient_key, incomplete))
    by_ref: dict[str, list[_Line]] = {}
    for line in all_lines:
        if line.key not in claimed:
            by_ref.setdefault(line.ref, []).append(line)
    for ref, lines in by_ref.items():
        moment = _date_moment(lines[0].service_date, tz)
        if settings.in_window(moment):
            rows.append(_orphan_row(ref, lines, bag, settings, patient_key))
    return PatientAudit(rows=[findings.check_row(r) for r in rows], skipped=skipped, resources=resources)


# ------------------------------------------------------------------------------------------------------- charges
def _extension_modifiers(resource: Any) -> tuple[str, ...]:
    found: list[str] = []
    for extension in resource.extension or ():
        coding = getattr(extension, "valueCoding", None)
        if extension.url == MODIFIER_EXTENSION_URL and coding is not None and coding.code:
            found.append(coding.code.strip().upper())
    return tuple(dict.fromkeys(found))


def _charge_modifiers(charge: Any) -> tuple[str, ...] | None:
    """A ChargeItem's modifiers: the modifier extension, else the words of ``ChargeItem.note`` ("Modifiers: GP",
    "G2250 with modifier(s) GP, CQ"; fhir-profile.md repeats them there for humans); None when neither records
    any (R4 ChargeItem has no modifier element, so silence is not a missing modifier)."""
    found = _extension_modifiers(charge)
    if found:
        return found
    for note in charge.note or ():
        match = _NOTE_MODIFIERS.search(note.text or "")
        if match:
            return tuple(dict.fromkeys(m.upper() for m in re.findall(r"\b[A-Za-z0-9]{2}\b", match.group(1))))
    return None


def _concept_codes(concepts: Iterable[Any] | None) -> tuple[str, ...]:
    found = [c.code.strip().upper() for concept in concepts or () for c in concept.coding or () if c.code]
    return tuple(dict.fromkeys(found))


def _charge_item_line(charge: Any, remote: frozenset[str], tz: Any) -> _Line | None:
    codes = not_already_billed.codes_of(charge.code) & remote
    if not codes:
        return None
    when = (as_datetime(charge.occurrenceDateTime, tz) or period_start(charge.occurrencePeriod, tz)
            or as_datetime(charge.enteredDate, tz))
    performer = next((ref_of(p.actor) for p in charge.performer or () if p.actor is not None), None)
    modifiers = _charge_modifiers(charge)
    return _Line(ref=key_of(charge), kind="ChargeItem", index=0, codes=tuple(sorted(codes)),
                 modifiers=modifiers or (), modifiers_recorded=modifiers is not None, pos=(),
                 service_date=when.date() if when else None,
                 practitioner=performer, organization=ref_of(charge.performingOrganization))


def _claim_line(claim: Any, index: int, item: Any, remote: frozenset[str], tz: Any) -> _Line | None:
    codes = not_already_billed.codes_of(item.productOrService) & remote
    if not codes:
        return None
    when = (as_datetime(item.servicedDate, tz) or period_start(item.servicedPeriod, tz)
            or period_start(claim.billablePeriod, tz) or as_datetime(claim.created, tz))
    provider = ref_of(claim.provider)
    return _Line(ref=key_of(claim), kind="Claim", index=index, codes=tuple(sorted(codes)),
                 modifiers=_concept_codes(item.modifier), modifiers_recorded=True,
                 pos=_concept_codes([item.locationCodeableConcept] if item.locationCodeableConcept else []),
                 service_date=when.date() if when else None,
                 practitioner=provider if ref_type(provider) in ("Practitioner", "PractitionerRole") else None,
                 organization=provider if ref_type(provider) == "Organization" else None)


def _remote_lines(bag: ResourceBag, patient_key: str, remote: frozenset[str], tz: Any) -> list[_Line]:
    """Every G2250/G2010 charge of the patient that counts (not void)."""
    found: list[_Line] = []
    for charge in bag.of_type("ChargeItem"):
        if not not_already_billed.charge_is_void(charge) and ref_of(charge.subject) == patient_key:
            line = _charge_item_line(charge, remote, tz)
            if line is not None:
                found.append(line)
    for claim in bag.of_type("Claim"):
        if not_already_billed.claim_is_void(claim) or ref_of(claim.patient) != patient_key:
            continue
        for index, item in enumerate(claim.item or ()):
            line = _claim_line(claim, index, item, remote, tz)
            if line is not None:
                found.append(line)
    return found


def _own_lines(determination: Determination, bag: ResourceBag, remote: frozenset[str], tz: Any) -> list[_Line]:
    """The assessment's own charges, as ``not-already-billed`` found them (``facts["own_charges"]``)."""
    refs = determination.criterion(not_already_billed.ID).facts.get("own_charges", ())
    keys = set(determination.submissions) | ({determination.follow_up} if determination.follow_up else set())
    found: list[_Line] = []
    for ref in refs:
        resource = bag.get(ref)
        if resource is None:
            continue
        if resource.get_resource_type() == "ChargeItem":
            line = _charge_item_line(resource, remote, tz)
            if line is not None:
                found.append(line)
            continue
        mine = not_already_billed.claim_lines_for(resource, determination.encounter, keys, remote)
        for index, item in enumerate(resource.item or ()):
            if any(item is m for m in mine):
                line = _claim_line(resource, index, item, remote, tz)
                if line is not None:
                    found.append(line)
    return found


# --------------------------------------------------------------------------------------------------------- rows
def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment is not None else None


def _month(day: date) -> str:
    return f"{day.year:04d}-{day.month:02d}"  # strftime looks the zone up again: measurably slower per row


def _date_moment(day: date | None, tz: Any) -> datetime | None:
    return datetime.combine(day, time(0), tzinfo=tz) if day is not None else None


def _encounter_start(episode: AssessedEpisode, tz: Any) -> datetime | None:
    encounter = episode.assessment.encounter
    return period_start(encounter.period, tz) if encounter is not None else None


def _placed_at(episode: AssessedEpisode, lines: list[_Line], tz: Any) -> datetime | None:
    """When the assessment happened, for the receipt window and the month: its receipt, else its review
    encounter's start, else its charge's date."""
    determination = episode.determination
    if determination.receipt_time is not None:
        return determination.receipt_time
    start = _encounter_start(episode, tz)
    if start is not None:
        return start
    dated = [line.service_date for line in lines if line.service_date is not None]
    return _date_moment(min(dated), tz) if dated else None



def _failed(determination: Determination) -> list[str]:
    return [f"{c.id}:{c.status}" for c in determination.criteria if c.status != "met"]


def _evidence(criteria: Iterable[CriterionResult]) -> list[str]:
    return list(dict.fromkeys(f"{c.id}={ref}" for c in criteria for ref in c.evidence if ref))


def _code_text(code: str | None, modifiers: Iterable[str]) -> str:
    return "-".join([code or "no code", *modifiers])


def _deadline_missed_hours(determination: Determination, settings: AuditSettings) -> float | None:
    """Business hours the follow-up came past its deadline (late), or is past it at as_of (no reply)."""
    result = determination.criterion("follow-up-within-24-business-hours")
    case = result.facts.get("case")
    if case == "late" and "elapsed_business_hours" in result.facts:
        allowed = float(settings.rules.settings.follow_up_business_hours)
        return round(max(0.0, float(result.facts["elapsed_business_hours"]) - allowed), 2)
    deadline = determination.deadline
    if case in ("no-reply", "reply-by-other") and deadline is not None and utc(settings.as_of) > utc(deadline):
        if utc(settings.as_of) - utc(deadline) > _MAX_COUNTED_SPAN:
            return None
        return round(settings.calendar.business_hours_between(deadline, settings.as_of), 2)
    return None


def _service_date(determination: Determination, lines: list[_Line], episode: AssessedEpisode,
                  tz: Any) -> date | None:
    dated = [line.service_date for line in lines if line.service_date is not None]
    if dated:
        return min(dated)
    for moment in (determination.follow_up_time, determination.receipt_time, _encounter_start(episode, tz)):
        if moment is not None:
            return moment.astimezone(tz).date()
    return None


def _timely(row: dict[str, Any], service_date: date | None, settings: AuditSettings) -> None:
    if service_date is None:
        row["past_timely_filing"] = False
        return
    limit = findings.timely_filing_deadline(service_date)
    row["timely_filing_deadline"] = limit.isoformat()
    row["past_timely_filing"] = settings.as_of.astimezone(settings.calendar.tz).date() > limit


def _billed(lines: list[_Line]) -> tuple[str | None, list[str]]:
    """The code and modifiers billed: the claim's lines when there are any (what the payer sees), else the
    ChargeItems'."""
    shown = [line for line in lines if line.kind == "Claim"] or lines
    codes = list(dict.fromkeys(code for line in shown for code in line.codes))
    modifiers = list(dict.fromkeys(m for line in shown for m in line.modifiers))
    return (", ".join(codes) if codes else None), modifiers


def _line_problems(lines: list[_Line], determination: Determination, rules: RulesData) -> list[str]:
    """How the charges differ from what the verdict calls for (§8 "at-risk charge")."""
    problems: list[str] = []
    code = determination.code
    wanted = set(determination.modifiers)
    forbidden = set(rules.settings.forbidden_modifiers) | findings.TELEHEALTH_MODIFIERS
    for line in lines:
        label = f"{line.ref}" + (f" line {line.index + 1}" if line.kind == "Claim" else "")
        if code is not None and set(line.codes) != {code}:
            billed = ", ".join(line.codes)
            why = (" (an E/M-capable practitioner bills G2010)" if code == "G2010" else
                   " (G2010 is for practitioners who can bill E/M)" if code == "G2250" else "")
            problems.append(f"{label} bills {billed} where the verdict calls for {code}{why}")
        present = set(line.modifiers)
        if code is not None and line.modifiers_recorded and wanted - present:
            problems.append(f"{label} lacks modifier {', '.join(sorted(wanted - present))}")
        if present & forbidden:
            problems.append(f"{label} carries modifier {', '.join(sorted(present & forbidden))}, which never "
                            "belongs on G2250/G2010 (not a telehealth service)")
        elif code is not None and present - wanted:
            problems.append(f"{label} carries modifier {', '.join(sorted(present - wanted))} the verdict does not "
                            "call for")
        telehealth = sorted(set(line.pos) & findings.TELEHEALTH_POS)
        if telehealth:
            problems.append(f"{label} has telehealth place of service {', '.join(telehealth)}")
    return problems


def _charges_count(lines: list[_Line]) -> int:
    """A ChargeItem and the Claim line that bills it are one charge: the larger of the two counts."""
    return max(sum(1 for line in lines if line.kind == "ChargeItem"), sum(1 for line in lines if line.kind == "Claim"))


def _follow_up_missing(determination: Determination) -> bool:
    return determination.criterion("follow-up-within-24-business-hours").facts.get("case") in ("no-reply",
                                                                                               "reply-by-other")


def _classify(determination: Determination, lines: list[_Line], rules: RulesData,
              incomplete: bool) -> tuple[str, str, float | None]:
    """(class, reason, estimated amount) per billing-rules.md §8."""
    status = determination.status
    failed = ", ".join(_failed(determination)) or "none"
    rates = rules.rates
    if not lines:
        if status == "billable":
            return (MISSED_REVENUE, f"Meets every condition this service checks and no G2250/G2010 charge or claim "
                    f"line is recorded for it: {_code_text(determination.code, determination.modifiers)} could be "
                    "billed.", rates.amount(determination.code))
        if status == "pending":
            return PENDING, (f"Follow-up still due by {_iso(determination.deadline)}; nothing to bill or fix yet "
                             "(outside the money totals)."), None
        if status == "needs-review":
            return NEEDS_REVIEW, f"Not charged; the rules cannot decide from the record ({failed}).", None
        if incomplete and _follow_up_missing(determination):
            return NEEDS_REVIEW, ("No follow-up found by the deadline, but part of the patient's record could not "
                                  f"be read (an invalid Communication or resource): check the reply by hand ({failed})."
                                  ), None
        return OK, f"Not billable ({failed}) and not billed.", None
    billed_code, _ = _billed(lines)
    count = _charges_count(lines)
    problems: list[str] = []
    if count > 1:
        problems.append(f"charged {count} times for one assessment (duplicate)")
    if status == "not-billable":
        problems.append(f"charged although not billable ({failed})")
    problems += _line_problems(lines, determination, rules)
    if problems:
        rate = rates.amount(billed_code.split(", ")[0]) if billed_code else None
        only_duplicate = count > 1 and len(problems) == 1
        at_stake = (count - 1) if only_duplicate else count
        amount = round(rate * at_stake, 2) if rate is not None else None
        return AT_RISK_CHARGE, "At-risk charge: " + "; ".join(problems) + ".", amount
    if status == "billable":
        return OK, f"Billed as the verdict says ({_code_text(determination.code, determination.modifiers)}).", None
    if status == "pending":
        return PENDING, (f"Charged before the follow-up was sent; it is due by {_iso(determination.deadline)} "
                         "(judged again after it)."), None
    return NEEDS_REVIEW, f"Charged, but the rules cannot decide from the record ({failed}).", None


def _related_encounters(determination: Determination) -> list[str]:
    """The E/M visits the rules found related: a prior related visit, or a related visit that followed."""
    found: list[str] = []
    for criterion_id, case in (("no-related-service-prior-7-days", "related-visit"), ("no-resulting-service", "visit")):
        result = determination.criterion(criterion_id)
        if result.status == "not-met" and result.facts.get("case") == case:
            found += [ref for ref in result.evidence if ref_type(ref) == "Encounter"]
    return list(dict.fromkeys(found))


def _visit_modifiers(encounters: list[str], bag: ResourceBag, patient_key: str) -> set[str]:
    """Modifiers on the charges and claim lines of the given visits (ChargeItem.context / Claim.item.encounter)."""
    wanted = set(encounters)
    found: set[str] = set()
    if not wanted:
        return found
    for charge in bag.of_type("ChargeItem"):
        if ref_of(charge.subject) == patient_key and ref_of(charge.context) in wanted:
            found.update(_charge_modifiers(charge) or ())
    for claim in bag.of_type("Claim"):
        if ref_of(claim.patient) != patient_key:
            continue
        for item in claim.item or ():
            if {ref_of(e) for e in item.encounter or ()} & wanted:
                found.update(_concept_codes(item.modifier))
    return found


def oig_screens(determination: Determination | None, lines: list[_Line], bag: ResourceBag,
                patient_key: str) -> list[str]:
    """The OIG A-05-23-00001 screens a charged row matches (findings.OIG_SCREENS), from the rules' own findings."""
    if not lines:
        return []
    screens: list[str] = []
    related: list[str] = []
    if determination is not None:
        related = _related_encounters(determination)
        if related:
            screens.append(findings.OIG_EM_WINDOW)
        visit = determination.criterion(not_already_billed.ID)
        if visit.status == "not-met" and visit.facts.get("case") == "e-visit":
            screens.append(findings.OIG_E_VISIT)
    modifiers = {m for line in lines for m in line.modifiers} | _visit_modifiers(related, bag, patient_key)
    if modifiers & findings.OIG_MODIFIER_CODES:
        screens.append(findings.OIG_MODIFIERS)
    return screens


def _assessment_row(episode: AssessedEpisode, lines: list[_Line], bag: ResourceBag, settings: AuditSettings,
                    patient_key: str, incomplete: bool) -> dict[str, Any]:
    determination = episode.determination
    tz = settings.calendar.tz
    row = findings.empty_row()
    klass, reason, amount = _classify(determination, lines, settings.rules, incomplete)
    billed_code, billed_modifiers = _billed(lines)
    placed = _placed_at(episode, lines, tz)
    row.update({
        "patient": patient_key,
        "assessment_id": findings.assessment_id([*determination.submissions, determination.encounter]),
        "received": _iso(determination.receipt_time),
        "follow_up": _iso(determination.follow_up_time),
        "practitioner": determination.practitioner,
        "organization": determination.organization,
        "status": determination.status,
        "code": determination.code,
        "modifiers": list(determination.modifiers),
        "class": klass,
        "billed_code": billed_code,
        "billed_modifiers": billed_modifiers,
        "charge_refs": list(dict.fromkeys(line.ref for line in lines)),
        "failed_criteria": _failed(determination),
        "oig_screens": oig_screens(determination, lines, bag, patient_key),
        "estimated_amount": amount,
        "evidence": _evidence(determination.criteria),
        "deadline": _iso(determination.deadline),
        "month": _month(placed.astimezone(tz)) if placed is not None else None,
        "payer_profile": determination.payer_profile,
        "reason": reason,
        "deadline_missed_hours": _deadline_missed_hours(determination, settings),
    })
    _timely(row, _service_date(determination, lines, episode, tz), settings)
    return row


def _orphan_reason(ref: str, lines: list[_Line], bag: ResourceBag) -> str:
    codes = ", ".join(dict.fromkeys(code for line in lines for code in line.codes))
    resource = bag.get(ref)
    links: list[str | None] = []
    if resource is not None and resource.get_resource_type() == "ChargeItem":
        links = [ref_of(resource.context), *(ref_of(s) for s in resource.supportingInformation or ())]
    elif resource is not None:
        for line in lines:
            item = (resource.item or [])[line.index]
            links += [ref_of(e) for e in item.encounter or ()]
        links += [ref_of(i.valueReference) for i in resource.supportingInfo or () if i.valueReference is not None]
    links = [link for link in dict.fromkeys(links) if link]
    if not links:
        why = "it names no review encounter, submission or follow-up"
    else:
        missing = [link for link in links if bag.get(link) is None]
        why = (f"it names {', '.join(links)}, "
               + ("not in the record" if len(missing) == len(links) else
                  "which is no store-and-forward assessment of a patient submission in the record"))
    return (f"At-risk charge: {codes} charged ({ref}) but no assessment in the record claims it — {why}; without "
            "a patient submission and its review the service cannot be shown to have happened.")


def _orphan_row(ref: str, lines: list[_Line], bag: ResourceBag, settings: AuditSettings,
                patient_key: str) -> dict[str, Any]:
    row = findings.empty_row()
    billed_code, billed_modifiers = _billed(lines)
    rate = settings.rules.rates.amount(lines[0].codes[0])
    dated = [line.service_date for line in lines if line.service_date is not None]
    service_date = min(dated) if dated else None
    practitioner = next((line.practitioner for line in lines if line.practitioner), None)
    row.update({
        "patient": patient_key,
        "assessment_id": findings.assessment_id([f"{line.ref}#{line.index}" for line in lines]),
        "practitioner": practitioner_of(practitioner, bag) or practitioner,
        "organization": next((line.organization for line in lines if line.organization), None),
        "class": AT_RISK_CHARGE,
        "billed_code": billed_code,
        "billed_modifiers": billed_modifiers,
        "charge_refs": [ref],
        "oig_screens": oig_screens(None, lines, bag, patient_key),
        "estimated_amount": round(rate * len(lines), 2) if rate is not None else None,
        "month": _month(service_date) if service_date else None,
        "reason": _orphan_reason(ref, lines, bag),
    })
    _timely(row, service_date, settings)
    return row


def iter_rows(audits: Iterable[PatientAudit]) -> Iterator[dict[str, Any]]:
    """Every row of several patients' audits (a convenience for engines and tests)."""
    for audit in audits:
        yield from audit.rows


__all__ = ["AuditSettings", "AuditSettingsError", "PatientAudit", "SharedRecord", "audit_patient", "build_shared",
           "iter_rows", "oig_screens", "parse_moment", "skip_reason"]
