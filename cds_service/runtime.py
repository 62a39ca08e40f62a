"""One hook invocation, independent of Flask: the code path shared by the HTTP service and ``g2250-cds evaluate``.

validate the request → check the fhirServer is allowed (before any outbound connection) → prefetch-or-fetch →
hook service → strict response. Client mistakes become :class:`ApiError` (4xx with an OperationOutcome).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import requests
from requests.adapters import HTTPAdapter

from hooks import SERVICES, SERVICES_BY_ID, HookOutcome, HookRequest, HookService
from hooks.base import RulesEnvironment

from . import metrics
from .config import ClientConfig, Config
from .fhir.client import FhirClient
from .fhir.source import BatchRefusals, DataSource, DataUnavailable
from .rules.calendar import BusinessCalendar
from .rules.rules_data import load_rules_data
from .store import DeterminationLog, FeedbackStore
from .web import schemas
from .web.errors import ApiError

log = logging.getLogger("g2250_cds")

Clock = Callable[[], datetime]


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
        self.determination_log = DeterminationLog(self.store)
        self.env = RulesEnvironment(
            calendar=BusinessCalendar.from_config(config.calendar),
            rules=load_rules_data(config.raw.get("rules")),
        )

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
        source = DataSource(request.prefetch, fhir_client, self.executor, deadline, reserve=reserve,
                            answer_time=answer_time,
                            batch=self.config.fhir["batch"] == "auto", batch_refusals=self.batch_refusals)
        try:
            outcome = service.handle(request, source, self.clock(), self.env)
        except DataUnavailable as exc:
            stats.status = 412
            metrics.HOOK_LATENCY.labels(service_id, "412").observe(time.monotonic() - started)
            raise ApiError(412, f"required data could not be obtained ({exc.key}): {exc.reason}",
                           code="incomplete") from exc
        finally:
            stats.fhir_requests = source.stats.fhir_requests
            stats.waves = source.stats.waves
            stats.prefetch_hits = source.stats.prefetch_hits
            stats.duration_ms = (time.monotonic() - started) * 1000
        if outcome.data is not None:
            stats.skipped_resources = len(outcome.data.bag.skipped)
        stats.cards = len(outcome.response.get("cards", ()))
        self.determination_log.append_determinations(outcome.determinations, service_id=service_id,
                                                     hook_instance=request.hook_instance)
        self._count(service_id, outcome, stats)
        return outcome.response

    @staticmethod
    def _count(service_id: str, outcome: HookOutcome, stats: InvocationStats) -> None:
        metrics.child(metrics.HOOK_LATENCY, service_id, "200").observe(stats.duration_ms / 1000)
        metrics.child(metrics.FHIR_REQUESTS, service_id).inc(stats.fhir_requests)
        metrics.child(metrics.FHIR_WAVES, service_id).inc(stats.waves)
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
        stored = self.store.record(service_id, body["feedback"])
        for item in body["feedback"]:
            metrics.FEEDBACK.labels(service_id, item["outcome"]).inc()
        return stored

    def ready(self) -> dict[str, str]:
        """Readiness of each dependency: ``ok`` or a short PHI-free reason."""
        checks = {"config": "ok", "database": "ok" if self.store.ping() else "unreachable"}
        if self.config.redis_url:
            checks["redis"] = "ok" if self.replay_ping() else "unreachable"
        return checks

    def replay_ping(self) -> bool:
        try:
            import redis

            client = redis.Redis.from_url(self.config.redis_url or "", socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False

    def close(self) -> None:
        self.determination_log.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.session.close()
        self.store.dispose()
