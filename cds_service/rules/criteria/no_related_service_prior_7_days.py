"""no-related-service-prior-7-days — billing-rules.md §2.5, §3 and §6 "Prior 7 days".

CMS: not originating from a related service (G2010: a related E/M service) provided within the previous 7 days.
Related = same problem; the OIG screens for it as same patient + same diagnosis code, here at ICD-10-CM category
level (first 3 characters). A prior service with no coded reason is possibly related → unknown, never silently met.
Scope: services of the billing practitioner by default; same specialty in the same organization by configuration.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from ..context import AssessmentContext
from ..facts import as_datetime, is_void, key_of, period_start
from ..model import CriterionResult

ID = "no-related-service-prior-7-days"


def service_start(resource: Any, tz: Any) -> Any:
    if resource.get_resource_type() == "Encounter":
        return period_start(resource.period, tz)
    return (as_datetime(resource.performedDateTime, tz) or period_start(resource.performedPeriod, tz)
            if resource.get_resource_type() == "Procedure" else None)


def services(ctx: AssessmentContext) -> list[tuple[Any, Any]]:
    """(start, resource) of the patient's Encounters and Procedures in scope, excluding the assessment itself."""
    return ctx.once("services", lambda: _services(ctx))


def _services(ctx: AssessmentContext) -> list[tuple[Any, Any]]:
    own = ctx.assessment.encounter_key
    found = []
    for resource in [*ctx.of_patient("Encounter"), *ctx.of_patient("Procedure")]:
        if key_of(resource) == own or is_void(resource):
            continue
        if resource.get_resource_type() == "Encounter" and resource.status in ("planned", "arrived", "triaged"):
            continue  # not a service (yet); a booked visit is an Appointment question
        start = service_start(resource, ctx.tz)
        if start is not None and ctx.in_scope(resource):
            found.append((start, resource))
    return sorted(found, key=lambda item: item[0])


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    if ctx.receipt_time is None:
        return CriterionResult(ID, "unknown", "No receipt time: the 7-day window cannot be placed.")
    hours = ctx.rules.settings.related_lookback_hours
    since = ctx.receipt_time - timedelta(hours=hours)
    prior = [(start, r) for start, r in services(ctx) if since <= start < ctx.receipt_time
             and not (r.get_resource_type() == "Encounter" and r.status not in ("finished", "in-progress"))
             and not (r.get_resource_type() == "Procedure" and r.status not in ("completed", "in-progress"))]
    if not prior:
        return CriterionResult(ID, "met", f"No visit or procedure in the {hours // 24} days before receipt.")
    categories = ctx.diagnosis_categories
    related, uncoded = [], []
    for start, resource in prior:
        theirs = ctx.categories_of(resource)
        if not theirs or not categories:
            uncoded.append(key_of(resource))
        elif theirs & categories:
            related.append((start, resource))
    if related:
        start, resource = related[0]
        shared = ", ".join(sorted(ctx.categories_of(resource) & categories))
        return CriterionResult(ID, "not-met", f"A related service on {start:%d %b} (same diagnosis {shared}) "
                               "started this; the review is part of it.", tuple(key_of(r) for _, r in related))
    if uncoded:
        why = ("the review has no coded diagnosis" if not categories else "its reason is not coded")
        return CriterionResult(ID, "unknown", f"A service in the prior {hours // 24} days may be related: {why}. "
                               "Confirm it was for another problem.", tuple(uncoded))
    return CriterionResult(ID, "met", "Services in the prior 7 days were for other problems.",
                           tuple(key_of(r) for _, r in prior))
