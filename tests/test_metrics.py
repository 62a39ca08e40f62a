"""Metrics that add up: over a mixed run, the Prometheus series equal the sums of the request log lines.

Every hook call is one log line (``event: http``, route ``/cds-services/<service_id>``, method other than OPTIONS)
and one observation of ``g2250_hook_duration_seconds{service,status}`` with its final status — answered (200, 412,
503, 500) or refused before the runtime (400, 401, 403, 404, 405, 413, 415). ``g2250_fhir_requests_total`` and
``g2250_fhir_waves_total`` equal the sums of the lines' ``fhir_requests`` and ``waves`` whatever the outcome, and
``g2250_feedback_total`` equals the rows in the feedback table (an idempotent repeat adds nothing).

Run twice: in process (Flask test client, metric deltas over the process registry), and through a real
``g2250-cds serve`` with two gunicorn workers (multi-process metrics from ``/metrics``, log lines from stderr).
FHIR data comes from :class:`FaultyFhir`, a stand-in FHIR server in a process of its own, whose faults give 412s
after some FHIR requests.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from jwt.algorithms import ECAlgorithm
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cds_service.app import create_app, runtime_of
from cds_service.config import Config
from cds_service.journal import JournalFull
from cds_service.logs import JsonFormatter
from cds_service.store import FeedbackStore, StoreUnavailable
from tests.support.faulty_fhir import FaultyFhir
from tests.support.served import stop_process_group, wait_ready

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = {path.stem: json.loads(path.read_text("utf-8"))
            for path in sorted((ROOT / "fhir_fixtures" / "requests").glob("*.json"))}
SERVICE_FOR_HOOK = {
    "patient-view": "g2250-patient-view",
    "encounter-start": "g2250-encounter-start",
    "encounter-discharge": "g2250-encounter-discharge",
    "appointment-book": "g2250-appointment-book",
}
HOOK_ROUTE = "/cds-services/<service_id>"
DISCHARGE_URL = "/cds-services/g2250-encounter-discharge"
UNKNOWN_ID = "no-such-service-" + uuid.uuid4().hex[:8]  # must never reach a label or a log line
DEADLINE = 1.0


def _fixture(name: str) -> dict[str, Any]:
    return json.loads(resources.files("fhir_fixtures").joinpath(name).read_text("utf-8"))


SCENARIO = next(s for s in _fixture("scenarios.json") if s["id"] == "s01-pt-billable")
NOW = datetime.fromisoformat(SCENARIO["now"])


# -- the ledger: log lines and metric samples ----------------------------------------------------------------------
def http_lines(text: str) -> list[dict[str, Any]]:
    """The request lines (``event: http``) among the JSON lines of a log (other lines, gunicorn's, are skipped)."""
    lines = []
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw.startswith("{"):
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if line.get("event") == "http":
            lines.append(line)
    return lines


def hook_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The hook calls: a service's URL, whatever the method or the outcome; CORS preflights are no calls."""
    return [line for line in lines if line.get("route") == HOOK_ROUTE and line.get("method") != "OPTIONS"]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def minus(after: Samples, before: Samples) -> Samples:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def series(values: Samples, name: str, *labels: str) -> Counter[tuple[str, ...]]:
    """``name``'s samples summed by ``labels`` (zero sums dropped)."""
    sums: Counter[tuple[str, ...]] = Counter()
    for (sample, label_items), value in values.items():
        if sample == name:
            label_map = dict(label_items)
            sums[tuple(label_map.get(label, "") for label in labels)] += value
    return Counter({key: value for key, value in sums.items() if value})


def assert_adds_up(lines: list[dict[str, Any]], metrics: Samples, feedback_rows: int) -> Counter[tuple[str, str]]:
    """The metrics equal the sums of the log lines; returns the calls by (service, status)."""
    calls = hook_lines(lines)
    by_status: Counter[tuple[str, str]] = Counter((line["service"], str(line["status"])) for line in calls)
    assert series(metrics, "g2250_hook_duration_seconds_count", "service", "status") == by_status
    fhir: Counter[tuple[str, ...]] = Counter()
    waves: Counter[tuple[str, ...]] = Counter()
    cards: Counter[tuple[str, ...]] = Counter()
    for line in calls:
        fhir[(line["service"],)] += line.get("fhir_requests", 0)
        waves[(line["service"],)] += line.get("waves", 0)
        cards[(line["service"],)] += line.get("cards", 0)
    assert series(metrics, "g2250_fhir_requests_total", "service") == +fhir
    assert series(metrics, "g2250_fhir_waves_total", "service") == +waves
    assert series(metrics, "g2250_cards_total", "service") == +cards  # cards answered (none on a 503)
    assert sum(series(metrics, "g2250_feedback_total", "outcome").values()) == feedback_rows
    for line in lines:  # PHI-free and bounded: no raw path, no id from the caller
        assert UNKNOWN_ID not in json.dumps(line)
        assert set(line) <= {"ts", "level", "logger", "msg", "event", "request_id", "method", "route", "status",
                             "duration_ms", "service", "hook", "cards", "fhir_requests", "waves", "prefetch_hits",
                             "skipped_resources"}
    return by_status


# -- the mixed run -------------------------------------------------------------------------------------------------
Post = Callable[..., int]


def _feedback_item(card: str, outcome: str) -> dict[str, Any]:
    item: dict[str, Any] = {"card": card, "outcome": outcome, "outcomeTimestamp": "2026-11-18T16:00:00Z"}
    if outcome == "accepted":
        item["acceptedSuggestions"] = [{"id": "suggestion-uuid-1"}]
    else:
        item["overrideReason"] = {"reason": {"system": "https://g2250-cds.example.org/override-reason",
                                             "code": "unrelated-visit", "display": "Visit was unrelated"}}
    return item


def by_fhir_server(fhir: FaultyFhir) -> dict[str, Any]:
    """Scenario s01's discharge with no prefetch: every resource is asked of the stand-in."""
    return {"hook": SCENARIO["hook"], "hookInstance": str(uuid.uuid4()), "fhirServer": fhir.base_url,
            "context": SCENARIO["context"],
            "fhirAuthorization": {"access_token": "t-" + uuid.uuid4().hex, "token_type": "Bearer",
                                  "expires_in": 300, "scope": "user/*.read", "subject": "g2250-cds"}}


def mixed_run(post: Post, fhir: FaultyFhir, *, max_body_bytes: int) -> dict[str, int]:
    """The mixed sequence; ``post(method, path, json=..., data=..., content_type=...)`` returns the status.
    Returns how many of each kind were sent (asserted statuses)."""
    sent: Counter[str] = Counter()

    def expect(status: int, method: str, path: str, **kwargs: Any) -> None:
        got = post(method, path, **kwargs)
        assert got == status, (method, path, got, status)
        sent[str(status)] += 1

    # Valid calls by prefetch, every hook.
    for body in REQUESTS.values():
        expect(200, "POST", f"/cds-services/{SERVICE_FOR_HOOK[body['hook']]}", json=body)
    # Through the FHIR server: answered, then 412 after some requests (a required type failing, the whole server
    # failing), then the deadline.
    fhir.set_mode("ok")
    expect(200, "POST", DISCHARGE_URL, json=by_fhir_server(fhir))
    fhir.override("Coverage", "status", status=500)
    expect(412, "POST", DISCHARGE_URL, json=by_fhir_server(fhir))
    fhir.clear_overrides()
    fhir.override("Encounter", "status", status=404)
    expect(412, "POST", DISCHARGE_URL, json=by_fhir_server(fhir))
    fhir.clear_overrides()
    fhir.set_mode("status", status=500)
    expect(412, "POST", DISCHARGE_URL, json=by_fhir_server(fhir))
    fhir.set_mode("slow", delay=DEADLINE * 3)
    expect(412, "POST", DISCHARGE_URL, json=by_fhir_server(fhir))
    fhir.set_mode("ok")
    # Refused: bad JSON, a bad context, too large, wrong type, unknown service, fhirServer not allowed, wrong method.
    discharge = REQUESTS["encounter-discharge"]
    expect(400, "POST", DISCHARGE_URL, data=b"{not json", content_type="application/json")
    expect(400, "POST", DISCHARGE_URL, json={**discharge, "context": {}})
    expect(400, "POST", DISCHARGE_URL, json={**discharge, "hook": "patient-view"})
    expect(413, "POST", DISCHARGE_URL, data=b'{"x":"' + b"a" * max_body_bytes + b'"}',
           content_type="application/json")
    expect(415, "POST", DISCHARGE_URL, data=json.dumps(discharge).encode(), content_type="text/plain")
    expect(404, "POST", f"/cds-services/{UNKNOWN_ID}", json=discharge)
    expect(404, "POST", f"/cds-services/{UNKNOWN_ID}", data=b"{not json", content_type="application/json")
    expect(403, "POST", DISCHARGE_URL, json={**by_fhir_server(fhir), "fhirServer": "https://evil.example.org/fhir"})
    expect(405, "GET", DISCHARGE_URL)
    expect(405, "PUT", f"/cds-services/{UNKNOWN_ID}", json=discharge)
    # Not hook calls: discovery, a preflight, health.
    expect(200, "GET", "/cds-services")
    expect(200, "OPTIONS", DISCHARGE_URL, headers={"Origin": "https://sandbox.cds-hooks.org",
                                                  "Access-Control-Request-Method": "POST"})
    expect(200, "GET", "/healthz")
    # Feedback: two new items (one of them twice in the POST), then the whole POST again (an EHR's retry).
    first = [_feedback_item("card-" + uuid.uuid4().hex, "accepted"),
             _feedback_item("card-" + uuid.uuid4().hex, "overridden")]
    expect(200, "POST", f"{DISCHARGE_URL}/feedback", json={"feedback": [*first, first[0]]})
    expect(200, "POST", f"{DISCHARGE_URL}/feedback", json={"feedback": first})
    expect(404, "POST", f"/cds-services/{UNKNOWN_ID}/feedback", json={"feedback": first})
    return dict(sent)


# -- in process ----------------------------------------------------------------------------------------------------
class Capture(logging.Handler):
    """The service's log lines, formatted as in production (JSON)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def stand_in() -> Iterator[FaultyFhir]:
    with FaultyFhir([_fixture("00-practice.json"), _fixture(SCENARIO["file"])]) as fhir:
        yield fhir


@pytest.fixture
def capture() -> Iterator[Capture]:
    handler = Capture()
    logger = logging.getLogger("g2250_cds")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _flask_post(app: Flask) -> Post:
    client = app.test_client()

    def post(method: str, path: str, **kwargs: Any) -> int:
        return client.open(path, method=method, **kwargs).status_code

    return post


def _registry() -> Samples:
    return samples(generate_latest(REGISTRY).decode())


def test_in_process_the_metrics_equal_the_log_lines(make_config: Callable[..., Config], stand_in: FaultyFhir,
                                                    capture: Capture, monkeypatch: pytest.MonkeyPatch) -> None:
    max_body = 262_144
    config = make_config({"fhir": {"allowed_servers": [stand_in.base_url], "batch": "never"},
                          "deadline_seconds": DEADLINE, "logging": {"level": "INFO"},
                          "server": {"max_body_bytes": max_body}})
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1", "alg": "ES384", "use": "sig"}
    authenticated = make_config({"auth": {"required": True, "audience": "http://localhost:8250/cds-services",
                                          "clients": [{"issuer": "https://ehr.example.org", "jwks": {"keys": [jwk]},
                                                       "fhir_servers": [stand_in.base_url]}]},
                                 "logging": {"level": "INFO"}})
    before = _registry()
    app = create_app(config, clock=lambda: NOW)
    locked = create_app(authenticated, clock=lambda: NOW)
    runtime = runtime_of(app)
    try:
        sent = mixed_run(_flask_post(app), stand_in, max_body_bytes=max_body)
        post = _flask_post(app)
        # 503: the journal cannot take the determinations; 500: a fault in the service after its FHIR requests.
        with monkeypatch.context() as patch:
            patch.setattr(runtime.determination_log, "append_determinations",
                          lambda *a, **k: (_ for _ in ()).throw(JournalFull("full")))
            assert post("POST", DISCHARGE_URL, json=by_fhir_server(stand_in)) == 503
        service = runtime.service("g2250-encounter-discharge")
        handle = service.handle

        def broken(*args: Any, **kwargs: Any) -> Any:
            handle(*args, **kwargs)
            raise RuntimeError("a bug after the FHIR requests")

        with monkeypatch.context() as patch:
            patch.setattr(service, "handle", broken)
            assert post("POST", DISCHARGE_URL, json=by_fhir_server(stand_in)) == 500
        # Feedback the database cannot take now: 503, counted apart, nothing stored.
        with monkeypatch.context() as patch:
            patch.setattr(runtime.store, "record_outcomes",
                          lambda *a, **k: (_ for _ in ()).throw(StoreUnavailable("OperationalError")))
            assert post("POST", f"{DISCHARGE_URL}/feedback",
                        json={"feedback": [_feedback_item("card-x", "accepted")]}) == 503
        # 401 with authentication on: a known service and an unknown one (refused before anything else).
        locked_post = _flask_post(locked)
        assert locked_post("POST", DISCHARGE_URL, json=REQUESTS["encounter-discharge"]) == 401
        assert locked_post("POST", f"/cds-services/{UNKNOWN_ID}", json=REQUESTS["encounter-discharge"]) == 401
        metrics = minus(_registry(), before)
        rows = runtime.store.count()
    finally:
        runtime.close()
        runtime_of(locked).close()

    lines = http_lines("\n".join(capture.lines))
    by_status = assert_adds_up(lines, metrics, rows)
    assert rows == 2  # two distinct items, though five were posted
    assert sum(series(metrics, "g2250_feedback_duplicates_total", "service").values()) == 3
    assert sum(series(metrics, "g2250_feedback_unavailable_total").values()) == 1
    statuses = {status for _, status in by_status}
    assert statuses == {"200", "400", "401", "403", "404", "405", "412", "413", "415", "500", "503"}
    assert by_status[("unknown", "404")] == 2 and by_status[("unknown", "405")] == 1
    assert by_status[("unknown", "401")] == 1
    assert by_status[("g2250-encounter-discharge", "401")] == 1
    calls = hook_lines(lines)
    assert len(calls) == sum(by_status.values()) == sent["412"] + sent["400"] + sent["413"] + sent["415"] + \
        sent["403"] + sent["405"] + len(REQUESTS) + 1 + 2 + 2 + 2  # + 200 by FHIR, 404s, 503/500, 401s
    # FHIR requests made by calls that did not answer 200 are counted too (the outside check's "19 vs 0").
    refused_fhir = [line["fhir_requests"] for line in calls if line["status"] in (412, 500, 503)]
    assert len(refused_fhir) == 6 and all(n > 0 for n in refused_fhir)


# -- a real server, two workers ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``g2250-cds serve --workers 2`` in a process group of its own; JSON logs at INFO on its stderr."""

    def __init__(self, tmp_path: Path, fhir: FaultyFhir, max_body_bytes: int) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.database_url = f"sqlite:///{tmp_path / 'served.db'}"
        config = tmp_path / "served.yaml"
        config.write_text(json.dumps({
            "database_url": self.database_url,
            "journal": {"dir": str(tmp_path / "journal")},
            "logging": {"level": "INFO", "format": "json"},
            "fhir": {"allowed_servers": [fhir.base_url], "batch": "never"},
            "deadline_seconds": DEADLINE,
            "server": {"max_body_bytes": max_body_bytes},
        }), "utf-8")
        metrics_dir = tmp_path / "metrics"
        metrics_dir.mkdir()
        self.stderr = tmp_path / "served.log"
        with self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cds_service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--config", str(config), "--workers", "2"],
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, cwd=tmp_path,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                     "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        try:
            wait_ready(self.process, f"{self.base}/readyz", timeout=60, log=self.log)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.stderr.read_text("utf-8", errors="replace")

    def post(self, method: str, path: str, *, json: Any = None, data: bytes | None = None,
             content_type: str | None = None, headers: dict[str, str] | None = None) -> int:
        all_headers = dict(headers or {})
        if content_type:
            all_headers["Content-Type"] = content_type
        # A fresh connection each time: a refused body (413, 415) may close it, and both workers get calls.
        response = requests.request(method, self.base + path, json=json, data=data, headers=all_headers,
                                    timeout=30)
        return response.status_code

    def stop(self) -> None:
        stop_process_group(self.process, grace=30)


def test_served_by_two_workers_the_metrics_equal_the_log_lines(tmp_path: Path, stand_in: FaultyFhir) -> None:
    max_body = 262_144
    server = Server(tmp_path, stand_in, max_body)
    try:
        sent = mixed_run(server.post, stand_in, max_body_bytes=max_body)
        metrics = samples(requests.get(f"{server.base}/metrics", timeout=10).text)
    finally:
        server.stop()
    lines = http_lines(server.log())
    store = FeedbackStore(server.database_url)
    try:
        rows = store.count()
    finally:
        store.dispose()
    by_status = assert_adds_up(lines, metrics, rows)
    assert rows == 2
    assert sum(series(metrics, "g2250_feedback_duplicates_total", "service").values()) == 3
    assert {status for _, status in by_status} == {"200", "400", "403", "404", "405", "412", "413", "415"}
    assert by_status[("g2250-encounter-discharge", "412")] == sent["412"] == 4
    assert len({line["request_id"] for line in lines}) == len(lines)  # one line per request, none twice


def test_unknown_service_ids_share_one_label(client: Any) -> None:
    """Cardinality and PHI: whatever ids callers put in the URL, the series stay one per real service."""
    before = _registry()
    ids = [f"Patient-{n}-{uuid.uuid4().hex}" for n in range(25)]
    for service_id in ids:
        assert client.post(f"/cds-services/{service_id}", json={}).status_code == 404
    metrics = minus(_registry(), before)
    assert series(metrics, "g2250_hook_duration_seconds_count", "service", "status") == Counter(
        {("unknown", "404"): len(ids)})
    text = generate_latest(REGISTRY).decode()
    assert not any(service_id in text for service_id in ids)
