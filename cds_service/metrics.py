"""Prometheus metrics (``GET /metrics``): latency per hook, FHIR calls, outcomes, feedback.

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
