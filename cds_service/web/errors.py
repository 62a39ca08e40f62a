"""Error responses as FHIR OperationOutcomes (cds-hooks.md "Endpoints": the 3.0 direction and the CRD convention).

Client mistakes are 4xx with an OperationOutcome naming the bad element; a 5xx means a bug in this service.
Diagnostics never carry request values (they may be PHI): only element paths and what was expected.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response

# HTTP status → OperationOutcome.issue.code (http://hl7.org/fhir/issue-type)
_ISSUE_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    412: "incomplete",
    413: "too-costly",
    414: "too-long",
    415: "not-supported",
    417: "not-supported",
    431: "too-long",
    500: "exception",
    501: "not-supported",
    503: "transient",
}


class ApiError(Exception):
    """An HTTP error answered with an OperationOutcome."""

    def __init__(self, status: int, diagnostics: str, expression: list[str] | None = None,
                 code: str | None = None, body: bool = True, headers: dict[str, str] | None = None) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.expression = expression or []
        self.code = code or _ISSUE_CODES.get(status, "processing")
        self.body = body  # 401 answers carry no detail (cds-hooks.md "Trusting CDS clients")
        self.headers = dict(headers or {})  # e.g. Retry-After on a 503


def operation_outcome(status: int, diagnostics: str, expression: list[str] | None = None,
                      code: str | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {
        "severity": "error" if status >= 400 else "information",
        "code": code or _ISSUE_CODES.get(status, "processing"),
    }
    if diagnostics:
        issue["diagnostics"] = diagnostics
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def error_response(error: ApiError) -> Response:
    if not error.body:
        response = Response(status=error.status)
        if error.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="g2250-cds"'
        response.headers.update(error.headers)
        return response
    document = operation_outcome(error.status, error.diagnostics, error.expression, error.code)
    response = Response(json.dumps(document, separators=(",", ":")), status=error.status,
                        mimetype="application/fhir+json")
    response.headers.update(error.headers)
    return response
