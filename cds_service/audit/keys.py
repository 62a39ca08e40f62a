"""Which resources the population audit reads and whose patient each one is.

One table of data, read by every engine: Python (``patient_of``), DuckDB's SQL and Spark's column expressions are
all generated from ``PATIENT_PATHS`` so the engines group the same resources under the same patient.

A resource either belongs to one patient (``PATIENT_PATHS``) or is shared by all (``SHARED_TYPES``: practitioners,
their roles and organizations, schedules and slots — the rules resolve them by reference). Other resource types
are not read by the rules and are counted, not parsed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# resourceType → JSON paths (from the resource root) of references that name the resource's patient. A path
# segment "[*]" walks an array; the first reference of the form "Patient/{id}" (relative or absolute) wins.
PATIENT_PATHS: Mapping[str, tuple[str, ...]] = {
    "Patient": (),  # the patient itself: its own id
    "Encounter": ("subject.reference",),
    "Communication": ("subject.reference",),
    "Media": ("subject.reference",),
    "DocumentReference": ("subject.reference",),
    "Observation": ("subject.reference",),
    "DiagnosticReport": ("subject.reference",),
    "ClinicalImpression": ("subject.reference",),
    "Procedure": ("subject.reference",),
    "Condition": ("subject.reference",),
    "ChargeItem": ("subject.reference",),
    "Claim": ("patient.reference",),
    "Consent": ("patient.reference",),
    "Coverage": ("beneficiary.reference",),
    "Appointment": ("participant[*].actor.reference",),
}

# Read by reference from every patient's record; small beside the population (they grow with the organization).
SHARED_TYPES: frozenset[str] = frozenset({
    "Practitioner", "PractitionerRole", "Organization", "Location", "HealthcareService", "Schedule", "Slot",
})

AUDIT_TYPES: frozenset[str] = frozenset(PATIENT_PATHS) | SHARED_TYPES

# Types whose presence can make a patient's record hold an assessment or a G2250/G2010 charge. A patient with
# none of them has no finding and is not parsed at all (most of a population).
SUBMISSION_TYPES: frozenset[str] = frozenset({"Communication", "Media", "DocumentReference"})
CHARGE_TYPES: frozenset[str] = frozenset({"ChargeItem", "Claim"})
REVIEW_CLASS_CODE = "VR"  # Encounter.class code of a virtual review (fhir-profile.md "The episode")


def patient_id_of_reference(reference: Any) -> str | None:
    """``"Patient/123"``, ``"https://x/fhir/Patient/123"`` or ``".../Patient/123/_history/2"`` → ``"123"``."""
    if not isinstance(reference, str):
        return None
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


def _walk(value: Any, segments: list[str]) -> list[Any]:
    if not segments:
        return [value]
    head, rest = segments[0], segments[1:]
    if not isinstance(value, dict):
        return []
    many = head.endswith("[*]")
    child = value.get(head[:-3] if many else head)
    if many:
        return [v for item in child if isinstance(child, list) for v in _walk(item, rest)] if isinstance(
            child, list) else []
    return _walk(child, rest)


def patient_of(resource: Mapping[str, Any]) -> str | None:
    """The id of the patient a raw resource belongs to; None for shared, unread or patient-less resources."""
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and rid else None
    for path in PATIENT_PATHS.get(rtype, ()):  # type: ignore[arg-type]
        for reference in _walk(resource, path.split(".")):
            found = patient_id_of_reference(reference)
            if found:
                return found
    return None


def marks_candidate(resource: Mapping[str, Any], remote_codes: tuple[str, ...] = ("G2250", "G2010")) -> bool:
    """Whether this resource can make its patient's record hold an assessment or a G2250/G2010 charge: a
    submission type, a review (class VR) encounter, or a charge / claim naming a remote assessment code. A
    superset is harmless (a false candidate is evaluated and yields no finding); the SQL and Spark forms may test
    the raw text the same way (``'"VR"'`` / the code in the line) and must never select fewer patients."""
    rtype = resource.get("resourceType")
    if rtype in SUBMISSION_TYPES:
        return True
    if rtype == "Encounter":
        klass = resource.get("class")
        return isinstance(klass, dict) and klass.get("code") == REVIEW_CLASS_CODE
    if rtype in CHARGE_TYPES:
        text = repr(resource)
        return any(code in text for code in remote_codes)
    return False
