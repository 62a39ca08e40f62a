"""End to end against a real FHIR R4 server (SEKMET, or FHIR_BASE_URL) loaded with fhir_fixtures/.

Each hook is called over HTTP twice: once with no prefetch (the service queries the FHIR server, with
``Prefer: handling=strict`` so an unsupported search parameter fails loudly) and once the way an EHR with prefetch
calls it (the test resolves the discovery templates against the server, and sends no fhirServer at all, so any
fetch the service attempted would fail with 412). Both must answer identically.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from importlib import resources
from typing import Any

import pytest
import requests
from flask import Flask

from cds_service.app import runtime_of
from cds_service.fhir.client import FhirClient
from cds_service.fhir.source import DataSource
from cds_service.web import schemas
from hooks.gather import gather_episode
from tests.support.fhir_server import FhirServer, free_port
from tests.support.spec import SPEC_CRITERION_IDS

pytestmark = pytest.mark.integration

SERVICE_FOR_HOOK = {
    "patient-view": "g2250-patient-view",
    "encounter-start": "g2250-encounter-start",
    "encounter-discharge": "g2250-encounter-discharge",
    "appointment-book": "g2250-appointment-book",
}
TOKEN = re.compile(r"\{\{\s*([^}]+?)\s*\}\}")


def scenarios() -> list[dict[str, Any]]:
    return json.loads(resources.files("fhir_fixtures").joinpath("scenarios.json").read_text("utf-8"))


def scenario(scenario_id: str) -> dict[str, Any]:
    return next(s for s in scenarios() if s["id"] == scenario_id)


def hook_request(item: dict[str, Any], server: FhirServer | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": item["hook"],
        "hookInstance": f"it-{item['id']}",
        "context": item["context"],
    }
    if server is not None:
        body["fhirServer"] = server.base_url
        if server.token:
            body["fhirAuthorization"] = {"access_token": server.token, "token_type": "Bearer",
                                         "expires_in": 300, "scope": "user/*.read",
                                         "subject": "cds-service"}
    return body


def resolve_prefetch(app: Flask, service_id: str, context: dict[str, Any], server: FhirServer) -> dict[str, Any]:
    """Play the EHR: fill each template of the discovery document and GET it (all pages) from the server."""
    services = app.test_client().get("/cds-services").get_json()["services"]
    templates = next(s for s in services if s["id"] == service_id)["prefetch"]
    user = context.get("userId", "")
    tokens = {f"context.{k}": v for k, v in context.items() if isinstance(v, str)}
    if user.startswith("Practitioner/"):
        tokens["userPractitionerId"] = user.split("/", 1)[1]
    prefetch: dict[str, Any] = {}
    for key, template in templates.items():
        names = TOKEN.findall(template)
        if any(name not in tokens for name in names):
            continue  # the EHR cannot fill it: the key is omitted, as the sandbox does
        url = TOKEN.sub(lambda m: tokens[m.group(1)], template)
        response = requests.get(f"{server.base_url}/{url}", headers=server.headers(), timeout=10)
        if response.status_code == 404:
            prefetch[key] = None
            continue
        response.raise_for_status()
        document = response.json()
        if document.get("resourceType") == "Bundle":
            document = _all_pages(document, server)
        prefetch[key] = document
    return prefetch


def _all_pages(bundle: dict[str, Any], server: FhirServer) -> dict[str, Any]:
    entries = list(bundle.get("entry") or [])
    next_url = next((link["url"] for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
    while next_url:
        page = requests.get(next_url, headers=server.headers(), timeout=10).json()
        entries.extend(page.get("entry") or [])
        next_url = next((link["url"] for link in page.get("link") or [] if link.get("relation") == "next"), None)
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries}


DEPENDENT_TYPES = {"PractitionerRole", "Practitioner", "Schedule", "Slot", "Organization", "Condition"}


@contextmanager
def recorded_fhir_urls(app: Flask) -> Iterator[list[str]]:
    """Every URL the app reads from the FHIR server: each GET, and each GET inside a batch Bundle."""
    session = runtime_of(app).session
    original = session.request
    urls: list[str] = []

    def recording_request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if method == "GET":
            urls.append(url)
        else:
            batch = json.loads(kwargs["data"])
            assert batch["type"] == "batch"
            urls.extend(f"{url}/{e['request']['url']}" for e in batch["entry"])
        return original(method, url, *args, **kwargs)

    session.request = recording_request  # type: ignore[method-assign]
    try:
        yield urls
    finally:
        session.request = original  # type: ignore[method-assign]


def _post(app: Flask, service_id: str, body: dict[str, Any]) -> Any:
    return app.test_client().post(f"/cds-services/{service_id}", json=body)


@pytest.mark.parametrize("batch", ["auto", "never"])
@pytest.mark.parametrize("scenario_id", [s["id"] for s in scenarios()])
def test_every_scenario_answers_the_same_with_and_without_prefetch(
        fhir_app: Callable[..., Flask], loaded_fhir: FhirServer, scenario_id: str, batch: str) -> None:
    """By fallback (waves by batch Bundle, or GET by GET with Prefer: handling=strict) and by prefetch: one answer."""
    item = scenario(scenario_id)
    app = fhir_app(datetime.fromisoformat(item["now"]), {"fhir": {"allowed_servers": [loaded_fhir.base_url],
                                                                  "batch": batch}})
    service_id = SERVICE_FOR_HOOK[item["hook"]]

    with recorded_fhir_urls(app) as asked:
        fallback = _post(app, service_id, hook_request(item, loaded_fhir))
    assert len(asked) >= 15  # the whole episode was read, whichever way
    assert fallback.status_code == 200, fallback.get_data(as_text=True)
    assert schemas.outbound_problems("cds-response", fallback.get_json()) == []
    assert schemas.card_problems(fallback.get_json()) == []

    body = hook_request(item, loaded_fhir)
    body["prefetch"] = resolve_prefetch(app, service_id, item["context"], loaded_fhir)
    with recorded_fhir_urls(app) as urls:
        prefetched = _post(app, service_id, body)
    assert prefetched.status_code == 200, prefetched.get_data(as_text=True)
    assert prefetched.get_json() == fallback.get_json()
    # What the EHR prefetched is not fetched again: only the dependent waves (roles, schedules, slots, payers,
    # coded conditions) may still go to the server.
    refetched = [u for u in urls if u.split("/fhir/", 1)[1].split("?")[0] not in DEPENDENT_TYPES]
    assert refetched == [], refetched

    assert_expected_card(item, fallback.get_json()["cards"])


def _card_for(item: dict[str, Any], cards: list[dict[str, Any]]) -> dict[str, Any]:
    expected = item["expected"]
    matching = [c for c in cards
                if c["extension"]["g2250-cds.determination"].get("deadline") == expected.get("deadline")]
    assert len(matching) == 1, (item["id"], [c["summary"] for c in cards])
    return matching[0]


CRITERION_IDS = SPEC_CRITERION_IDS


def assert_card_texts(item: dict[str, Any], card: dict[str, Any]) -> None:
    """What a clinician reads in two seconds, and what a coder needs in the detail."""
    expected = item["expected"]
    summary, detail = card["summary"], card["detail"]
    assert len(summary) < 140
    assert not any(cid in summary for cid in CRITERION_IDS)  # no jargon in the summary
    code = expected.get("code")
    if code and item["hook"] != "appointment-book":
        assert code in summary, summary
    openers = {"billable": ("Bill ",), "pending": ("Reply to the patient",),
               "needs-review": ("Confirm before billing",), "not-billable": ("Do not bill", "Use G2010", "Use G2250")}
    if item["hook"] == "encounter-start":
        assert summary.startswith(("Reply by", "Reply sent", "Remote assessment opened")), summary
    elif item["hook"] == "appointment-book":
        assert summary.startswith("This visit would include the photo review of"), summary
    else:
        assert summary.startswith(openers[expected["status"]]), summary
    # Every failing or open criterion is explained with its evidence in the detail.
    determination = card["extension"]["g2250-cds.determination"]
    for criterion in determination["criteria"]:
        if criterion["status"] in ("not-met", "unknown"):
            assert criterion["detail"] in detail
            for reference in criterion.get("evidence", [])[:6]:
                assert f"`{reference}`" in detail
    if expected.get("deadline") and item["hook"] != "appointment-book":
        assert "reply due" in detail.lower() or "Reply by" in summary


def assert_expected_card(item: dict[str, Any], cards: list[dict[str, Any]]) -> None:
    """The determination extension and the card shape of billing-rules.md §6 "Card by status"."""
    expected = item["expected"]
    card = _card_for(item, cards)
    determination = card["extension"]["g2250-cds.determination"]
    assert determination["status"] == expected["status"], (item["id"], determination)
    assert determination.get("code") == expected.get("code"), item["id"]
    assert determination.get("modifiers") == expected.get("modifiers"), item["id"]
    got = {c["id"]: c["status"] for c in determination["criteria"]}
    assert got == expected["criteria"], (item["id"], {k: (v, got[k]) for k, v in expected["criteria"].items()
                                                      if got[k] != v})
    assert [c["id"] for c in determination["criteria"]] == list(expected["criteria"])  # all ten, §3 order
    creates = [a for s in card.get("suggestions", []) for a in s["actions"] if a["type"] == "create"]
    status = expected["status"]
    assert_card_texts(item, card)
    if item["hook"] == "encounter-start":
        assert card["indicator"] == "info"
        assert not creates
        return
    if item["hook"] == "appointment-book":
        assert card["indicator"] == "warning"
        proposed = [e["resource"]["id"] for e in item["context"]["appointments"]["entry"]]
        evidence = next(c for c in determination["criteria"] if c["id"] == "no-resulting-service")["evidence"]
        assert any(f"Appointment/{pid}" in evidence for pid in proposed)
        deletes = [a for s in card.get("suggestions", []) for a in s["actions"] if a["type"] == "delete"]
        assert deletes and all(a["resourceId"].startswith("ChargeItem/") for a in deletes)
        assert not creates
        return
    if status == "billable":
        assert card["indicator"] == "info"
        recommended = [s for s in card["suggestions"] if s.get("isRecommended")]
        assert len(recommended) == 1 and card["selectionBehavior"] == "at-most-one"
        (action,) = recommended[0]["actions"]
        charge = action["resource"]
        assert action["type"] == "create" and charge["resourceType"] == "ChargeItem"
        assert charge["code"]["coding"][0] == {**charge["code"]["coding"][0], "code": expected["code"],
                                               "system": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"}
        assert charge["subject"]["reference"] == f"Patient/{item['context']['patientId']}"
        assert charge["context"]["reference"] == item["assessmentEncounter"]
        assert charge["performer"][0]["actor"]["reference"].startswith("Practitioner/")
        assert charge["supportingInformation"] and charge["occurrenceDateTime"]
        modifiers = [e["valueCoding"]["code"] for e in charge.get("extension", [])]
        assert modifiers == expected.get("modifiers", [])
        # Not Medicare telehealth (billing-rules.md §2.8/2.9): no telehealth or surgical modifiers, no POS 02/10,
        # and CO/CR are never offered (CO is the OT-assistant modifier, not "catastrophe").
        assert not set(modifiers) & {"95", "93", "GT", "GQ", "FQ", "G0", "25", "CR", "CO", "CQ"}
        assert "placeOfService" not in json.dumps(charge) and "02" not in modifiers
    elif status == "pending":
        assert card["indicator"] == "info" and not creates
    elif status == "needs-review":
        assert card["indicator"] == "warning"
        assert all(not s.get("isRecommended") for s in card.get("suggestions", []))
    else:
        assert card["indicator"] == "warning" and not creates
        assert card["overrideReasons"]
    if expected.get("code") == "G2010":  # never proposes G2250 to an E/M-capable practitioner
        assert "Bill G2250" not in card["summary"]
        assert all(a["resource"]["code"]["coding"][0]["code"] == "G2010" for a in creates)
    if item["id"].startswith("s53-"):  # "use G2010": the wrong G2250 charge is offered for deletion
        assert card["summary"].startswith("Use G2010")
        deletes = [a for s in card["suggestions"] for a in s["actions"] if a["type"] == "delete"]
        assert [a["resourceId"] for a in deletes] == ["ChargeItem/s53-charge-wrong-g2250"]


def test_fallback_gathers_the_whole_episode(loaded_fhir: FhirServer) -> None:
    """The data path reads every resource type of fhir-profile.md the scenario holds, under strict handling."""
    item = scenario("s01-pt-billable")
    bundle = json.loads(resources.files("fhir_fixtures").joinpath(item["file"]).read_text("utf-8"))
    expected = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]
                if e["resource"]["resourceType"] != "Patient"}
    client = FhirClient(loaded_fhir.base_url, access_token=loaded_fhir.token,
                        extra_headers={"Prefer": "handling=strict"})
    with ThreadPoolExecutor(8) as pool:
        source = DataSource(None, client, pool, time.monotonic() + 20)
        data = gather_episode(source, patient_id=item["context"]["patientId"],
                              now=datetime.fromisoformat(item["now"]),
                              encounter_id=item["context"]["encounterId"],
                              user_practitioner_id=item["context"]["userId"].split("/")[1])
    gathered = {f"{r.get_resource_type()}/{r.id}" for r in data.bag}
    assert expected <= gathered, sorted(expected - gathered)
    # Shared master data the rules need: the practitioner and their role, the payer. (Schedules and slots are
    # read only when an appointment could be the soonest available one; s01 has none.)
    assert {"PractitionerRole/prrole-pt-1", "Practitioner/pr-pt-1"} <= gathered
    assert any(key.startswith("Organization/") for key in gathered)
    # SEKMET 0.1.1 has no ClinicalImpression search parameters; under strict handling that optional query fails.
    assert set(data.unavailable) <= {"impressions"}
    assert data.bag.skipped == []
    # The common case — the user bills and saw the patient before — is one wave of concurrent queries.
    assert source.stats.waves == 1


def test_encounter_hook_with_only_the_encounter_prefetched(fhir_app: Callable[..., Flask],
                                                            loaded_fhir: FhirServer) -> None:
    item = scenario("s01-pt-billable")
    app = fhir_app(datetime.fromisoformat(item["now"]))
    body = hook_request(item, loaded_fhir)
    full = resolve_prefetch(app, "g2250-encounter-discharge", item["context"], loaded_fhir)
    body["prefetch"] = {"encounter": full["encounter"]}
    partial = _post(app, "g2250-encounter-discharge", body)
    assert partial.status_code == 200
    assert partial.get_json() == _post(app, "g2250-encounter-discharge", hook_request(item, loaded_fhir)).get_json()


def test_operation_outcome_prefetch_is_refetched(fhir_app: Callable[..., Flask], loaded_fhir: FhirServer) -> None:
    item = scenario("s01-pt-billable")
    app = fhir_app(datetime.fromisoformat(item["now"]))
    body = hook_request(item, loaded_fhir)
    body["prefetch"] = {"encounter": {"resourceType": "OperationOutcome",
                                      "issue": [{"severity": "error", "code": "timeout"}]}}
    response = _post(app, "g2250-encounter-discharge", body)
    assert response.status_code == 200
    assert response.get_json() == _post(app, "g2250-encounter-discharge",
                                         hook_request(item, loaded_fhir)).get_json()


def test_wrong_fhir_token_is_412(fhir_app: Callable[..., Flask], loaded_fhir: FhirServer) -> None:
    item = scenario("s01-pt-billable")
    app = fhir_app(datetime.fromisoformat(item["now"]))
    body = hook_request(item, loaded_fhir)
    body["fhirAuthorization"]["access_token"] = "not-the-token"
    response = _post(app, "g2250-encounter-discharge", body)
    assert response.status_code == 412
    outcome = response.get_json(force=True)
    assert outcome["resourceType"] == "OperationOutcome"
    assert "not-the-token" not in response.get_data(as_text=True)


def test_unreachable_fhir_server_is_412(make_config: Callable[..., Any]) -> None:
    from cds_service.app import create_app

    dead = f"http://127.0.0.1:{free_port()}/fhir"
    app = create_app(make_config({"fhir": {"allowed_servers": [dead]}}))
    item = scenario("s01-pt-billable")
    body = hook_request(item, FhirServer(dead, None))
    try:
        response = _post(app, "g2250-encounter-discharge", body)
    finally:
        runtime_of(app).close()
    assert response.status_code == 412


def test_missing_encounter_has_nothing_to_say(fhir_app: Callable[..., Flask], loaded_fhir: FhirServer) -> None:
    item = scenario("s01-pt-billable")
    app = fhir_app(datetime.fromisoformat(item["now"]))
    body = hook_request(item, loaded_fhir)
    body["context"] = {**item["context"], "encounterId": "does-not-exist"}
    response = _post(app, "g2250-encounter-discharge", body)
    assert response.status_code == 200
    assert response.get_json() == {"cards": []}


def test_the_sandbox_way_of_calling(make_config: Callable[..., Any], open_fhir: FhirServer) -> None:
    """The public CDS Hooks sandbox: browser origin (CORS preflight), patient-view only, no fhirAuthorization
    (an open FHIR server is queried without a token), and only the prefetch keys it could resolve."""
    from cds_service.app import create_app

    item = scenario("s29-uncoded-visit-prior-7-days")
    app = create_app(make_config({"fhir": {"allowed_servers": [open_fhir.base_url]}}),
                     clock=lambda: datetime.fromisoformat(item["now"]), fhir_headers={"Prefer": "handling=strict"})
    client = app.test_client()
    origin = "https://sandbox.cds-hooks.org"
    preflight = client.options("/cds-services/g2250-patient-view", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    body = {
        "hook": "patient-view",
        "hookInstance": "5b5ef1bd-6b84-4b8e-9e2c-0c4c2b1a1111",
        "fhirServer": open_fhir.base_url,
        "context": {"patientId": item["context"]["patientId"], "userId": item["context"]["userId"]},
    }
    full = resolve_prefetch(app, "g2250-patient-view", body["context"], open_fhir)
    body["prefetch"] = {k: v for k, v in full.items() if k in ("consents", "coverages", "encounters")}
    response = client.post("/cds-services/g2250-patient-view", json=body, headers={"Origin": origin})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Access-Control-Allow-Origin"] in (origin, "*")
    assert_expected_card(item, response.get_json()["cards"])
    # Feedback as the sandbox posts it when a card is dismissed.
    card = response.get_json()["cards"][0]
    feedback = client.post("/cds-services/g2250-patient-view/feedback", headers={"Origin": origin}, json={
        "feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-12-14T15:12:00Z",
                      "overrideReason": {"reason": card["overrideReasons"][0]}}]})
    assert feedback.status_code == 200
    stored = runtime_of(app).store.feedback_for_card(card["uuid"])
    assert stored[0]["override_code"] == card["overrideReasons"][0]["code"]
    runtime_of(app).close()


def test_card_uuids_are_stable_across_calls(fhir_app: Callable[..., Flask], loaded_fhir: FhirServer) -> None:
    item = scenario("s01-pt-billable")
    app = fhir_app(datetime.fromisoformat(item["now"]))
    first = _post(app, "g2250-encounter-discharge", hook_request(item, loaded_fhir)).get_json()["cards"][0]
    second = _post(app, "g2250-encounter-discharge", hook_request(item, loaded_fhir)).get_json()["cards"][0]
    assert first["uuid"] == second["uuid"]
    assert first["suggestions"][0]["uuid"] == second["suggestions"][0]["uuid"]


def test_proposed_appointment_without_id_is_named_by_position(fhir_app: Callable[..., Flask],
                                                                loaded_fhir: FhirServer) -> None:
    item = json.loads(json.dumps(scenario("s52-appointment-book-bundles")))
    for entry in item["context"]["appointments"]["entry"]:
        entry["resource"].pop("id", None)
    app = fhir_app(datetime.fromisoformat(item["now"]))
    response = _post(app, "g2250-appointment-book", hook_request(item, loaded_fhir))
    (card,) = response.get_json()["cards"]
    evidence = next(c for c in card["extension"]["g2250-cds.determination"]["criteria"]
                    if c["id"] == "no-resulting-service")["evidence"]
    assert "Appointment/proposed-1" in evidence
