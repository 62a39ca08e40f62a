"""Prometheus metrics (``GET /metrics``): latency per hook, FHIR calls, outcomes, feedback, the determination journal.

Under gunicorn with several workers set ``PROMETHEUS_MULTIPROC_DIR`` (``g2250-cds serve`` does it for you) so the
scrape aggregates every worker. The feedback acceptance rate is
``sum(rate(g2250_feedback_total{outcome="accepted"}[1h])) / sum(rate(g2250_feedback_total[1h]))``.
"""

from __future__ import annotations

import os
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

HOOK_LATENCY = Histogram(
    "g2250_hook_duration_seconds", "Time to answer one hook call", ["service", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 4.0, 8.0),
)
FHIR_REQUESTS = Counter("g2250_fhir_requests_total", "Requests made to FHIR servers", ["service"])
FHIR_WAVES = Counter("g2250_fhir_waves_total", "Dependent waves of FHIR queries", ["service"])
CARDS = Counter("g2250_cards_total", "Cards returned", ["service", "indicator", "determination"])
FEEDBACK = Counter("g2250_feedback_total", "Feedback items stored", ["service", "outcome"])
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


def render() -> tuple[bytes, str]:
    """The exposition text, aggregated over all gunicorn workers when running multi-process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

