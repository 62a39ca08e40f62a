"""A FHIR stand-in that answers every request with a malformed body, in a process of its own (stdlib only).

    with MalformedFhir() as fhir:
        fhir.base_url("entry-number")    # http://127.0.0.1:<port>/entry-number/fhir
        ...

The first path segment names the shape of every answer under it (:data:`SHAPES`): bodies that are not JSON, not
UTF-8, nested too deeply, Bundles whose elements have the wrong types, numbers no JSON reader should take, a
``batch-response`` with odd entries, and so on. GETs and POSTs (batch Bundles) get the same shape, except
``batch-mixed``, which answers a batch with one odd entry per request. Run as a script, it prints its port on
stdout and serves until its stdin closes, so it dies with the test process that started it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any

FHIR_JSON = "application/fhir+json"


def _bundle(entry: Any, **extra: Any) -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entry, **extra}).encode()


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


_ENCOUNTER = {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "VR"}}
_DEEP_EXTENSION = {**_ENCOUNTER, "extension": _nested(600, {"url": "u", "valueString": "v"})}

# name -> (status, content type, body)
SHAPES: dict[str, tuple[int, str, bytes]] = {
    "not-json": (200, "text/html", b"<html><body>Service Unavailable</body></html>"),
    "truncated-json": (200, FHIR_JSON, _bundle([{"resource": _ENCOUNTER}])[:-7]),
    "empty-body": (200, FHIR_JSON, b""),
    "json-array": (200, FHIR_JSON, b'[{"resourceType": "Bundle"}]'),
    "json-string": (200, FHIR_JSON, b'"Bundle"'),
    "entry-string": (200, FHIR_JSON, _bundle("entries")),
    "entry-number": (200, FHIR_JSON, _bundle(5, link=7, total="many")),
    "entry-object": (200, FHIR_JSON, _bundle({"resource": _ENCOUNTER})),
    "entries-not-objects": (200, FHIR_JSON, _bundle([1, "a", None, [], {"resource": 5}, {"resource": "x"},
                                                     {"resource": {"id": "no-type"}}, {"search": 5}])),
    "link-malformed": (200, FHIR_JSON, _bundle([], link=[{"relation": "next", "url": "http://[::1/x"}, 5,
                                                         {"relation": ["next"], "url": {}}])),
    "link-string": (200, FHIR_JSON, _bundle([], link="next", total=[1])),
    "no-resource-type": (200, FHIR_JSON, b'{"entry": []}'),
    "resource-type-number": (200, FHIR_JSON, b'{"resourceType": 5, "entry": []}'),
    "deep-array": (200, FHIR_JSON, b"[" * 3000 + b"]" * 3000),
    "deep-bundle": (200, FHIR_JSON, _bundle(_nested(900, {"resource": _ENCOUNTER}))),
    "deep-resource": (200, FHIR_JSON, _bundle([{"resource": _DEEP_EXTENSION}])),
    "huge-integer": (200, FHIR_JSON, b'{"resourceType": "Bundle", "type": "searchset", "total": ' + b"9" * 5000 + b"}"),
    "huge-float": (200, FHIR_JSON, _bundle([{"resource": {**_ENCOUNTER, "length": {"value": 1}}}])
                   .replace(b'"value": 1', b'"value": 1e999')),
    "nan": (200, FHIR_JSON, b'{"resourceType": "Bundle", "type": "searchset", "total": NaN, "entry": [{"resource": '
                            b'{"resourceType": "Encounter", "id": "e1", "length": {"value": Infinity}}}]}'),
    "invalid-utf8": (200, FHIR_JSON, _bundle([{"resource": _ENCOUNTER}]).replace(b'"e1"', b'"e\xff\xfe1"')),
    "utf8-surrogate": (200, FHIR_JSON, _bundle([{"resource": _ENCOUNTER}]).replace(b'"e1"', b'"e\xed\xa0\x801"')),
    "escaped-surrogate": (200, FHIR_JSON, _bundle([{"resource": _ENCOUNTER}]).replace(b'"e1"', b'"e\\ud8001"')),
    "latin1": (200, "application/fhir+json; charset=iso-8859-1",
               _bundle([{"resource": {**_ENCOUNTER, "id": "e1\u00e9"}}]).replace(b"\\u00e9", b"\xe9")),
    "wrong-content-type": (200, "text/plain", _bundle([{"resource": _ENCOUNTER}])),
    "non-bundle": (200, FHIR_JSON, b'{"resourceType": "Patient", "id": "p1"}'),
    "outcome-odd": (200, FHIR_JSON, b'{"resourceType": "OperationOutcome", "issue": 5}'),
    "bundle-of-odd-outcomes": (200, FHIR_JSON, _bundle([{"resource": {"resourceType": "OperationOutcome",
                                                                      "issue": "error"},
                                                         "search": {"mode": 5}}])),
    "batch-entry-string": (200, FHIR_JSON, b'{"resourceType": "Bundle", "type": "batch-response", "entry": "abc"}'),
    "server-error-html": (500, "text/html", b"<h1>500</h1>"),
    "redirect": (302, "text/html", b""),
    "bom": (200, FHIR_JSON, b"\xef\xbb\xbf" + _bundle([])),
}
_BATCH_STATUSES: list[Any] = ["200 OK", "\u00b2\u00b9\u2070", "2000", 200, None, "404 Not Found", "abc", "500"]
_BATCH_RESOURCES: list[Any] = [{"resourceType": "Bundle", "type": "searchset", "entry": 5}, {"resourceType": 5},
                               "x", {"resourceType": "Bundle", "type": "searchset", "link": 3}, None, _ENCOUNTER]


def _batch_mixed(request_body: bytes) -> bytes:
    """One odd answer per request of the batch (the right count, so the service reads every entry)."""
    try:
        count = len(json.loads(request_body)["entry"])
    except (ValueError, KeyError, TypeError):
        count = 1
    entries = [{"response": {"status": _BATCH_STATUSES[i % len(_BATCH_STATUSES)]},
                "resource": _BATCH_RESOURCES[i % len(_BATCH_RESOURCES)]} for i in range(count)]
    return json.dumps({"resourceType": "Bundle", "type": "batch-response", "entry": entries}).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request_body = self.rfile.read(length) if length else b""
        shape = self.path.lstrip("/").split("/", 1)[0]
        if shape == "batch-mixed":
            status, content_type, body = 200, FHIR_JSON, _batch_mixed(request_body)
            if self.command == "GET":
                body = SHAPES["entry-number"][2]
        else:
            status, content_type, body = SHAPES.get(shape, (404, "text/plain", b"no such shape"))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 302:
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


SHAPE_NAMES = [*SHAPES, "batch-mixed"]


class MalformedFhir:
    """The stand-in as a child process; :meth:`base_url` names one shape's base URL."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> MalformedFhir:
        self._process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)
        assert self._process.stdout is not None
        self.port = int(self._process.stdout.readline())
        return self

    def base_url(self, shape: str) -> str:
        return f"http://127.0.0.1:{self.port}/{shape}/fhir"

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            assert self._process.stdin is not None and self._process.stdout is not None
            self._process.stdin.close()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process.stdout.close()


def _serve(stdin: IO[str], stdout: IO[str]) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stdout.write(f"{server.server_address[1]}\n")
    stdout.flush()
    stdin.read()  # until the parent closes the pipe (or dies)
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    _serve(sys.stdin, sys.stdout)
