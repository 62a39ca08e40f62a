"""Flask application factory and the CDS Hooks HTTP surface (cds-hooks.md "Endpoints").

``GET /cds-services`` (discovery), ``POST /cds-services/{id}`` (invoke), ``POST /cds-services/{id}/feedback``.
Every error is an OperationOutcome; client mistakes are 4xx, never 5xx. CORS is on so the browser-based CDS Hooks
sandbox can call the service.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Iterator
from typing import Any

import orjson
from flask import Flask, Response, current_app, g, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

from hooks import SERVICES_BY_ID

from . import metrics, worklist
from .config import Config, load_config
from .fhir.client import has_lone_surrogate
from .jsonbytes import orjson_reads_exactly
from .logs import configure_logging, request_line
from .runtime import Clock, InvocationStats, Runtime, ServiceUnavailable
from .store import FeedbackStore
from .web.auth import Authenticator, AuthError, JwksCache, replay_cache_for
from .web.errors import ApiError, error_response

log = logging.getLogger("g2250_cds")

_JSON_TYPES = ("application/json", "application/fhir+json")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_BOM = b"\xef\xbb\xbf"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")
#: A service's URL (``/cds-services/{id}``): the requests counted as hook calls, whatever their outcome.
_HOOK_PATH = re.compile(r"/cds-services/([^/]+)")


def create_app(config: Config | None = None, *, clock: Clock | None = None,
               store: FeedbackStore | None = None, fhir_headers: dict[str, str] | None = None,
               test_config: dict[str, Any] | None = None) -> Flask:
    """Build the WSGI app. ``config`` defaults to ``$G2250_CDS_CONFIG`` or the embedded defaults."""
    config = config or load_config()
    configure_logging(config.logging["level"], config.logging["format"])
    app = Flask(__name__)
    app.url_map.merge_slashes = False  # a "//" path is a 404 OperationOutcome, not an HTML redirect
    app.config["MAX_CONTENT_LENGTH"] = int(config.server["max_body_bytes"])
    app.config["JSON_SORT_KEYS"] = False
    if test_config:
        app.config.update(test_config)
    runtime = Runtime(config, clock=clock, store=store, fhir_headers=fhir_headers)
    runtime.create_schema()  # a database down at start is tolerated: the journal holds the determinations
    app.extensions["g2250_runtime"] = runtime
    authenticator = None
    if config.auth_required:
        # jti replay cache shared by every worker and replica: Redis, else the database (cds_service.replay).
        authenticator = Authenticator(config, replay=replay_cache_for(config.redis_url, config.database_url),
                                      jwks=JwksCache())
    if not config.auth_required:
        log.warning(
            "AUTHENTICATION IS OFF (auth.required: false): any caller can invoke this service. "
            "Use this only on a developer machine.",
            extra={"event": "auth-disabled"},
        )
    CORS(
        app,
        resources={r"/cds-services*": {"origins": config.server["cors_allowed_origins"]}},
        allow_headers=["Authorization", "Content-Type"],
        methods=["GET", "POST", "OPTIONS"],
        max_age=600,
    )
    _cors_for_browsers_only(app)
    _register_routes(app, runtime, authenticator)
    worklist.init_app(app, runtime)  # the billing worklist's pages under /worklist (worklist.enabled)
    app.wsgi_app = HookCalls(app, app.wsgi_app, runtime, authenticator)  # type: ignore[method-assign]
    return app


def _cors_for_browsers_only(app: Flask) -> None:
    """Run flask-cors only for requests that carry an ``Origin`` header.

    CORS headers are read by browsers alone, and browsers send ``Origin`` on every cross-origin request and
    preflight (Fetch standard). EHRs calling server to server (most production traffic) send none, and
    flask-cors' per-response work (origin and resource matching) cost about 60-90 µs of every hook call.
    """
    functions = app.after_request_funcs.setdefault(None, [])
    for i, function in enumerate(functions):
        if getattr(function, "__name__", "") != "cors_after_request":
            continue

        def only_with_origin(response: Response, _cors: Any = function) -> Response:
            return _cors(response) if "Origin" in request.headers else response

        functions[i] = only_with_origin


_INTERNAL_ERROR = "internal error; the request id is in the X-Request-Id header"


def finish_request(request_id: str | None, method: str, route: str, status: int, seconds: float,
                   stats: InvocationStats | None, service_id: str | None) -> None:
    """A request's one log line, and its metrics from the same fields (``metrics.count_request``): every hook call
    with its final status, whether the runtime answered it or it was refused before. ``service_id``: the id in a
    service's URL (``/cds-services/{id}``), else None."""
    fields: dict[str, Any] = {
        "event": "http",
        "request_id": request_id,
        "method": method,
        "route": route,
        "status": status,
        "duration_ms": round(seconds * 1000, 1),
    }
    if stats is not None:
        fields.update(service=stats.service_id, hook=stats.hook, cards=stats.cards,
                      fhir_requests=stats.fhir_requests, waves=stats.waves,
                      prefetch_hits=stats.prefetch_hits, skipped_resources=stats.skipped_resources)
    elif service_id is not None:
        # Refused before the runtime took the call (401, unknown service, 405): a bounded, PHI-free label.
        service = SERVICES_BY_ID.get(service_id)
        if service is not None:
            fields.update(service=service.id, hook=service.hook)
        else:
            fields["service"] = metrics.UNKNOWN_SERVICE
    request_line(log, fields)
    metrics.count_request(fields, seconds)


class _Answer:
    """A hook call's answer body, as a WSGI iterable: what the call kept (its request document, record and rules'
    objects) is released when the server closes it, once the answer is on the wire (as Flask's
    ``call_on_close`` did: freeing tens of thousands of objects first took about a tenth of a call's latency)."""

    __slots__ = ("body", "keep")

    def __init__(self, body: bytes, keep: list[Any]) -> None:
        self.body = body
        self.keep = keep

    def __iter__(self) -> Iterator[bytes]:
        return iter((self.body,))

    def close(self) -> None:
        self.keep.clear()


class HookCalls:
    """``POST /cds-services/{id}`` — the hook call — answered in plain WSGI, around Flask's own WSGI callable.

    Why (issue 13): Flask's per-request machinery (request context, URL map, before/after handlers, the Response
    object, the session interface) cost about 4 % of a hook call's round trip on a 56 KB record, measured served
    and interleaved (``bench.ab``). Hook calls are nearly all of the traffic and have one shape; everything else
    (discovery, feedback, health, metrics, the worklist) stays in Flask.

    Same answers, same log line and metrics as the Flask route had: request id, authentication (the same
    ``Authenticator``, the same 401), the body read, JSON decoding, the runtime's answer or its ``ApiError`` as an
    OperationOutcome, an unexpected error as the same 500. Whatever is less plain goes to Flask untouched, before
    anything is read: another method or URL, a browser's call (``Origin``: CORS is flask-cors'), a media type
    that is not JSON (415), a body without a ``Content-Length`` or past ``server.max_body_bytes`` (413)."""

    def __init__(self, app: Flask, flask_wsgi: Any, runtime: Runtime, authenticator: Authenticator | None) -> None:
        self.app = app
        self.flask_wsgi = flask_wsgi
        self.runtime = runtime
        self.authenticator = authenticator

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") != "POST" or "HTTP_ORIGIN" in environ:
            return self.flask_wsgi(environ, start_response)
        path = environ.get("PATH_INFO", "")
        match = _HOOK_PATH.fullmatch(path)
        length = environ.get("CONTENT_LENGTH", "")
        limit = self.app.config.get("MAX_CONTENT_LENGTH")
        if (match is None or match.group(1) not in SERVICES_BY_ID or not path.isascii()
                or not (length.isascii() and length.isdigit()) or (limit and int(length) > limit)
                or "HTTP_TRANSFER_ENCODING" in environ
                or environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower() not in _JSON_TYPES):
            return self.flask_wsgi(environ, start_response)
        return self._answer(environ, start_response, path, match.group(1), int(length))

    def _answer(self, environ: dict[str, Any], start_response: Any, path: str, service_id: str,
                length: int) -> Any:
        started = time.monotonic()
        request_id = _request_id(environ.get("HTTP_X_REQUEST_ID", ""))
        stats: InvocationStats | None = None
        try:
            client = None
            if self.authenticator is not None:
                client = _authenticate(self.authenticator, environ.get("HTTP_AUTHORIZATION"), path)
            service = self.runtime.service(service_id)
            stats = InvocationStats(service_id, service.hook)
            body = decode_json_body(_read_body(environ, length))
            result = self.runtime.invoke(service_id, body, client, stats)
            answer = _json_bytes(result)
            stats.keep.extend((body, result))
        except ApiError as error:
            response = error_response(error)
        except Exception as error:  # as Flask's errorhandler(Exception) did: logged, a 500 OperationOutcome
            log.error("unhandled error", extra={"event": "error", "request_id": request_id,
                                                "error_type": type(error).__name__})
            response = error_response(ApiError(500, _INTERNAL_ERROR))
        else:
            finish_request(request_id, "POST", metrics.HOOK_ROUTE, 200, time.monotonic() - started, stats,
                           service_id)
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer))),
                                      ("X-Request-Id", request_id)])
            return _Answer(answer, stats.keep)
        response.headers["X-Request-Id"] = request_id
        finish_request(request_id, "POST", metrics.HOOK_ROUTE, response.status_code, time.monotonic() - started,
                       stats, service_id)
        return response(environ, start_response)


def _request_id(supplied: str) -> str:
    """The caller's ``X-Request-Id`` (its first 64 characters) when it is a plain token, else a new one."""
    supplied = supplied[:64]
    return supplied if _REQUEST_ID.fullmatch(supplied) else _new_request_id()


def _authenticate(authenticator: Authenticator, header: str | None, path: str) -> Any:
    """The calling client (``Authenticator.authenticate``); a refusal is counted, logged and answered 401 with no
    detail (cds-hooks.md "Trusting CDS clients")."""
    try:
        return authenticator.authenticate(header, path)
    except AuthError as exc:
        metrics.AUTH_FAILURES.inc()
        log.info("authentication refused", extra={"event": "auth-failed", "reason": exc.reason})
        raise ApiError(401, "", body=False) from None


_UNREADABLE_BODY = "request body could not be read (malformed message framing)"


def _read_body(environ: dict[str, Any], length: int) -> bytes:
    """The request body of a declared length, as Flask read it: a connection lost before its end is a 400 (werkzeug's
    ``ClientDisconnected``), a body reader failing otherwise too, with its own words (``_json_body``)."""
    try:
        raw = environ["wsgi.input"].read(length) if length else b""
    except Exception as exc:
        raise ApiError(400, _UNREADABLE_BODY, ["(root)"]) from exc
    if len(raw) != length:
        raise ApiError(400, "Bad Request")
    return raw


def _new_request_id() -> str:
    """128 random bits as 32 hex digits. A request id correlates log lines; it guards nothing, so it needs no
    cryptographic randomness (``uuid4`` reads the kernel's, about 50 µs here). ``random`` reseeds itself in each
    forked worker, so workers never share a sequence."""
    return f"{random.getrandbits(128):032x}"


def runtime_of(app: Flask) -> Runtime:
    return app.extensions["g2250_runtime"]


def _json_body() -> Any:
    mimetype = (request.mimetype or "").lower()
    if mimetype not in _JSON_TYPES:
        raise ApiError(415, "Content-Type must be application/json", ["Content-Type"], code="not-supported")
    try:
        raw = request.get_data(cache=False)
    except HTTPException:
        raise  # 413 past server.max_body_bytes, or the client went away mid-body (400)
    except Exception as exc:  # the server's body reader: malformed chunked framing and the like
        raise ApiError(400, _UNREADABLE_BODY, ["(root)"]) from exc
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit and request.content_length is None and len(raw) >= limit:
        # A chunked upload is cut at the limit silently by the framework: never parse a truncated body.
        raise ApiError(413, "request body is larger than the configured server.max_body_bytes")
    return decode_json_body(raw)


def decode_json_body(raw: bytes) -> Any:
    """A request body's JSON document, or ApiError 400 naming what is wrong with it."""
    if raw.startswith(_BOM):  # RFC 8259 §8.1: a byte order mark may be ignored
        raw = raw[len(_BOM):]
    if orjson_reads_exactly(raw):
        # Fast path: orjson is stricter in every way that matters here — it refuses NaN/Infinity, numbers that
        # overflow a double, invalid UTF-8 and unpaired surrogate escapes (integers beyond 64 bits: jsonbytes.py).
        # Anything orjson refuses takes the stdlib path below, so every error keeps its own message.
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return strict_json_body(raw)


def strict_json_body(raw: bytes) -> Any:
    """The stdlib decoder with the same refusals (and a message for each); ``raw`` has no byte order mark."""
    try:
        # RFC 8259 §8.1: JSON exchanged between systems is UTF-8. Decoded
        # strictly: UTF-8-encoded surrogates (b"\\xed\\xa0\\x80") are not UTF-8 and would reach the log,
        # the database and outbound URLs as text that cannot be encoded again.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "request body is not valid UTF-8", ["(root)"]) from exc
    try:
        document = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:  # incl. integers longer than Python reads (int_max_str_digits)
        raise ApiError(400, "request body is not valid JSON", ["(root)"]) from exc
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) and has_lone_surrogate(document):
        raise ApiError(400, "request body holds an unpaired UTF-16 surrogate escape", ["(root)"])
    return document


def _no_constant(name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")  # RFC 8259 §6


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: RFC 8259 §6 allows implementations to refuse numbers out of their range
        raise ValueError("number out of range")
    return value


def _json_bytes(document: dict[str, Any]) -> bytes:
    try:
        # orjson writes the same document as the stdlib below (compact, UTF-8), about ten times faster (a card's
        # evidence and criteria made stdlib encoding ~5 % of a hook call's CPU).
        return orjson.dumps(document)
    except TypeError:  # what orjson does not write (an integer beyond 64 bits, a non-string key): the stdlib
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _json_response(document: dict[str, Any], status: int = 200) -> Response:
    return Response(_json_bytes(document), status=status, mimetype="application/json")


def _register_routes(app: Flask, runtime: Runtime, authenticator: Authenticator | None) -> None:
    @app.before_request
    def _start() -> None:
        g.request_id = _request_id(request.headers.get("X-Request-Id", ""))
        g.started = time.monotonic()
        g.client = None
        # CDS Hooks "Trusting CDS clients": every discovery, service and feedback call carries a JWT; CORS
        # preflights do not (browsers never send Authorization on OPTIONS).
        if authenticator is not None and request.method != "OPTIONS" and request.path.startswith("/cds-services"):
            g.client = _authenticate(authenticator, request.headers.get("Authorization"), request.path)

    @app.after_request
    def _finish(response: Response) -> Response:
        """One log line per request, and the request's metrics from the same fields (``metrics.count_request``):
        every hook call with its final status, whether the runtime answered it or it was refused before."""
        if g.get("finished"):  # a failing later after_request handler makes Flask finalize the request again
            return response
        g.finished = True
        response.headers["X-Request-Id"] = g.get("request_id", "")
        seconds = time.monotonic() - g.get("started", time.monotonic())
        hook_path = _HOOK_PATH.fullmatch(request.path)
        route = request.url_rule.rule if request.url_rule else "(unmatched)"
        if hook_path is not None:
            route = metrics.HOOK_ROUTE  # also when the method is wrong (405: no rule matched)
        finish_request(g.get("request_id"), request.method, route, response.status_code, seconds, g.get("stats"),
                       hook_path.group(1) if hook_path is not None else None)
        return response

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        if worklist.handles(app, request):  # people read /worklist: HTML pages, not OperationOutcomes
            return worklist.error_page(error)
        status = error.code or 500
        messages = {
            404: "not found; the service catalogue is at GET /cds-services",
            405: "method not allowed on this URL",
            413: "request body is larger than the configured server.max_body_bytes",
        }
        response = error_response(ApiError(status, messages.get(status, error.name)))
        if status == 405 and hasattr(error, "valid_methods") and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.error("unhandled error", extra={"event": "error", "request_id": g.get("request_id"),
                                            "error_type": type(error).__name__})
        if worklist.handles(app, request):
            return worklist.error_page(error)
        return error_response(ApiError(500, _INTERNAL_ERROR))

    @app.get("/cds-services")
    def discovery() -> Response:
        return _json_response(runtime.discovery())

    @app.post("/cds-services/<service_id>")
    def invoke(service_id: str) -> Response:
        service = runtime.service(service_id)
        g.stats = InvocationStats(service_id, service.hook)
        body = _json_body()
        result = runtime.invoke(service_id, body, g.client, g.stats)
        response = _json_response(result)
        # The request document, its record and the rules' objects (tens of thousands of them) are released once
        # the answer is on the wire — the server closes the response after writing it — not before: freeing them
        # took about a tenth of a call's latency on a 56 KB record (issue 13). The work is the same; the EHR waits
        # less.
        g.stats.keep.extend((body, result))
        response.call_on_close(g.stats.keep.clear)
        return response

    @app.post("/cds-services/<service_id>/feedback")
    def feedback(service_id: str) -> Response:
        runtime.service(service_id)
        body = _json_body()
        try:
            runtime.feedback(service_id, body)
        except ServiceUnavailable as exc:
            # The database cannot store it now: 503 + Retry-After, never a 500. The POST is one transaction
            # and idempotent, so the EHR's retry stores each item exactly once.
            response = error_response(exc)
            response.headers.update(exc.headers)
            return response
        return Response(status=200)  # the spec defines no response body for feedback

    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness: the process answers."""
        return _json_response({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        """Readiness, each check with its own timeout: the config file re-read and validated, the database, Redis
        (when configured), the determination journal. ``ok`` and ``degraded`` (hook calls still answered and
        recorded in the journal; feedback may answer 503) are 200; ``failed`` is 503."""
        status, body = runtime.ready()
        return _json_response(body, 503 if status == "failed" else 200)

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        runtime.determination_log.publish_metrics()  # this worker's backlog as of now, not of the last round
        body, content_type = metrics.render()
        return Response(body, mimetype=content_type.split(";")[0], content_type=content_type)
