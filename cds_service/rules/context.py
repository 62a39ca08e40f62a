"""Everything one assessment's criteria read, computed once: who bills, when the clock started, the deadline.

Built by :func:`cds_service.rules.engine.determine`; each criterion module receives it and returns one
:class:`~cds_service.rules.model.CriterionResult`. No I/O, and the clock (``now``) is a field.

Time windows are elapsed time (billing-rules.md §7): every comparison and ``± timedelta`` here goes through the UTC
helpers of :mod:`.facts`; local times are kept for the words on the card.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from cds_service.memo import BoundedMemo, cached_property
from cds_service.record import ResourceBag

from .calendar import BusinessCalendar
from .episode import Assessment, FollowUp, practitioner_of
from .facts import (
    codes_in,
    conditions_categories,
    earliest,
    elapsed,
    icd_categories,
    is_void,
    key_of,
    not_after,
    ref_of,
    ref_type,
    shifted,
    utc,
)
from .model import NUCC_SYSTEM
from .rules_data import RulesData, TaxonomyMatch

MAX_COUNTED_SPAN = timedelta(days=400)
OwnCharges = Literal["count", "ignore"]


@dataclass
class AssessmentContext:
    bag: ResourceBag
    patient_id: str
    assessment: Assessment
    practitioner: str | None  # billing Practitioner key, "Practitioner/id"
    now: datetime
    calendar: BusinessCalendar
    rules: RulesData
    # "count" (every hook): the assessment's own G2250/G2010 charge makes ``not-already-billed`` not met.
    # "ignore" (the population audit, billing-rules.md §8): the assessment is judged as if its own charge were
    # absent; the charge itself decides the audit's class. Nothing else reads it.
    own_charges: OwnCharges = "count"
    notes: list[str] = field(default_factory=list)
    _memo: BoundedMemo[Any] = field(default_factory=BoundedMemo, repr=False)

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """A value several criteria derive from this context (e.g. the services around it), computed once."""
        return self._memo.get(key, compute)

    # -- people ------------------------------------------------------------------------------------------------
    @property
    def patient_key(self) -> str:
        return f"Patient/{self.patient_id}"

    @cached_property
    def tz(self) -> Any:
        return self.calendar.tz

    @cached_property
    def practitioner_roles(self) -> list[Any]:
        return roles_of(self.practitioner, self.bag)

    @cached_property
    def specialty_codes(self) -> set[str]:
        return practitioner_codes(self.practitioner, self.bag)

    @cached_property
    def organizations(self) -> set[str]:
        """The billing practitioner's organizations: their roles', and the review encounter's service provider."""
        found = {ref_of(r.organization) for r in self.practitioner_roles if r.organization is not None}
        encounter = self.assessment.encounter
        if encounter is not None and encounter.serviceProvider is not None:
            found.add(ref_of(encounter.serviceProvider))
        return {o for o in found if o}

    @cached_property
    def taxonomy(self) -> TaxonomyMatch:
        return self.rules.taxonomy.classify(sorted(self.specialty_codes))

    @property
    def code(self) -> str | None:
        """The code this practitioner would bill (billing-rules.md §6: whatever the status, omitted when none)."""
        rule = self.taxonomy.rule
        if rule.outcome in ("G2250", "G2010"):
            return rule.outcome
        # Not eligible, verify, or review: a therapy assistant cannot bill in their own name (§4) — no code is
        # this practitioner's to bill; the eligibility detail names what the supervising therapist would bill.
        return None

    def of_patient(self, resource_type: str) -> tuple[Any, ...]:
        """This patient's resources of a type: the bag may hold others' (a server ignoring a search parameter)."""
        patient = self.patient_key
        return self.bag.memo(("of_patient", resource_type, patient), lambda: tuple(
            r for r in self.bag.of_type(resource_type) if belongs_to(r, patient)))

    # -- time --------------------------------------------------------------------------------------------------
    @cached_property
    def receipt_time(self) -> datetime | None:
        # The assessment is complete when its context is made (group_assessments), and the criteria read its
        # receipt time about twenty times per determination: read once.
        return self.assessment.receipt_time

    @cached_property
    def deadline(self) -> datetime | None:
        if self.receipt_time is None:
            return None
        return self.calendar.follow_up_deadline(self.receipt_time, float(self.rules.settings.follow_up_business_hours))

    @cached_property
    def follow_up(self) -> FollowUp | None:
        """The qualifying follow-up: the first linked message the billing practitioner sent after receipt."""
        if self.receipt_time is None or self.practitioner is None:
            return None
        for candidate in self.assessment.follow_ups:
            if candidate.sender_practitioner == self.practitioner and not_after(self.receipt_time, candidate.sent):
                return candidate
        return None

    def business_hours(self, start: datetime, end: datetime) -> float | None:
        """Business hours between two instants, or None when they are implausibly far apart (a mistyped year):
        counting is day by day and must stay cheap whatever the record says."""
        if abs(elapsed(start, end)) > MAX_COUNTED_SPAN:
            return None
        return self.calendar.business_hours_between(start, end)

    @property
    def deadline_passed(self) -> bool:
        return self.deadline is not None and utc(self.now) > utc(self.deadline)

    @property
    def service_time(self) -> datetime:
        """When the service is complete: the follow-up; before it, the latest it can still be (for windows)."""
        if self.follow_up is not None:
            return self.follow_up.sent
        if self.deadline is not None:
            return earliest(self.now, self.deadline)
        return self.now

    # -- problems ----------------------------------------------------------------------------------------------
    @cached_property
    def diagnosis_categories(self) -> set[str]:
        """ICD-10-CM categories of the assessment: the review encounter's reason and diagnoses."""
        encounter = self.assessment.encounter
        if encounter is None:
            return set()
        found = icd_categories(encounter.reasonCode)
        references = [d.condition for d in encounter.diagnosis or () if d.condition is not None]
        references += list(encounter.reasonReference or ())
        return found | conditions_categories(references, self.bag)

    def categories_of(self, resource: Any) -> set[str]:
        """ICD-10-CM categories a service or appointment is coded with (reasonCode, diagnosis, reasonReference)."""
        found = icd_categories(getattr(resource, "reasonCode", None))
        references = list(getattr(resource, "reasonReference", None) or ())
        if resource.get_resource_type() == "Encounter":
            references += [d.condition for d in resource.diagnosis or () if d.condition is not None]
        if resource.get_resource_type() == "ChargeItem":
            found |= icd_categories(resource.reason)
        return found | conditions_categories(references, self.bag)

    # -- scope -------------------------------------------------------------------------------------------------
    def involves_practitioner(self, resource: Any) -> bool:
        return self.practitioner is not None and self.practitioner in people_of(resource, self.bag)

    def in_scope(self, resource: Any) -> bool:
        """Services of the billing practitioner, or — with scope "organization" — of a same-specialty colleague
        in the same organization (billing-rules.md §6 "Prior 7 days")."""
        if self.involves_practitioner(resource):
            return True
        if self.rules.settings.prior_service_scope != "organization":
            return False
        return any(self.is_same_specialty_colleague(p) for p in people_of(resource, self.bag))

    def is_same_specialty_colleague(self, practitioner: str) -> bool | None:
        """True/False, or None when the colleague's roles are not known."""
        roles = roles_of(practitioner, self.bag)
        if not roles:
            return None
        same_org = any(ref_of(r.organization) in self.organizations for r in roles if r.organization is not None)
        return same_org and bool(specialty_codes(roles) & self.specialty_codes)

    def window(self, start: datetime, hours: float) -> tuple[datetime, datetime]:
        """``hours`` of elapsed time from ``start`` (billing-rules.md §7), the end in ``start``'s zone."""
        return start, shifted(start, timedelta(hours=hours))

    # -- interpretation and therapy assistants (billing-rules.md §2.3, §2.9, §4, §7 "Therapy assistants") ----------
    @cached_property
    def interpretations(self) -> list[tuple[Any, set[str]]]:
        """Interpretations of this assessment (ClinicalImpression, Observation, DiagnosticReport linked to it) with
        the Practitioners who authored or performed them."""
        found: list[tuple[Any, set[str]]] = []
        for rtype in INTERPRETATION_TYPES:
            for resource in self.of_patient(rtype):
                if is_void(resource) or not self._links_to_assessment(resource):
                    continue
                authors = {practitioner_of(a, self.bag) for a in interpretation_authors(resource)}
                found.append((resource, {a for a in authors if a}))
        return found

    def _links_to_assessment(self, resource: Any) -> bool:
        keys = self.assessment.keys
        encounter = ref_of(getattr(resource, "encounter", None))
        if encounter is not None and encounter == self.assessment.encounter_key:
            return True
        linked: list[Any] = []
        for name in ("derivedFrom", "basedOn", "partOf", "media", "supportingInfo", "investigation"):
            value = getattr(resource, name, None)
            if value is None:
                continue
            for item in value if isinstance(value, list) else [value]:
                linked.append(getattr(item, "link", item))
                linked.extend(getattr(item, "item", None) or ())
        return any(ref_of(item) in keys for item in linked)

    def taxonomy_of(self, practitioner: str | None) -> TaxonomyMatch:
        return self.rules.taxonomy.classify(sorted(practitioner_codes(practitioner, self.bag)))

    def is_assistant(self, practitioner: str | None) -> bool:
        """A physical/occupational therapy assistant (taxonomy rule with an assistant modifier, §4)."""
        return practitioner is not None and self.taxonomy_of(practitioner).rule.is_assistant

    @property
    def practitioner_is_assistant(self) -> bool:
        """The billing practitioner chosen is a PTA/OTA: they may not bill in their own name (§4, §7)."""
        return self.practitioner is not None and self.taxonomy.rule.is_assistant

    @cached_property
    def review_people(self) -> dict[str, list[str]]:
        """Practitioners recorded in the review, each with the resources that show it: participants of the review
        encounter, authors/performers of an interpretation, senders of a follow-up or another reply (§7)."""
        found: dict[str, list[str]] = {}
        encounter = self.assessment.encounter
        if encounter is not None:
            for participant in encounter.participant or ():
                who = practitioner_of(ref_of(participant.individual), self.bag)
                if who:
                    found.setdefault(who, []).append(key_of(encounter))
        for resource, authors in self.interpretations:
            for who in authors:
                found.setdefault(who, []).append(key_of(resource))
        for reply in self.assessment.follow_ups:
            if reply.sender_practitioner:
                found.setdefault(reply.sender_practitioner, []).append(reply.key)
        return found

    @cached_property
    def assistants(self) -> dict[str, TaxonomyMatch]:
        """Therapy assistants recorded in the review other than the billing practitioner (§7 "Therapy assistants")."""
        return {who: self.taxonomy_of(who) for who in self.review_people
                if who != self.practitioner and self.is_assistant(who)}

    @property
    def supervises_assistant(self) -> bool:
        """A therapist (G2250 with a discipline modifier, e.g. PT +GP, OT +GO) bills a review an assistant took part
        in: the claim carries CQ/CO and needs review (the 10 % de-minimis test is not in the record, §7)."""
        rule = self.taxonomy.rule
        return rule.outcome == "G2250" and bool(rule.modifiers) and bool(self.assistants)

    @property
    def assistant_modifiers(self) -> tuple[str, ...]:
        """CQ (PTA) / CO (OTA) for the assistants in the review, when a therapist bills it (§2.9, §7)."""
        if not self.supervises_assistant:
            return ()
        found = {m.rule.assistant_modifier for m in self.assistants.values() if m.rule.assistant_modifier}
        return tuple(sorted(found))

    # -- RHC/FQHC (billing-rules.md §2.12, §7 "RHC/FQHC") -----------------------------------------------------------
    @cached_property
    def billing_organizations(self) -> list[str]:
        """The billing organization: the review encounter's serviceProvider, else the billing practitioner's
        PractitionerRole organizations."""
        encounter = self.assessment.encounter
        if encounter is not None and ref_of(encounter.serviceProvider):
            return [ref_of(encounter.serviceProvider)]  # type: ignore[list-item]
        found = [ref_of(r.organization) for r in self.practitioner_roles if r.organization is not None]
        return list(dict.fromkeys(o for o in found if o))

    @cached_property
    def rhc_fqhc(self) -> tuple[str, str] | None:
        """(organization, why) when the billing organization is a rural health clinic or FQHC: typed so (NUCC
        261QR1300X / 261QF0400X on Organization.type) or listed in the rules settings; None otherwise (also when
        the Organization resource is not in the record and the settings do not name it)."""
        settings = self.rules.settings
        listed = set(settings.rhc_fqhc_organizations)
        codes = set(settings.rhc_fqhc_taxonomy_codes)
        for organization in self.billing_organizations:
            if organization in listed:
                return organization, "listed as RHC/FQHC in the rules settings"
            resource = self.bag.get(organization)
            if resource is None or resource.get_resource_type() != "Organization":
                continue
            typed = sorted(codes.intersection(codes_in(resource.type, NUCC_SYSTEM)))
            if typed:
                label = _RHC_FQHC_LABELS.get(typed[0], "rural health clinic or federally qualified health center")
                return organization, f"typed as a {label} (NUCC {typed[0]})"
            for identifier in resource.identifier or ():
                if identifier.value and f"{identifier.system or ''}|{identifier.value}" in listed:
                    return organization, "listed as RHC/FQHC in the rules settings"
        return None


INTERPRETATION_TYPES = ("ClinicalImpression", "Observation", "DiagnosticReport")
_RHC_FQHC_LABELS = {"261QR1300X": "rural health clinic", "261QF0400X": "federally qualified health center"}


def interpretation_authors(resource: Any) -> list[str | None]:
    """Who authored or performed an interpretation (ClinicalImpression.assessor, performer, resultsInterpreter)."""
    rtype = resource.get_resource_type()
    if rtype == "ClinicalImpression":
        return [ref_of(resource.assessor)]
    if rtype == "Observation":
        return [ref_of(p) for p in resource.performer or ()]
    return [ref_of(p) for p in resource.performer or ()] + [ref_of(p) for p in resource.resultsInterpreter or ()]


_PATIENT_ELEMENT = {
    "Encounter": "subject", "Procedure": "subject", "Observation": "subject", "DiagnosticReport": "subject",
    "ClinicalImpression": "subject", "ChargeItem": "subject", "Consent": "patient", "Coverage": "beneficiary",
    "Communication": "subject", "Media": "subject", "DocumentReference": "subject", "Claim": "patient",
}


def belongs_to(resource: Any, patient_key: str) -> bool:
    rtype = resource.get_resource_type()
    if rtype == "Appointment":
        return any(ref_of(p.actor) == patient_key for p in resource.participant or () if p.actor is not None)
    element = _PATIENT_ELEMENT.get(rtype)
    if element is None:
        return True
    return ref_of(getattr(resource, element, None)) == patient_key


def roles_of(practitioner: str | None, bag: ResourceBag) -> list[Any]:
    """A practitioner's active roles in the bag."""
    if practitioner is None:
        return []
    return list(bag.memo("active_roles_by_practitioner", lambda: _active_roles(bag), types=("PractitionerRole",))
                .get(practitioner, ()))


def _active_roles(bag: ResourceBag) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for role in bag.of_type("PractitionerRole"):
        if role.active is not False:
            key = ref_of(role.practitioner)
            if key:
                found.setdefault(key, []).append(role)
    return found


def specialty_codes(roles: list[Any]) -> set[str]:
    found: set[str] = set()
    for role in roles:
        found.update(codes_in(role.code, NUCC_SYSTEM))
        found.update(codes_in(role.specialty, NUCC_SYSTEM))
    return found


def practitioner_codes(practitioner: str | None, bag: ResourceBag) -> set[str]:
    """NUCC taxonomy codes of a practitioner: their roles' code/specialty and Practitioner.qualification
    (fhir-profile.md "Practitioner type")."""
    return set(bag.memo(("practitioner_codes", practitioner),
                        lambda: frozenset(_practitioner_codes(practitioner, bag)),
                        types=("PractitionerRole", ref_type(practitioner) or "Practitioner")))


def _practitioner_codes(practitioner: str | None, bag: ResourceBag) -> set[str]:
    codes = specialty_codes(roles_of(practitioner, bag))
    resource = bag.get(practitioner) if practitioner else None
    if resource is not None and resource.get_resource_type() == "Practitioner":
        for qualification in resource.qualification or ():
            codes.update(codes_in(qualification.code, NUCC_SYSTEM))
    return codes


def people_of(resource: Any, bag: ResourceBag) -> set[str]:
    """Practitioners taking part in an Encounter, Procedure, Appointment or ChargeItem (roles resolved)."""
    references: list[str | None] = []
    rtype = resource.get_resource_type()
    if rtype == "Encounter":
        references = [ref_of(p.individual) for p in resource.participant or () if p.individual is not None]
    elif rtype == "Procedure":
        # Participant or performer (§6 "Prior 7 days"); whoever merely recorded it did not take part.
        references = [ref_of(p.actor) for p in resource.performer or () if p.actor is not None]
    elif rtype == "Appointment":
        references = [ref_of(p.actor) for p in resource.participant or () if p.actor is not None]
    elif rtype == "ChargeItem":
        references = [ref_of(p.actor) for p in resource.performer or () if p.actor is not None]
    found: set[str] = set()
    for reference in references:
        if ref_type(reference) in ("Practitioner", "PractitionerRole"):
            practitioner = practitioner_of(reference, bag)
            if practitioner:
                found.add(practitioner)
    return found


__all__ = ["AssessmentContext", "key_of", "people_of", "roles_of", "specialty_codes"]
