"""The shared template of every hook service: check the context → gather data → evaluate → build cards.

One subclass per hook (Da Vinci CRD's pattern): the web layer never knows billing rules, the rules never know the
web. Discovery metadata is plain data on each class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

from cds_service.fhir.source import DataSource
from cds_service.rules.calendar import BusinessCalendar
from cds_service.rules.model import Determination
from cds_service.rules.rules_data import RulesData

from .cards import DETERMINATION_KEY
from .gather import GLOBAL_PERIOD_LOOKBACK, EpisodeData, gather_episode, prefetch_for

_REFERENCE_TYPES = ("Practitioner", "PractitionerRole", "Patient", "RelatedPerson")


@dataclass(frozen=True)
class HookRequest:
    """The parts of a CDS Hooks request a service reads (cds-hooks.md "Request"); unknown elements ignored."""

    hook: str
    hook_instance: str
    context: dict[str, Any]
    fhir_server: str | None = None
    fhir_authorization: dict[str, Any] | None = None
    prefetch: dict[str, Any] | None = None
    extension: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> HookRequest:
        return cls(
            hook=body["hook"],
            hook_instance=body["hookInstance"],
            context=body.get("context") or {},
            fhir_server=body.get("fhirServer"),
            fhir_authorization=body.get("fhirAuthorization"),
            prefetch=body.get("prefetch"),
            extension=body.get("extension"),
        )

    @property
    def access_token(self) -> str | None:
        auth = self.fhir_authorization or {}
        token = auth.get("access_token")
        return token if isinstance(token, str) and token else None

    @property
    def patient_id(self) -> str:
        return str(self.context["patientId"])

    @property
    def encounter_id(self) -> str | None:
        value = self.context.get("encounterId")
        return value if isinstance(value, str) and value else None

    def user_id_of(self, resource_type: str) -> str | None:
        """``userId`` is ``Type/id`` (Hook Library); the id when it names ``resource_type``."""
        value = self.context.get("userId")
        if isinstance(value, str) and value.startswith(f"{resource_type}/"):
            rest = value.split("/", 1)[1]
            return rest or None
        return None


@dataclass(frozen=True)
class RulesEnvironment:
    """What the rules need besides the data: the practice calendar and the rules data (with config overrides)."""

    calendar: BusinessCalendar
    rules: RulesData


@dataclass
class HookOutcome:
    response: dict[str, Any]
    data: EpisodeData | None = None
    # (card uuid, Determination) of every card that carries one: what the determination log records.
    determinations: list[tuple[str, Determination]] = field(default_factory=list)


class HookService(ABC):
    """One CDS service, registered for exactly one hook (contract.md "Discovery")."""

    id: ClassVar[str]
    hook: ClassVar[str]
    title: ClassVar[str]
    description: ClassVar[str]
    usage_requirements: ClassVar[str] = (
        "Read access (user or system scope) to the patient's Encounter, Communication, Media, DocumentReference, "
        "Observation, DiagnosticReport, Procedure, Appointment, Schedule, Slot, Consent, Coverage, Organization, "
        "PractitionerRole and ChargeItem. Register the EHR's JWT issuer and FHIR server with the service."
    )
    prefetch_keys: ClassVar[tuple[str, ...]]
    required_context: ClassVar[dict[str, str]] = {"patientId": "string"}

    def discovery_entry(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "prefetch": prefetch_for(self.prefetch_keys),
            "usageRequirements": self.usage_requirements,
        }

    def context_problems(self, context: dict[str, Any]) -> list[tuple[str, str]]:
        """Missing or mistyped context fields, as ``(element path, problem)``; values never echoed."""
        found: list[tuple[str, str]] = []
        for name, kind in self.required_context.items():
            value = context.get(name)
            if value is None:
                found.append((f"context.{name}", "is required for this hook"))
            elif kind == "string" and (not isinstance(value, str) or not value.strip()):
                found.append((f"context.{name}", "must be a non-empty string"))
            elif kind == "Bundle" and not (isinstance(value, dict) and value.get("resourceType") == "Bundle"):
                found.append((f"context.{name}", "must be a FHIR Bundle"))
            elif kind == "Bundle" and not isinstance(value.get("entry", []), list):
                # FHIR R4 json.html: a repeating element is always an array.
                found.append((f"context.{name}.entry", "must be an array"))
        user = context.get("userId")
        if user is not None and (not isinstance(user, str) or "/" not in user):
            found.append(("context.userId", "must be a reference such as Practitioner/123"))
        for name in ("patientId", "encounterId"):
            value = context.get(name)
            if isinstance(value, str) and ("/" in value or not value.strip()):
                found.append((f"context.{name}", "must be a FHIR logical id (no resource type or slash)"))
        return found

    def proposed_resources(self, request: HookRequest) -> list[dict[str, Any]]:
        """Resources the context carries that are not on the FHIR server yet (appointment-book)."""
        return []

    def gather(self, request: HookRequest, source: DataSource, now: datetime,
               env: RulesEnvironment | None = None) -> EpisodeData:
        organization_scope = env is not None and env.rules.settings.prior_service_scope == "organization"
        procedures_lookback = GLOBAL_PERIOD_LOOKBACK
        if env is not None:
            # Procedures are read as far back as a post-operative global period can reach (billing-rules.md §7).
            settings = env.rules.settings
            days = max(settings.global_period_lookback_days, *settings.global_days_by_cpt.values(), 0)
            procedures_lookback = max(procedures_lookback, timedelta(days=days))
        return gather_episode(
            source,
            patient_id=request.patient_id,
            now=now,
            encounter_id=request.encounter_id,
            user_practitioner_id=request.user_id_of("Practitioner"),
            proposed=self.proposed_resources(request),
            organization_scope=organization_scope,
            procedures_lookback=procedures_lookback,
        )

    def handle(self, request: HookRequest, source: DataSource, now: datetime,
               env: RulesEnvironment) -> HookOutcome:
        data = self.gather(request, source, now, env)
        cards = self.cards(request, data, now, env)
        determinations = [(card["uuid"], card.pop(DETERMINATION_KEY)) for card in cards if DETERMINATION_KEY in card]
        return HookOutcome({"cards": cards}, data, determinations)

    @abstractmethod
    def cards(self, request: HookRequest, data: EpisodeData, now: datetime,
              env: RulesEnvironment) -> list[dict[str, Any]]:
        """Cards for this hook, from the determinations of the rules layer."""
