"""The FHIR fallback in one round trip whenever the server allows it (issue 13 item 3).

Against SEKMET (a real FHIR R4 server, ``Prefer: handling=strict``) loaded with fhir_fixtures/, directly and through
a stand-in proxy in a process of its own (this file run as a script) that changes what the server declares or how
it treats the look-ahead searches:

* ``declare``  — forwards everything: SEKMET's CapabilityStatement declares the includes the plan needs;
* ``plain``    — the CapabilityStatement with no ``searchInclude``/``searchRevInclude``: a server that declares none;
* ``refuse``   — declares them, but answers 400 (as ``Prefer: handling=strict`` asks for an unsupported parameter)
  to any search with ``_revinclude:iterate``;
* ``ignore``   — declares them, but drops ``_revinclude:iterate`` before SEKMET sees it (a lenient server ignoring
  it: the self link no longer shows it, FHIR R4 search.html §3.1.1.6).

The proxy counts ``GET /metadata`` and the look-ahead searches it received (``GET /__counts``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import requests
from flask import Flask

from bench.waves import doors_of
from cds_service.app import runtime_of
from cds_service.fhir.capabilities import CapabilityCache, ServerCapabilities
from cds_service.fhir.source import _honored
from cds_service.runtime import InvocationStats
from hooks import gather
from tests.support.determinations import Recorder
from tests.support.fhir_server import FhirServer, free_port
from tests.test_doors import _assert_expected, _of_assessment, _verdict
from tests.test_integration_fhir import SERVICE_FOR_HOOK, hook_request, scenario

# Every fixture scenario that needed a second wave before the look-ahead (bench/README.md, 2026-12-03).
TWO_WAVE_SCENARIOS = (
    "s12-colleague-same-specialty", "s13-prior-different-specialty", "s14-prior-same-specialty-other-org",
    "s17-nurse-only-follow-up", "s30-appointment-within-24h", "s31-appointment-soonest-slot",
    "s32-appointment-earlier-slots-free", "s33-appointment-no-slot-data", "s35-unrelated-visit-next-day",
    "s36-uncoded-visit-next-day", "s37-cancelled-appointment-ignored", "s61-pt-with-pta-participant",
    "s62-ot-with-ota-participant", "s66-colleague-same-org-one-year", "s67-colleague-other-org-only",
)
COLLEAGUE = "s12-colleague-same-specialty"  # two waves without the look-ahead: a colleague's roles


# --- unit: what a statement declares, what a self link shows ------------------------------------------------------
def _statement(**resource: Any) -> dict[str, Any]:
    return {"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "resource": [
        {"type": "Encounter", "searchParam": [{"name": "patient", "type": "reference"}], **resource}]}]}


def test_a_statement_declares_includes_and_parameters_per_type() -> None:
    caps = ServerCapabilities.from_statement(_statement(searchInclude=["Encounter:participant"],
                                                        searchRevInclude=["PractitionerRole:practitioner"]))
    assert caps is not None
    assert caps.supports_include("Encounter", "Encounter:participant")
    assert not caps.supports_include("Encounter", "Encounter:subject")
    assert caps.supports_revinclude("Encounter", "PractitionerRole:practitioner")
    assert caps.supports_param("Encounter", "patient") and not caps.supports_param("Encounter", "date")
    assert caps.supports_chain(("Encounter", "patient")) and not caps.supports_chain(("Slot", "schedule"))
    # Anything else than a server CapabilityStatement declares nothing; wrong shapes count as not declared.
    assert ServerCapabilities.from_statement({"resourceType": "Bundle"}) is None
    assert ServerCapabilities.from_statement({"resourceType": "CapabilityStatement", "rest": "x"}) is None
    odd = ServerCapabilities.from_statement(_statement(searchInclude="Encounter:participant", searchParam=[1]))
    assert odd is not None and not odd.supports_include("Encounter", "Encounter:participant")


def test_the_self_link_must_show_every_include() -> None:
    wanted = (("_include", "Encounter:participant"), ("_revinclude:iterate", "PractitionerRole:practitioner"))
    used = "http://h/fhir/Encounter?patient=p&_include=Encounter%3Aparticipant&_revinclude%3Aiterate=" \
           "PractitionerRole%3Apractitioner&_count=20"
    bundle = {"resourceType": "Bundle", "link": [{"relation": "self", "url": used}]}
    assert _honored(bundle, [], wanted)
    dropped = {"resourceType": "Bundle", "link": [{"relation": "self", "url": used.split("&_revinclude")[0]}]}
    assert not _honored(dropped, [], wanted)
    assert not _honored({"resourceType": "Bundle"}, [], wanted)  # no self link: not shown, not trusted
    warning = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "not-supported"}]}
    assert not _honored(bundle, [warning], wanted)


def test_the_cache_keeps_a_statement_for_its_ttl_and_refusals_apart() -> None:
    now = [0.0]
    cache = CapabilityCache(ttl=100, failed_retry=10, clock=lambda: now[0])
    assert cache.lookup("b") == (False, None)
    assert cache.start_fetch("b") and not cache.start_fetch("b")  # one fetch in flight per server
    cache.store("b", _statement(searchInclude=["Encounter:participant"]))
    fresh, caps = cache.lookup("b")
    assert fresh and caps is not None
    cache.remember_refusal("b", "feature")
    assert cache.refused("b") == {"feature"}
    now[0] = 150.0  # expired: still given while it is read again, and the refusal expired too
    fresh, caps = cache.lookup("b")
    assert not fresh and caps is not None and cache.refused("b") == frozenset()
    assert cache.start_fetch("b")
    cache.fetch_failed("b")
    assert cache.lookup("b") == (True, None)
    now[0] = 161.0
    assert cache.lookup("b") == (False, None)  # a failed read is retried sooner
    assert cache.fetches == 2


# --- the stand-in proxy (its own process) -------------------------------------------------------------------------
class Proxy:
    def __init__(self, upstream: str, mode: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/fhir"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
        self.process = subprocess.Popen([sys.executable, __file__, upstream, mode, str(self.port)], env=env)
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"http://127.0.0.1:{self.port}/__counts", timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)

    def counts(self) -> dict[str, int]:
        return dict(requests.get(f"http://127.0.0.1:{self.port}/__counts", timeout=5).json())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def proxy(loaded_fhir: FhirServer) -> Iterator[Callable[[str], Proxy]]:
    started: list[Proxy] = []

    def start(mode: str) -> Proxy:
        started.append(Proxy(loaded_fhir.base_url, mode))
        return started[-1]

    yield start
    for item in started:
        item.stop()


def _app(fhir_app: Callable[..., Flask], item: dict[str, Any], base_url: str, batch: str = "auto") -> Flask:
    return fhir_app(datetime.fromisoformat(item["now"]),
                    {"fhir": {"allowed_servers": [base_url], "batch": batch}})


def _call(app: Flask, item: dict[str, Any], server: FhirServer, recorder: Recorder,
          hook: str | None = None, context: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
    hook = hook or item["hook"]
    door = {**item, "hook": hook, "context": context or item["context"], "id": f"{item['id']}-{hook}"}
    stats = InvocationStats(SERVICE_FOR_HOOK[hook], hook)
    runtime_of(app).invoke(SERVICE_FOR_HOOK[hook], hook_request(door, server), stats=stats)
    determination = _of_assessment(item, recorder.take())
    assert determination is not None, (item["id"], hook)
    return _verdict(determination), stats.waves


def _wait_for_statement(proxy: Proxy) -> None:
    """The statement is read concurrently with the first call's wave; let that read land."""
    deadline = time.monotonic() + 10
    while proxy.counts()["metadata"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)


pytestmark = pytest.mark.integration


def test_the_statement_is_read_once_and_cached(fhir_app: Callable[..., Flask], loaded_fhir: FhirServer,
                                               proxy: Callable[[str], Proxy],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    server = proxy("declare")
    item = scenario(COLLEAGUE)
    app = _app(fhir_app, item, server.base_url)
    recorder = Recorder(monkeypatch)
    fhir = FhirServer(server.base_url, loaded_fhir.token)
    first, waves = _call(app, item, fhir, recorder)
    assert waves == 2  # planned before the statement was known: it was read alongside, never before
    _wait_for_statement(server)
    for _ in range(3):
        again, waves = _call(app, item, fhir, recorder)
        assert (again, waves) == (first, 1)
    assert server.counts()["metadata"] == 1
    assert server.counts()["lookahead"] >= 3
    _assert_expected(item, first, "encounter-discharge by FHIR")


def test_a_server_declaring_no_includes_keeps_two_waves(fhir_app: Callable[..., Flask], loaded_fhir: FhirServer,
                                                        proxy: Callable[[str], Proxy],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    server = proxy("plain")
    item = scenario(COLLEAGUE)
    app = _app(fhir_app, item, server.base_url)
    recorder = Recorder(monkeypatch)
    fhir = FhirServer(server.base_url, loaded_fhir.token)
    first, _ = _call(app, item, fhir, recorder)
    _wait_for_statement(server)
    for _ in range(2):
        assert _call(app, item, fhir, recorder) == (first, 2)
    assert server.counts() == {"metadata": 1, "lookahead": 0, "refused": 0}
    _assert_expected(item, first, "encounter-discharge by FHIR")


@pytest.mark.parametrize("mode", ["refuse", "ignore"])
def test_a_refused_or_ignored_include_falls_back_and_is_remembered(
        fhir_app: Callable[..., Flask], loaded_fhir: FhirServer, proxy: Callable[[str], Proxy],
        monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    server = proxy(mode)
    item = scenario(COLLEAGUE)
    # One GET per query, each carrying Prefer: handling=strict (SEKMET applies it to a batch's entries too lax).
    app = _app(fhir_app, item, server.base_url, batch="never")
    recorder = Recorder(monkeypatch)
    fhir = FhirServer(server.base_url, loaded_fhir.token)
    first, waves = _call(app, item, fhir, recorder)
    assert waves == 2
    _wait_for_statement(server)
    tried, waves = _call(app, item, fhir, recorder)  # declared: asked, refused (or ignored), two waves after all
    assert (tried, waves) == (first, 2)
    asked = server.counts()["lookahead"]
    assert asked >= 1 and (server.counts()["refused"] >= 1) == (mode == "refuse")
    assert _call(app, item, fhir, recorder) == (first, 2)
    assert server.counts()["lookahead"] == asked  # remembered: not asked again
    _assert_expected(item, first, "encounter-discharge by FHIR")


def test_one_wave_on_sekmet_for_every_scenario_that_needed_two(fhir_app: Callable[..., Flask],
                                                               loaded_fhir: FhirServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """SEKMET declares every include the look-ahead uses (and does the chained Slot/Schedule searches): each door
    of each scenario that took two waves takes one, with the determination the two-wave plan gives."""
    recorder = Recorder(monkeypatch)
    look_ahead = gather._one_round_trip_queries
    for scenario_id in TWO_WAVE_SCENARIOS:
        item = scenario(scenario_id)
        app = _app(fhir_app, item, loaded_fhir.base_url)
        without: list[int] = []
        for hook, context in doors_of(item):
            monkeypatch.setattr(gather, "_one_round_trip_queries", lambda *a, **k: [])
            two_wave, waves_without = _call(app, item, loaded_fhir, recorder, hook, context)
            monkeypatch.setattr(gather, "_one_round_trip_queries", look_ahead)
            _call(app, item, loaded_fhir, recorder, hook, context)  # the statement may be read during this one
            one_wave, waves = _call(app, item, loaded_fhir, recorder, hook, context)
            door = f"{scenario_id} {hook}{'+encounterId' if 'encounterId' in context else ''}"
            assert waves == 1, door
            assert one_wave == two_wave, door
            without.append(waves_without)
        assert max(without) == 2, scenario_id  # the scenario still takes two waves without the look-ahead


# --- the proxy process --------------------------------------------------------------------------------------------
def _serve(upstream: str, mode: str, port: int) -> None:  # pragma: no cover - runs in its own process
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qsl, urlencode, urlsplit

    counts = {"metadata": 0, "lookahead": 0, "refused": 0}
    lock = threading.Lock()
    own = f"http://127.0.0.1:{port}/fhir".encode()
    session = requests.Session()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._forward()

        def do_POST(self) -> None:
            self._forward()

        def _forward(self) -> None:
            if self.path == "/__counts":
                with lock:
                    self._answer(200, json.dumps(counts).encode())
                return
            split = urlsplit(self.path)
            params = parse_qsl(split.query, keep_blank_values=True)
            if split.path.rstrip("/").endswith("/metadata"):
                with lock:
                    counts["metadata"] += 1
            if any(k in ("_revinclude:iterate", "_include:iterate") for k, _ in params):
                with lock:
                    counts["lookahead"] += 1
                if mode == "refuse":
                    with lock:
                        counts["refused"] += 1
                    self._answer(400, json.dumps({"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "not-supported", "diagnostics": "unsupported"}]}).encode())
                    return
                if mode == "ignore":
                    params = [(k, v) for k, v in params if k != "_revinclude:iterate"]
            target = upstream + split.path[len("/fhir"):] + (f"?{urlencode(params)}" if params else "")
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() in ("authorization", "accept", "content-type", "prefer")}
            length = int(self.headers.get("Content-Length") or 0)
            payload = self.rfile.read(length) if length else None
            if payload and b"iterate" in payload:  # a batch: its entries' URLs
                entries = json.loads(payload).get("entry", ())
                with lock:
                    counts["lookahead"] += sum("iterate" in e["request"]["url"] for e in entries)
            reply = session.request(self.command, target, data=payload, headers=headers, timeout=30)
            body = reply.content
            if mode == "plain" and split.path.rstrip("/").endswith("/metadata"):
                statement = json.loads(body)
                for rest in statement.get("rest", ()):
                    for resource in rest.get("resource", ()):
                        resource.pop("searchInclude", None)
                        resource.pop("searchRevInclude", None)
                body = json.dumps(statement).encode()
            self._answer(reply.status_code, body.replace(upstream.encode(), own))

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    Server(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":  # pragma: no cover
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
