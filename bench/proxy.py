"""Two stand-ins between the service and the FHIR server, both on 127.0.0.1 in the harness process.

:class:`LatencyProxy` — a threaded HTTP/1.1 reverse proxy in front of SEKMET that holds every response for
``delay`` seconds after the upstream answered (so each FHIR round trip costs at least ``delay``), counts the
requests it forwards, and rewrites the upstream base URL in response bodies to its own (Bundle ``next`` links must
stay on the origin the service was given, or the service will not follow them). Requests carrying the header
``X-Bench-Probe`` (the harness's own round-trip probes) are forwarded and delayed but not counted.

:class:`BlackHole` — accepts connections, reads what is sent (to count requests), and never answers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import selectors
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}
PROBE_HEADER = "X-Bench-Probe"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the service pools its connections
    # Headers and body leave in separate writes: without TCP_NODELAY, Nagle's algorithm and the client's delayed
    # ACK would hold the body back ~40 ms and add that to every "round trip".
    disable_nagle_algorithm = True
    timeout = 60  # an idle keep-alive connection is closed after a minute

    def do_GET(self) -> None:
        self.server.proxy.forward(self)  # type: ignore[attr-defined]

    def do_POST(self) -> None:
        self.server.proxy.forward(self)  # type: ignore[attr-defined]

    def do_PUT(self) -> None:
        self.server.proxy.forward(self)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        return


class LatencyProxy:
    """``base_url`` (http://127.0.0.1:PORT/fhir) forwards to ``upstream`` with ``delay`` seconds added."""

    def __init__(self, upstream: str, delay: float = 0.0) -> None:
        parts = urlsplit(upstream)
        self.upstream = upstream.rstrip("/")
        self._up_host = parts.hostname or "127.0.0.1"
        self._up_port = parts.port or 80
        self.delay = delay
        self._count = 0
        self._probes = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        # When a list, every forwarded request appends (path, received, upstream answered, response sent, the GETs
        # it carries), times in time.monotonic() seconds: the harness reconstructs waves and FHIR time of a traced
        # call. "The GETs it carries" is [path] for a GET, and the entries' paths for a batch Bundle.
        self.record: list[tuple[str, float, float, float, list[str]]] | None = None
        self._server = _Server(("127.0.0.1", 0), _ProxyHandler)
        self._server.proxy = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}{parts.path.rstrip('/')}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="latency-proxy", daemon=True)

    def start(self) -> LatencyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def requests(self) -> int:
        with self._lock:
            return self._count

    def _connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection(self._up_host, self._up_port, timeout=60)
            self._local.conn = conn
        return conn

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        received = time.monotonic()
        probe = handler.headers.get(PROBE_HEADER) is not None
        with self._lock:
            if probe:
                self._probes += 1
            else:
                self._count += 1
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        # No Accept-Encoding upstream: bodies come back uncompressed, so base URLs in them can be rewritten.
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() not in _HOP_BY_HOP and k.lower() != "accept-encoding" and k != PROBE_HEADER}
        status, reason, out_headers, content = 502, "Bad Gateway", [], b""
        for attempt in (0, 1):  # a pooled upstream connection may have been closed: retry once on a new one
            conn = self._connection(fresh=attempt == 1)
            try:
                conn.request(handler.command, handler.path, body=body, headers=headers)
                response = conn.getresponse()
                content = response.read()
                status, reason = response.status, response.reason
                out_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                content = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient"}]}'
        answered = time.monotonic()
        if self.upstream.encode() in content:
            content = content.replace(self.upstream.encode(), self.base_url.encode())
        if self.delay > 0:
            time.sleep(self.delay)
        try:
            handler.send_response(status, reason)
            for key, value in out_headers:
                handler.send_header(key, value)
            handler.send_header("Content-Length", str(len(content)))
            handler.end_headers()
            handler.wfile.write(content)
        except OSError:
            handler.close_connection = True
        record = self.record
        if record is not None and not probe:
            record.append((handler.path, received, answered, time.monotonic(), _carried(handler.path, body)))


def _carried(path: str, body: bytes | None) -> list[str]:
    """The GET paths a request stands for: itself, or each entry of a batch Bundle POSTed to the base URL."""
    if not body:
        return [path]
    try:
        bundle = json.loads(body)
        return [f"{path.rstrip('/')}/{e['request']['url']}" for e in bundle["entry"] if e["request"]["method"] == "GET"]
    except (ValueError, KeyError, TypeError):
        return [path]


class BlackHole:
    """Accepts every connection and never answers. ``base_url`` is http://127.0.0.1:PORT/fhir."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/fhir"
        self.connections = 0
        self.requests = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._open: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="black-hole", daemon=True)

    def start(self) -> BlackHole:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                sock = key.fileobj
                if sock is self._listener:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = self._listener.accept()
                        conn.setblocking(False)
                        self._open.add(conn)
                        self._selector.register(conn, selectors.EVENT_READ)
                        self.connections += 1
                    continue
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    self.requests += data.count(b" HTTP/1.")  # request lines seen (never answered)
                else:  # the client gave up (the service's deadline watchdog shut the socket)
                    self._selector.unregister(sock)
                    self._open.discard(sock)
                    sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in list(self._open):
            with contextlib.suppress(OSError):
                sock.close()
        self._selector.close()
        self._listener.close()
