"""The four CDS services, one per hook (contract.md "Discovery": exactly one entry per supported hook)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, ClassVar

from cds_service.rules.engine import determine, find_assessments
from cds_service.rules.episode import Assessment
from cds_service.rules.facts import key_of
from cds_service.rules.model import Determination

from .base import HookRequest, HookService, RulesEnvironment
from .cards import (
    code_phrase,
    criterion_line,
    detail_markdown,
    determination_card,
    fmt_time,
    label,
    make_card,
    stable_uuid,
    texts,
)
from .gather import EpisodeData

_EPISODE_KEYS = (
    "consents", "coverages", "userRoles", "encounters", "communications", "media", "documents",
    "procedures", "appointments", "observations", "reports", "impressions", "chargeItems", "claims",
)


def _truncated(data: EpisodeData) -> frozenset[str]:
    return frozenset(re.split(r"[:@#]", key)[0] for key in data.truncated)


# billing-rules.md §7 "one episode, one verdict": every hook finds the record's assessments the same way
# (find_assessments) and judges each with the same pure function (determine), which reads no hook context; a hook
# only chooses which assessments to show, and how. Only the chosen ones are judged: a verdict does not depend on
# the others, so this is the same answer as judging them all (cds_service.rules.engine.evaluate_record).


def _assessments(request: HookRequest, data: EpisodeData, env: RulesEnvironment) -> list[Assessment]:
    return find_assessments(data.bag, request.patient_id, env.calendar, env.rules)


def _determine(assessment: Assessment, request: HookRequest, data: EpisodeData, now: datetime,
               env: RulesEnvironment) -> Determination:
    return determine(assessment, bag=data.bag, patient_id=request.patient_id, now=now, calendar=env.calendar,
                     rules=env.rules, truncated=_truncated(data))


def _encounter_determination(request: HookRequest, data: EpisodeData, now: datetime,
                             env: RulesEnvironment) -> Determination | None:
    """The determination of the assessment whose review encounter is the context's; None when the encounter is
    missing or is not a remote assessment's (an office visit)."""
    if data.encounter is None:
        return None
    key = key_of(data.encounter)
    assessment = next((a for a in _assessments(request, data, env) if a.encounter_key == key), None)
    if assessment is None:
        return None
    return _determine(assessment, request, data, now, env)


class PatientViewService(HookService):
    id = "g2250-patient-view"
    hook = "patient-view"
    title = "Remote assessments awaiting a reply or a charge (G2250/G2010)"
    description = (
        "When a patient's chart opens: one card per store-and-forward submission of the last 30 days that is "
        "waiting for the practitioner's reply (with the 24-business-hour deadline), billable but not yet "
        "charged, or needing review."
    )
    prefetch_keys = ("encounter", *_EPISODE_KEYS)  # encounterId is optional here: EHRs omit what they cannot fill

    def cards(self, request: HookRequest, data: EpisodeData, now: datetime,
              env: RulesEnvironment) -> list[dict[str, Any]]:
        since = now - timedelta(days=env.rules.settings.patient_view_lookback_days)
        cards = []
        for assessment in _assessments(request, data, env):
            receipt = assessment.receipt_time
            if receipt is None or not since <= receipt <= now:
                continue
            determination = _determine(assessment, request, data, now, env)
            if determination.status in ("pending", "billable", "needs-review"):
                cards.append(determination_card(determination, "patient-view", now))
        return cards


class EncounterStartService(HookService):
    id = "g2250-encounter-start"
    hook = "encounter-start"
    title = "Remote assessment opened: reply deadline and early billing checks"
    description = (
        "When a remote-assessment (virtual) encounter starts: the follow-up deadline (24 business hours from "
        "receipt of the patient's images) and problems still fixable now: consent, practitioner type and code, "
        "a related visit in the prior 7 days."
    )
    prefetch_keys = ("encounter", *_EPISODE_KEYS)
    required_context: ClassVar[dict[str, str]] = {"patientId": "string", "encounterId": "string"}
    # The problems worth raising while the review is still open (issue: "early problems ... fixable now").
    EARLY = ("consent-documented", "billing-practitioner-eligible", "no-related-service-prior-7-days",
             "established-patient", "patient-submitted-media", "payer-covers-code", "not-already-billed")

    def cards(self, request: HookRequest, data: EpisodeData, now: datetime,
              env: RulesEnvironment) -> list[dict[str, Any]]:
        determination = _encounter_determination(request, data, now, env)
        if determination is None:
            return []
        early = [r for r in determination.criteria if r.id in self.EARLY and r.status in ("not-met", "unknown")]
        code = code_phrase(determination) if determination.code else None
        if determination.deadline is not None and determination.follow_up is None:
            head = f"Reply by {fmt_time(determination.deadline)} — 24 business hours"
        elif determination.follow_up_time is not None:
            head = f"Reply sent {fmt_time(determination.follow_up_time)}"
        else:
            head = "Remote assessment opened"
        if early:
            summary = f"{head}; fix first: {label(early[0].id).lower()}"
            if len(early) > 1:
                summary += f" (+{len(early) - 1} more)"
        else:
            summary = f"{head}" + (f"; bills as {code}" if code else "")
        leads = texts()["leads"]
        lead_lines = [f"**{head}.**"]
        if code:
            lead_lines.append(leads["encounter_start_code"].format(code=code))
        if early:
            lead_lines.append(leads["encounter_start_early"])
            lead_lines += [criterion_line(r, with_evidence=False) for r in early]
        # The billing note only while the review can still be billed (pending or billable), never beside a
        # "do not bill" verdict (billing-rules.md §7).
        detail = "\n".join(lead_lines) + "\n\n" + detail_markdown(
            determination, leads["encounter_start_all"],
            billing_note=determination.status in ("pending", "billable"))
        card = make_card("encounter-start", determination, summary, "info", detail)
        return [card]


class EncounterDischargeService(HookService):
    id = "g2250-encounter-discharge"
    hook = "encounter-discharge"
    title = "Remote assessment closed: may it be billed as G2250 or G2010?"
    description = (
        "When a remote-assessment encounter closes: the full determination for HCPCS G2250 (therapists, "
        "psychologists, social workers) or G2010 (E/M-capable practitioners), with each criterion's evidence "
        "and the ChargeItem to create when billable."
    )
    prefetch_keys = ("encounter", *_EPISODE_KEYS)
    required_context: ClassVar[dict[str, str]] = {"patientId": "string", "encounterId": "string"}

    def cards(self, request: HookRequest, data: EpisodeData, now: datetime,
              env: RulesEnvironment) -> list[dict[str, Any]]:
        determination = _encounter_determination(request, data, now, env)
        if determination is None:
            return []
        return [determination_card(determination, "encounter-discharge", now)]


class AppointmentBookService(HookService):
    id = "g2250-appointment-book"
    hook = "appointment-book"
    title = "Appointment would bundle an earlier remote assessment"
    description = (
        "When an appointment is booked: warns if it follows a store-and-forward remote assessment closely "
        "enough (within 24 hours of its follow-up, or at the soonest available slot) that the assessment may "
        "not be billed separately, and offers to remove an existing G2250/G2010 charge."
    )
    prefetch_keys = _EPISODE_KEYS
    required_context: ClassVar[dict[str, str]] = {"patientId": "string", "appointments": "Bundle"}

    def proposed_resources(self, request: HookRequest) -> list[dict[str, Any]]:
        """The proposed Appointments of ``context.appointments``; one without an id (not saved yet) gets a
        positional one, so a card's evidence can still name it."""
        found = []
        for position, entry in enumerate(request.context["appointments"].get("entry") or ()):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or resource.get("resourceType") != "Appointment":
                continue
            if not isinstance(resource.get("id"), str) or not resource["id"]:
                resource = {**resource, "id": f"proposed-{position + 1}"}
            found.append(resource)
        return found

    def cards(self, request: HookRequest, data: EpisodeData, now: datetime,
              env: RulesEnvironment) -> list[dict[str, Any]]:
        proposed = {f"Appointment/{r['id']}" for r in self.proposed_resources(request) if isinstance(r.get("id"), str)}
        if not proposed:
            return []
        cards = []
        for assessment in _assessments(request, data, env):
            if assessment.receipt_time is None or assessment.receipt_time > now:
                continue
            determination = _determine(assessment, request, data, now, env)
            resulting = determination.criterion("no-resulting-service")
            bundling = sorted(proposed.intersection(resulting.evidence))
            if resulting.status != "not-met" or not bundling:
                continue
            cards.append(self._bundling_card(determination, bundling, data, now))
        return cards

    def _bundling_card(self, determination: Determination, appointments: list[str], data: EpisodeData,
                       now: datetime) -> dict[str, Any]:
        """The bundling warning (contract.md "Cards", billing-rules.md §7 "appointment-book"): the appointment is
        only proposed and may still be cancelled, so deleting an existing charge is offered, never recommended,
        and no billing note is shown."""
        words = texts()
        received = f"{determination.receipt_time:%d %b}" if determination.receipt_time else "recently"
        code = code_phrase(determination)
        summary = words["summaries"]["appointment_book"].format(received=received)
        resulting = determination.criterion("no-resulting-service")
        lead = words["leads"]["appointment_book"].format(received=received, code=code, detail=resulting.detail)
        charges = list(determination.existing_charges)
        if charges:
            lead += " " + words["notes"]["appointment_book_pending"]
        card = make_card("appointment-book", determination, summary, "warning",
                         detail_markdown(determination, lead), key="|".join(appointments))
        if charges:
            card["suggestions"] = [{
                "label": words["suggestions"]["appointment_book_label"].format(code=code, received=received),
                "uuid": stable_uuid("suggestion", "appointment-book", *appointments, *charges),
                "isRecommended": False,
                "actions": [{"type": "delete", "description": words["suggestions"]["appointment_book_action"].format(
                    code=code, charge=charge), "resourceId": charge} for charge in charges],
            }]
            card["selectionBehavior"] = "at-most-one"
        card["overrideReasons"] = [
            {"system": "https://g2250-cds.example.org/fhir/CodeSystem/override-reason", "code": code_,
             "display": words["override_reasons"][code_]} for code_ in ("unrelated-visit", "other")
        ]
        return card


SERVICES: tuple[HookService, ...] = (
    PatientViewService(),
    EncounterStartService(),
    EncounterDischargeService(),
    AppointmentBookService(),
)
SERVICES_BY_ID: dict[str, HookService] = {service.id: service for service in SERVICES}
