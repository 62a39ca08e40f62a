"""PHI-safe logs: with logging at DEBUG, a run of every fixture scenario leaves no token, id or name in the logs."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from importlib import resources
from typing import Any

import pytest

from cds_service.app import create_app, runtime_of
from cds_service.config import Config
from cds_service.logs import JsonFormatter
from tests.support.fhir_server import FhirServer
from tests.test_integration_fhir import SERVICE_FOR_HOOK, hook_request, scenarios


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Everything any logger writes at DEBUG, formatted as our JSON lines and as plain text."""
    stream = io.StringIO()
    json_handler = logging.StreamHandler(stream)
    json_handler.setFormatter(JsonFormatter())
    text_handler = logging.StreamHandler(stream)
    text_handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(args)s"))
    root = logging.getLogger()
    ours = logging.getLogger("g2250_cds")
    saved = (root.level, ours.level)
    root.setLevel(logging.DEBUG)
    for handler in (json_handler, text_handler):
        root.addHandler(handler)
        ours.addHandler(handler)
    try:
        yield stream
    finally:
        for handler in (json_handler, text_handler):
            root.removeHandler(handler)
            ours.removeHandler(handler)
        root.setLevel(saved[0])
        ours.setLevel(saved[1])


def _secrets_of_fixtures() -> set[str]:
    """Ids of every patient, encounter and practitioner, and every patient's names."""
    found: set[str] = set()
    folder = resources.files("fhir_fixtures")
    for entry in folder.iterdir():
        if not entry.name.endswith(".json") or entry.name == "scenarios.json":
            continue
        bundle = json.loads(entry.read_text("utf-8"))
        for item in bundle.get("entry", []):
            resource = item["resource"]
            if resource["resourceType"] in ("Patient", "Encounter", "Practitioner", "RelatedPerson"):
                found.add(resource["id"])
            for name in resource.get("name", []) if resource["resourceType"] in ("Patient", "RelatedPerson") else []:
                found.update(n for n in name.get("given", []) if len(n) > 3)
                if len(name.get("family", "")) > 3:
                    found.add(name["family"])
    return found


@pytest.mark.integration
def test_no_phi_or_tokens_in_debug_logs(make_config: Callable[..., Config], loaded_fhir: FhirServer,
                                        captured_logs: io.StringIO) -> None:
    apps = []
    for item in scenarios():
        config = make_config({"fhir": {"allowed_servers": [loaded_fhir.base_url]},
                              "logging": {"level": "DEBUG", "format": "json"}})
        app = create_app(config, clock=lambda item=item: datetime.fromisoformat(item["now"]))
        apps.append(app)
        response = app.test_client().post(f"/cds-services/{SERVICE_FOR_HOOK[item['hook']]}",
                                          json=hook_request(item, loaded_fhir))
        assert response.status_code == 200
        card_uuids = [c["uuid"] for c in response.get_json()["cards"]]
        if card_uuids:
            app.test_client().post(f"/cds-services/{SERVICE_FOR_HOOK[item['hook']]}/feedback", json={"feedback": [
                {"card": card_uuids[0], "outcome": "overridden", "outcomeTimestamp": "2026-12-01T10:00:00Z",
                 "overrideReason": {"userComment": f"patient {item['context']['patientId']} said so"}}]})
    logs = captured_logs.getvalue()
    assert '"hook"' in logs and "request" in logs  # the structured lines are there
    leaked = sorted(s for s in _secrets_of_fixtures() | {loaded_fhir.token or "no-token"} if s in logs)
    assert leaked == [], leaked[:10]
    assert "Bearer" not in logs and "access_token" not in logs
    for app in apps:
        runtime_of(app).close()


class _RecordingListener:
    """A TCP listener that only counts connections (an internal address an attacker would like us to call)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.mark.parametrize("server", [
    "http://127.0.0.1:{port}/fhir",
    "http://localhost:{port}/fhir",
    "http://127.0.0.1:{port}/fhir/../other",
    "http://127.0.0.1:{port}@evil.example/fhir",
])
def test_fhir_server_off_the_allowlist_is_never_contacted(make_config: Callable[..., Config], server: str) -> None:
    listener = _RecordingListener()
    try:
        allowed = f"http://127.0.0.1:{listener.port + 1 if listener.port < 65535 else 1}/fhir"
        app = create_app(make_config({"fhir": {"allowed_servers": [allowed]}}))
        body: dict[str, Any] = {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p1"},
                                "fhirServer": server.format(port=listener.port)}
        response = app.test_client().post("/cds-services/g2250-patient-view", json=body)
        assert response.status_code == 403
        assert response.get_json(force=True)["issue"][0]["expression"] == ["fhirServer"]
        assert listener.connections == 0
        runtime_of(app).close()
    finally:
        listener.close()


def test_the_request_line_written_straight_is_the_one_logging_writes() -> None:
    """``logs.request_line`` writes, without a LogRecord, the line the JSON formatter writes for the record; any
    other set-up of the logger (another handler, a filter, text format) gets the record itself."""
    import io
    import logging

    from cds_service.logs import JsonFormatter, TextFormatter, request_line

    logger = logging.getLogger("g2250_cds.test-request-line")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler._g2250 = True  # type: ignore[attr-defined]  # as configure_logging marks its own
    handler.setFormatter(JsonFormatter())
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    fields = {"event": "http", "request_id": "r1", "method": "POST", "route": "/cds-services/<service_id>",
              "status": 200, "duration_ms": 1.5, "service": "s", "hook": "h", "cards": 1, "fhir_requests": 0,
              "waves": 1, "prefetch_hits": 3, "skipped_resources": 0, "patient": "never logged", "big": 2**70}
    request_line(logger, fields)
    logger.info("request", extra=fields)
    straight, recorded = (json.loads(line) for line in stream.getvalue().splitlines())
    assert straight.pop("ts")[:4] == recorded.pop("ts")[:4]
    assert list(straight.items()) == list(recorded.items())  # same fields, same order
    assert "patient" not in straight and "big" not in straight

    caught: list[logging.LogRecord] = []
    other = logging.Handler()
    other.emit = caught.append  # type: ignore[method-assign]
    for setup in ("second handler", "filter", "text"):
        logger.handlers = [handler, other] if setup == "second handler" else [handler]
        logger.filters = [lambda record: True] if setup == "filter" else []
        handler.setFormatter(TextFormatter() if setup == "text" else JsonFormatter())
        before = len(stream.getvalue())
        request_line(logger, fields)
        assert stream.getvalue()[before:].strip(), setup  # still written, through logging
    assert len(caught) == 1 and caught[0].status == 200  # the second handler got the record

    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("gone")

    logger.handlers, logger.filters = [handler], []
    handler.setFormatter(JsonFormatter())
    handler.setStream(Broken())
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        request_line(logger, fields)  # reported by logging's handleError, never raised into the hook call
    finally:
        logging.raiseExceptions = raise_exceptions
