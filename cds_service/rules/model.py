"""What the rules produce: one result per criterion, and the overall determination (billing-rules.md §3).

Plain frozen dataclasses: no FHIR models, no I/O. ``to_extension`` renders the machine-readable card extension
``g2250-cds.determination`` of contract.md ("Cards").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

CriterionStatus = Literal["met", "not-met", "pending", "unknown"]
DeterminationStatus = Literal["billable", "not-billable", "pending", "needs-review"]

# The ten criterion ids of billing-rules.md §3, in the order the table lists them. Every determination lists all ten.
CRITERION_IDS: tuple[str, ...] = (
    "established-patient",
    "patient-submitted-media",
    "practitioner-interpretation",
    "follow-up-within-24-business-hours",
    "no-related-service-prior-7-days",
    "no-resulting-service",
    "consent-documented",
    "billing-practitioner-eligible",
    "payer-covers-code",
    "not-already-billed",
)

HCPCS_SYSTEM = "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
CPT_SYSTEM = "http://www.ama-assn.org/go/cpt"
ICD10CM_SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"
NUCC_SYSTEM = "http://nucc.org/provider-taxonomy"


@dataclass(frozen=True)
class CriterionResult:
    """One criterion's verdict with its evidence: resource references and a one-line human explanation."""

    id: str
    status: CriterionStatus
    detail: str
    evidence: tuple[str, ...] = ()
    # Extra machine-readable facts (e.g. due time, elapsed business hours); ISO strings and numbers only.
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.evidence:
            document["evidence"] = list(dict.fromkeys(self.evidence))
        if self.detail:
            document["detail"] = self.detail
        return document


def overall_status(results: list[CriterionResult]) -> DeterminationStatus:
    """§3: billable (all met); not-billable (any not-met); pending (the follow-up can still come before the
    deadline and nothing is not-met — this wins over unknowns, which stay visible on the card); else needs-review."""
    statuses = {r.status for r in results}
    if "not-met" in statuses:
        return "not-billable"
    if statuses <= {"met"}:
        return "billable"
    if "pending" in statuses:
        return "pending"
    return "needs-review"


@dataclass(frozen=True)
class Determination:
    """The answer for one remote assessment (one patient submission episode)."""

    status: DeterminationStatus
    criteria: tuple[CriterionResult, ...]
    code: str | None = None  # G2250 or G2010; None when no code applies (not eligible, or verify)
    modifiers: tuple[str, ...] = ()
    deadline: datetime | None = None
    receipt_time: datetime | None = None
    patient: str | None = None  # "Patient/id"
    encounter: str | None = None  # the assessment Encounter, "Encounter/id"
    practitioner: str | None = None  # the billing Practitioner, "Practitioner/id"
    submissions: tuple[str, ...] = ()  # the patient's media/communications
    follow_up: str | None = None
    follow_up_time: datetime | None = None
    existing_charges: tuple[str, ...] = ()  # G2250/G2010 ChargeItems already recorded for this submission
    payer_profile: str | None = None
    # The billing organization: the review encounter's serviceProvider, else the billing practitioner's role's
    # organization (the RHC/FQHC rule of §7 reads the same). Every door reports it: audit rows, the worklist.
    organization: str | None = None

    def criterion(self, criterion_id: str) -> CriterionResult:
        return next(c for c in self.criteria if c.id == criterion_id)

    def failing(self) -> list[CriterionResult]:
        return [c for c in self.criteria if c.status == "not-met"]

    def unknown(self) -> list[CriterionResult]:
        return [c for c in self.criteria if c.status == "unknown"]

    def to_extension(self) -> dict[str, Any]:
        document: dict[str, Any] = {"status": self.status}
        if self.code:
            document["code"] = self.code
        if self.modifiers:
            document["modifiers"] = list(self.modifiers)
        if self.deadline is not None:
            document["deadline"] = self.deadline.isoformat(timespec="seconds")
        document["criteria"] = [c.to_json() for c in self.criteria]
        return document
