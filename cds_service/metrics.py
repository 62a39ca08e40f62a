"""Prometheus metrics (``GET /metrics``): latency per hook, FHIR calls, outcomes, feedback, the determination journal.

Under gunicorn with several workers set ``PROMETHEUS_MULTIPROC_DIR`` (``g2250-cds serve`` does it for you) so the
scrape aggregates every worker. The feedback acceptance rate is
``sum(rate(g2250_feedback_total{outcome="accepted"}[1h])) / sum(rate(g2250_feedback_total[1h]))``.

The per-request series (hook calls and their FHIR requests) are written in one place, :func:`count_request`, from
the very fields of the request's log line (``app._finish``): the metrics and the logs cannot disagree. Every hook
call is counted once with its final status, whether the runtime answered it or it was refused before (401, 413,
415, bad JSON, unknown service, 405); its FHIR requests and waves are counted whatever the outcome (200, 412, 503,
500). Service labels are bounded: an id that names no service is counted as ``unknown``, never as the raw path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

#: The route of a hook call (``POST /cds-services/{id}``), as the request log line names it.
HOOK_ROUTE = "/cds-services/<service_id>"
#: The ``service`` label of a hook call to an id that names no service (cardinality, and no caller text in labels).
UNKNOWN_SERVICE = "unknown"

HOOK_LATENCY = Histogram(
    "g2250_hook_duration_seconds", "Time to answer one hook call, every call counted with its final HTTP status",
    ["service", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 4.0, 8.0),
)
FHIR_REQUESTS = Counter("g2250_fhir_requests_total", "Requests made to FHIR servers", ["service"])
FHIR_WAVES = Counter("g2250_fhir_waves_total", "Dependent waves of FHIR queries", ["service"])
CARDS = Counter("g2250_cards_total", "Cards returned", ["service", "indicator", "determination"])
FEEDBACK = Counter("g2250_feedback_total", "Feedback items newly stored (a repeated item is not counted again)",
                   ["service", "outcome"])
FEEDBACK_DUPLICATES = Counter("g2250_feedback_duplicates_total",
                              "Feedback items received that were already stored (idempotent repeats, retries)",
                              ["service"])
AUTH_FAILURES = Counter("g2250_auth_failures_total", "Requests refused with 401")


# The determination journal (cds_service/journal.py). Gauges are per worker and summed over live workers.
JOURNAL_APPENDED = Counter("g2250_journal_rows_appended_total",
                           "Determination rows journaled on the hook path (before the answer)")
JOURNAL_WRITTEN = Counter("g2250_journal_rows_written_total",
                          "Determination rows inserted into the database from the journal (replays included)")
JOURNAL_REPLAYED = Counter("g2250_journal_rows_replayed_total",
                           "Determination rows inserted from journal segments left by a stopped or killed process")
JOURNAL_WRITE_ERRORS = Counter("g2250_journal_write_errors_total",
                               "Failed database writes of journaled rows (the rows stay journaled and are retried)")
JOURNAL_REFUSED = Counter("g2250_journal_refused_total",
                          "Hook calls answered 503 because the journal could not take their rows (full or failing)")
JOURNAL_UNREADABLE = Counter("g2250_journal_unreadable_records_total",
                             "Journal records skipped on replay: torn by a crash mid-write, or corrupt")
JOURNAL_BACKLOG_ROWS = Gauge("g2250_journal_backlog_rows", "Determination rows journaled, not yet in the database",
                             multiprocess_mode="livesum")
JOURNAL_BACKLOG_BYTES = Gauge("g2250_journal_backlog_bytes", "Journal bytes not yet in the database",
                              multiprocess_mode="livesum")
FEEDBACK_UNAVAILABLE = Counter("g2250_feedback_unavailable_total",
                               "Feedback POSTs answered 503 because the database could not store them")


@lru_cache(maxsize=1024)  # label sets are few (service x status x indicator); labels() re-validates every time
def child(metric: Any, *labels: str) -> Any:
    """The labelled series of ``metric``, looked up once per label set (hot path: every hook call)."""
    return metric.labels(*labels)


def is_hook_call(fields: Mapping[str, Any]) -> bool:
    """Whether a request's log line is a hook call's: its URL is a service's (``route`` names the hook route even
    when the method is wrong), and it is no CORS preflight (browsers send those before the call itself)."""
    return fields.get("route") == HOOK_ROUTE and fields.get("method") != "OPTIONS"


def count_request(fields: Mapping[str, Any], seconds: float) -> None:
    """Count one HTTP request from the fields of its log line (``app._finish``), if it was a hook call.

    ``service`` is then a bounded label (a service id or :data:`UNKNOWN_SERVICE`); ``fhir_requests`` and ``waves``
    are on the line whenever the runtime got as far as the call's statistics, whatever the call's outcome."""
    if not is_hook_call(fields):
        return
    service = str(fields.get("service") or UNKNOWN_SERVICE)
    child(HOOK_LATENCY, service, str(fields["status"])).observe(seconds)
    fhir_requests = int(fields.get("fhir_requests") or 0)
    if fhir_requests:
        child(FHIR_REQUESTS, service).inc(fhir_requests)
    waves = int(fields.get("waves") or 0)
    if waves:
        child(FHIR_WAVES, service).inc(waves)


def render() -> tuple[bytes, str]:
    """The exposition text, aggregated over all gunicorn workers when running multi-process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

