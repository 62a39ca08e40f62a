"""The determination engine: gathered resources + a clock → one :class:`Determination` per assessment.

Pure (no I/O, no Flask, ``now`` passed in). Every determination lists all ten criteria of billing-rules.md §3 in
their table order, and its overall status follows §3's rule (:func:`overall_status`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cds_service.record import ResourceBag

from .calendar import BusinessCalendar
from .context import AssessmentContext, OwnCharges, practitioner_codes, roles_of
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
from .facts import is_void, key_of, period_start, ref_of, utc
from .model import CRITERION_IDS, CriterionResult, Determination, overall_status
from .rules_data import RulesData

_LAST = datetime.max.replace(tzinfo=UTC)  # sorts after every real instant
_PRIMARY_TYPES = ("PPRF", "ATND", "SPRF")  # v3 ParticipationType: primary performer, attender, secondary


def _billing_practitioner(assessment: Assessment, bag: ResourceBag, rules: RulesData) -> str | None:
    """Who bills, read from the record alone (billing-rules.md §7: never from the hook's user): among the review
    encounter's participants, the primary performer, else one whose provider type can bill a code, else the first;
    without an encounter, whom the patient wrote to, else who answered."""
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
    return None


def find_assessments(bag: ResourceBag, patient_id: str, calendar: BusinessCalendar,
                     rules: RulesData) -> list[Assessment]:
    """Every remote assessment in the patient's record, found from the record's own links (fhir-profile.md "The
    episode"), whatever hook asks (billing-rules.md §7 "one episode, one verdict").

    Submissions are grouped by their review encounter (directly or through a follow-up that answers them) or by
    time; then each review encounter (class VR) that no submission names adopts the unlinked assessment received
    shortly before or while it was open — in the order the encounters started, so the pairing does not depend
    on which encounter a hook names; a review encounter with no submission at all is an assessment of its own
    (its verdict says no media came from the patient). Oldest first.
    """
    window = timedelta(hours=rules.settings.submission_grouping_hours)
    follow_ups = find_follow_ups(bag, patient_id, calendar.tz)
    assessments = group_assessments(find_submissions(bag, patient_id, calendar.tz), follow_ups, bag, window)
    taken = {a.encounter_key for a in assessments if a.encounter_key}
    patient_key = f"Patient/{patient_id}"
    reviews = [e for e in bag.of_type("Encounter")
               if is_review_encounter(e) and not is_void(e) and key_of(e) not in taken
               and ref_of(e.subject) in (None, patient_key)]
    reviews.sort(key=lambda e: (period_start(e.period, calendar.tz) is None,
                                utc(period_start(e.period, calendar.tz) or _LAST), e.id or ""))
    for encounter in reviews:
        assessment = assessment_for_encounter(assessments, encounter, calendar.tz, window)
        if not any(a is assessment for a in assessments):
            assessments.append(assessment)
        assessment.follow_ups = linked_follow_ups(assessment, follow_ups)
    return sorted(assessments, key=_assessment_order)


def _assessment_order(assessment: Assessment) -> tuple[bool, datetime, str]:
    receipt = assessment.receipt_time
    return (receipt is None, utc(receipt or _LAST), assessment.encounter_key or min(assessment.keys, default=""))


@dataclass(frozen=True)
class AssessedEpisode:
    """One assessment of the record with its verdict: what every door (hook, audit, worklist) chooses from."""

    assessment: Assessment
    determination: Determination


def evaluate_record(bag: ResourceBag, patient_id: str, *, now: datetime, calendar: BusinessCalendar,
                    rules: RulesData, truncated: frozenset[str] = frozenset(),
                    own_charges: OwnCharges = "count") -> list[AssessedEpisode]:
    """The one entry of the rules (billing-rules.md §7): a patient's resources, the clock and the rules data in,
    every assessment with its determination out. Pure; no hook context is read, so the same record gives the
    same verdicts through every hook, with or without an encounter in the context, and in a population audit.

    ``truncated`` names the data keys (e.g. "encounters") whose results were cut short: "met" drawn from them
    becomes "unknown".

    ``own_charges="ignore"`` is the population audit's reading (billing-rules.md §8): each assessment is judged as
    if its own G2250/G2010 charge or claim line were absent, so ``not-already-billed`` speaks only of overlapping
    e-visits, check-ins and care management, and the charge itself decides the audit's class (its references are
    in that criterion's ``facts["own_charges"]``). Every hook uses the default, "count".
    """
    return [AssessedEpisode(a, determine(a, bag=bag, patient_id=patient_id, now=now, calendar=calendar,
                                         rules=rules, truncated=truncated, own_charges=own_charges))
            for a in find_assessments(bag, patient_id, calendar, rules)]


def assessment_of_encounter(bag: ResourceBag, patient_id: str, encounter: Any, calendar: BusinessCalendar,
                            rules: RulesData) -> Assessment | None:
    """The assessment whose review episode ``encounter`` is; None when it is not a remote assessment."""
    key = key_of(encounter)
    return next((a for a in find_assessments(bag, patient_id, calendar, rules) if a.encounter_key == key), None)


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
    # Who took part in the review (an assistant → CQ/CO, §7) and the billing organization (RHC/FQHC, §7).
    "billing-practitioner-eligible": ("practitionerRoles", "practitioners", "encounters", "communications",
                                      "observations", "reports", "impressions"),
    "payer-covers-code": ("coverages", "payers"),
}


def _incomplete(result: CriterionResult, truncated: frozenset[str]) -> CriterionResult:
    if result.status != "met" or not any(key in truncated for key in _DATA_OF_CRITERION.get(result.id, ())):
        return result
    return CriterionResult(result.id, "unknown", "Part of the record could not be read (too large, or the FHIR "
                           "server failed); check this point by hand. " + result.detail, result.evidence, result.facts)


def determine(assessment: Assessment, *, bag: ResourceBag, patient_id: str, now: datetime,
              calendar: BusinessCalendar, rules: RulesData,
              truncated: frozenset[str] = frozenset(), own_charges: OwnCharges = "count") -> Determination:
    """Evaluate every criterion for one assessment (billing-rules.md §3–§7).

    ``truncated`` names the data keys (prefetch keys, e.g. "encounters") whose results were cut short.
    ``own_charges``: see :func:`evaluate_record` ("ignore" only for the population audit, §8).
    """
    practitioner = _billing_practitioner(assessment, bag, rules)
    ctx = AssessmentContext(bag=bag, patient_id=patient_id, assessment=assessment, practitioner=practitioner,
                            now=now, calendar=calendar, rules=rules, own_charges=own_charges)
    checked: list[CriterionResult] = []
    for criterion in CRITERIA:
        result = criterion.evaluate(ctx)
        incomplete = _incomplete(result, truncated)
        if incomplete is not result:  # §7 "Honest wording": every non-met result names its case
            incomplete = CriterionResult(incomplete.id, incomplete.status, incomplete.detail, incomplete.evidence,
                                         {**incomplete.facts, "case": "incomplete-record"})
        checked.append(incomplete)
    results = tuple(checked)
    assert tuple(r.id for r in results) == CRITERION_IDS
    code = ctx.code
    forbidden = set(rules.settings.forbidden_modifiers)
    # §2.9: the discipline modifier (GP/GO/GN) of the taxonomy rule; §7 "Therapy assistants": CQ (PTA) / CO (OTA)
    # after it when a therapist bills a review an assistant took part in — never removed by forbidden_modifiers.
    modifiers = tuple(m for m in ctx.taxonomy.rule.modifiers if m not in forbidden) if code else ()
    if code:
        modifiers += tuple(m for m in ctx.assistant_modifiers if m not in modifiers)
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
        organization=billing_organization(assessment, practitioner, bag),
    )


def billing_organization(assessment: Assessment, practitioner: str | None, bag: ResourceBag) -> str | None:
    """The organization that bills the review: the review encounter's ``serviceProvider``, else the organization
    of the billing practitioner's first role that names one."""
    encounter = assessment.encounter
    if encounter is not None and ref_of(encounter.serviceProvider):
        return ref_of(encounter.serviceProvider)
    for role in roles_of(practitioner, bag):
        if role.organization is not None and ref_of(role.organization):
            return ref_of(role.organization)
    return None
