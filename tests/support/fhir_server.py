"""The real FHIR R4 server of the integration tests.

``FHIR_BASE_URL`` (and ``FHIR_TOKEN``) point the suite at any server (HAPI, a public sandbox). Otherwise SEKMET is
started by :func:`fhir_fixtures.sekmet.start_sekmet` (its one home, shared with ``bench/`` and the example builder;
re-exported here for the tests).
"""

from __future__ import annotations

import os

from fhir_fixtures.sekmet import DEFAULT_SEKMET_BINS, FhirServer, free_port, sekmet_binary, start_sekmet

__all__ = ["DEFAULT_SEKMET_BINS", "FhirServer", "external_server", "free_port", "sekmet_binary", "start_sekmet"]


def external_server() -> FhirServer | None:
    base = os.environ.get("FHIR_BASE_URL")
    if not base:
        return None
    return FhirServer(base.rstrip("/"), os.environ.get("FHIR_TOKEN") or None)
