"""A fault-injecting FHIR R4 stand-in: real HTTP servers on 127.0.0.1, in a process of their own, whose failures a
test chooses.

    with FaultyFhir(resources) as fhir:            # serves ``fhir.base_url`` = http://127.0.0.1:<port>/fhir
        fhir.set_mode("hang")                      # every request from now on hangs until shutdown
        fhir.override("Slot", "status", status=500)  # ... except Slot, which fails with HTTP 500
        ...
        assert fhir.requests("Slot")               # what the service asked for (in arrival order)

The deadline tests time the service under test, which runs in the test's own process. The stand-in therefore
never runs there: the first :class:`FaultyFhir` of a test session starts one host process (this file run as a
script, stdlib only) and every stand-in of the session is a listener of its own (its own port) in that host. The
test drives it through a pipe: each call (``set_mode``, ``override``, ``requests``, ...) is answered before it
returns, so a fault chosen before a hook call is the fault that call meets, and the requests recorded by the time
the call returns are all there. Answering — JSON encoding of huge Bundles, trickling bodies, hanging connections
— costs the host's interpreter lock and CPU, never the service's. The host ends when the test process closes the
pipe (at exit, or when it dies).

Modes (``set_mode`` for every path, ``override(resource_type, ...)`` for one resource type):

``ok``            serve the in-memory resources: ``GET Type/id`` reads, ``GET Type?...`` returns a searchset Bundle of
                  every resource of that type (search parameters other than ``_id`` and PractitionerRole's
                  ``practitioner`` are ignored, as a lax server does; the service must filter again anyway)
``slow``          the same as ``ok`` after ``delay`` seconds
``hang``          accept the connection and never answer (until shutdown, which is prompt)
``status``        answer HTTP ``status`` (default 500) with an OperationOutcome body (or ``body``)
``malformed``     200 with ``{not json``
``not_fhir``      200 with JSON that has no ``resourceType``
``endless_next``  searches answer as ``ok`` on the first page, and every page links ``next`` to a new page
``huge``          searches answer one Bundle of ``entries`` (default 20,000) minimal resources of the type
``redirect``      302 to ``redirect_to`` + the same path and query (e.g. another listener's base URL)
``drip``          200 headers, then the body one byte every ``delay`` seconds (never finishes before shutdown)

With ``batch=True`` it also answers batch Bundles (``POST /fhir``): each entry as its GET would be, faults that
hold a connection (hang, slow, drip) holding the whole batch; without, a POST is refused with 405 like a server
that does not do batches.

Each listener speaks HTTP/1.0 (one request per connection), runs handlers on daemon threads, and stops cleanly:
:meth:`FaultyFhir.stop` releases hanging handlers, shuts the listener down and closes its socket.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import subprocess
import sys
import threading
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

MODES = ("ok", "slow", "hang", "status", "malformed", "not_fhir", "endless_next", "huge", "redirect", "drip")
FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class Fault:
    """A mode and its options."""

    mode: str = "ok"
    delay: float = 0.0
    status: int = 500
    body: bytes | None = None
    entries: int = 20_000
    redirect_to: str | None = None
    template: dict[str, Any] | None = None  # huge: the resource repeated (with ids huge-0, huge-1, ...)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {', '.join(MODES)}")

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["body"] = None if self.body is None else base64.b64encode(self.body).decode("ascii")
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Fault:
        body = wire.get("body")
        return cls(**{**wire, "body": None if body is None else base64.b64decode(body)})


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # path and query string, as requested
    resource_type: str | None  # the first segment after /fhir/, e.g. "Slot"
    query: dict[str, list[str]] = field(default_factory=dict)
    authorization: str | None = None  # the Authorization header, as sent
    in_batch: bool = False  # an entry of a batch Bundle (the POST carrying it is recorded too)


def _outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}


def _minimal(resource_type: str, n: int, template: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**(template or {}), "resourceType": resource_type, "id": f"huge-{n}"}


# -- the test's side ---------------------------------------------------------------------------------------------
class FaultyFhir:
    """A stand-in FHIR server (a listener in the host process). ``resources`` are FHIR resources (or
    transaction/collection Bundles of them) to serve; ``mode`` and ``options`` the fault of every path."""

    def __init__(self, resources: Iterable[dict[str, Any]] = (), *, mode: str = "ok", batch: bool = False,
                 **options: Any) -> None:
        self.batch = batch  # answer batch Bundles (POST [base]); otherwise 405 like a server without batch
        self._host = _Host.shared()
        self._id = self._host.call("create", resources=list(resources), batch=batch,
                                   fault=Fault(mode, **options).to_wire())
        self._port: int | None = None
        weakref.finalize(self, self._host.forget, self._id)

    def _call(self, op: str, **args: Any) -> Any:
        return self._host.call(op, stand=self._id, **args)

    # -- data ------------------------------------------------------------------------------------------------
    def add(self, resources: Iterable[dict[str, Any]]) -> None:
        """Add resources; a Bundle is unpacked into its entries' resources."""
        self._call("add", resources=list(resources))

    def resources_of(self, resource_type: str) -> list[dict[str, Any]]:
        return list(self._call("resources_of", resource_type=resource_type))

    # -- faults ----------------------------------------------------------------------------------------------
    def set_mode(self, mode: str, **options: Any) -> None:
        """The fault of every path without an override."""
        self._call("set_mode", fault=Fault(mode, **options).to_wire())

    def override(self, resource_type: str, mode: str, *, when: str | None = None, **options: Any) -> None:
        """The fault of one resource type's URLs (``/fhir/{resource_type}...``), whatever the default mode;
        with ``when``, only of those whose path and query contain that text. The latest override wins."""
        self._call("override", resource_type=resource_type, when=when, fault=Fault(mode, **options).to_wire())

    def clear_overrides(self) -> None:
        self._call("clear_overrides")

    def fault_for(self, resource_type: str | None, path: str = "") -> Fault:
        return Fault.from_wire(self._call("fault_for", resource_type=resource_type, path=path))

    # -- record ----------------------------------------------------------------------------------------------
    def requests(self, resource_type: str | None = None) -> list[RecordedRequest]:
        """Every request received so far (optionally of one resource type), in arrival order."""
        return [RecordedRequest(**r) for r in self._call("requests", resource_type=resource_type)]

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.requests()]

    def reset_requests(self) -> None:
        self._call("reset_requests")

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._port is not None, "not started"
        return self._port

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/fhir"

    def start(self) -> FaultyFhir:
        if self._port is None:
            self._port = int(self._call("start"))
        return self

    def stop(self) -> None:
        """Release hanging and dripping handlers, stop listening and close the socket (idempotent)."""
        if self._port is not None:
            self._call("stop")
            self._port = None

    def __enter__(self) -> FaultyFhir:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Host:
    """The host process and the pipe to it: one JSON line per call, one JSON line per answer, in order."""

    _shared: _Host | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._forgotten: list[int] = []  # stand-ins collected by the garbage collector, dropped on the next call
        self._process = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).resolve())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._stdin: IO[bytes] = self._process.stdin
        self._stdout: IO[bytes] = self._process.stdout
        self._closed = False
        atexit.register(self.close)

    @classmethod
    def shared(cls) -> _Host:
        with cls._shared_lock:
            if cls._shared is None or cls._shared._closed or cls._shared._process.poll() is not None:
                cls._shared = cls()
            return cls._shared

    def forget(self, stand: int) -> None:
        self._forgotten.append(stand)  # no lock, no I/O: may run inside a garbage collection, in any thread

    def call(self, op: str, **args: Any) -> Any:
        with self._lock:
            forgotten, self._forgotten[:] = list(self._forgotten), []
            message = json.dumps({"op": op, "args": args, "forget": forgotten}, separators=(",", ":"))
            try:
                self._stdin.write(message.encode() + b"\n")
                self._stdin.flush()
                line = self._stdout.readline()
            except (BrokenPipeError, ValueError) as exc:
                raise RuntimeError(f"the FHIR stand-in host is gone (exit {self._process.poll()})") from exc
            if not line:
                raise RuntimeError(f"the FHIR stand-in host is gone (exit {self._process.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"FHIR stand-in {op}: {answer['error']}")
        return answer["result"]

    def close(self) -> None:
        """Close the pipe: the host stops every listener and exits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError):
                self._stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        with contextlib.suppress(OSError):
            self._stdout.close()


# -- the host's side ---------------------------------------------------------------------------------------------
_HUGE_CACHE: dict[tuple[str, int, str], bytes] = {}  # (type, entries, template) -> searchset
_HUGE_LOCK = threading.Lock()


class _Stand:
    """One stand-in server, inside the host process. ``resources`` are FHIR resources (or transaction/collection
    Bundles of them) to serve."""

    def __init__(self, resources: Iterable[dict[str, Any]] = (), *, batch: bool = False,
                 default: Fault = Fault()) -> None:
        self._lock = threading.Lock()
        self.batch = batch  # answer batch Bundles (POST [base]); otherwise 405 like a server without batch
        self._release = threading.Event()  # set at shutdown: hanging, slow and dripping handlers return
        self._store: dict[str, dict[str, dict[str, Any]]] = {}
        self._default = default
        self._overrides: list[tuple[str, str | None, Fault]] = []  # newest first
        self._requests: list[RecordedRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.add(resources)

    # -- data ------------------------------------------------------------------------------------------------
    def add(self, resources: Iterable[dict[str, Any]]) -> None:
        """Add resources; a Bundle is unpacked into its entries' resources."""
        with self._lock:
            for resource in resources:
                if resource.get("resourceType") == "Bundle" and resource.get("type") in ("transaction", "collection",
                                                                                         "batch", "searchset"):
                    inner = [e["resource"] for e in resource.get("entry") or () if isinstance(e.get("resource"), dict)]
                    for item in inner:
                        self._store.setdefault(item["resourceType"], {})[str(item.get("id"))] = item
                    continue
                self._store.setdefault(resource["resourceType"], {})[str(resource.get("id"))] = resource

    def resources_of(self, resource_type: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._store.get(resource_type, {}).values())

    # -- faults ----------------------------------------------------------------------------------------------
    def set_mode(self, fault: Fault) -> None:
        """The fault of every path without an override."""
        with self._lock:
            self._default = fault

    def override(self, resource_type: str, fault: Fault, when: str | None = None) -> None:
        """The fault of one resource type's URLs, whatever the default; with ``when``, only of those whose path
        and query contain that text. The latest override wins."""
        with self._lock:
            self._overrides.insert(0, (resource_type, when, fault))

    def clear_overrides(self) -> None:
        with self._lock:
            self._overrides.clear()

    def fault_for(self, resource_type: str | None, path: str = "") -> Fault:
        with self._lock:
            for kind, when, fault in self._overrides:
                if kind == resource_type and (when is None or when in path):
                    return fault
            return self._default

    # -- record ----------------------------------------------------------------------------------------------
    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def requests(self, resource_type: str | None = None) -> list[RecordedRequest]:
        """Every request received so far (optionally of one resource type), in arrival order."""
        with self._lock:
            return [r for r in self._requests if resource_type is None or r.resource_type == resource_type]

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.requests()]

    def reset_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/fhir"

    def start(self) -> _Stand:
        if self._server is not None:
            return self
        self._release.clear()
        server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"faulty-fhir-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._release.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    # -- answers ---------------------------------------------------------------------------------------------
    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds``, cut short by shutdown; True when shutting down."""
        return self._release.wait(seconds)

    def answer(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        segments = [s for s in split.path.split("/") if s]
        query = parse_qs(split.query, keep_blank_values=True)
        resource_type = segments[1] if len(segments) >= 2 and segments[0] == "fhir" else None
        self._record(RecordedRequest(handler.command, handler.path, resource_type, query,
                                     handler.headers.get("Authorization")))
        if handler.command == "POST" and segments == ["fhir"] and self.batch:
            self._answer_batch(handler)
            return
        if handler.command != "GET":
            handler.send_json(405, _outcome("not-supported", "this stand-in answers GET only"))
            return
        if not segments or segments[0] != "fhir" or resource_type is None:
            handler.send_json(404, _outcome("not-found", "not a FHIR URL of this server"))
            return
        if segments == ["fhir", "metadata"]:
            # A real server's small CapabilityStatement, declaring no _include/_revinclude: the service keeps its
            # two-wave plan here, and the faults below stay about the searches the tests configure.
            handler.send_json(200, {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                                    "fhirVersion": "4.0.1", "format": ["json"],
                                    "rest": [{"mode": "server", "resource": []}]})
            return
        fault = self.fault_for(resource_type, handler.path)
        if self._stall(handler, fault):
            return
        if fault.mode == "redirect":
            target = (fault.redirect_to or self.base_url).rstrip("/") + split.path.removeprefix("/fhir")
            if split.query:
                target += "?" + split.query
            handler.send_response(302)
            handler.send_header("Location", target)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        status, body = self._respond(resource_type, segments[2:], query, fault, split.path)
        handler.send_bytes(status, body) if isinstance(body, bytes) else handler.send_json(status, body)

    def _stall(self, handler: _Handler, fault: Fault) -> bool:
        """The faults that hold the connection (hang, slow, drip); True when the answer is over."""
        if fault.mode == "hang":
            self._release.wait()
            handler.close_connection = True
            return True
        if fault.mode == "slow" and self._wait(fault.delay):
            handler.close_connection = True
            return True
        if fault.mode == "drip":
            handler.send_response(200)
            handler.send_header("Content-Type", FHIR_JSON)
            handler.end_headers()
            with contextlib.suppress(OSError):
                handler.wfile.write(b"{")
                handler.wfile.flush()
                while not self._wait(fault.delay or 0.1):
                    handler.wfile.write(b" ")
                    handler.wfile.flush()
            handler.close_connection = True
            return True
        return False

    def _respond(self, resource_type: str, rest: list[str], query: dict[str, list[str]], fault: Fault,
                 path: str) -> tuple[int, Any]:
        """Status and body (a document, or raw bytes) of one GET, for every mode that answers at once."""
        if fault.mode == "status":
            return fault.status, fault.body if fault.body is not None else _outcome(
                "exception", f"injected HTTP {fault.status}")
        if fault.mode == "malformed":
            return 200, b"{not json"
        if fault.mode == "not_fhir":
            return 200, {"hello": "world", "entry": [{"resource": {"id": "x"}}]}
        # ok, slow (after its delay), endless_next, huge
        if rest and rest[0] not in ("_search",) and not rest[0].startswith("$"):
            resource = self._read(resource_type, rest[0])
            if resource is None:
                return 404, _outcome("not-found", f"{resource_type}/{rest[0]} is not known")
            return 200, resource
        if fault.mode == "huge":
            return 200, self._huge(resource_type, fault)
        return 200, self._search(resource_type, query, fault, path)

    def _answer_batch(self, handler: _Handler) -> None:
        """A batch of GETs (FHIR R4 http.html#transaction): each entry answered as its GET would be, within one
        batch-response. Faults that hold a connection (hang, slow, drip) hold the whole batch; a redirect fault
        answers its entry 302."""
        try:
            bundle = json.loads(handler.rfile.read(int(handler.headers.get("Content-Length") or 0)))
            requests = [e["request"] for e in bundle["entry"]]
            assert bundle["resourceType"] == "Bundle" and bundle["type"] == "batch"
            assert all(r["method"] == "GET" for r in requests)
        except (ValueError, KeyError, TypeError, AssertionError):
            handler.send_json(400, _outcome("invalid", "not a batch Bundle of GETs"))
            return
        parts = []
        for request in requests:
            split = urlsplit("/fhir/" + request["url"])
            segments = [s for s in split.path.split("/") if s]
            resource_type = segments[1] if len(segments) >= 2 else None
            query = parse_qs(split.query, keep_blank_values=True)
            self._record(RecordedRequest("GET", f"/fhir/{request['url']}", resource_type, query,
                                         handler.headers.get("Authorization"), in_batch=True))
            parts.append((resource_type, segments[2:], query, split.path, self.fault_for(resource_type,
                                                                                         f"/fhir/{request['url']}")))
        stalls = [p[4] for p in parts if p[4].mode in ("hang", "drip")] or \
            sorted((p[4] for p in parts if p[4].mode == "slow"), key=lambda f: -f.delay)
        if stalls and self._stall(handler, stalls[0]):
            return
        entries: list[bytes] = []  # assembled as bytes: a huge searchset is spliced in, not parsed and re-encoded
        for resource_type, rest, query, path, fault in parts:
            if resource_type is None:
                status, body = 404, _outcome("not-found", "not a FHIR URL of this server")
            elif fault.mode == "redirect":
                status, body = 302, None
            else:
                status, body = self._respond(resource_type, rest, query, fault, path)
            if isinstance(body, dict):
                body = json.dumps(body, separators=(",", ":")).encode()
            elif isinstance(body, bytes) and not body.startswith(b"{\""):
                body = None  # a malformed answer: the entry carries no resource
            response = json.dumps({"status": f"{status} {'OK' if status < 300 else 'Error'}"}).encode()
            entries.append(b'{"response":' + response + (b',"resource":' + body if body else b"") + b"}")
        handler.send_bytes(200, b'{"resourceType":"Bundle","type":"batch-response","entry":[' + b",".join(entries)
                           + b"]}")

    def _huge(self, resource_type: str, fault: Fault) -> bytes:
        """One searchset of ``entries`` minimal resources, serialised once per type, size and template for every
        stand-in of the host (megabytes re-encoded per request or per test would spend the CPU the service under
        test needs)."""
        key = (resource_type, fault.entries, json.dumps(fault.template, sort_keys=True))
        with _HUGE_LOCK:
            cached = _HUGE_CACHE.get(key)
            if cached is None:
                bundle = {"resourceType": "Bundle", "type": "searchset", "total": fault.entries,
                          "entry": [{"resource": _minimal(resource_type, n, fault.template)}
                                    for n in range(fault.entries)]}
                cached = _HUGE_CACHE[key] = json.dumps(bundle, separators=(",", ":")).encode()
        return cached

    def _read(self, resource_type: str, rid: str) -> dict[str, Any] | None:
        with self._lock:
            return self._store.get(resource_type, {}).get(rid)

    def _search(self, resource_type: str, query: dict[str, list[str]], fault: Fault, path: str) -> dict[str, Any]:
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
        if "_page" in query:  # a later page of an endless search: nothing new, but always another page
            resources = []
        else:
            resources = self.resources_of(resource_type)
            ids = {i for value in query.get("_id", ()) for i in value.split(",")}
            if ids:
                resources = [r for r in resources if str(r.get("id")) in ids]
            people = {i.rsplit("/", 1)[-1] for value in query.get("practitioner", ()) for i in value.split(",")}
            if people and resource_type == "PractitionerRole":  # whose roles: the one filter that changes the flow
                resources = [r for r in resources
                             if (r.get("practitioner") or {}).get("reference", "").rsplit("/", 1)[-1] in people]
        bundle["total"] = len(resources)
        bundle["entry"] = [{"fullUrl": f"{self.base_url}/{r['resourceType']}/{r.get('id')}", "resource": r,
                            "search": {"mode": "match"}} for r in resources]
        if fault.mode == "endless_next":
            page = int((query.get("_page") or ["1"])[0]) + 1
            chain = (query.get("_chain") or [uuid.uuid4().hex[:12]])[0]  # one id per search, kept on every page
            bundle["link"] = [{"relation": "self", "url": f"{self.origin}{path}"},
                              {"relation": "next", "url": f"{self.origin}{path}?_chain={chain}&_page={page}"}]
        return bundle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 drops the burst of a hook's concurrent queries (1 s SYN retry)


class _Handler(BaseHTTPRequestHandler):
    owner: _Stand
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self.owner.answer(self)

    do_POST = do_PUT = do_DELETE = do_GET

    def send_json(self, status: int, document: Any) -> None:
        self.send_bytes(status, json.dumps(document, separators=(",", ":")).encode())

    def send_bytes(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", FHIR_JSON)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (its deadline passed): nothing to tell it
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read the recorded requests instead


def _handler_for(owner: _Stand) -> type[_Handler]:
    return type("FaultyFhirHandler", (_Handler,), {"owner": owner})


def _serve(commands: IO[bytes], answers: IO[bytes]) -> None:
    """The host: carry out each call read from ``commands`` and write its answer; at end of input, stop every
    listener and return."""
    stands: dict[int, _Stand] = {}
    ids = count(1)

    def carry_out(op: str, args: dict[str, Any]) -> Any:
        if op == "create":
            stand_id = next(ids)
            stands[stand_id] = _Stand(args["resources"], batch=args["batch"], default=Fault.from_wire(args["fault"]))
            return stand_id
        stand = stands[args.pop("stand")]
        if op == "start":
            return stand.start().port
        if op in ("set_mode", "override"):
            getattr(stand, op)(fault=Fault.from_wire(args.pop("fault")), **args)
            return None
        if op == "fault_for":
            return stand.fault_for(**args).to_wire()
        if op == "requests":
            return [asdict(r) for r in stand.requests(**args)]
        if op in ("add", "resources_of", "clear_overrides", "reset_requests", "stop"):
            return getattr(stand, op)(**args)
        raise ValueError(f"unknown call {op!r}")

    try:
        for line in commands:
            message = json.loads(line)
            for stand_id in message.get("forget") or ():
                dropped = stands.pop(stand_id, None)
                if dropped is not None:
                    dropped.stop()
            try:
                answer: dict[str, Any] = {"result": carry_out(message["op"], message["args"])}
            except Exception as exc:  # the test's mistake (unknown op, bad arguments): tell it, keep serving
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            answers.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            answers.flush()
    finally:
        for stand in stands.values():
            stand.stop()


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
