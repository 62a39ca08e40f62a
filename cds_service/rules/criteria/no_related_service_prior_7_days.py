"""no-related-service-prior-7-days — billing-rules.md §2.5, §2.11, §3, §6 "Prior 7 days" and §7.

CMS: not originating from a related service (G2010: a related E/M service) provided within the previous 7 days.
Related = same problem; the OIG screens for it as same patient + same diagnosis code, here at ICD-10-CM category
level (first 3 characters). A prior service with no coded reason is possibly related → unknown, never silently met.
Scope: services of the billing practitioner by default; same specialty in the same organization by configuration.

§7 "Elapsed windows are elapsed time": the window is 7 × 24 h of absolute time before receipt (168 h even across a
daylight-saving change), compared on UTC instants.

§7 "Global surgical period" (§2.11): when the answer would otherwise be met, a related surgical Procedure (CPT
10004–69990) in scope, performed up to ``global_period_lookback_days`` (90) calendar days before receipt — or, for a
code listed in ``global_days_by_cpt``, while its 0/10/90-day global period runs — makes it unknown: the review may
be part of the post-operative global package (the global days are not in the record).

Cases (``facts["case"]``): not-met ``related-visit``; unknown ``uncoded``, ``global-period``, ``no-receipt``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from ..context import AssessmentContext
from ..facts import as_datetime, before, codes_in, is_void, key_of, not_after, period_start, utc
from ..model import CPT_SYSTEM, CriterionResult

ID = "no-related-service-prior-7-days"
SURGERY_RANGE = (10004, 69990)  # CPT surgery section (billing-rules.md §7 "Global surgical period")


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
    return sorted(found, key=lambda item: utc(item[0]))


def _took_place(resource: Any) -> bool:
    if resource.get_resource_type() == "Encounter":
        return resource.status in ("finished", "in-progress")
    return resource.status in ("completed", "in-progress")


def surgical_codes(resource: Any) -> list[str]:
    """CPT codes of a Procedure in the surgery range 10004–69990."""
    found = []
    for code in codes_in(resource.code, CPT_SYSTEM):
        text = code.strip()
        if len(text) == 5 and text.isdigit() and SURGERY_RANGE[0] <= int(text) <= SURGERY_RANGE[1]:
            found.append(text)
    return found


def global_period_procedures(ctx: AssessmentContext) -> list[tuple[Any, Any, str]]:
    """(performed, Procedure, CPT code) of related surgical procedures whose global period may still run at
    receipt (§7). Days are calendar days in the practice time zone: CMS counts the global period as the day of the
    procedure plus 0, 10 or 90 days."""
    receipt = ctx.receipt_time
    categories = ctx.diagnosis_categories
    if receipt is None or not categories:
        return []
    settings = ctx.rules.settings
    receipt_day = receipt.astimezone(ctx.tz).date()
    found = []
    for start, resource in services(ctx):
        if resource.get_resource_type() != "Procedure" or not _took_place(resource) or not before(start, receipt):
            continue
        codes = surgical_codes(resource)
        if not codes or not ctx.categories_of(resource) & categories:
            continue
        days_after = (receipt_day - start.astimezone(ctx.tz).date()).days
        for code in codes:
            # A listed code runs for its own global days (0 = the procedure day only); others for the look-back.
            limit = settings.global_days_by_cpt.get(code, settings.global_period_lookback_days)
            if 0 <= days_after <= limit:
                found.append((start, resource, code))
                break
    return found


def _met_or_global(ctx: AssessmentContext, detail: str, evidence: tuple[str, ...] = ()) -> CriterionResult:
    procedures = global_period_procedures(ctx)
    if not procedures:
        return CriterionResult(ID, "met", detail, evidence)
    start, resource, code = procedures[0]
    shared = ", ".join(sorted(ctx.categories_of(resource) & ctx.diagnosis_categories))
    listed = ctx.rules.settings.global_days_by_cpt.get(code)
    days = f"{listed}-day global period" if listed is not None else "global period (length not in the record)"
    return CriterionResult(
        ID, "unknown",
        f"{detail[:-1]}, but a related surgical procedure (CPT {code}, same diagnosis {shared}) was performed on "
        f"{start:%d %b %Y}, and its {days} may still run: is this review part of a post-operative global period? "
        "If so, it is included in the surgery and not billed separately.",
        (*evidence, *(key_of(r) for _, r, _ in procedures)), {"case": "global-period", "cpt": code})


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    if ctx.receipt_time is None:
        return CriterionResult(ID, "unknown", "No receipt time: the 7-day window cannot be placed.",
                               facts={"case": "no-receipt"})
    hours = ctx.rules.settings.related_lookback_hours
    receipt = utc(ctx.receipt_time)
    since = receipt - timedelta(hours=hours)  # elapsed time (§7), not the wall clock
    prior = [(start, r) for start, r in services(ctx)
             if not_after(since, start) and before(start, receipt) and _took_place(r)]
    span = f"{hours // 24} days" if hours % 24 == 0 else f"{hours} hours"
    if not prior:
        return _met_or_global(ctx, f"No visit or procedure in scope in the {span} before receipt.")
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
        kind = "visit" if resource.get_resource_type() == "Encounter" else "procedure"
        return CriterionResult(ID, "not-met", f"A related {kind} on {start:%d %b %H:%M} (same diagnosis {shared}), "
                               f"within the {span} before receipt, started this; the review is part of it.",
                               tuple(key_of(r) for _, r in related), {"case": "related-visit"})
    if uncoded:
        why = ("the review has no coded diagnosis" if not categories else "its reason is not coded")
        return CriterionResult(ID, "unknown", f"A service in the {span} before receipt may be related: {why}. "
                               "Confirm it was for another problem.", tuple(uncoded), {"case": "uncoded"})
    return _met_or_global(ctx, f"Services in the {span} before receipt were for other problems.",
                          tuple(key_of(r) for _, r in prior))
