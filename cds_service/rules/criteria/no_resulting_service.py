"""no-resulting-service — billing-rules.md §2.6, §3 and §6 "Resulting services".

CMS: not leading to a service or procedure within the next 24 hours or soonest available appointment; if it does,
the review is bundled into that visit, even when the soonest slot is more than 24 hours away.
- An Encounter/Procedure starting from receipt to 24 h after the follow-up: related → not met; uncoded → unknown.
- An Appointment created after receipt, for a related or uncoded reason (presumed to result from the review):
  not met when it starts within 24 h of the follow-up, or when Slot data shows it is the soonest available (no
  free Slot of that practitioner starting more than the tolerance earlier); met when earlier free slots existed;
  without Slot data, unknown when created within 2 business days of the follow-up, otherwise ignored.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ..context import AssessmentContext
from ..episode import practitioner_of
from ..facts import as_datetime, key_of, ref_of
from ..model import CriterionResult
from .no_related_service_prior_7_days import services

ID = "no-resulting-service"
_IGNORED_APPOINTMENTS = ("cancelled", "noshow", "entered-in-error")


def _schedules_of(ctx: AssessmentContext) -> set[str]:
    """The billing practitioner's schedules (Schedule.actor may name the Practitioner or one of their roles)."""
    return {key_of(s) for s in ctx.bag.of_type("Schedule")
            if ctx.practitioner in {practitioner_of(ref_of(a), ctx.bag) for a in s.actor or ()}}


def _slot_verdict(ctx: AssessmentContext, appointment: Any, created: datetime, start: datetime,
                  schedules: set[str]) -> tuple[str, list[str]]:
    """'soonest' / 'earlier-free' / 'no-data', with the slots that decided it."""
    tolerance = timedelta(minutes=ctx.rules.settings.soonest_slot_tolerance_minutes)
    own_slots = {ref_of(s) for s in appointment.slot or ()}
    slots = [s for s in ctx.bag.of_type("Slot") if ref_of(s.schedule) in schedules]
    window = [s for s in slots if s.start is not None and created <= as_datetime(s.start, ctx.tz) <= start]
    if not window and not own_slots & {key_of(s) for s in slots}:
        return "no-data", []
    earlier = [s for s in window if s.status == "free" and key_of(s) not in own_slots
               and as_datetime(s.start, ctx.tz) < start - tolerance]
    if earlier:
        return "earlier-free", [key_of(s) for s in earlier[:3]]
    return "soonest", [key_of(s) for s in window[:3]]


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    if ctx.receipt_time is None:
        return CriterionResult(ID, "unknown", "No receipt time: resulting visits cannot be placed.")
    receipt = ctx.receipt_time
    follow_up_time = ctx.service_time
    hours = ctx.rules.settings.resulting_service_hours
    horizon = follow_up_time + timedelta(hours=hours)
    categories = ctx.diagnosis_categories
    not_met: list[tuple[str, str]] = []
    unknown: list[tuple[str, str]] = []
    met_evidence: list[str] = []

    for start, resource in services(ctx):
        if not receipt <= start <= horizon:
            continue
        theirs = ctx.categories_of(resource)
        label = "visit" if resource.get_resource_type() == "Encounter" else "procedure"
        if theirs and categories and not theirs & categories:
            continue  # coded and for another problem
        if theirs and categories:
            not_met.append((key_of(resource), f"a related {label} on {start:%d %b %H:%M} followed within {hours} h"))
        else:
            unknown.append((key_of(resource), f"a {label} on {start:%d %b %H:%M} followed; its reason is not coded"))

    schedules = _schedules_of(ctx)
    days = ctx.rules.settings.possibly_resulting_business_days
    for appointment in ctx.of_patient("Appointment"):
        if appointment.status in _IGNORED_APPOINTMENTS or appointment.start is None:
            continue
        if not ctx.involves_practitioner(appointment) and not ctx.in_scope(appointment):
            continue
        created = as_datetime(appointment.created, ctx.tz) or ctx.now  # a proposed one is created now (§6)
        start = as_datetime(appointment.start, ctx.tz)
        if created < receipt or start is None or start < receipt:
            continue
        theirs = ctx.categories_of(appointment)
        if theirs and categories and not theirs & categories:
            continue  # booked for another problem
        key = key_of(appointment)
        if start <= horizon:
            not_met.append((key, f"an appointment on {start:%d %b %H:%M} is within {hours} h of the reply"))
            continue
        verdict, slots = _slot_verdict(ctx, appointment, created, start, schedules) if schedules else ("no-data", [])
        if verdict == "soonest":
            not_met.append((key, f"the appointment on {start:%d %b} was the soonest available"))
        elif verdict == "earlier-free":
            met_evidence.extend([key, *slots])
        elif created <= ctx.calendar.add_business_hours(follow_up_time, days * 24):
            unknown.append((key, f"an appointment on {start:%d %b} was booked soon after; no slot data shows "
                                 "whether it was the soonest available"))
    if not_met:
        return CriterionResult(ID, "not-met", "The review led to a visit: " + "; ".join(d for _, d in not_met) + ".",
                               tuple(k for k, _ in not_met))
    if unknown:
        return CriterionResult(ID, "unknown", "Possibly bundled: " + "; ".join(d for _, d in unknown) + ".",
                               tuple(k for k, _ in unknown))
    if met_evidence:
        return CriterionResult(ID, "met", "A later visit was booked although earlier slots were free, so it did not "
                               "result from the review.", tuple(met_evidence))
    return CriterionResult(ID, "met", f"No related visit within {hours} h of the reply and none booked at the "
                           "soonest slot.")
