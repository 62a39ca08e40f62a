"""Production WSGI serving with gunicorn (never the Flask debug server).

Workers are ``gthread`` (:class:`HouseWorker`, which answers gunicorn's own refusals as OperationOutcomes): a hook
call mostly waits on the FHIR server, so threads overlap that waiting cheaply. A response to a request whose body
was not read closes the connection (:class:`CloseUnreadBodies`).
The app is built in each worker after the fork (no preload), so thread pools and database connections are never
shared across processes; the master only creates the schema and warms the FHIR model imports before forking.
SIGTERM drains in-flight requests for ``graceful_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from .config import Config
from .web.errors import operation_outcome

log = logging.getLogger("g2250_cds")

# Requests gunicorn refuses before the application sees them (its limits are set in gunicorn_options):
# (error class, status, reason phrase, diagnostics). Diagnostics are fixed phrases: the refused line or header may
# carry patient ids and is never echoed, nor logged.
_PARSE_ERRORS: tuple[tuple[type[Exception], int, str, str], ...] = (
    (http_errors.LimitRequestLine, 414, "URI Too Long", "request line is longer than the service accepts"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large",
     "request headers are more or larger than the service accepts"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "transfer coding not supported"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "expectation not supported"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden", "request forbidden"),
)
_APPLICATION_FAULTS = (http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName,
                       http_errors.ConfigurationProblem)


def house_error(exc: BaseException) -> tuple[int, bytes]:
    """The complete HTTP/1.1 answer to a request gunicorn could not take: an OperationOutcome (as every other error
    of the service, cds-hooks.md "Endpoints") and ``Connection: close`` — where the next request would start on the
    connection is unknown."""
    status, reason, diagnostics = 500, "Internal Server Error", "internal error"
    if isinstance(exc, http_errors.ParseException) and not isinstance(exc, _APPLICATION_FAULTS):
        status, reason, diagnostics = 400, "Bad Request", "request is not valid HTTP/1.1"
        for kind, kind_status, kind_reason, kind_diagnostics in _PARSE_ERRORS:
            if isinstance(exc, kind):
                status, reason, diagnostics = kind_status, kind_reason, kind_diagnostics
                break
    body = json.dumps(operation_outcome(status, diagnostics), separators=(",", ":")).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/fhir+json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return status, head.encode("ascii") + body


class HouseWorker(ThreadWorker):
    """gunicorn's ``gthread`` worker, answering what gunicorn itself refuses (a request line over
    ``limit_request_line``, too many or too large headers, malformed HTTP) with an OperationOutcome instead of its
    HTML page, and logging the kind of error only (gunicorn's own message quotes the refused request line)."""

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        status, answer = house_error(exc)
        # The service's own JSON log (allowlisted fields), not gunicorn's error log, whose format needs the
        # process id the service's logging leaves out.
        log.log(logging.ERROR if status >= 500 else logging.INFO, "request refused by the HTTP server",
                extra={"event": "http-refused", "status": status, "error_type": type(exc).__name__})
        with contextlib.suppress(Exception):  # the client may be gone: nothing more to tell it
            gunicorn_util.write_nonblock(client, answer)


class _CountedInput:
    """``wsgi.input`` counting what the application read of the request body."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.read_bytes = 0
        self.exhausted = False

    def _count(self, data: bytes, size: int | None) -> bytes:
        self.read_bytes += len(data)
        if not data and size != 0:
            self.exhausted = True
        return data

    def read(self, size: int | None = None) -> bytes:
        return self._count(self._stream.read(size), size)

    def readline(self, size: int | None = None) -> bytes:
        return self._count(self._stream.readline(size), size)

    def readlines(self, hint: int | None = None) -> list[bytes]:
        lines = self._stream.readlines(hint)
        for line in lines:
            self._count(line, None)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class CloseUnreadBodies:
    """WSGI middleware: a response to a request whose body the application did not read to its end (a 413 past
    ``server.max_body_bytes``, or a 401/404/415 answered before reading) goes out with ``Connection: close``.

    gunicorn drains at most 64 KB of an unread body before reusing a connection and closes it silently beyond
    that — after having announced ``keep-alive`` (RFC 9112 §9.3), so the client's next request on it would be
    lost. gunicorn drops a ``Connection`` header set by the application (hop-by-hop); its response object, whose
    bound ``start_response`` the worker passes in, has ``force_close()``, which makes it send ``close`` and
    close the connection after the answer (lingering, so the answer is not cut by a reset). Under another server
    the middleware does nothing.
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        body = _CountedInput(environ["wsgi.input"])
        environ["wsgi.input"] = body
        declared = environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            unread = (not body.exhausted) if chunked else (declared.isdigit() and body.read_bytes < int(declared))
            if unread:
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if callable(force_close):
                    force_close()
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


class GunicornApp(BaseApplication):
    """Gunicorn with ``options`` (from :func:`gunicorn_options`) serving the WSGI app ``load()`` returns; ``load``
    runs in each worker after the fork. The benchmark's baseline runs on this same class."""

    def __init__(self, options: dict[str, Any], load: Callable[[], Any]) -> None:
        self._options = options
        self._load = load
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._load()


def freeze_start_up_heap() -> None:
    """Move every object alive now into the collector's permanent generation (``gc.freeze``).

    A hook call that parses a large FHIR answer allocates millions of objects, and every full collection it
    triggers walks every tracked object of the process: with the start-up heap (rules data, fhir.resources models,
    the parse cache's first entries) that walk cost tenths of a second on the hook path, past the deadline. Frozen
    objects are never walked. In the master, before the fork, it also keeps the workers' pages shared (the gc
    module's documentation on ``gc.freeze``: freeze before ``fork()`` to avoid copy-on-write).
    """
    gc.collect()
    gc.freeze()


# Young-generation threshold of the workers' collector (CPython's default is 700). A hook call builds a request
# document and a record of tens of thousands of objects that all die when the call ends. At 700 allocations the
# collector ran in the middle of nearly every call, moved that whole document into the older generations, and so
# set off a full collection every hundred-odd calls that walked the parse cache too: measured on a 56 KB record
# with a new patient per call, 0.7 ms of collection per call on average and 50 ms pauses at the p99. At 50,000, a
# call's objects are mostly freed by reference counting before any collection sees them; cyclic garbage still
# goes at the next young collection. The middle generation is collected every 20 young collections and a full
# collection waits for 100 of those (and, as always in CPython, for a quarter more long-lived objects).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_collector() -> None:
    """Set the worker's collector thresholds to ``GC_THRESHOLDS`` (see there why)."""
    gc.set_threshold(*GC_THRESHOLDS)


# How long a thread may hold the interpreter while another waits for it (CPython's default is 5 ms). A worker's
# hook-call threads share it with the determination log's writer (reading journal records and handing them to the
# writer child) and gunicorn's own loop. A hook call that gives the interpreter up for a moment — writing its
# journal record, its log line, its answer — waited until the other thread's slice ended: measured in process on a
# 56 KB record, the journal append took 1.06 ms at its 99th percentile with 5 ms and 0.21 ms with 0.5 ms (its
# median, 0.06 ms, either way). Two hook calls running at once in one worker also interleave more finely.
SWITCH_INTERVAL_SECONDS = 0.0005


def tune_switch_interval() -> None:
    """Set the worker's thread switch interval to ``SWITCH_INTERVAL_SECONDS`` (see there why)."""
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


def _service(config: Config) -> Any:
    from . import logwriter
    from .app import create_app

    logwriter.PROCESS_BY_DEFAULT = True  # a served worker: the log's database writes in a child (logwriter.py)

    app = CloseUnreadBodies(create_app(config))
    freeze_start_up_heap()  # the worker's own start-up objects (the app, its caches, its rules data)
    tune_collector()
    tune_switch_interval()
    return app


def gunicorn_options(config: Config, host: str, port: int, workers: int | None = None) -> dict[str, Any]:
    server = config.server
    return {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers or int(server["workers"]),
        "worker_class": "cds_service.server.HouseWorker",  # gthread, with errors in the house format
        "threads": int(server["threads"]),
        # A hook call never legitimately outlives its deadline; the worker timeout is a last resort.
        "timeout": max(30, int(config.deadline_seconds * 4)),
        "graceful_timeout": max(10, int(config.deadline_seconds * 2)),
        "keepalive": 5,
        "accesslog": None,  # our own structured log line per request; gunicorn's would print query strings
        "errorlog": "-",
        "loglevel": "warning",
        "proc_name": "g2250-cds",
        # Past these, gunicorn answers itself (HouseWorker: 414 / 431 OperationOutcomes).
        "limit_request_line": 8190,
        "limit_request_fields": 100,
        "limit_request_field_size": 8190,
    }


def _child_exit(_server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def run_gunicorn(config: Config, config_path: str | None, *, host: str, port: int,
                 workers: int | None = None) -> None:
    options = gunicorn_options(config, host, port, workers)
    # Create the database tables once, in the master, before the workers fork and race to do it.
    from .store import FeedbackStore

    store = FeedbackStore(config.database_url)
    try:
        store.create_schema()
    finally:
        store.dispose()
    # Import fhir.resources' element models once, here, rather than in every worker's first calls.
    from .fhir.parse import warm_up

    warm_up()
    # Metrics from every worker, aggregated at scrape time (prometheus_client multiprocess mode).
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="g2250-metrics-")
    options["child_exit"] = _child_exit
    freeze_start_up_heap()
    GunicornApp(options, lambda: _service(config)).run()
