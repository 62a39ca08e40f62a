"""Hook calls are answered in plain WSGI (``cds_service.app.HookCalls``, issue 13) exactly as Flask's route answers
them: the same status, body and headers, the same log line and metrics, for answers and for every kind of error.

Two doors to one call: without an ``Origin`` header a hook call takes the plain path; with one (a browser's call,
which needs flask-cors' headers) it goes to Flask's route. Every comparison below sends the same request through
both and checks which door answered it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from prometheus_client import REGISTRY

from cds_service.app import HookCalls, create_app, runtime_of
from cds_service.config import Config

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = {path.stem: path.read_bytes() for path in sorted((ROOT / "fhir_fixtures" / "requests").glob("*.json"))}
NOW = datetime.fromisoformat("2026-11-18T15:40:00-05:00")
ORIGIN = {"Origin": "https://ehr.example.org"}
JSON = {"Content-Type": "application/json", "X-Request-Id": "door-test-1"}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def lines() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger("g2250_cds")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _counting_doors(app: Flask, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``app`` and the paths of the calls its plain path answered itself."""
    assert isinstance(app.wsgi_app, HookCalls)
    answered: list[str] = []
    plain = HookCalls._answer

    def counting(self: HookCalls, environ: dict[str, Any], *args: Any) -> Any:
        answered.append(environ["PATH_INFO"])
        return plain(self, environ, *args)

    monkeypatch.setattr(HookCalls, "_answer", counting)
    return {"app": app, "answered": answered}


@pytest.fixture
def doors(make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """An app at the fixtures' clock, and a count of the calls the plain path answered itself."""
    app = create_app(make_config(), clock=lambda: NOW)
    yield _counting_doors(app, monkeypatch)
    runtime_of(app).close()


def _request_line(handler: _Lines) -> dict[str, Any]:
    fields = [vars(r) for r in handler.records if r.getMessage() == "request"]
    assert len(fields) == 1, [r.getMessage() for r in handler.records]
    keep = ("event", "request_id", "method", "route", "status", "service", "hook", "cards", "fhir_requests",
            "waves", "prefetch_hits", "skipped_resources")
    return {k: fields[0][k] for k in keep if k in fields[0]}


def _count(service: str, status: int) -> float:
    return REGISTRY.get_sample_value("g2250_hook_duration_seconds_count",
                                     {"service": service, "status": str(status)}) or 0.0


def _through_both(doors: dict[str, Any], lines: _Lines, path: str, body: bytes,
                  headers: dict[str, str] | None = None) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    client = doors["app"].test_client()
    headers = {**JSON, **(headers or {})}
    logging.getLogger("g2250_cds").setLevel(logging.INFO)  # create_app set the config's level (WARNING)
    before = len(doors["answered"])
    lines.records.clear()
    plain = client.post(path, data=body, headers=headers)
    plain_line = _request_line(lines)
    assert len(doors["answered"]) == before + 1, "the plain path did not answer the call without Origin"
    lines.records.clear()
    routed = client.post(path, data=body, headers={**headers, **ORIGIN})
    routed_line = _request_line(lines)
    assert len(doors["answered"]) == before + 1, "a browser's call must go to Flask's route (CORS)"
    return plain, routed, plain_line, routed_line


def _same(plain: Any, routed: Any, plain_line: dict[str, Any], routed_line: dict[str, Any]) -> None:
    assert plain.status_code == routed.status_code
    assert plain.get_data() == routed.get_data()
    for header in ("Content-Type", "X-Request-Id", "WWW-Authenticate", "Retry-After"):
        assert plain.headers.get(header) == routed.headers.get(header), header
    assert "Access-Control-Allow-Origin" not in plain.headers
    assert routed.headers.get("Access-Control-Allow-Origin")  # flask-cors answered the browser's call
    assert plain_line == routed_line


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_every_fixture_call_is_answered_alike_through_both_doors(doors: dict[str, Any], lines: _Lines,
                                                                  name: str) -> None:
    body = REQUESTS[name]
    service = {"patient-view": "g2250-patient-view", "patient-view-no-encounter": "g2250-patient-view",
               "encounter-start": "g2250-encounter-start", "encounter-discharge": "g2250-encounter-discharge",
               "appointment-book": "g2250-appointment-book"}[name]
    counted = _count(service, 200)
    plain, routed, plain_line, routed_line = _through_both(doors, lines, f"/cds-services/{service}", body)
    assert plain.status_code == 200 and "cards" in plain.get_json(), plain.get_data()
    assert plain.headers["Content-Length"] == str(len(plain.get_data()))
    assert plain_line["status"] == 200 and plain_line["request_id"] == "door-test-1"
    _same(plain, routed, plain_line, routed_line)
    assert _count(service, 200) == counted + 2  # each door counted its call once


@pytest.mark.parametrize("body, status", [
    (b"{", 400),                                   # not JSON
    (b'{"hook": "encounter-discharge"}', 400),     # not a hook request (schema)
    (b"[1, 2]", 400),                              # not an object
    (b'{"a": NaN}', 400),                          # refused by both decoders
])
def test_bad_bodies_are_refused_alike(doors: dict[str, Any], lines: _Lines, body: bytes, status: int) -> None:
    plain, routed, plain_line, routed_line = _through_both(doors, lines, "/cds-services/g2250-encounter-discharge",
                                                           body)
    assert plain.status_code == status
    assert plain.get_json(force=True)["resourceType"] == "OperationOutcome"
    _same(plain, routed, plain_line, routed_line)


def test_an_empty_body_of_declared_length_zero_is_refused_alike(doors: dict[str, Any]) -> None:
    client = doors["app"].test_client()
    path = "/cds-services/g2250-encounter-discharge"
    plain = client.post(path, data=b"", headers=JSON, environ_overrides={"CONTENT_LENGTH": "0"})
    assert doors["answered"] == [path]
    routed = client.post(path, data=b"", headers={**JSON, **ORIGIN}, environ_overrides={"CONTENT_LENGTH": "0"})
    assert plain.status_code == routed.status_code == 400 and plain.get_data() == routed.get_data()


def test_a_call_without_its_data_is_a_412_alike(doors: dict[str, Any], lines: _Lines) -> None:
    request = json.loads(REQUESTS["encounter-discharge"])
    del request["prefetch"]  # and no fhirServer: the data cannot be had
    request.pop("fhirServer", None)
    plain, routed, plain_line, routed_line = _through_both(
        doors, lines, "/cds-services/g2250-encounter-discharge", json.dumps(request).encode())
    assert plain.status_code == 412
    _same(plain, routed, plain_line, routed_line)


def test_an_unexpected_error_is_the_same_500(doors: dict[str, Any], lines: _Lines,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(runtime_of(doors["app"]), "invoke", broken)
    plain, routed, plain_line, routed_line = _through_both(doors, lines, "/cds-services/g2250-patient-view",
                                                           REQUESTS["patient-view"])
    assert plain.status_code == 500
    assert "a bug" not in plain.get_data(as_text=True)
    _same(plain, routed, plain_line, routed_line)
    lines.records.clear()
    doors["app"].test_client().post("/cds-services/g2250-patient-view", data=REQUESTS["patient-view"],
                                    headers=JSON)
    errors = [r for r in lines.records if r.getMessage() == "unhandled error"]
    assert len(errors) == 1 and errors[0].error_type == "RuntimeError" and errors[0].request_id == "door-test-1"


def test_authentication_is_the_same_on_both_doors(make_config: Callable[..., Config], lines: _Lines,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_auth_http import auth_config, epic_token

    app = create_app(auth_config(make_config), clock=lambda: NOW)
    doors = _counting_doors(app, monkeypatch)
    answered = doors["answered"]
    try:
        path = "/cds-services/g2250-encounter-discharge"
        failures = REGISTRY.get_sample_value("g2250_auth_failures_total") or 0.0
        plain, routed, plain_line, routed_line = _through_both(doors, lines, path, REQUESTS["encounter-discharge"])
        assert plain.status_code == 401 and plain.get_data() == b""
        _same(plain, routed, plain_line, routed_line)
        assert (REGISTRY.get_sample_value("g2250_auth_failures_total") or 0.0) == failures + 2
        # A valid token is taken on the plain path (a new one each time: a jti is used once).
        client = app.test_client()
        answered.clear()
        ok = client.post(path, data=REQUESTS["encounter-discharge"],
                         headers={**JSON, "Authorization": f"Bearer {epic_token()}"})
        assert answered == [path]
        assert ok.status_code in (200, 403), ok.get_data()  # the fixture's fhirServer may not be this client's
        again = client.post(path, data=REQUESTS["encounter-discharge"],
                            headers={**JSON, "Authorization": f"Bearer {epic_token()}", **ORIGIN})
        assert again.status_code == ok.status_code and again.get_data() == ok.get_data()
    finally:
        runtime_of(app).close()


def test_what_the_plain_path_leaves_to_flask_is_answered_there(doors: dict[str, Any]) -> None:
    app: Flask = doors["app"]
    client = app.test_client()
    path = "/cds-services/g2250-encounter-discharge"
    body = REQUESTS["encounter-discharge"]
    assert client.post(path, data=body, headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.get(path).status_code == 405
    assert client.post("/cds-services/no-such-service", data=body, headers=JSON).status_code == 404
    assert client.post(path + "/feedback", data=b'{"feedback": []}', headers=JSON).status_code in (200, 400)
    app.config["MAX_CONTENT_LENGTH"] = 100
    assert client.post(path, data=body, headers=JSON).status_code == 413
    assert doors["answered"] == []  # every one of them went to Flask
