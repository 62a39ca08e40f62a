"""not-already-billed — billing-rules.md §2.10, §3.

No second G2250/G2010 for the same submission; no G2250/G2010 when the same problem is already inside an e-visit
(99421–99423, 98970–98972) in the same 7 days; no separate check-in code (G2251/G2252/98016) for the follow-up.
Charges entered in error, aborted or marked not billable do not count. The 7-day e-visit window is elapsed time
(§7 "Elapsed windows are elapsed time").

§7 "Care management / remote monitoring" (§2.10 "time counted toward care management or remote monitoring is not
counted again"): when the answer would otherwise be met, a ChargeItem or Claim line (not void) with a care
management code (99490, 99491, 99439, 99487, 99489, 99424–99427) or a remote monitoring code (99457, 99458, 99091)
— the ``care_management_codes`` / ``remote_monitoring_codes`` settings — for the same patient in the calendar month
(practice time zone) of the receipt or of the follow-up makes it unknown: was this review's time counted there?

Cases (``facts["case"]``): not-met ``same-submission``, ``wrong-code`` (with the ``wrong_code`` fact), ``e-visit``,
``check-in``; unknown ``e-visit-uncoded``, ``care-management``, ``no-receipt``.

Population audit (billing-rules.md §8, ``ctx.own_charges == "ignore"``): the assessment is judged as if its own
G2250/G2010 charge were absent — ``same-submission`` and ``wrong-code`` never arise, the criterion speaks only of
overlapping e-visits, check-ins and care management — and the own charges' references are reported in
``facts["own_charges"]`` (ChargeItems, then Claims) for the audit to class. Hooks keep the default, "count".
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ..context import AssessmentContext
from ..facts import as_datetime, codings, elapsed, key_of, period_start, ref_of
from ..model import CPT_SYSTEM, HCPCS_SYSTEM, CriterionResult

ID = "not-already-billed"
_VOID = ("entered-in-error", "aborted", "not-billable")
_VOID_CLAIM = ("cancelled", "entered-in-error")
_CODE_SYSTEMS = (HCPCS_SYSTEM, CPT_SYSTEM, None)


def codes_of(concept: Any) -> set[str]:
    """HCPCS/CPT codes (or codes without a system) of a CodeableConcept, trimmed and upper-case: how every charge
    and claim line is read (the population audit reads them the same way)."""
    return {c.code.strip().upper() for c in codings(concept) if c.code and c.system in _CODE_SYSTEMS}


_codes = codes_of


def charged_codes(resource: Any) -> set[str]:
    """Codes of a ChargeItem, or of every line of a Claim."""
    if resource.get_resource_type() == "Claim":
        return {code for item in resource.item or () for code in _codes(item.productOrService)}
    return _codes(resource.code)


_charged_codes = charged_codes


def charge_is_void(charge: Any) -> bool:
    """A ChargeItem entered in error, aborted or marked not billable does not count as a charge."""
    return charge.status in _VOID


def claim_is_void(claim: Any) -> bool:
    """A cancelled or entered-in-error Claim does not count."""
    return claim.status in _VOID_CLAIM


def _when(charge: Any, ctx: AssessmentContext) -> Any:
    return (as_datetime(charge.occurrenceDateTime, ctx.tz) or period_start(charge.occurrencePeriod, ctx.tz)
            or as_datetime(charge.enteredDate, ctx.tz))


def _about_this_assessment(charge: Any, ctx: AssessmentContext) -> bool:
    keys = ctx.assessment.keys
    if ctx.follow_up is not None:
        keys = keys | {ctx.follow_up.key}
    if ctx.assessment.encounter_key and ref_of(charge.context) == ctx.assessment.encounter_key:
        return True
    return any(ref_of(s) in keys for s in charge.supportingInformation or ())


def existing_charges(ctx: AssessmentContext) -> list[Any]:
    """G2250/G2010 ChargeItems already recorded for this assessment (appointment-book offers to delete them)."""
    remote = set(ctx.rules.settings.remote_assessment_codes)
    return [c for c in ctx.of_patient("ChargeItem")
            if c.status not in _VOID and ref_of(c.subject) == ctx.patient_key
            and _codes(c.code) & remote and _about_this_assessment(c, ctx)]


def claims_for_assessment(ctx: AssessmentContext) -> list[Any]:
    """Claims (drafts or submitted) with a G2250/G2010 line for this assessment's encounter or submission."""
    remote = set(ctx.rules.settings.remote_assessment_codes)
    keys = ctx.assessment.keys | ({ctx.follow_up.key} if ctx.follow_up else set())
    return [claim for claim in ctx.of_patient("Claim")
            if not claim_is_void(claim) and claim_lines_for(claim, ctx.assessment.encounter_key, keys, remote)]


def claim_lines_for(claim: Any, encounter_key: str | None, keys: set[str] | frozenset[str],
                    remote: set[str] | frozenset[str]) -> list[Any]:
    """The lines of a Claim with a G2250/G2010 code (``remote``) that are for one assessment: the line names its
    review encounter, or the claim's supportingInfo names one of its submissions or its follow-up (``keys``)."""
    supporting = {ref_of(i.valueReference) for i in claim.supportingInfo or () if i.valueReference is not None}
    found = []
    for item in claim.item or ():
        if not _codes(item.productOrService) & remote:
            continue
        encounters = {ref_of(e) for e in item.encounter or ()}
        if (encounter_key and encounter_key in encounters) or supporting & keys:
            found.append(item)
    return found


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    already = existing_charges(ctx) + claims_for_assessment(ctx)
    if ctx.own_charges == "ignore":  # the population audit (§8): as if the own charge were absent
        result = _other_services(ctx)
        if not already:
            return result
        return CriterionResult(result.id, result.status, result.detail, result.evidence,
                               {**result.facts, "own_charges": tuple(key_of(c) for c in already)})
    if already:
        charged = {code for c in already for code in _charged_codes(c)}
        codes = ", ".join(sorted(charged))
        evidence = tuple(key_of(c) for c in already)
        if ctx.code is not None and ctx.code not in charged:
            # §1: "warn when G2250 is proposed for an E/M-capable practitioner ('use G2010')" — and the reverse.
            return CriterionResult(ID, "not-met", f"A {codes} charge was entered, but this practitioner bills "
                                   f"{ctx.code}: replace it rather than add a second charge.", evidence,
                                   {"wrong_code": codes, "case": "wrong-code"})
        return CriterionResult(ID, "not-met", f"Already charged ({codes}) for this submission; do not bill it twice.",
                               evidence, {"case": "same-submission"})
    return _other_services(ctx)


def _other_services(ctx: AssessmentContext) -> CriterionResult:
    """The criterion once the assessment's own G2250/G2010 charges are set aside: e-visits, check-ins, care
    management and remote monitoring."""
    settings = ctx.rules.settings
    if ctx.receipt_time is None:
        return CriterionResult(ID, "unknown", "No receipt time: overlapping e-visits cannot be checked.",
                               facts={"case": "no-receipt"})
    e_visits, check_ins = set(settings.e_visit_codes), set(settings.check_in_codes)
    window = timedelta(days=7)
    categories = ctx.diagnosis_categories
    overlapping, uncoded, check_in = [], [], []
    for charge in ctx.of_patient("ChargeItem"):
        if charge.status in _VOID or ref_of(charge.subject) != ctx.patient_key:
            continue
        codes = _codes(charge.code)
        when = _when(charge, ctx)
        if codes & check_ins and _about_this_assessment(charge, ctx):
            check_in.append(key_of(charge))
            continue
        if not codes & e_visits or when is None or abs(elapsed(ctx.receipt_time, when)) > window:
            continue
        theirs = ctx.categories_of(charge)
        context = ctx.bag.get(ref_of(charge.context))
        if not theirs and context is not None and context.get_resource_type() == "Encounter":
            theirs = ctx.categories_of(context)
        if theirs and categories and not theirs & categories:
            continue
        (overlapping if theirs and categories else uncoded).append(key_of(charge))
    if check_in:
        return CriterionResult(ID, "not-met", "The follow-up was billed as a separate check-in; it is part of this "
                               "service.", tuple(check_in), {"case": "check-in"})
    if overlapping:
        return CriterionResult(ID, "not-met", "The same problem is already billed as an online e-visit within 7 "
                               "days.", tuple(overlapping), {"case": "e-visit"})
    if uncoded:
        return CriterionResult(ID, "unknown", "An e-visit within 7 days may cover the same problem; confirm it was "
                               "for another problem.", tuple(uncoded), {"case": "e-visit-uncoded"})
    managed = care_management_charges(ctx)
    if managed:
        kinds = " / ".join(sorted({kind for _, _, kind in managed}))
        codes = ", ".join(sorted({code for _, code, _ in managed}))
        months = " or ".join(sorted({f"{m:%B %Y}" for m in _service_months(ctx)}))
        return CriterionResult(
            ID, "unknown",
            f"Not billed yet, but {kinds} ({codes}) is billed for this patient in {months}: was this review's time "
            f"counted toward {kinds}? Time counted there cannot be billed again as {ctx.code or 'G2250/G2010'}.",
            tuple(dict.fromkeys(key for key, _, _ in managed)), {"case": "care-management"})
    return CriterionResult(ID, "met", "Not billed yet, and no overlapping e-visit, check-in, care management or "
                           "remote monitoring charge.")


def _service_months(ctx: AssessmentContext) -> list[datetime]:
    """The first day of the calendar month (practice time zone) of the receipt and, if different, the follow-up."""
    moments = [m for m in (ctx.receipt_time, ctx.follow_up.sent if ctx.follow_up else None) if m is not None]
    firsts = {m.astimezone(ctx.tz).replace(day=1, hour=0, minute=0, second=0, microsecond=0) for m in moments}
    return sorted(firsts, key=lambda m: (m.year, m.month))


def _month_of(moment: datetime | None, ctx: AssessmentContext) -> tuple[int, int] | None:
    if moment is None:
        return None
    local = moment.astimezone(ctx.tz)
    return local.year, local.month


def care_management_charges(ctx: AssessmentContext) -> list[tuple[str, str, str]]:
    """(reference, code, "care management" | "remote monitoring") of the patient's charges and claim lines in the
    month of the service (§7 "Care management / remote monitoring")."""
    settings = ctx.rules.settings
    kinds = {**{c: "remote monitoring" for c in settings.remote_monitoring_codes},
             **{c: "care management" for c in settings.care_management_codes}}
    if not kinds:
        return []
    months = {(m.year, m.month) for m in _service_months(ctx)}
    found: list[tuple[str, str, str]] = []
    for charge in ctx.of_patient("ChargeItem"):
        if charge.status in _VOID or ref_of(charge.subject) != ctx.patient_key:
            continue
        if _month_of(_when(charge, ctx), ctx) not in months:
            continue
        found += [(key_of(charge), code, kinds[code]) for code in sorted(_codes(charge.code)) if code in kinds]
    for claim in ctx.of_patient("Claim"):
        if claim_is_void(claim) or ref_of(claim.patient) != ctx.patient_key:
            continue
        for item in claim.item or ():
            when = (as_datetime(item.servicedDate, ctx.tz) or period_start(item.servicedPeriod, ctx.tz)
                    or period_start(claim.billablePeriod, ctx.tz) or as_datetime(claim.created, ctx.tz))
            if _month_of(when, ctx) not in months:
                continue
            found += [(key_of(claim), code, kinds[code]) for code in sorted(_codes(item.productOrService))
                      if code in kinds]
    return found
