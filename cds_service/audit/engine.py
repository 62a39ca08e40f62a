"""What every audit engine takes and gives back, so ``run`` can swap ``local`` for ``spark`` and tests can compare
them row for row.

An engine reads NDJSON files (plain or gzip), groups the resources of ``keys.AUDIT_TYPES`` by patient
(``keys.PATIENT_PATHS``), builds the shared record once per worker from ``keys.SHARED_TYPES``, and calls
``patient.audit_patient`` for every candidate patient (``keys.marks_candidate``) — and for nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Why a line was skipped; the same words in every engine (summary.json "skipped", report's data-quality section).
SKIP_NOT_JSON = "not-json"                # the line does not parse as JSON
SKIP_NOT_RESOURCE = "not-a-resource"      # JSON, but not an object with a string resourceType
SKIP_NO_PATIENT = "no-patient"            # a patient-scoped type whose patient reference cannot be read
SKIP_INVALID_PREFIX = "invalid-resource"  # "invalid-resource: <element path and error kind>" (never values)


@dataclass(frozen=True)
class SettingsSpec:
    """Picklable description of the audit's settings; each worker process builds ``patient.AuditSettings`` from
    it once (``AuditSettings.from_spec``)."""

    config_path: str | None          # the --config file, or None for the embedded defaults
    as_of: str                       # ISO 8601 instant with offset
    since: str | None = None         # ISO date / instant: assessments received at or after
    until: str | None = None         # ISO date / instant: assessments received before


@dataclass
class EngineResult:
    rows: list[dict[str, Any]]                                       # finding rows, sorted (patient, assessment_id)
    input: dict[str, Any] = field(default_factory=dict)
    # {"files": n, "bytes": n, "lines": n, "resources": n, "patients": n, "candidates": n,
    #  "by_type": {resourceType: n}}
    skipped: list[dict[str, Any]] = field(default_factory=list)      # {"file": basename, "reason": str, "count": n}
    timings: dict[str, float] = field(default_factory=dict)          # seconds per phase
