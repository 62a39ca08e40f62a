"""Move the fixture stories to a chosen moment: ``g2250-cds load-fixtures --shift-to DATE|now`` (issue 12, item 3).

The fixtures are written at fixed dates (November–December 2026, DST scenarios in March and October 2026) and
every door of the service reads the real clock, so a demo against a FHIR server shows nothing current. This module
rewrites every date, dateTime and instant of every resource so that each scenario's story happens just before a
target moment, then checks with the rules engine, scenario by scenario, whether the story still means what its
``expected`` says at that moment — and says so when it does not.

How a scenario is moved (billing-rules.md §3, §6, §7)
------------------------------------------------------
* **Whole weeks, in local calendar days.** The follow-up deadline counts 24 *business* hours, skipping weekends
  and US holidays in the practice zone (§3 ``follow-up-within-24-business-hours``, §6 weekend receipt), so a
  shift must keep every timestamp's weekday: it is a multiple of 7 days. It is applied to the *local* date in
  America/New_York (the calendar's zone) keeping the wall-clock time, and the offset in force at the new date is
  re-attached — 10:00 stays 10:00 across a DST switch, as a practice's day would.
* **The latest week at or before the target.** The base shift is the largest multiple of 7 days that puts the
  scenario's ``now`` (for a file holding several scenarios, the latest of their clocks) at or before the target:
  a review that is pending in the story is still recent, a deadline still ahead as far as the week allows, and
  no story's clock is in the future.
* **What weeks cannot keep.** Elapsed windows are elapsed time (§7: 7 × 24 h, 24 h, 3 years, 12 months), so a
  story shifted off its DST week gains or loses an hour; a holiday (Thanksgiving) stays on its date, not on the
  story's weekday; a calendar-month rule (§7 care management) sees other month boundaries; and the evaluation
  clock is the target, not the story's ``now``, so a pending review may be past its deadline. After shifting,
  every scenario is judged by the engine (``find_assessments``/``determine`` on a ResourceBag of its shifted
  bundle, the master data and every shared resource of the other files — Slots are not patient-scoped) at the
  target moment, and compared with its written expectation (status, code, modifiers, every criterion, and the
  deadline moved by the same shift).
* **Choosing among candidates** (strategy ``keep-verdict``, the default): the base shift, then 1, 2, … 104 weeks
  earlier (two years of weeks, which include the 364-day shifts that keep a holiday's weekday and meet every
  DST switch and every Thanksgiving of those years), the first that keeps every verdict of the file. Scenarios
  expected ``pending`` only try the base shift: an earlier week only puts their deadline further in the past.
  When none keeps it, the base shift is used and the change is reported, never hidden. Strategy ``nearest``
  always takes the base shift.

The master data (``00-practice.json``) holds no story of its own: its dated elements are the Schedules'
``planningHorizon``. A horizon covering the original stories, widened to start at its start + the smallest shift
used and end at its end + the largest, covers every shifted story (each story moved by a shift between the two).
Any other dated element there (none today) moves by the smallest shift.

Resource ids never change: loading twice with different targets simply overwrites (PUT in transaction Bundles).
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from cds_service.fhir.parse import add_raw
from cds_service.record import ResourceBag
from cds_service.rules.calendar import BusinessCalendar
from cds_service.rules.engine import determine, find_assessments
from cds_service.rules.model import Determination
from cds_service.rules.rules_data import RulesData

__all__ = [
    "FileShift",
    "ScenarioOutcome",
    "ShiftError",
    "ShiftPlan",
    "hook_request",
    "parse_target",
    "plan_shift",
    "shift_moment",
    "shift_resource",
    "shift_text",
    "wall_clock",
    "weekly_shift",
]

MASTER_FILE = "00-practice.json"
Strategy = Literal["keep-verdict", "nearest"]
# Two years of weeks: every holiday and DST switch is met twice — once is not always enough, since in a given
# year another holiday may fall in the story's week (Veterans Day 2027 is the Thursday after the 2027 fall-back).
WEEKS_BACK = 104
# Types outside any patient's compartment: a server shows them to every patient's queries (Slots of a
# practitioner's Schedule are how "soonest available" is judged, §6), so each scenario is judged with all of them.
SHARED_TYPES = frozenset({"Slot", "Schedule", "Practitioner", "PractitionerRole", "Organization", "Location",
                          "HealthcareService", "Endpoint"})

# FHIR date (full dates only) and dateTime/instant with a time; partial dates (YYYY, YYYY-MM) have no day to shift.
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?P<fraction>\.\d+)?)?(?P<zone>Z|[+-]\d{2}:\d{2})$")
_DAY_END = time(23, 59, 59)
_FIRST_YEAR, _LAST_YEAR = 1900, 2999


class ShiftError(ValueError):
    """A bad ``--shift-to`` value; the message is one line."""


def wall_clock() -> datetime:
    """The real clock (``--shift-to now``); tests replace it."""
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------------- the target


def parse_target(value: str, tz: ZoneInfo, clock: Callable[[], datetime] = wall_clock) -> datetime:
    """``now``, an ISO date (the end of that day in the practice zone, 23:59:59, so every story whose clock falls
    on that weekday lands on that day), or an ISO date-time with a UTC offset. Returned in ``tz``."""
    text = value.strip() if isinstance(value, str) else ""
    if text.lower() == "now":
        moment = clock()
        if moment.tzinfo is None:
            raise ShiftError("the clock returned a naive date-time")
        return _in_range(moment.astimezone(tz), "now")
    if _DATE.match(text):
        try:
            day = date.fromisoformat(text)
        except ValueError as exc:
            raise ShiftError(f"not a valid date: {value!r} (use YYYY-MM-DD, an ISO date-time with offset, "
                             "or now)") from exc
        _in_range(datetime.combine(day, _DAY_END), value)
        return _localize(datetime.combine(day, _DAY_END), tz)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ShiftError(f"not a date, a date-time or 'now': {value!r} (e.g. 2027-03-10, "
                         "2027-03-10T09:30:00-05:00 or now)") from exc
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ShiftError(f"a date-time needs a UTC offset, e.g. 2027-03-10T09:30:00-05:00: {value!r}")
    return _in_range(moment.astimezone(tz), value)


def _in_range(moment: datetime, value: str) -> datetime:
    # The stories reach 85 years back (birth dates) and weeks ahead: keep every shifted date inside Python's.
    if not _FIRST_YEAR <= moment.year <= _LAST_YEAR:
        raise ShiftError(f"{value!r} is out of range: choose a moment in the years {_FIRST_YEAR}–{_LAST_YEAR}")
    return moment


# ------------------------------------------------------------------------------------------- shifting moments


def _localize(wall: datetime, tz: ZoneInfo, fold: int = 0) -> datetime:
    """A wall-clock reading in ``tz`` as an aware datetime with the offset in force then. A reading in a DST gap
    (02:30 on the spring-forward Sunday) does not exist: it becomes the instant it names with the pre-gap offset
    (03:30 new time), the only place where a shift cannot keep the time of day."""
    return wall.replace(tzinfo=tz, fold=fold).astimezone(UTC).astimezone(tz)


def shift_moment(moment: datetime, days: int, tz: ZoneInfo) -> datetime:
    """``moment`` moved by ``days`` local calendar days in ``tz``, same wall-clock time, re-localized."""
    local = moment.astimezone(tz)
    return _localize(local.replace(tzinfo=None) + timedelta(days=days), tz, local.fold)


def shift_text(text: str, days: int, tz: ZoneInfo) -> str:
    """A FHIR date / dateTime / instant string moved by ``days`` local days; anything else unchanged.

    Written as the original was: a date stays a date; a time written with the practice zone's offset gets the
    offset in force at the new date; one written in UTC (``Z``) or another fixed offset keeps that offset; the
    precision (seconds, fraction digits) is kept.
    """
    if _DATE.match(text):
        try:
            return (date.fromisoformat(text) + timedelta(days=days)).isoformat()
        except ValueError:
            return text  # not a real date (2026-02-30): not ours to repair
    match = _DATETIME.match(text)
    if match is None:
        return text
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    shifted = shift_moment(moment, days, tz)
    local = moment.astimezone(tz)
    if moment.utcoffset() != local.utcoffset():  # written in UTC or another fixed offset: keep that offset
        shifted = shifted.astimezone(moment.tzinfo)
    fraction = match.group("fraction")
    has_seconds = text[16:17] == ":"
    body = shifted.strftime("%Y-%m-%dT%H:%M" + (":%S" if has_seconds else ""))
    if fraction:
        digits = len(fraction) - 1
        body += "." + f"{shifted.microsecond:06d}"[:digits].ljust(digits, "0")
    if match.group("zone") == "Z" and shifted.utcoffset() == timedelta(0):
        return body + "Z"
    offset = shifted.strftime("%z")
    return f"{body}{offset[:3]}:{offset[3:]}"


def shift_resource(node: Any, days: int, tz: ZoneInfo) -> Any:
    """A deep copy of a JSON document with every FHIR date/dateTime/instant moved by ``days`` local days.

    Every string leaf that is a full FHIR date or a date-time with an offset is one (the fixtures write no other
    kind of string in that shape; ``tests/test_shift.py`` walks every fixture to prove none is left behind).
    Free text that mentions a date ("photo review of 09 Dec") is prose and stays as written.
    """
    if isinstance(node, dict):
        return {key: shift_resource(value, days, tz) for key, value in node.items()}
    if isinstance(node, list):
        return [shift_resource(value, days, tz) for value in node]
    if isinstance(node, str):
        return shift_text(node, days, tz)
    return node


def weekly_shift(anchor: datetime, target: datetime, tz: ZoneInfo) -> int:
    """The largest multiple of 7 days that puts ``anchor`` (shifted in local days) at or before ``target``."""
    days = (target.astimezone(tz).date() - anchor.astimezone(tz).date()).days
    shift = days - days % 7
    if shift_moment(anchor, shift, tz) > target:
        shift -= 7
    return shift


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class ScenarioOutcome:
    """One scenario after the shift, judged at the target moment."""

    item: dict[str, Any]  # the scenarios.json entry, shifted (now, receipt, deadline, context)
    original: dict[str, Any]
    days: int
    kept: bool
    got: dict[str, Any] | None  # the engine's verdict at the target: status, code, modifiers, deadline, criteria
    reason: str = ""  # why the verdict differs, when it does
    note: str = ""  # a kept verdict that rests on another holiday than the story's

    @property
    def id(self) -> str:
        return str(self.item["id"])

    @property
    def expected_status(self) -> str:
        return str(self.item["expected"]["status"])

    @property
    def got_status(self) -> str:
        return str(self.got["status"]) if self.got else "no verdict"

    def line(self) -> str:
        """One line for the console: where the story now is, the hook to call, and what its verdict does."""
        item = self.item
        now = datetime.fromisoformat(item["now"])
        where = (f"{self.id}: {self.days:+d} d, now {now.strftime('%a %Y-%m-%d %H:%M%z')}; "
                 f"{item['hook']} {_compact(_context_without_bundle(item['context']))}")
        if self.kept:
            return f"{where} — {self.expected_status}: verdict kept" + (f" ({self.note})" if self.note else "")
        if self.got_status == self.expected_status:
            return f"{where} — {self.expected_status} kept, but its determination differs ({self.reason})"
        return f"{where} — {self.expected_status} → {self.got_status} after the shift ({self.reason})"


@dataclass
class FileShift:
    name: str
    days: int
    bundle: dict[str, Any]
    candidates_tried: int = 1


@dataclass
class ShiftPlan:
    target: datetime
    strategy: Strategy
    files: list[FileShift]
    outcomes: list[ScenarioOutcome] = field(default_factory=list)

    def bundles(self) -> list[tuple[str, dict[str, Any]]]:
        return [(f.name, f.bundle) for f in self.files]

    def scenarios(self) -> list[dict[str, Any]]:
        return [o.item for o in self.outcomes]

    def kept(self) -> list[ScenarioOutcome]:
        return [o for o in self.outcomes if o.kept]

    def changed(self) -> list[ScenarioOutcome]:
        return [o for o in self.outcomes if not o.kept]

    def summary(self) -> str:
        shifts = sorted({f.days for f in self.files if f.name != MASTER_FILE})
        span = f"{shifts[0]:+d} to {shifts[-1]:+d} days" if shifts else "none"
        return (f"shifted to {self.target.isoformat(timespec='seconds')} (strategy {self.strategy}, shifts "
                f"{span}, whole weeks): {len(self.kept())} of {len(self.outcomes)} scenarios keep their verdict, "
                f"{len(self.changed())} change")


def plan_shift(bundles: Iterable[tuple[str, dict[str, Any]]], scenarios: list[dict[str, Any]], target: datetime,
               *, calendar: BusinessCalendar, rules: RulesData, strategy: Strategy = "keep-verdict") -> ShiftPlan:
    """Shift every bundle and scenario so that each story happens at or just before ``target``, then judge every
    scenario at ``target`` with the engine (module docstring)."""
    tz = calendar.tz
    originals = dict(bundles)
    if MASTER_FILE not in originals:
        raise ValueError(f"{MASTER_FILE} (the master data) is missing from the bundles")
    by_file: dict[str, list[dict[str, Any]]] = {}
    for item in scenarios:
        by_file.setdefault(item["file"], []).append(item)
    master = _resources(originals[MASTER_FILE])
    judge = _Judge(target, calendar, rules, master)

    chosen: dict[str, int] = {}
    tried: dict[str, int] = {}
    # Round 1: each file on its own (with the master data); round 2: again with every other file's shared
    # resources as shifted in round 1 (a Slot moved with its story may fall in another story's window).
    for shared_round in (False, True) if strategy == "keep-verdict" else (False,):
        shared: list[dict[str, Any]] = []
        if shared_round:
            shared = [r for name, days in chosen.items()
                      for r in _shared(shift_resource(originals[name], days, tz))]
        for name, items in by_file.items():
            anchor = max(datetime.fromisoformat(i["now"]) for i in items)
            base = weekly_shift(anchor, target, tz)
            if shared_round and chosen.get(name) is not None and judge.file_kept(
                    originals[name], items, chosen[name], _others(shared, originals[name])):
                continue
            candidates = [base]
            if strategy == "keep-verdict" and not any(i["expected"]["status"] == "pending" for i in items):
                candidates += [base - 7 * weeks for weeks in range(1, WEEKS_BACK + 1)]
            others = _others(shared, originals[name]) if shared_round else []
            chosen[name] = base
            for count, days in enumerate(candidates, start=1):
                if len(candidates) == 1 or judge.file_kept(originals[name], items, days, others):
                    chosen[name] = days
                    tried[name] = count
                    break
            else:
                tried[name] = len(candidates)
    # A bundle no scenario names (none but the master data today) has no clock of its own: it moves by the
    # smallest shift used, like the master data's single dates.
    scenario_shifts = list(chosen.values()) or [0]
    low, high = min(scenario_shifts), max(scenario_shifts)
    files: list[FileShift] = []
    for name, bundle in originals.items():
        if name == MASTER_FILE:
            files.append(FileShift(name, low, _shift_master(bundle, low, high, tz)))
        else:
            days = chosen.get(name, low)
            files.append(FileShift(name, days, shift_resource(bundle, days, tz), tried.get(name, 1)))
    plan = ShiftPlan(target, strategy, files)
    shifted = {f.name: f.bundle for f in files}
    all_shared = [r for f in files if f.name != MASTER_FILE for r in _shared(f.bundle)]
    final = _Judge(target, calendar, rules, _resources(shifted[MASTER_FILE]))
    for item in scenarios:
        days = chosen[item["file"]]
        own = shifted[item["file"]]
        others = [r for r in all_shared if _key(r) not in _keys(own)]
        moved = shift_item(item, days, tz)
        got = final.verdict(moved, _resources(own), others)
        kept, reason = _compare(item, moved, got, days, target, calendar, rules)
        note = _holiday_swap(item, moved, calendar) if kept else ""
        plan.outcomes.append(ScenarioOutcome(moved, item, days, kept, got, reason, note))
    return plan


def shift_item(item: dict[str, Any], days: int, tz: ZoneInfo) -> dict[str, Any]:
    """A scenarios.json entry moved with its story: ``now``, ``receipt``, the expected deadline and the hook
    context (appointment-book's proposed appointments). Prose (title, note) stays as written."""
    moved = copy.deepcopy(item)
    for key in ("now", "receipt"):
        if key in moved:
            moved[key] = shift_text(moved[key], days, tz)
    if "deadline" in moved.get("expected", {}):
        moved["expected"]["deadline"] = shift_text(moved["expected"]["deadline"], days, tz)
    moved["context"] = shift_resource(moved["context"], days, tz)
    moved["shiftDays"] = days
    return moved


def hook_request(item: dict[str, Any], fhir_server: str | None = None) -> dict[str, Any]:
    """A CDS Hooks request for a (shifted) scenario: its hook and context, the FHIR server to read (no token:
    add ``fhirAuthorization`` when the server needs one), no prefetch (the service fetches what it needs)."""
    # CDS Hooks 2.0: hookInstance is a UUID; derived from the scenario and its clock, so rewriting is stable.
    instance = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:g2250-cds:fixtures:{item['id']}:{item['now']}")
    body: dict[str, Any] = {"hook": item["hook"], "hookInstance": str(instance), "context": item["context"]}
    if fhir_server:
        body["fhirServer"] = fhir_server
    return body


# ------------------------------------------------------------------------------------------------- internals


class _Judge:
    """The rules engine on a shifted story, at the target moment (billing-rules.md §7: one verdict per
    assessment, from the record and the clock only)."""

    def __init__(self, target: datetime, calendar: BusinessCalendar, rules: RulesData,
                 master: list[dict[str, Any]]) -> None:
        self.target = target
        self.calendar = calendar
        self.rules = rules
        self.master = master

    def verdict(self, item: dict[str, Any], own: list[dict[str, Any]],
                others: list[dict[str, Any]]) -> dict[str, Any] | None:
        bag = ResourceBag()
        add_raw(bag, self.master)
        add_raw(bag, others)
        add_raw(bag, own)
        proposed = item["context"].get("appointments") if item["hook"] == "appointment-book" else None
        if isinstance(proposed, Mapping):  # appointment-book: the proposal joins the record (hooks/gather.py)
            add_raw(bag, [e["resource"] for e in proposed.get("entry") or () if "resource" in e])
        patient_id = item["context"]["patientId"]
        assessments = find_assessments(bag, patient_id, self.calendar, self.rules)
        encounter = item.get("assessmentEncounter")
        receipt = datetime.fromisoformat(item["receipt"]) if item.get("receipt") else None
        chosen = next((a for a in assessments if encounter and a.encounter_key == encounter), None)
        if chosen is None:
            chosen = next((a for a in assessments if receipt is not None and a.receipt_time == receipt), None)
        if chosen is None:
            return None
        determination = determine(chosen, bag=bag, patient_id=patient_id, now=self.target,
                                  calendar=self.calendar, rules=self.rules)
        return _verdict(determination)

    def file_kept(self, bundle: dict[str, Any], items: list[dict[str, Any]], days: int,
                  others: list[dict[str, Any]]) -> bool:
        tz = self.calendar.tz
        own = _resources(shift_resource(bundle, days, tz))
        for item in items:
            moved = shift_item(item, days, tz)
            got = self.verdict(moved, own, others)
            if not _compare(item, moved, got, days, self.target, self.calendar, self.rules)[0]:
                return False
        return True


def _verdict(determination: Determination) -> dict[str, Any]:
    return {
        "status": determination.status,
        "code": determination.code,
        "modifiers": list(determination.modifiers) or None,
        "deadline": determination.deadline,
        "criteria": {c.id: c.status for c in determination.criteria},
    }


def _compare(original: dict[str, Any], moved: dict[str, Any], got: dict[str, Any] | None, days: int,
             target: datetime, calendar: BusinessCalendar, rules: RulesData) -> tuple[bool, str]:
    """Does the engine's verdict at the target match the scenario's expectation (deadline moved with the story),
    and will its hook show it? If not, why, in words."""
    if got is None:
        return False, "the engine finds no such assessment in the shifted record"
    expected = moved["expected"]
    differences: list[str] = []
    if got["status"] != expected["status"]:
        differences.append(f"status {expected['status']} → {got['status']}")
    if got["code"] != expected.get("code") or got["modifiers"] != expected.get("modifiers"):
        differences.append(f"code {_code(expected.get('code'), expected.get('modifiers'))} → "
                           f"{_code(got['code'], got['modifiers'])}")
    changed = _changed_criteria(moved, got)
    deadline = expected.get("deadline")
    if deadline is not None and (got["deadline"] is None or got["deadline"] != datetime.fromisoformat(deadline)):
        got_deadline = got["deadline"].isoformat(timespec="minutes") if got["deadline"] else "none"
        differences.append(f"deadline {deadline[:16]} → {got_deadline[:16]}")
    if moved["hook"] == "patient-view" and moved.get("receipt"):
        since = target - timedelta(days=rules.settings.patient_view_lookback_days)
        if not since <= datetime.fromisoformat(moved["receipt"]) <= target:
            differences.append(f"patient-view shows only the submissions of the last "
                               f"{rules.settings.patient_view_lookback_days} days")
    if not differences and not changed:
        return True, ""
    causes = _causes(original, moved, got, days, target, calendar)
    return False, "; ".join([*changed, *differences, *causes])


def _causes(original: dict[str, Any], moved: dict[str, Any], got: dict[str, Any], days: int,
            target: datetime, calendar: BusinessCalendar) -> list[str]:
    """Why the calendar may read the shifted story differently: holidays and DST switches in its window that
    the shift left behind or met, a deadline the target is past, a calendar month boundary."""
    tz = calendar.tz
    causes: list[str] = []
    deadline = moved["expected"].get("deadline")
    if original["expected"]["status"] == "pending" and deadline and datetime.fromisoformat(deadline) <= target:
        causes.append(f"the target is past its shifted deadline {deadline[:16]}")
    # Holidays count only where business hours are counted: receipt to deadline, and the 2 business days after
    # the follow-up that decide a possibly resulting appointment (§3, §6).
    before, after = _span(original, tz, back=0, ahead=3), _span(moved, tz, back=0, ahead=3)
    lost = [f"{calendar.holiday_name(d)} {d.isoformat()}" for d in _days(*before) if calendar.holiday_name(d)
            and not calendar.holiday_name(d + timedelta(days=days))]
    met = [f"{calendar.holiday_name(d)} {d.isoformat()}" for d in _days(*after) if calendar.holiday_name(d)
           and not calendar.holiday_name(d - timedelta(days=days))]
    changed = {c.split(" ", 1)[0] for c in _changed_criteria(moved, got)}
    # Named only where they can be the cause: a holiday moves the deadline or the 2 business days of a possibly
    # resulting appointment; a DST switch changes an elapsed window.
    if deadline is None or got["deadline"] != datetime.fromisoformat(deadline) or "no-resulting-service" in changed:
        if lost:
            causes.append(f"its holiday ({', '.join(lost)}) is no longer in its window")
        if met:
            causes.append(f"a holiday ({', '.join(met)}) is now in its window")
    if changed & {"no-related-service-prior-7-days", "no-resulting-service", "established-patient",
                  "consent-documented"}:
        # Elapsed windows (§7): 7 × 24 h before receipt, 24 h after the follow-up.
        had = _dst_days(*_span(original, tz, back=8, ahead=2), tz)
        has = _dst_days(*_span(moved, tz, back=8, ahead=2), tz)
        if had and not has:
            causes.append("its DST switch is no longer in its window (elapsed hours differ by one)")
        elif has and not had:
            causes.append("a DST switch is now in its window (elapsed hours differ by one)")
    receipt = moved.get("receipt")
    if receipt and original.get("receipt"):
        was = datetime.fromisoformat(original["receipt"]).astimezone(tz).day
        now_day = datetime.fromisoformat(receipt).astimezone(tz).day
        if was != now_day and any(c.startswith("not-already-billed") for c in _changed_criteria(moved, got)):
            causes.append(f"the receipt is on day {now_day} of its month, was day {was} (§7 care management "
                          "counts the calendar month)")
    return causes


def _holiday_swap(original: dict[str, Any], moved: dict[str, Any], calendar: BusinessCalendar) -> str:
    """"its Thanksgiving Day 2026-11-26 is now Veterans Day 2027-11-11": a kept story whose deadline now skips
    another holiday than its own (§3: any configured holiday is skipped alike)."""
    tz = calendar.tz

    def named(item: dict[str, Any]) -> list[str]:
        return [f"{name} {d.isoformat()}" for d in _days(*_span(item, tz, back=0, ahead=3))
                if (name := calendar.holiday_name(d))]

    before, after = named(original), named(moved)
    if before and after and [h.rsplit(" ", 1)[0] for h in before] != [h.rsplit(" ", 1)[0] for h in after]:
        return f"its {' and '.join(before)} is now {' and '.join(after)}"
    return ""


def _changed_criteria(moved: dict[str, Any], got: dict[str, Any]) -> list[str]:
    return [f"{cid} {status} → {got['criteria'].get(cid)}" for cid, status in moved["expected"]["criteria"].items()
            if got["criteria"].get(cid) != status]


def _span(item: dict[str, Any], tz: ZoneInfo, *, back: int, ahead: int) -> tuple[date, date]:
    """From ``back`` days before a story's receipt to ``ahead`` days after the later of its clock and deadline."""
    receipt = datetime.fromisoformat(item.get("receipt") or item["now"]).astimezone(tz).date()
    ends = [datetime.fromisoformat(item["now"]).astimezone(tz).date()]
    if item["expected"].get("deadline"):
        ends.append(datetime.fromisoformat(item["expected"]["deadline"]).astimezone(tz).date())
    return receipt - timedelta(days=back), max(ends) + timedelta(days=ahead)


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def _dst_days(first: date, last: date, tz: ZoneInfo) -> bool:
    start = datetime.combine(first, time(0), tzinfo=tz)
    end = datetime.combine(last, time(23, 59), tzinfo=tz)
    return start.utcoffset() != end.utcoffset() or any(
        datetime.combine(d, time(12), tzinfo=tz).utcoffset() != start.utcoffset() for d in _days(first, last))


def _shift_master(bundle: dict[str, Any], low: int, high: int, tz: ZoneInfo) -> dict[str, Any]:
    """The master data: a period's start moves by the smallest shift, its end by the largest (so a Schedule's
    planningHorizon that covered every original story covers every shifted one); any other date by the
    smallest."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                if key == "end" and isinstance(value, str) and "start" in node:
                    out[key] = shift_text(value, high, tz)
                elif isinstance(value, str):
                    out[key] = shift_text(value, low, tz)
                else:
                    out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(bundle)  # type: ignore[no-any-return]


def _resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry") or () if isinstance(e.get("resource"), dict)]


def _shared(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in _resources(bundle) if r.get("resourceType") in SHARED_TYPES]


def _key(resource: dict[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def _keys(bundle: dict[str, Any]) -> set[str]:
    return {_key(r) for r in _resources(bundle)}


def _others(shared: list[dict[str, Any]], own_bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The shared resources of the other files (the file's own come with its shifted bundle)."""
    own = _keys(own_bundle)
    return [r for r in shared if _key(r) not in own]


def _code(code: str | None, modifiers: list[str] | None) -> str:
    return "-".join([code or "no code", *(modifiers or ())])


def _context_without_bundle(context: dict[str, Any]) -> dict[str, Any]:
    """The context for the console: a proposed appointment as its id and start, not the whole Bundle."""
    shown = {k: v for k, v in context.items() if k != "appointments"}
    bundle = context.get("appointments")
    if isinstance(bundle, Mapping):
        shown["appointments"] = [f"{r.get('resourceType')}/{r.get('id')} start {r.get('start')}"
                                 for e in bundle.get("entry") or () if isinstance(r := e.get("resource"), dict)]
    return shown


def _compact(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)
