"""The determination engine: gathered resources + a clock → one :class:`Determination` per assessment.

Pure (no I/O, no Flask, ``now`` passed in). Every determination lists all ten criteria of billing-rules.md §3 in
their table order, and its overall status follows §3's rule (:func:`overall_status`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from cds_service.fhir.parse import ResourceBag

from .calendar import BusinessCalendar
from .context import AssessmentContext, practitioner_codes
from .criteria import ALL as CRITERIA
from .criteria.not_already_billed import existing_charges
from .episode import (
    Assessment,
    assessment_for_encounter,
    find_follow_ups,
    find_submissions,
    group_assessments,
    is_review_encounter,
    linked_follow_ups,
    practitioner_of,
)
from .facts import key_of, ref_of, ref_type
from .model import CRITERION_IDS, CriterionResult, Determination, overall_status
from .rules_data import RulesData

_PRIMARY_TYPES = ("PPRF", "ATND", "SPRF")  # v3 ParticipationType: primary performer, attender, secondary


def _billing_practitioner(assessment: Assessment, bag: ResourceBag, rules: RulesData,
                          fallback: str | None) -> str | None:
    """Who bills: among the review encounter's participants, the primary performer, else one whose provider type
    can bill a code, else the first; without an encounter, whom the patient wrote to, who answered, the user."""
    encounter = assessment.encounter
    if encounter is not None:
        ranked: list[tuple[int, int, int, str]] = []
        for position, participant in enumerate(encounter.participant or ()):
            practitioner = practitioner_of(ref_of(participant.individual), bag)
            if practitioner is None:
                continue
            types = {c.code for concept in participant.type or () for c in concept.coding or ()}
            primary = 0 if types & set(_PRIMARY_TYPES) else 1
            outcome = rules.taxonomy.classify(sorted(practitioner_codes(practitioner, bag))).rule.outcome
            can_bill = 0 if outcome in ("G2250", "G2010") else 1
            ranked.append((primary, can_bill, position, practitioner))
        if ranked:
            return min(ranked)[-1]
    for submission in assessment.submissions:
        for recipient in submission.recipients:
            practitioner = practitioner_of(recipient, bag)
            if practitioner is not None:
                return practitioner
    for follow_up in assessment.follow_ups:
        if follow_up.sender_practitioner is not None:
            return follow_up.sender_practitioner
    if ref_type(fallback) == "Practitioner":
        return fallback
    return None


def assessments_of(bag: ResourceBag, patient_id: str, calendar: BusinessCalendar,
                   rules: RulesData) -> list[Assessment]:
    submissions = find_submissions(bag, patient_id, calendar.tz)
    follow_ups = find_follow_ups(bag, patient_id, calendar.tz)
    window = timedelta(hours=rules.settings.submission_grouping_hours)
    return group_assessments(submissions, follow_ups, bag, window)


def assessment_of_encounter(bag: ResourceBag, patient_id: str, encounter: Any, calendar: BusinessCalendar,
                            rules: RulesData) -> Assessment | None:
    """The assessment whose review episode ``encounter`` is; None when it is not a remote assessment."""
    assessments = assessments_of(bag, patient_id, calendar, rules)
    window = timedelta(hours=rules.settings.submission_grouping_hours)
    linked = any(a.encounter_key == key_of(encounter) for a in assessments)
    if not linked and not is_review_encounter(encounter):
        return None  # an office visit or admission: not this service's business
    assessment = assessment_for_encounter(assessments, encounter, calendar.tz, window)
    assessment.follow_ups = linked_follow_ups(assessment, find_follow_ups(bag, patient_id, calendar.tz))
    return assessment


# Which gathered data each criterion relies on: a "met" drawn from a list the server cut short (page cap) could
# be wrong, so it becomes "unknown" instead — never a wrong "billable".
_DATA_OF_CRITERION = {
    "established-patient": ("encounters", "practitionerRoles"),
    "patient-submitted-media": ("communications", "media", "documents"),
    "practitioner-interpretation": ("communications", "observations", "reports", "impressions"),
    "follow-up-within-24-business-hours": ("communications",),
    "no-related-service-prior-7-days": ("encounters", "procedures", "conditions", "practitionerRoles"),
    "no-resulting-service": ("encounters", "procedures", "appointments", "slots", "schedules", "conditions"),
    "not-already-billed": ("chargeItems", "claims", "conditions"),
    "consent-documented": ("consents",),
    "billing-practitioner-eligible": ("practitionerRoles", "practitioners"),
    "payer-covers-code": ("coverages", "payers"),
}


def _incomplete(result: CriterionResult, truncated: frozenset[str]) -> CriterionResult:
    if result.status != "met" or not any(key in truncated for key in _DATA_OF_CRITERION.get(result.id, ())):
        return result
    return CriterionResult(result.id, "unknown", "Part of the record could not be read (too large, or the FHIR "
                           "server failed); check this point by hand. " + result.detail, result.evidence, result.facts)


def determine(assessment: Assessment, *, bag: ResourceBag, patient_id: str, now: datetime,
              calendar: BusinessCalendar, rules: RulesData, user: str | None = None,
              truncated: frozenset[str] = frozenset()) -> Determination:
    """Evaluate every criterion for one assessment (billing-rules.md §3–§6).

    ``truncated`` names the data keys (prefetch keys, e.g. "encounters") whose results were cut short.
    """
    practitioner = _billing_practitioner(assessment, bag, rules, user)
    ctx = AssessmentContext(bag=bag, patient_id=patient_id, assessment=assessment, practitioner=practitioner,
                            now=now, calendar=calendar, rules=rules)
    results = tuple(_incomplete(criterion.evaluate(ctx), truncated) for criterion in CRITERIA)
    assert tuple(r.id for r in results) == CRITERION_IDS
    code = ctx.code
    forbidden = set(rules.settings.forbidden_modifiers)
    modifiers = tuple(m for m in ctx.taxonomy.rule.modifiers if m not in forbidden) if code else ()
    follow_up = ctx.follow_up
    return Determination(
        status=overall_status(list(results)),
        criteria=results,
        code=code,
        modifiers=modifiers,
        deadline=ctx.deadline,
        receipt_time=ctx.receipt_time.astimezone(calendar.tz) if ctx.receipt_time else None,
        patient=ctx.patient_key,
        encounter=assessment.encounter_key,
        practitioner=practitioner,
        submissions=tuple(sorted(assessment.keys)),
        follow_up=follow_up.key if follow_up else None,
        follow_up_time=follow_up.sent.astimezone(calendar.tz) if follow_up else None,
        existing_charges=tuple(key_of(c) for c in existing_charges(ctx)),
        payer_profile=next((r.facts.get("profile") for r in results if r.id == "payer-covers-code"), None),
    )
