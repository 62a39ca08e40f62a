"""The four CDS services, one per hook (contract.md "Discovery": exactly one entry per supported hook)."""

from __future__ import annotations

from typing import Any, ClassVar

from .base import HookRequest, HookService

_EPISODE_KEYS = (
    "consents", "coverages", "userRoles", "encounters", "communications", "media", "documents",
    "procedures", "appointments", "observations", "reports", "chargeItems",
)


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
        return [
            entry["resource"]
            for entry in request.context["appointments"].get("entry") or ()
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict)
        ]


SERVICES: tuple[HookService, ...] = (
    PatientViewService(),
    EncounterStartService(),
    EncounterDischargeService(),
    AppointmentBookService(),
)
SERVICES_BY_ID: dict[str, HookService] = {service.id: service for service in SERVICES}
