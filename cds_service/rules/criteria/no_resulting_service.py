"""no-resulting-service — billing-rules.md §2.6, §3 and §6 "Resulting services".

CMS: not leading to a service or procedure within the next 24 hours or soonest available appointment; if it does,
the review is bundled into that visit, even when the soonest slot is more than 24 hours away.
- An Encounter/Procedure starting from receipt to 24 h after the follow-up: related → not met; uncoded → unknown.
- An Appointment created after receipt, for a related or uncoded reason (presumed to result from the review):
  not met when it starts within 24 h of the follow-up, or when Slot data shows it is the soonest available (no
  free Slot of that practitioner starting more than the tolerance earlier); met when earlier free slots existed;
  without Slot data, unknown when created within 2 business days of the follow-up, otherwise ignored.

§7 "Elapsed windows are elapsed time": "24 h after the follow-up" and the slot tolerance are absolute time, so the
horizon is computed and compared on UTC instants (the 2 business days follow the calendar).

Cases (``facts["case"]``): not-met ``visit`` (a related visit or procedure followed), ``appointment-within-24h``,
``appointment-soonest``; unknown ``uncoded-visit``, ``possibly-resulting``, ``no-receipt``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from cds_service.record import ResourceBag

from ..context import AssessmentContext
from ..episode import practitioner_of
from ..facts import as_datetime, before, between, key_of, not_after, ref_of, shifted, utc
from ..model import CriterionResult
from .no_related_service_prior_7_days import services

ID = "no-resulting-service"
_IGNORED_APPOINTMENTS = ("cancelled", "noshow", "entered-in-error")


def _schedules_of(ctx: AssessmentContext) -> set[str]:
    """The billing practitioner's schedules (Schedule.actor may name the Practitioner or one of their roles)."""
    return set(schedules_by_practitioner(ctx.bag).get(ctx.practitioner, ()))


def schedules_by_practitioner(bag: ResourceBag) -> Mapping[str | None, frozenset[str]]:
    """Schedule keys by the Practitioner key behind each actor (None: an actor that is no practitioner), computed
    once per bag — and once per population-audit worker, whose patients borrow the shared Schedules and roles."""
    return bag.memo("schedules_by_practitioner", lambda: _schedules_by_practitioner(bag),
                    types=("Schedule", "PractitionerRole"))


def _schedules_by_practitioner(bag: ResourceBag) -> dict[str | None, frozenset[str]]:
    found: dict[str | None, set[str]] = {}
    for schedule in bag.of_type("Schedule"):
        for who in {practitioner_of(ref_of(a), bag) for a in schedule.actor or ()}:
            found.setdefault(who, set()).add(key_of(schedule))
    return {who: frozenset(keys) for who, keys in found.items()}


def _slot_verdict(ctx: AssessmentContext, appointment: Any, created: datetime, start: datetime,
                  schedules: set[str]) -> tuple[str, list[str]]:
    """'soonest' / 'earlier-free' / 'no-data', with the slots that decided it."""
    tolerance = timedelta(minutes=ctx.rules.settings.soonest_slot_tolerance_minutes)
    own_slots = {ref_of(s) for s in appointment.slot or ()}
    slots = [s for s in ctx.bag.of_type("Slot") if ref_of(s.schedule) in schedules]
    starts = {key_of(s): as_datetime(s.start, ctx.tz) for s in slots}
    window = [s for s in slots if (when := starts[key_of(s)]) is not None and between(when, created, start)]
    if not window and not own_slots & set(starts):
        return "no-data", []
    latest = utc(start) - tolerance  # elapsed minutes (§7)
    earlier = [s for s in window if s.status == "free" and key_of(s) not in own_slots
               and utc(starts[key_of(s)]) < latest]
    if earlier:
        return "earlier-free", [key_of(s) for s in earlier[:3]]
    return "soonest", [key_of(s) for s in window[:3]]


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    if ctx.receipt_time is None:
        return CriterionResult(ID, "unknown", "No receipt time: resulting visits cannot be placed.",
                               facts={"case": "no-receipt"})
    receipt = ctx.receipt_time
    follow_up_time = ctx.service_time
    hours = ctx.rules.settings.resulting_service_hours
    horizon = shifted(follow_up_time, timedelta(hours=hours))  # elapsed hours (§7), shown in local time
    categories = ctx.diagnosis_categories
    not_met: list[tuple[str, str, str]] = []  # (reference, words, case)
    unknown: list[tuple[str, str, str]] = []
    met_evidence: list[str] = []

    for start, resource in services(ctx):
        if not between(start, receipt, horizon):
            continue
        theirs = ctx.categories_of(resource)
        label = "visit" if resource.get_resource_type() == "Encounter" else "procedure"
        if theirs and categories and not theirs & categories:
            continue  # coded and for another problem
        if theirs and categories:
            not_met.append((key_of(resource), f"a related {label} on {start:%d %b %H:%M} followed within {hours} h",
                            "visit"))
        else:
            unknown.append((key_of(resource), f"a {label} on {start:%d %b %H:%M} followed; its reason is not coded",
                            "uncoded-visit"))

    schedules = _schedules_of(ctx)
    days = ctx.rules.settings.possibly_resulting_business_days
    for appointment in ctx.of_patient("Appointment"):
        if appointment.status in _IGNORED_APPOINTMENTS or appointment.start is None:
            continue
        if not ctx.involves_practitioner(appointment) and not ctx.in_scope(appointment):
            continue
        created = as_datetime(appointment.created, ctx.tz) or ctx.now  # a proposed one is created now (§6)
        start = as_datetime(appointment.start, ctx.tz)
        if start is None or before(created, receipt) or before(start, receipt):
            continue
        theirs = ctx.categories_of(appointment)
        if theirs and categories and not theirs & categories:
            continue  # booked for another problem
        key = key_of(appointment)
        if not_after(start, horizon):
            not_met.append((key, f"an appointment on {start:%d %b %H:%M} is within {hours} h of the reply",
                            "appointment-within-24h"))
            continue
        verdict, slots = _slot_verdict(ctx, appointment, created, start, schedules) if schedules else ("no-data", [])
        if verdict == "soonest":
            not_met.append((key, f"the appointment on {start:%d %b} was the soonest available",
                            "appointment-soonest"))
        elif verdict == "earlier-free":
            met_evidence.extend([key, *slots])
        elif not_after(created, ctx.calendar.add_business_hours(follow_up_time, days * 24)):
            unknown.append((key, f"an appointment on {start:%d %b} was booked soon after; no slot data shows "
                                 "whether it was the soonest available", "possibly-resulting"))
    if not_met:
        return CriterionResult(ID, "not-met", "The review led to a visit: " + "; ".join(d for _, d, _ in not_met)
                               + ".", tuple(k for k, _, _ in not_met), {"case": not_met[0][2]})
    if unknown:
        return CriterionResult(ID, "unknown", "Possibly bundled: " + "; ".join(d for _, d, _ in unknown) + ".",
                               tuple(k for k, _, _ in unknown), {"case": unknown[0][2]})
    if met_evidence:
        return CriterionResult(ID, "met", "A later visit was booked although earlier slots were free, so it did not "
                               "result from the review.", tuple(met_evidence))
    return CriterionResult(ID, "met", f"No related visit within {hours} h of the reply and none booked at the "
                           "soonest slot.")
