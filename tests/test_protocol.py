"""The CDS Hooks HTTP surface through HTTP (Flask test client): discovery, errors, CORS, strict outbound."""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds_service.web import schemas

SERVICE_IDS = {
    "patient-view": "g2250-patient-view",
    "encounter-start": "g2250-encounter-start",
    "encounter-discharge": "g2250-encounter-discharge",
    "appointment-book": "g2250-appointment-book",
}
TOKEN_RE = re.compile(r"\{\{([^}]*)\}\}")
LEGAL_TOKENS = {"userPractitionerId", "userPractitionerRoleId", "userPatientId", "userRelatedPersonId"}
CONTEXT_FIELDS = {
    "patient-view": {"patientId", "userId", "encounterId"},
    "encounter-start": {"patientId", "userId", "encounterId"},
    "encounter-discharge": {"patientId", "userId", "encounterId"},
    "appointment-book": {"patientId", "userId", "encounterId"},  # appointments is a Bundle, not a token
}


def _request(hook: str, **context: Any) -> dict[str, Any]:
    ctx = {"patientId": "p-1", "userId": "Practitioner/pr-1", **context}
    return {"hook": hook, "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "context": ctx}


def _assert_outcome(response: Any, status: int, expression: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json(force=True)
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error"
    assert issue["code"]
    if expression is not None:
        assert expression in issue.get("expression", []), issue
    return body


def test_discovery_lists_one_service_per_hook(client: FlaskClient) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    body = response.get_json()
    assert schemas.outbound_problems("discovery", body) == []
    hooks = [s["hook"] for s in body["services"]]
    assert sorted(hooks) == sorted(SERVICE_IDS)
    assert {s["hook"]: s["id"] for s in body["services"]} == SERVICE_IDS
    for service in body["services"]:
        assert service["title"] and service["description"] and service["usageRequirements"]


def test_discovery_prefetch_templates_use_only_cds_hooks_2_tokens(client: FlaskClient) -> None:
    for service in client.get("/cds-services").get_json()["services"]:
        assert service["prefetch"], service["id"]
        for template in service["prefetch"].values():
            for token in TOKEN_RE.findall(template):
                if token.startswith("context."):
                    assert token.split(".", 1)[1] in CONTEXT_FIELDS[service["hook"]], (service["id"], token)
                else:
                    assert token in LEGAL_TOKENS, (service["id"], token)
            # No date arithmetic in 2.0 (e.g. {{today}}): every brace belongs to a legal token.
            assert "{" not in TOKEN_RE.sub("", template)


def test_encounter_services_prefetch_the_encounter(client: FlaskClient) -> None:
    services = {s["hook"]: s for s in client.get("/cds-services").get_json()["services"]}
    for hook in ("encounter-start", "encounter-discharge"):
        assert services[hook]["prefetch"]["encounter"] == "Encounter/{{context.encounterId}}"


def test_unknown_service_is_404(client: FlaskClient) -> None:
    _assert_outcome(client.post("/cds-services/nope", json=_request("patient-view")), 404)
    _assert_outcome(client.post("/cds-services/nope/feedback", json={"feedback": []}), 404)


def test_unknown_path_is_404_operation_outcome(client: FlaskClient) -> None:
    _assert_outcome(client.get("/somewhere-else"), 404)


@pytest.mark.parametrize(("method", "url"), [
    ("get", "/cds-services/g2250-patient-view"),
    ("put", "/cds-services/g2250-patient-view"),
    ("delete", "/cds-services"),
    ("get", "/cds-services/g2250-patient-view/feedback"),
])
def test_wrong_method_is_405(client: FlaskClient, method: str, url: str) -> None:
    response = getattr(client, method)(url)
    _assert_outcome(response, 405)
    assert "POST" in response.headers["Allow"] or "GET" in response.headers["Allow"]


def test_not_json_is_415(client: FlaskClient) -> None:
    response = client.post("/cds-services/g2250-patient-view", data="hook=patient-view",
                           content_type="application/x-www-form-urlencoded")
    _assert_outcome(response, 415, "Content-Type")


def test_fhir_json_content_type_is_accepted(client: FlaskClient) -> None:
    request = _request("patient-view")
    request["prefetch"] = {key: None for key in _prefetch_keys(client, "g2250-patient-view")}
    response = client.post("/cds-services/g2250-patient-view", json=request,
                           headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 200


def test_unparsable_body_is_400(client: FlaskClient) -> None:
    response = client.post("/cds-services/g2250-patient-view", data="{not json",
                           content_type="application/json")
    _assert_outcome(response, 400)


def test_deeply_nested_json_is_400_not_500(client: FlaskClient) -> None:
    body = "[" * 100_000 + "]" * 100_000
    response = client.post("/cds-services/g2250-patient-view", data=body, content_type="application/json")
    assert response.status_code in (400, 413)


def test_oversized_body_is_413(client: FlaskClient) -> None:
    response = client.post("/cds-services/g2250-patient-view", data=b"{" + b" " * 2_000_000 + b"}",
                           content_type="application/json")
    _assert_outcome(response, 413)


@pytest.mark.parametrize(("mutate", "element"), [
    (lambda r: r.pop("hook"), "hook"),
    (lambda r: r.pop("hookInstance"), "hookInstance"),
    (lambda r: r.pop("context"), "context"),
    (lambda r: r.update(context="x"), "context"),
    (lambda r: r["context"].pop("patientId"), "context.patientId"),
    (lambda r: r["context"].update(patientId=42), "context.patientId"),
    (lambda r: r["context"].update(patientId="Patient/1"), "context.patientId"),
    (lambda r: r["context"].update(userId="no-slash"), "context.userId"),
    (lambda r: r.update(fhirServer="ftp://x"), "fhirServer"),
    (lambda r: r.update(fhirAuthorization={"access_token": "a", "token_type": "Bearer"}), "fhirServer"),
    (lambda r: r.update(fhirServer="http://127.0.0.1:8090/fhir",
                        fhirAuthorization={"token_type": "Bearer"}), "fhirAuthorization.access_token"),
    (lambda r: r.update(prefetch=[1]), "prefetch"),
    (lambda r: r.update(hook="order-sign"), "hook"),
])
def test_invalid_request_is_400_naming_the_element(client: FlaskClient, mutate: Any, element: str) -> None:
    request = _request("patient-view")
    mutate(request)
    _assert_outcome(client.post("/cds-services/g2250-patient-view", json=request), 400, element)


def test_body_not_an_object_is_400(client: FlaskClient) -> None:
    _assert_outcome(client.post("/cds-services/g2250-patient-view", json=[1, 2]), 400)


@pytest.mark.parametrize(("service", "context", "element"), [
    ("g2250-encounter-start", {}, "context.encounterId"),
    ("g2250-encounter-discharge", {"encounterId": ""}, "context.encounterId"),
    ("g2250-appointment-book", {}, "context.appointments"),
    ("g2250-appointment-book", {"appointments": {"resourceType": "Appointment"}}, "context.appointments"),
])
def test_hook_specific_required_context(client: FlaskClient, service: str, context: dict[str, Any],
                                        element: str) -> None:
    hook = next(h for h, s in SERVICE_IDS.items() if s == service)
    _assert_outcome(client.post(f"/cds-services/{service}", json=_request(hook, **context)), 400, element)


def test_error_diagnostics_never_echo_request_values(client: FlaskClient) -> None:
    request = _request("patient-view")
    request["context"]["patientId"] = "Patient/Zzyzx-Secret-Id"
    body = client.post("/cds-services/g2250-patient-view", json=request).get_data(as_text=True)
    assert "Zzyzx" not in body


def test_unknown_elements_are_ignored(client: FlaskClient) -> None:
    request = _request("patient-view", somethingNew={"x": 1})
    request["futureElement"] = [1, 2, 3]
    request["extension"] = {"com.example.foo": True}
    request["prefetch"] = {key: None for key in _prefetch_keys(client, "g2250-patient-view")}
    response = client.post("/cds-services/g2250-patient-view", json=request)
    assert response.status_code == 200
    assert response.get_json() == {"cards": []}


def _prefetch_keys(client: FlaskClient, service_id: str) -> list[str]:
    services = client.get("/cds-services").get_json()["services"]
    return list(next(s for s in services if s["id"] == service_id)["prefetch"])


def test_missing_data_without_fhir_server_is_412(client: FlaskClient) -> None:
    response = client.post("/cds-services/g2250-patient-view", json=_request("patient-view"))
    _assert_outcome(response, 412)


def test_all_prefetch_null_means_no_data_and_no_fetch(client: FlaskClient) -> None:
    for hook, service_id in SERVICE_IDS.items():
        extra: dict[str, Any] = {}
        if hook.startswith("encounter"):
            extra["encounterId"] = "enc-1"
        if hook == "appointment-book":
            extra["appointments"] = {"resourceType": "Bundle", "type": "collection", "entry": []}
        request = _request(hook, **extra)
        # A fhirServer that does not exist: any attempt to fetch would fail the request with 412.
        request["fhirServer"] = "http://127.0.0.1:8090/fhir"
        request["prefetch"] = {key: None for key in _prefetch_keys(client, service_id)}
        response = client.post(f"/cds-services/{service_id}", json=request)
        assert response.status_code == 200, (hook, response.get_data(as_text=True))
        body = response.get_json()
        assert schemas.outbound_problems("cds-response", body) == []


def test_fhir_server_not_on_allowlist_is_refused(client: FlaskClient) -> None:
    request = _request("patient-view")
    request["fhirServer"] = "http://169.254.169.254/latest"
    _assert_outcome(client.post("/cds-services/g2250-patient-view", json=request), 403, "fhirServer")


def test_cors_preflight_for_the_sandbox(client: FlaskClient) -> None:
    origin = "https://sandbox.cds-hooks.org"
    for url, headers in (("/cds-services", "authorization"),
                         ("/cds-services/g2250-patient-view", "authorization, content-type"),
                         ("/cds-services/g2250-patient-view/feedback", "authorization, content-type")):
        response = client.options(url, headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST" if "g2250" in url else "GET",
            "Access-Control-Request-Headers": headers,
        })
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] in (origin, "*")
        allowed = response.headers["Access-Control-Allow-Headers"].lower()
        for header in headers.split(", "):
            assert header in allowed
    response = client.get("/cds-services", headers={"Origin": origin})
    assert response.headers["Access-Control-Allow-Origin"] in (origin, "*")


def test_responses_carry_a_request_id(client: FlaskClient) -> None:
    assert client.get("/cds-services").headers["X-Request-Id"]


# --- the strict outbound checks themselves must be able to fail ---------------------------------------------
@pytest.mark.parametrize("bad", [
    {"cards": [{"uuid": "u", "summary": "s", "indicator": "info", "source": {"label": "x"}, "detail": ""}]},
    {"cards": [{"uuid": "u", "summary": "s", "indicator": "info", "source": {"label": "x"}, "links": []}]},
    {"cards": [{"uuid": "u", "summary": "s", "indicator": "info", "source": {"label": "x"}, "extension": {}}]},
    {"cards": [{"uuid": "u", "summary": "s", "indicator": "info", "source": {"label": "x"}, "detail": None}]},
    {"cards": [{"uuid": "u", "summary": "x" * 140, "indicator": "info", "source": {"label": "x"}}]},
    {"cards": [{"summary": "s", "indicator": "info", "source": {"label": "x"}}]},
    {"cards": [{"uuid": "u", "summary": "s", "indicator": "info", "source": {"label": "x"},
                "suggestions": [{"label": "l", "uuid": "v"}]}]},
    {"cards": [], "systemActions": []},
])
def test_strict_outbound_check_rejects(bad: dict[str, Any]) -> None:
    assert schemas.outbound_problems("cds-response", bad)


def test_strict_outbound_check_accepts_a_good_card() -> None:
    good = {"cards": [{
        "uuid": "c-1", "summary": "May be billed as G2250 with GP", "indicator": "info",
        "source": {"label": "g2250-cds", "topic": {"system": "https://example.org", "code": "g2250"}},
        "suggestions": [{"label": "Add charge", "uuid": "s-1", "isRecommended": True, "actions": [
            {"type": "create", "description": "Create ChargeItem", "resource": {"resourceType": "ChargeItem"}}]}],
        "selectionBehavior": "at-most-one",
    }]}
    assert schemas.outbound_problems("cds-response", good) == []
    assert schemas.card_problems(good) == []
    assert schemas.outbound_problems("cds-response", {"cards": []}) == []


def test_cors_headers_only_for_browser_requests(client: FlaskClient) -> None:
    # Browsers always send Origin cross-origin; server-to-server callers get no CORS headers (and no CORS cost).
    assert "Access-Control-Allow-Origin" not in client.get("/cds-services").headers
    assert client.get("/cds-services", headers={"Origin": "https://sandbox.cds-hooks.org"}).headers[
        "Access-Control-Allow-Origin"] in ("https://sandbox.cds-hooks.org", "*")
