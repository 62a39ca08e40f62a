"""Hostile input: property-based fuzzing of every endpoint (hypothesis), through the Flask test client.

Properties, whatever arrives: no status ≥ 500, every non-2xx answer is an OperationOutcome (405 with ``Allow``),
every 200 hook answer passes the strict outbound check, and no network is attempted unless the request names a
``fhirServer``. Explicit tests cover what fuzzing finds only by luck: oversized and deeply nested bodies, and
per-resource tolerance of malformed prefetch.

Bugs this suite found are pinned by explicit tests at the end of the file (lone surrogate escapes, JSON nested just
below Python's recursion limit inside a resource, edge-of-range or leap-second dateTimes, partial dates in the
context Encounter's period, feedback values longer than the PostgreSQL columns, double slashes); the fuzz
strategies now include edge-of-range years and empty path segments too.
"""

from __future__ import annotations

import copy
import io
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.app import create_app, runtime_of
from cds_service.config import Config
from cds_service.fhir.parse import parse_resource
from cds_service.web import schemas

SERVICE_FOR_HOOK = {
    "patient-view": "g2250-patient-view",
    "encounter-start": "g2250-encounter-start",
    "encounter-discharge": "g2250-encounter-discharge",
    "appointment-book": "g2250-appointment-book",
}
HOOK_OF = {service: hook for hook, service in SERVICE_FOR_HOOK.items()}
SERVICE_IDS = list(HOOK_OF)
# The worked examples' clocks (tests/test_examples.py): each self-contained request is evaluated at its "now".
NOW_OF_REQUEST = {
    "encounter-discharge": "2026-11-18T15:40:00-05:00",
    "encounter-start": "2026-12-09T16:00:00-05:00",
    "patient-view": "2026-12-14T15:10:00-05:00",
    "appointment-book": "2026-12-09T16:00:00-05:00",
}
ALLOWED_SERVER = "http://127.0.0.1:8090/fhir"  # on the embedded defaults' allowlist; nothing listens there
# G2250_FUZZ_SCALE=20 multiplies every example budget, for a long fuzzing run by hand (default: ~260 examples).
SCALE = max(1, int(os.environ.get("G2250_FUZZ_SCALE", "1")))
FUZZ = settings(max_examples=40 * SCALE, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])


def _request_file(hook: str) -> dict[str, Any]:
    return json.loads(resources.files("fhir_fixtures").joinpath(f"requests/{hook}.json").read_text("utf-8"))


REQUESTS = {hook: _request_file(hook) for hook in SERVICE_FOR_HOOK}


# --- the app under test, with a network guard -----------------------------------------------------------------
class NetworkGuard:
    """Refuses every outbound connection and records the attempts (the service's FHIR client included)."""

    def __init__(self) -> None:
        self.attempts: list[Any] = []

    def refuse(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts.append(args[1] if len(args) > 1 else args)
        raise ConnectionRefusedError("network is off in the fuzz tests")


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> NetworkGuard:
    guard = NetworkGuard()
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: guard.refuse(sock, address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda sock, address: guard.refuse(sock, address))
    return guard


@pytest.fixture
def fuzz_app(make_config: Callable[..., Config], guard: NetworkGuard) -> Iterator[Callable[[str], Flask]]:
    """``fuzz_app(hook)``: an app on the embedded defaults, its clock at that hook's worked example."""
    apps: dict[str, Flask] = {}

    def factory(hook: str = "encounter-discharge") -> Flask:
        if hook not in apps:
            now = datetime.fromisoformat(NOW_OF_REQUEST[hook])
            apps[hook] = create_app(make_config({"deadline_seconds": 2.0}), clock=lambda: now)
        return apps[hook]

    yield factory
    for app in apps.values():
        runtime_of(app).close()


HANG_LIMIT = 3.0  # "zero hangs": far above any honest answer here (tens of ms), far below a hang


def timed(call: Callable[[], Any]) -> Any:
    """Run one request; it must come back within HANG_LIMIT seconds."""
    started = time.monotonic()
    response = call()
    elapsed = time.monotonic() - started
    assert elapsed < HANG_LIMIT, f"request took {elapsed:.2f} s"
    return response


def check(response: Any, *, method: str = "POST", kind: str = "invoke") -> Any:
    """The properties every answer has. Returns the parsed JSON body (or None)."""
    status = response.status_code
    text = response.get_data(as_text=True)
    assert status < 500, text[:500]
    if status >= 300:
        if method == "HEAD":
            return None
        assert response.mimetype in ("application/fhir+json", "application/json"), response.mimetype
        body = json.loads(text)
        assert body["resourceType"] == "OperationOutcome", text[:500]
        assert body["issue"] and body["issue"][0]["severity"] == "error" and body["issue"][0]["code"]
        if status == 405:
            assert response.headers.get("Allow"), "405 without Allow"
        return body
    if method in ("HEAD", "OPTIONS") or not text:
        return None
    body = json.loads(text)
    if kind == "invoke":
        assert schemas.outbound_problems("cds-response", body) == [], body
        assert schemas.card_problems(body) == []
    elif kind == "discovery":
        assert schemas.outbound_problems("discovery", body) == []
    return body


# --- strategies -------------------------------------------------------------------------------------------------
# Hypothesis's default text alphabet excludes surrogates (the lone-surrogate bug is pinned below).
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=24))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=16,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)

weird_strings = st.one_of(
    st.text(max_size=40),
    st.text(max_size=8).map(lambda s: f"{s}/{s}"),
    st.sampled_from(["", " ", "/", "Patient/1", "../../etc/passwd", "a?b=c&d=e", "%2F%00", "a#frag", "ｐａｔ",
                     "患者-1", "🙂", "a\u0000b", "\u202e", "x" * 70_000, "s01-pat", "s01-enc-vr", "null"]),
)
weird_values = st.one_of(weird_strings, st.integers(), st.floats(allow_nan=False), st.none(), st.booleans(),
                         st.lists(st.text(max_size=3), max_size=2),
                         st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
user_ids = weird_values | st.sampled_from(["Practitioner/pr-pt-1", "Practitioner/", "Practitioner/a/b",
                                           "PractitionerRole/x", "Patient/p", "Practitioner/🙂", "Practitioner/ "])

# Instants over the whole range FHIR allows (the service treats years outside 1900–2200 as unusable) and
# malformed date strings.
_instants = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                         timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=14)),
                                                    timezone(timedelta(hours=-12))]))
fhir_datetimes = st.one_of(
    _instants.map(lambda d: d.isoformat()),
    st.sampled_from(["2026-12-10T09:00:00-05:00", "2026-11-18T10:00:00Z", "2026-02-30T00:00:00Z", "not a date",
                     "", "2026-12-10T09:00:00", "2026-13-01T00:00:00Z", "2026-12-10T25:00:00Z", "T09:00:00Z"]),
)
partial_dates = st.sampled_from(["2026-11-18", "2026-11", "2026"])
appointment_statuses = st.sampled_from(["proposed", "pending", "booked", "cancelled", "noshow", "bogus", 5, None])


@st.composite
def appointments(draw: st.DrawFn) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Appointment"}
    for name, strategy in (("id", weird_values), ("status", appointment_statuses), ("start", fhir_datetimes),
                           ("end", fhir_datetimes), ("created", fhir_datetimes | partial_dates),
                           ("participant", st.just([{"actor": {"reference": "Practitioner/pr-pt-1"},
                                                     "status": "accepted"}]) | json_values),
                           ("reasonCode", st.just([{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                                                "code": "M25.561"}]}]) | json_values),
                           ("junk", json_values)):
        if draw(st.booleans()):
            resource[name] = draw(strategy)
    return resource


appointment_bundles = st.builds(
    lambda entries, kind: {"resourceType": "Bundle", "type": kind, "entry": entries},
    st.lists(st.one_of(appointments().map(lambda r: {"resource": r}), json_values,
                       st.builds(lambda v: {"resource": v}, json_values),
                       st.just({"resource": {"resourceType": "Patient", "id": "p"}})), max_size=4),
    st.sampled_from(["collection", "searchset", "transaction", 7]),
)


@st.composite
def hook_requests(draw: st.DrawFn, service_id: str) -> tuple[dict[str, Any], bool]:
    """A request shaped like a CDS Hooks call with fuzzed values; also whether it names a fhirServer."""
    hook = HOOK_OF[service_id]
    context: dict[str, Any] = {}
    for name, strategy in (("patientId", weird_values), ("userId", user_ids), ("encounterId", weird_values)):
        if draw(st.integers(0, 4)) > 0:  # mostly present
            context[name] = draw(strategy)
    if hook == "appointment-book" and draw(st.integers(0, 4)) > 0:
        context["appointments"] = draw(appointment_bundles | json_values)
    context.update(draw(st.dictionaries(st.sampled_from(["draftOrders", "selections", "x"]), json_values,
                                        max_size=2)))
    body: dict[str, Any] = {
        "hook": draw(st.sampled_from([hook, hook, hook, "order-sign", "", "PATIENT-VIEW"])),
        "hookInstance": draw(st.uuids().map(str) | st.text(max_size=300)),
        "context": context,
    }
    keys = list(REQUESTS[hook]["prefetch"])
    prefetch_kind = draw(st.sampled_from(["none", "all-null", "fuzzed", "absent"]))
    if prefetch_kind == "all-null":
        body["prefetch"] = dict.fromkeys(keys)
    elif prefetch_kind == "fuzzed":
        body["prefetch"] = draw(st.dictionaries(st.sampled_from([*keys, "bogus"]), json_values, max_size=5))
    elif prefetch_kind == "none":
        body["prefetch"] = None
    server = draw(st.sampled_from([None, None, None, "http://169.254.169.254/latest", "https://evil.example/fhir",
                                   "ftp://x", "http://127.0.0.1:8090/fhir/", ALLOWED_SERVER]))
    if server is not None:
        body["fhirServer"] = server
    if draw(st.integers(0, 5)) == 0:
        body["fhirAuthorization"] = draw(json_values | st.fixed_dictionaries(
            {"access_token": st.text(max_size=20), "token_type": st.sampled_from(["Bearer", "bearer", "MAC"])}))
    if draw(st.integers(0, 5)) == 0:
        body["extension"] = draw(json_values)
    return body, server is not None


# --- every endpoint, arbitrary input ---------------------------------------------------------------------------
POST_URLS = [f"/cds-services/{s}" for s in SERVICE_IDS] + [f"/cds-services/{s}/feedback" for s in SERVICE_IDS]


@FUZZ
@given(url=st.sampled_from(POST_URLS), body=json_values)
def test_any_json_value_on_any_endpoint(fuzz_app: Callable[..., Flask], guard: NetworkGuard, url: str,
                                        body: Any) -> None:
    response = timed(lambda: fuzz_app().test_client().post(url, json=body))
    check(response, kind="feedback" if url.endswith("/feedback") else "invoke")
    if not url.endswith("/feedback"):
        assert response.status_code in (200, 400, 412, 415), response.status_code  # 415: json=None sends no body
    assert guard.attempts == []


@FUZZ
@given(url=st.sampled_from(POST_URLS),
       data=st.binary(max_size=3000) | json_values.map(lambda v: json.dumps(v).encode()).map(lambda b: b[:-1]),
       content_type=st.sampled_from([None, "application/json", "application/fhir+json", "text/plain",
                                     "application/json; charset=utf-16", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "APPLICATION/JSON"]))
def test_arbitrary_bytes_with_and_without_a_json_content_type(fuzz_app: Callable[..., Flask], guard: NetworkGuard,
                                                              url: str, data: bytes, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = timed(lambda: fuzz_app().test_client().post(url, data=data, headers=headers))
    check(response, kind="feedback" if url.endswith("/feedback") else "invoke")
    assert guard.attempts == []


_segments = st.one_of(
    st.sampled_from(["cds-services", *SERVICE_IDS, "feedback", ".", "..", "healthz", "g2250-patient-view ", "%", ""]),
    st.text(min_size=1, max_size=12),
)


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE"]),
       prefix=st.sampled_from(["", "/cds-services", "/cds-services/g2250-patient-view"]),
       segments=st.lists(_segments, max_size=3),
       query=st.none() | st.text(max_size=20),
       body=st.none() | json_values)
def test_random_paths_and_methods(fuzz_app: Callable[..., Flask], guard: NetworkGuard, method: str, prefix: str,
                                  segments: list[str], query: str | None, body: Any) -> None:
    path = prefix + "".join("/" + quote(s, safe="") for s in segments) or "/"
    if query is not None:
        path += "?" + quote(query, safe="=&")
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    response = timed(lambda: fuzz_app().test_client().open(path, method=method, **kwargs))
    kind = "discovery" if path.split("?")[0] == "/cds-services" else (
        "feedback" if path.split("?")[0].endswith("/feedback") else "invoke")
    if path.split("?")[0] == "/healthz":
        kind = "other"
    check(response, method=method, kind=kind)
    assert guard.attempts == []


def test_discovery_is_stable(fuzz_app: Callable[..., Flask]) -> None:
    client = fuzz_app().test_client()
    first = check(client.get("/cds-services"), method="GET", kind="discovery")
    assert first == check(client.get("/cds-services?x=1"), method="GET", kind="discovery")
    assert sorted(s["id"] for s in first["services"]) == sorted(SERVICE_IDS)


@FUZZ
@given(data=st.data())
def test_structurally_valid_requests_with_fuzzed_context(fuzz_app: Callable[..., Flask], guard: NetworkGuard,
                                                         data: st.DataObject) -> None:
    service_id = data.draw(st.sampled_from(SERVICE_IDS))
    body, names_server = data.draw(hook_requests(service_id))
    guard.attempts.clear()
    response = timed(lambda: fuzz_app().test_client().post(f"/cds-services/{service_id}", json=body))
    check(response)
    assert response.status_code in (200, 400, 403, 412), response.status_code
    if not names_server:
        assert guard.attempts == [], "network attempted without a fhirServer"
    if body.get("fhirServer") not in (None, ALLOWED_SERVER, ALLOWED_SERVER + "/"):
        assert guard.attempts == [], "network attempted to a server not on the allowlist"


@FUZZ
@given(service_id=st.sampled_from(SERVICE_IDS),
       feedback=st.lists(st.fixed_dictionaries(
           {"card": weird_values, "outcome": st.sampled_from(["accepted", "overridden", "maybe", 1])},
           optional={"outcomeTimestamp": fhir_datetimes | st.sampled_from(["2026-11-30T15:10:00Z",
                                                                           "2026-13-45T99:99Z"]),
                     "acceptedSuggestions": json_values | st.lists(st.fixed_dictionaries({"id": weird_values}),
                                                                  max_size=3),
                     "overrideReason": json_values | st.fixed_dictionaries(
                         {}, optional={"reason": json_values | st.fixed_dictionaries(
                             {}, optional={"system": st.text(max_size=40), "code": st.text(max_size=40),
                                           "display": st.text(max_size=40)}),
                             "userComment": weird_values})}), max_size=3))
def test_feedback_with_fuzzed_items(fuzz_app: Callable[..., Flask], guard: NetworkGuard, service_id: str,
                                    feedback: list[dict[str, Any]]) -> None:
    response = timed(lambda: fuzz_app().test_client().post(f"/cds-services/{service_id}/feedback",
                                                           json={"feedback": feedback}))
    check(response, kind="feedback")
    assert response.status_code in (200, 400)
    if response.status_code == 200:
        assert response.get_data() == b""
    assert guard.attempts == []


# --- prefetch: wrong types, malformed resources, junk bundles ---------------------------------------------------
_OTHER_RESOURCES = [
    {"resourceType": "Coverage", "id": "cov-x", "status": "active", "beneficiary": {"reference": "Patient/other"},
     "payor": [{"reference": "Organization/x"}]},
    {"resourceType": "Patient", "id": "p-x"},
    {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]},
    {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "informational"}]},
    {"resourceType": "Bundle", "type": "searchset"},
    {"resourceType": "Bundle", "type": "searchset", "entry": [1, "x", None, {"resource": 5},
                                                             {"resource": {"resourceType": 7}}, {"search": {}}]},
    {"resourceType": "NotAType", "id": "n"},
    {"resourceType": "Encounter", "id": "s01-enc-vr", "status": 5, "period": "x", "class": "VR", "extra": [1]},
    {"resourceType": "Encounter", "id": "e-x", "status": "finished",
     "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR"},
     "subject": {"reference": "Patient/other"}, "unknownElement": {"a": 1}},
    {"resourceType": "Communication", "id": "c-x", "status": "completed", "sent": "not a date",
     "payload": [{"contentAttachment": {"contentType": 5}}]},
    {"resourceType": "Slot", "id": "sl-x", "status": "free", "schedule": {"reference": "Schedule/none"},
     "start": "2026-12-08T09:00:00-05:00", "end": "2026-12-08T08:00:00-05:00"},
    {"resourceType": "ChargeItem", "id": "ch-x", "status": "billable", "code": {"coding": [{"code": "G2250"}]},
     "subject": {"reference": "Patient/other"}},
]
other_resources = st.sampled_from(_OTHER_RESOURCES).map(copy.deepcopy)
_FIELDS = ["status", "period", "start", "end", "sent", "received", "created", "subject", "patient", "beneficiary",
           "participant", "recipient", "sender", "payload", "class", "code", "type", "diagnosis", "reasonCode",
           "reasonReference", "performer", "actor", "schedule", "payor", "provision", "dateTime", "meta", "id",
           "extension", "contained", "occurrenceDateTime", "enteredDate", "supportingInformation", "content"]


def _entries(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict) and value.get("resourceType") == "Bundle":
        return [e["resource"] for e in value.get("entry") or () if isinstance(e, dict)
                and isinstance(e.get("resource"), dict)]
    return [value] if isinstance(value, dict) else []


@st.composite
def prefetch_mutations(draw: st.DrawFn, hook: str) -> dict[str, Any]:
    body = copy.deepcopy(REQUESTS[hook])
    prefetch = body["prefetch"]
    keys = sorted(prefetch)
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(keys))
        action = draw(st.sampled_from(["wrong-type", "junk", "null", "drop", "append-junk-entry",
                                       "append-other", "mutate-field", "mutate-field", "mutate-field"]))
        if action == "wrong-type":
            prefetch[key] = draw(other_resources)
        elif action == "junk":
            prefetch[key] = draw(json_values)
        elif action == "null":
            prefetch[key] = None
        elif action == "drop":
            prefetch.pop(key, None)
        elif action in ("append-junk-entry", "append-other"):
            value = prefetch.get(key)
            if isinstance(value, dict) and value.get("resourceType") == "Bundle":
                entry = draw(json_values) if action == "append-junk-entry" else {"resource": draw(other_resources)}
                value.setdefault("entry", []).append(entry)
        else:
            candidates = _entries(prefetch.get(key))
            if candidates:
                resource = draw(st.sampled_from(candidates))
                field = draw(st.sampled_from(_FIELDS))
                values = json_values | fhir_datetimes | st.sampled_from([5, "x", [], {}, None, True])
                if resource.get("resourceType") != "Encounter":
                    values = values | partial_dates
                if field == "period" and resource.get("resourceType") != "Encounter":
                    values = values | st.fixed_dictionaries({"start": fhir_datetimes | partial_dates})
                resource[field] = draw(values)
    return body


@settings(FUZZ, max_examples=60 * SCALE)
@given(data=st.data())
def test_prefetch_with_wrong_types_and_malformed_resources(fuzz_app: Callable[..., Flask], guard: NetworkGuard,
                                                           data: st.DataObject) -> None:
    hook = data.draw(st.sampled_from(list(SERVICE_FOR_HOOK)))
    body = data.draw(prefetch_mutations(hook))
    response = timed(lambda: fuzz_app(hook).test_client().post(f"/cds-services/{SERVICE_FOR_HOOK[hook]}", json=body))
    check(response)
    # No fhirServer: data that became unusable cannot be refetched → 412; anything else is an answer.
    assert response.status_code in (200, 412), response.get_data(as_text=True)[:500]
    assert guard.attempts == []


# --- explicit hostile inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("url", POST_URLS)
def test_oversized_body_is_413(fuzz_app: Callable[..., Flask], url: str) -> None:
    app = fuzz_app()
    limit = runtime_of(app).config.server["max_body_bytes"]
    body = json.dumps({"hook": "patient-view", "hookInstance": "x", "context": {}, "pad": "x" * limit})
    response = app.test_client().post(url, data=body, content_type="application/json")
    assert response.status_code == 413
    assert check(response)["issue"][0]["code"] == "too-costly"


def test_oversized_chunked_body_is_413(fuzz_app: Callable[..., Flask]) -> None:
    app = fuzz_app()
    limit = runtime_of(app).config.server["max_body_bytes"]
    stream = io.BytesIO(b'{"pad": "' + b"x" * (limit + 10) + b'"}')
    response = app.test_client().post("/cds-services/g2250-patient-view", input_stream=stream,
                                      headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                                      environ_overrides={"wsgi.input_terminated": True})
    check(response)
    assert response.status_code == 413


@pytest.mark.parametrize("url", POST_URLS)
@pytest.mark.parametrize("shape", ["array", "object", "mixed"])
def test_json_nested_10000_deep_is_refused(fuzz_app: Callable[..., Flask], url: str, shape: str) -> None:
    depth = 10_000
    if shape == "array":
        data = "[" * depth + "]" * depth
    elif shape == "object":
        data = '{"a":' * depth + "1" + "}" * depth
    else:
        data = '{"hook":"patient-view","hookInstance":"x","context":' + '{"a":[' * (depth // 2) + "1" \
               + "]}" * (depth // 2) + "}"
    response = fuzz_app().test_client().post(url, data=data, content_type="application/json")
    assert response.status_code in (400, 413), response.status_code
    check(response)


def _determinations(body: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    return [(c["extension"]["g2250-cds.determination"]["status"],
             {k["id"]: k["status"] for k in c["extension"]["g2250-cds.determination"]["criteria"]})
            for c in body["cards"]]


MALFORMED_OF_TYPE = {
    "Encounter": {"status": 5, "period": "x", "class": "VR", "futureElement": True},
    "Communication": {"status": "completed", "sent": "x", "payload": "not a list"},
    "Coverage": {"status": "active", "beneficiary": "Patient/x", "payor": 7},
    "Consent": {"status": ["active"], "scope": None},
    "PractitionerRole": {"practitioner": {"reference": 5}, "code": "pt"},
    "Schedule": {"actor": "Practitioner/x"},
    "ChargeItem": {"status": "billable", "code": 1},
    "Organization": {"name": {"text": "x"}},
    "Practitioner": {"name": "not a list", "active": "maybe"},
}


@pytest.mark.parametrize("hook", list(SERVICE_FOR_HOOK))
def test_one_malformed_resource_per_bundle_leaves_the_answer_unchanged(fuzz_app: Callable[..., Flask],
                                                                       guard: NetworkGuard, hook: str) -> None:
    """Per-resource tolerance: every prefetched Bundle gains a malformed resource of its own type (and a junk
    entry); the malformed resources are skipped one by one and the determination stays what it was."""
    client = fuzz_app(hook).test_client()
    url = f"/cds-services/{SERVICE_FOR_HOOK[hook]}"
    baseline = client.post(url, json=REQUESTS[hook])
    assert baseline.status_code == 200
    assert baseline.get_json()["cards"], "the worked example has a card"
    body = copy.deepcopy(REQUESTS[hook])
    touched = 0
    for value in body["prefetch"].values():
        if not (isinstance(value, dict) and value.get("resourceType") == "Bundle"):
            continue
        types = {r["resourceType"] for r in _entries(value)} or {"Observation"}
        for resource_type in sorted(types):
            bad = {"resourceType": resource_type, "id": f"malformed-{touched}",
                   **MALFORMED_OF_TYPE.get(resource_type, {"status": 5, "code": "x", "subject": 7})}
            assert parse_resource(bad)[2] is not None, f"{resource_type}: not malformed enough to be skipped"
            value.setdefault("entry", []).extend([{"resource": bad}, {"resource": "junk"}, 42])
            touched += 1
    assert touched >= 5
    response = client.post(url, json=body)
    check(response)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    assert _determinations(response.get_json()) == _determinations(baseline.get_json())
    assert guard.attempts == []


@pytest.mark.parametrize("hook", ["encounter-discharge", "encounter-start"])
def test_wrong_resource_type_for_the_encounter_key_is_no_encounter(fuzz_app: Callable[..., Flask], hook: str) -> None:
    """A Coverage where the Encounter is expected: it is not taken for the encounter (no card, no crash)."""
    body = copy.deepcopy(REQUESTS[hook])
    coverage = copy.deepcopy(_entries(body["prefetch"]["coverages"])[0])
    body["prefetch"]["encounter"] = coverage
    body["prefetch"]["encounters"]["entry"] = [e for e in body["prefetch"]["encounters"]["entry"]
                                               if e["resource"]["id"] != body["context"]["encounterId"]]
    response = fuzz_app(hook).test_client().post(f"/cds-services/{SERVICE_FOR_HOOK[hook]}", json=body)
    assert check(response) == {"cards": []}


@pytest.mark.parametrize("hook", list(SERVICE_FOR_HOOK))
def test_malformed_resource_instead_of_a_bundle_is_handled(fuzz_app: Callable[..., Flask], hook: str) -> None:
    """Malformed or wrong-type prefetch values: without a fhirServer to refetch from, 412 or an answer."""
    for key in REQUESTS[hook]["prefetch"]:
        for replacement in (_OTHER_RESOURCES[7], [1, 2], "Bundle", {"entry": []}):
            body = copy.deepcopy(REQUESTS[hook])
            body["prefetch"][key] = copy.deepcopy(replacement)
            response = fuzz_app(hook).test_client().post(f"/cds-services/{SERVICE_FOR_HOOK[hook]}", json=body)
            check(response)
            assert response.status_code in (200, 412), (key, replacement, response.status_code)


# --- known bugs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/cds-services//g2250-patient-view"),
    ("POST", "/cds-services/g2250-patient-view//feedback"),
])
def test_double_slash_answers_with_an_operation_outcome(fuzz_app: Callable[..., Flask], method: str,
                                                        path: str) -> None:
    response = fuzz_app().test_client().open(path, method=method, json={})
    check(response, method=method)


def _raw_with_surrogate(hook: str, where: str) -> str:
    body = copy.deepcopy(REQUESTS[hook])
    marker = "SURROGATE-MARKER"
    if where == "context.patientId":
        body["context"]["patientId"] = marker
    elif where == "context.userId":
        body["context"]["userId"] = f"Practitioner/{marker}"
    elif where == "context.encounterId":
        body["context"]["encounterId"] = marker
    return json.dumps(body).replace(marker, "\\ud800")


@pytest.mark.parametrize("where", ["context.patientId", "context.userId", "context.encounterId"])
def test_lone_surrogate_in_the_context_is_400_not_500(fuzz_app: Callable[..., Flask], where: str) -> None:
    response = fuzz_app().test_client().post("/cds-services/g2250-encounter-discharge",
                                             data=_raw_with_surrogate("encounter-discharge", where),
                                             content_type="application/json")
    check(response)


@pytest.mark.parametrize("field", ["card", "userComment"])
def test_lone_surrogate_in_feedback_is_400_not_500(fuzz_app: Callable[..., Flask], field: str) -> None:
    item: dict[str, Any] = {"card": "c-1", "outcome": "overridden", "outcomeTimestamp": "2026-11-30T15:10:00Z",
                            "overrideReason": {"userComment": "ok"}}
    if field == "card":
        item["card"] = "MARKER"
    else:
        item["overrideReason"]["userComment"] = "MARKER"
    data = json.dumps({"feedback": [item]}).replace("MARKER", "\\udc00")
    response = fuzz_app().test_client().post("/cds-services/g2250-patient-view/feedback", data=data,
                                             content_type="application/json")
    check(response, kind="feedback")


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("where", ["unknown-element", "extension"])
def test_json_nested_below_the_recursion_limit_inside_a_resource(fuzz_app: Callable[..., Flask], where: str) -> None:
    body = copy.deepcopy(REQUESTS["encounter-discharge"])
    if where == "unknown-element":
        body["prefetch"]["encounter"]["futureElement"] = _nested(700)
    else:
        body["prefetch"]["encounter"]["extension"] = [{"url": "http://example.org/x", "extension": [_nested(700)]}]
    response = fuzz_app().test_client().post("/cds-services/g2250-encounter-discharge", json=body)
    check(response)
    assert response.status_code in (200, 400, 413)


@pytest.mark.parametrize("value", ["2026-11-18", "2026-11", "2026", "2026-11-18T10:00:60-05:00"])
def test_partial_date_in_the_encounter_period_is_handled(fuzz_app: Callable[..., Flask], value: str) -> None:
    body = copy.deepcopy(REQUESTS["encounter-discharge"])
    body["prefetch"]["encounter"]["period"] = {"start": value}
    response = fuzz_app().test_client().post("/cds-services/g2250-encounter-discharge", json=body)
    check(response)
    assert response.status_code == 200


@pytest.mark.parametrize(("key", "field", "value"), [
    ("consents", "dateTime", "0001-01-01T00:00:00Z"),
    ("coverages", "period", "0001-01-01T00:00:00Z"),
    ("communications", "sent", "0001-01-01T00:00:00Z"),
    ("communications", "received", "0001-01-01"),
    ("encounters", "period", "9999-12-31T23:59:59-12:00"),
])
def test_edge_of_range_datetimes_are_handled(fuzz_app: Callable[..., Flask], key: str, field: str,
                                             value: str) -> None:
    body = copy.deepcopy(REQUESTS["encounter-discharge"])
    for resource in _entries(body["prefetch"][key]):
        if field == "period":
            resource["period"] = {"start": value}
        else:
            resource[field] = value
    response = fuzz_app().test_client().post("/cds-services/g2250-encounter-discharge", json=body)
    check(response)


def test_far_future_follow_up_answers_within_the_deadline(make_config: Callable[..., Config],
                                                          guard: NetworkGuard) -> None:
    now = datetime.fromisoformat(NOW_OF_REQUEST["encounter-discharge"])
    app = create_app(make_config({"deadline_seconds": 0.5}), clock=lambda: now)
    try:
        body = copy.deepcopy(REQUESTS["encounter-discharge"])
        for resource in _entries(body["prefetch"]["communications"]):
            if resource.get("sender", {}).get("reference", "").startswith("Practitioner/"):
                resource["sent"] = "5000-01-01T10:00:00Z"
        started = time.monotonic()
        response = app.test_client().post("/cds-services/g2250-encounter-discharge", json=body)
        elapsed = time.monotonic() - started
        check(response)
        assert elapsed <= 0.5 + 0.1, f"{elapsed:.2f} s"
    finally:
        runtime_of(app).close()


@pytest.mark.postgres
@pytest.mark.parametrize("item", [
    {"overrideReason": {"reason": {"system": "https://x", "code": "c" * 200}}},
    {"overrideReason": {"reason": {"code": "c", "display": "d" * 600}}},
    {"overrideReason": {"reason": {"code": "c", "system": "s" * 300}}},
    {"card": "nul\u0000card"},
    {"overrideReason": {"userComment": "a\u0000b"}},
], ids=["long-code", "long-display", "long-system", "nul-card", "nul-comment"])
def test_feedback_values_the_postgresql_columns_cannot_hold(make_config: Callable[..., Config], postgres_url: str,
                                                            item: dict[str, Any]) -> None:
    app = create_app(make_config({"database_url": postgres_url}))
    try:
        feedback = {"card": "c-1", "outcome": "overridden", "outcomeTimestamp": "2026-11-30T15:10:00Z", **item}
        response = app.test_client().post("/cds-services/g2250-patient-view/feedback", json={"feedback": [feedback]})
        check(response, kind="feedback")
    finally:
        runtime_of(app).close()


# -- the request schema's quick check agrees with jsonschema --

_REQUEST_KEYS = ("hook", "hookInstance", "fhirServer", "fhirAuthorization", "context", "prefetch", "extension")
_AUTH_KEYS = ("access_token", "token_type", "expires_in", "scope", "subject", "patient")
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from(["", "x", "Bearer", "bEaReR", "bearer ", "https://fhir.example.org/r4",
                                      "http://a b", "ftp://x", "h" * 257, "https://" + "x" * 2050]))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(["a", "b"]), inner,
                                                                       max_size=2)), max_leaves=5)


_auth = st.fixed_dictionaries(
    {"access_token": st.one_of(st.just("t0k"), _scalars), "token_type": st.one_of(st.just("Bearer"), _scalars)},
    optional={"expires_in": st.one_of(st.sampled_from([0, 300, -1, 0.5, -0.0]), _scalars),
              **{k: _scalars for k in ("scope", "subject", "patient")}})
_near_valid = st.fixed_dictionaries(
    {"hook": st.one_of(st.just("patient-view"), _scalars), "hookInstance": st.one_of(st.just("abc"), _scalars),
     "context": st.one_of(st.just({"patientId": "1"}), _json)},
    optional={"fhirServer": st.one_of(st.just("https://fhir.example.org/r4"), _scalars),
              "fhirAuthorization": st.one_of(_auth, _json), "prefetch": st.one_of(st.none(), st.just({}), _json),
              "extension": st.one_of(st.just({}), _json)})


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    _json,
    _near_valid,
    st.dictionaries(st.sampled_from(_REQUEST_KEYS), st.one_of(
        _json, st.dictionaries(st.sampled_from(_AUTH_KEYS), _json, max_size=6)), max_size=7),
))
def test_request_quick_check_agrees_with_jsonschema(document: Any) -> None:
    from cds_service.web import schemas

    quick = schemas._quick_check("cds-request")
    assert quick is not None  # the request schema stays within the keywords the quick check knows
    assert quick(document) == schemas._validator("cds-request").is_valid(document)
