"""One hook invocation, independent of Flask: the code path shared by the HTTP service and ``g2250-cds evaluate``.

validate the request → check the fhirServer is allowed (before any outbound connection) → prefetch-or-fetch →
hook service → strict response. Client mistakes become :class:`ApiError` (4xx with an OperationOutcome).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import requests
from requests.adapters import HTTPAdapter
from sqlalchemy.exc import SQLAlchemyError

from hooks import SERVICES, SERVICES_BY_ID, HookOutcome, HookRequest, HookService
from hooks.base import RulesEnvironment

from . import metrics
from .config import ClientConfig, Config, ConfigError, read_config_file, validate_config_data
from .fhir.client import FhirClient
from .fhir.source import BatchRefusals, DataSource, DataUnavailable
from .journal import Journal, JournalError, JournalFull, journal_directory
from .logwriter import use_process
from .rules.calendar import BusinessCalendar
from .rules.rules_data import load_rules_data
from .store import DeterminationLog, FeedbackStore, StoreUnavailable
from .web import schemas
from .web.errors import ApiError

log = logging.getLogger("g2250_cds")

Clock = Callable[[], datetime]

#: Seconds an EHR is asked to wait (``Retry-After``) when a write the answer depends on cannot be made now.
RETRY_AFTER_SECONDS = 5
#: Each readiness check's own time limit (seconds): ``/readyz`` answers within the longest, whatever hangs.
READY_TIMEOUTS = {"config": 1.0, "database": 1.0, "redis": 0.5}


class ServiceUnavailable(ApiError):
    """503 with ``Retry-After``: a write this answer depends on (feedback, the determination journal) cannot be
    made now; the same request later will succeed. Never a 500: nothing is wrong with the request or the code."""

    def __init__(self, diagnostics: str, retry_after: int = RETRY_AFTER_SECONDS) -> None:
        super().__init__(503, diagnostics, code="transient", headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


def _config_file(config: Config) -> Path | None:
    """The file the config was loaded from (``load_config`` names it in ``source``), if any."""
    path = Path(config.source)
    return path if config.source not in ("embedded defaults", "config", "test") and path.is_file() else None


def normalise_server_url(url: str) -> str:
    """Scheme and host are case-insensitive; a trailing slash does not make another server."""
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"


@dataclass
class InvocationStats:
    service_id: str
    hook: str
    status: int = 200
    cards: int = 0
    fhir_requests: int = 0
    waves: int = 0
    prefetch_hits: int = 0
    skipped_resources: int = 0
    duration_ms: float = 0.0
    # What the call read (the request, its record, the rules' context), released once the answer is sent.
    keep: list[Any] = field(default_factory=list)


class Runtime:
    """Long-lived state of the service: config, connection pool, thread pool, store, clock."""

    def __init__(self, config: Config, *, clock: Clock | None = None, store: FeedbackStore | None = None,
                 session: requests.Session | None = None, fhir_headers: dict[str, str] | None = None) -> None:
        self.config = config
        # Extra headers on every FHIR request; tests send ``Prefer: handling=strict`` so that a search
        # parameter the server does not support fails loudly instead of being ignored.
        self.fhir_headers = dict(fhir_headers or {})
        tz = ZoneInfo(config.calendar["timezone"])
        self.clock: Clock = clock or (lambda: datetime.now(tz))
        workers = int(config.fhir["max_workers"])
        self.batch_refusals = BatchRefusals()  # servers that answered a batch with an error, for an hour
        self.executor = ThreadPoolExecutor(max_workers=workers * 4, thread_name_prefix="fhir")
        self.session = session or requests.Session()
        adapter = HTTPAdapter(pool_connections=8, pool_maxsize=workers * 4, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.trust_env = False  # never route PHI through a proxy picked up from the environment
        self.store = store or FeedbackStore(config.database_url)
        self.services: tuple[HookService, ...] = SERVICES
        journal_config = config.journal
        self.journal = Journal(
            journal_directory(self.store.database_url, journal_config["dir"]),
            max_bytes=int(journal_config["max_bytes"]),
            fsync=journal_config["fsync"],
            fsync_interval_seconds=float(journal_config["fsync_interval_seconds"]),
            header={"database": self.store.engine.url.render_as_string(hide_password=True)},
        )
        self.env = RulesEnvironment(
            calendar=BusinessCalendar.from_config(config.calendar),
            rules=load_rules_data(config.raw.get("rules")),
        )
        # The log's writer also feeds the billing worklist: the money at stake from the rates table, dates (timely
        # filing) in the practice's time zone — both taken once here.
        self.determination_log = DeterminationLog(self.store, self.journal, rates=self.env.rules.rates,
                                                  tz=self.env.calendar.tz,
                                                  process=use_process(journal_config.get("writer")))
        # Readiness: each probe on its own thread with its own timeout; a probe still hanging from an earlier
        # /readyz is waited on again, never started twice (no pile-up of stuck threads).
        self.config_path = _config_file(config)
        self._config_seen: tuple[bytes, str] | None = None
        self._probe_pool = ThreadPoolExecutor(max_workers=len(READY_TIMEOUTS), thread_name_prefix="readyz")
        self._probes: dict[str, Future[str]] = {}
        self._probe_lock = threading.Lock()
        self._last_checks: dict[str, str] = {}
        self._redis_client: Any = None

    def create_schema(self) -> None:
        """Create the tables, tolerating a database that is down: a worker that gunicorn restarts during an outage
        (after a ``kill -9``, say) must boot — a worker failing to boot halts the whole server — and answer from
        the journal; the writer creates the tables when the database returns, and feedback answers 503 until."""
        try:
            if not self.store.ping():  # one bounded attempt, not create_schema's ten retries meant for races
                raise ConnectionError("database unreachable")
            self.store.create_schema()
        except (SQLAlchemyError, ConnectionError) as exc:
            log.error("database unreachable at start: determinations are journaled and written when it returns",
                      extra={"event": "database-unreachable", "error_type": type(exc).__name__})

    # -- discovery ---------------------------------------------------------------------------------------------
    def discovery(self) -> dict[str, Any]:
        return {"services": [service.discovery_entry() for service in self.services]}

    def service(self, service_id: str) -> HookService:
        service = SERVICES_BY_ID.get(service_id)
        if service is None:
            raise ApiError(404, "no CDS service with this id; see GET /cds-services")
        return service

    # -- allowlist ---------------------------------------------------------------------------------------------
    def allowed_servers(self, client: ClientConfig | None) -> set[str]:
        if client is not None:
            return {normalise_server_url(u) for u in client.fhir_servers}
        return {normalise_server_url(u) for u in self.config.fhir["allowed_servers"]}

    def check_fhir_server(self, fhir_server: str, client: ClientConfig | None) -> None:
        """Refuse a caller-chosen fhirServer not on the allowlist — before any connection is made (no SSRF)."""
        if normalise_server_url(fhir_server) not in self.allowed_servers(client):
            raise ApiError(403, "fhirServer is not on the allowlist for this CDS client", ["fhirServer"],
                           code="forbidden")

    # -- invocation --------------------------------------------------------------------------------------------
    def parse_request(self, service: HookService, body: Any) -> HookRequest:
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", ["(root)"])
        problems = schemas.problems("cds-request", body)
        if problems:
            raise ApiError(400, "; ".join(f"{p} {m}" for p, m in problems[:10]), [p for p, _ in problems[:10]])
        if body["hook"] != service.hook:
            raise ApiError(400, f"hook must be {service.hook!r} for this service", ["hook"])
        context_problems = service.context_problems(body["context"])
        if context_problems:
            raise ApiError(400, "; ".join(f"{p} {m}" for p, m in context_problems),
                           [p for p, _ in context_problems])
        return HookRequest.from_json(body)

    def invoke(self, service_id: str, body: Any, client: ClientConfig | None = None,
               stats: InvocationStats | None = None) -> dict[str, Any]:
        started = time.monotonic()
        service = self.service(service_id)
        stats = stats or InvocationStats(service_id, service.hook)
        request = self.parse_request(service, body)
        deadline = started + self.config.deadline_seconds
        fhir_client = None
        if request.fhir_server:
            self.check_fhir_server(request.fhir_server, client)
            fhir_client = FhirClient(
                request.fhir_server,
                access_token=request.access_token,
                timeout=float(self.config.fhir["timeout_seconds"]),
                max_pages=int(self.config.fhir["max_pages"]),
                max_entries=int(self.config.fhir["max_entries"]),
                page_size=int(self.config.fhir["page_size"]),
                session=self.session,
                deadline=deadline,
                extra_headers=self.fhir_headers,
            )
        # Time kept back from optional FHIR queries for parsing, rules and cards (see DataSource).
        reserve = min(0.3, 0.2 * self.config.deadline_seconds)
        # Time kept back from required queries to write the answer (a 412) before the deadline: threads still
        # parsing large FHIR answers hold the interpreter in pieces of tens of ms (json.loads cannot be interrupted).
        answer_time = min(0.25, 0.1 * self.config.deadline_seconds)
        if fhir_client is not None:
            fhir_client.decode_by = deadline - answer_time
        source = DataSource(request.prefetch, fhir_client, self.executor, deadline, reserve=reserve,
                            answer_time=answer_time,
                            batch=self.config.fhir["batch"] == "auto", batch_refusals=self.batch_refusals)
        try:
            outcome = service.handle(request, source, self.clock(), self.env)
        except DataUnavailable as exc:
            stats.status = 412
            raise ApiError(412, f"required data could not be obtained ({exc.key}): {exc.reason}",
                           code="incomplete") from exc
        finally:
            # Whatever the outcome (200, 412, deadline, an error): the caller's log line and the metrics
            # (metrics.count_request) both read these. The client's own count is the latest: it includes requests
            # sent after the last wave was mapped (next pages of an abandoned query, until the deadline).
            stats.fhir_requests = (fhir_client.requests_made if fhir_client is not None
                                   else source.stats.fhir_requests)
            stats.waves = source.stats.waves
            stats.prefetch_hits = source.stats.prefetch_hits
            stats.duration_ms = (time.monotonic() - started) * 1000
        if outcome.data is not None:
            stats.skipped_resources = len(outcome.data.bag.skipped)
        # The determinations are journaled (on disk) before the answer leaves: an answered determination is a
        # recorded one. A journal that cannot take them refuses the answer rather than give unrecorded advice.
        try:
            cards = {card.get("uuid"): card for card in outcome.response.get("cards", ())}
            self.determination_log.append_determinations(
                [(uuid, determination, cards.get(uuid)) for uuid, determination in outcome.determinations],
                service_id=service_id, hook_instance=request.hook_instance)
        except JournalFull as exc:
            stats.status = 503
            log.error("determination journal full: hook call refused", extra={"event": "journal-full"})
            raise ServiceUnavailable("the determination log is full and cannot record this answer; retry later"
                                     ) from exc
        except JournalError as exc:
            stats.status = 503
            log.error("determination journal unwritable: hook call refused",
                      extra={"event": "journal-unwritable", "error_type": type(exc.__cause__).__name__})
            raise ServiceUnavailable("the determination log cannot record this answer; retry later") from exc
        stats.cards = len(outcome.response.get("cards", ()))  # answered: a refused call (503) returns none
        self._count(service_id, outcome)
        stats.keep.append((request, source, outcome))
        return outcome.response

    @staticmethod
    def _count(service_id: str, outcome: HookOutcome) -> None:
        """The cards of an answered call. Call duration, status and FHIR requests are counted per HTTP request,
        from its log line, whatever the outcome (``metrics.count_request``)."""
        by_uuid = dict(outcome.determinations)
        for card in outcome.response.get("cards", ()):
            determination = by_uuid.get(card["uuid"])
            metrics.child(metrics.CARDS, service_id, card["indicator"],
                          determination.status if determination else "none").inc()

    # -- feedback ----------------------------------------------------------------------------------------------
    def feedback(self, service_id: str, body: Any) -> int:
        self.service(service_id)
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", ["(root)"])
        problems = schemas.problems("feedback", body)
        if problems:
            raise ApiError(400, "; ".join(f"{p} {m}" for p, m in problems[:10]), [p for p, _ in problems[:10]])
        try:
            stored = self.store.record_outcomes(service_id, body["feedback"])
        except StoreUnavailable as exc:
            metrics.FEEDBACK_UNAVAILABLE.inc()
            log.warning("feedback not stored: database unavailable", extra={"event": "feedback-unavailable",
                                                                            "error_type": str(exc)})
            raise ServiceUnavailable("feedback cannot be stored now; retry later (it is stored once)") from exc
        # Counted as stored: an item stored before (the EHR's retry, a repeated item) adds nothing to
        # g2250_feedback_total, which therefore equals the rows in the feedback table.
        for outcome, new in stored.items():
            metrics.child(metrics.FEEDBACK, service_id, outcome).inc(new)
        repeated = len(body["feedback"]) - sum(stored.values())
        if repeated:
            metrics.child(metrics.FEEDBACK_DUPLICATES, service_id).inc(repeated)
        return sum(stored.values())

    # -- readiness ---------------------------------------------------------------------------------------------
    def ready(self) -> tuple[str, dict[str, Any]]:
        """``(status, body)``: ``ok``; ``degraded`` — still answering hook calls, but the database is unreachable
        (determinations wait in the journal, feedback answers 503) or the journal is draining; ``failed`` — the
        config file no longer validates, Redis (when configured) is unreachable, the journal is past its bound or
        unwritable, or the database is down while it holds the replay cache (every authenticated call fails)."""
        probes: dict[str, Callable[[], str]] = {"config": self._check_config, "database": self._check_database}
        if self.config.redis_url:
            probes["redis"] = self._check_redis
        started = time.monotonic()
        with self._probe_lock:
            futures = {}
            for name, probe in probes.items():
                future = self._probes.get(name)
                if future is None or future.done():
                    future = self._probes[name] = self._probe_pool.submit(probe)
                futures[name] = future
        checks: dict[str, str] = {}
        for name, future in futures.items():
            remaining = READY_TIMEOUTS[name] - (time.monotonic() - started)
            try:
                checks[name] = future.result(timeout=max(0.0, remaining))
            except FutureTimeout:
                checks[name] = "timeout"
            except Exception as exc:  # a probe never raises on purpose; say what it was, do not hide it
                checks[name] = f"error ({type(exc).__name__})"
        checks["journal"] = self._check_journal(database_ok=checks["database"] == "ok")
        status = "ok"
        failed = (checks["config"] != "ok" or checks.get("redis", "ok") != "ok"
                  or checks["journal"] in ("over bound", "unwritable")
                  or (checks["database"] != "ok" and self.config.auth_required and not self.config.redis_url))
        if failed:
            status = "failed"
        elif checks["database"] != "ok" or checks["journal"] != "ok":
            status = "degraded"
        self._log_changes(checks)
        journal = self.journal
        # Bytes are the whole journal directory's (every worker's, as of the last scan); rows and counters are
        # this worker's — /metrics sums them over workers.
        body: dict[str, Any] = {"status": status, "checks": checks, "journal": {
            "backlog_bytes": journal.total_pending_bytes(), "max_bytes": journal.max_bytes,
            "backlog_rows": journal.pending_rows(), "write_errors": self.determination_log.failed,
            "rows_replayed": self.determination_log.replayed}}
        return status, body

    def _check_config(self) -> str:
        """Re-read the config file and validate it (again only when its bytes changed: validation builds the
        calendar and the rules data)."""
        if self.config_path is None:
            return "ok"  # embedded defaults or a mapping: nothing on disk can have changed
        try:
            data = self.config_path.read_bytes()
        except OSError:
            return "unreadable"
        digest = hashlib.sha256(data).digest()
        if self._config_seen is not None and self._config_seen[0] == digest:
            return self._config_seen[1]
        try:
            problems = validate_config_data(read_config_file(self.config_path))
            verdict = "ok" if not problems else f"invalid ({len(problems)} problem(s); run g2250-cds check-config)"
        except ConfigError:
            verdict = "invalid (not readable YAML)"
        self._config_seen = (digest, verdict)
        return verdict

    def _check_database(self) -> str:
        return "ok" if self.store.ping() else "unreachable"

    def _check_redis(self) -> str:
        import redis

        if self._redis_client is None:
            # One small pool for the probe: a connection is reused across /readyz calls instead of a new TCP
            # (and TLS) handshake each time.
            pool = redis.ConnectionPool.from_url(self.config.redis_url or "", max_connections=2,
                                                 socket_timeout=READY_TIMEOUTS["redis"],
                                                 socket_connect_timeout=READY_TIMEOUTS["redis"])
            self._redis_client = redis.Redis(connection_pool=pool)
        try:
            return "ok" if self._redis_client.ping() else "unreachable"
        except redis.RedisError as exc:
            log.debug("readiness: redis ping failed", extra={"event": "ready-redis", "error_type":
                                                             type(exc).__name__})
            return "unreachable"

    def _check_journal(self, *, database_ok: bool) -> str:
        journal = self.journal
        if not journal.writable():
            return "unwritable"
        if journal.over_bound():
            return "over bound"
        writer = self.determination_log
        if (writer.failing_since is not None or journal.adopted_segments()
                or (not database_ok and journal.total_pending_bytes())):
            return "draining"
        return "ok"

    def _log_changes(self, checks: dict[str, str]) -> None:
        """A check that changes value is logged once (not on every probe): errors are visible, never spammed."""
        for name, value in checks.items():
            before = self._last_checks.get(name, "ok")
            if value != before:
                level = logging.INFO if value == "ok" else logging.WARNING
                log.log(level, f"readiness: {name} {before} -> {value}", extra={"event": "readiness",
                                                                                  "reason": value})
        self._last_checks = dict(checks)

    def close(self) -> None:
        self.determination_log.close()
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
        if self._redis_client is not None:
            self._redis_client.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.session.close()
        self.store.dispose()
