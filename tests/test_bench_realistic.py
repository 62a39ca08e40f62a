"""bench.realistic reads the service's own duration of each measured call from its log (read_in_service)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.realistic import read_in_service, summarise


def _line(request_id: str, ms: float, event: str = "http") -> str:
    return json.dumps({"ts": "2026-12-04T22:00:00+00:00", "event": event, "request_id": request_id,
                       "status": 200, "duration_ms": ms, "hook": "patient-view"})


def test_named_calls_are_grouped_by_size_hook_and_side_and_warm_up_rounds_left_out(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text("\n".join([
        "not json at all",
        _line("rb.33.patient-view.svc-new.0", 99.0),    # warm-up round (plan: 2 warm-up rounds)
        _line("rb.33.patient-view.svc-new.1", 98.0),    # warm-up round
        _line("rb.33.patient-view.svc-new.2", 2.5),
        _line("rb.33.patient-view.svc-same.2", 2.0),
        _line("rb.33.patient-view.svc-new.3", 3.5),
        _line("rb.20.appointment-book.svc-new.1", 4.0),
        _line("rb.33.patient-view.svc-new.4", 7.0, event="auth-failed"),  # not a request's line
        _line("0123abcd", 1.0),                          # an id the driver did not name
        '{"event": "http", "request_id": "rb.33.patient-view.svc-new.x", "duration_ms": 1}',  # unreadable round
        "",
    ]), "utf-8")
    found = read_in_service(log, {"33": (2, 10, 60), "20": (1, 10, 60)})
    assert found == {"33": {"patient-view": {"svc-new": [2.5, 3.5], "svc-same": [2.0]}},
                     "20": {"appointment-book": {"svc-new": [4.0]}}}


def test_summary_rows_carry_the_in_service_percentiles() -> None:
    hooks = ("encounter-discharge", "encounter-start", "patient-view", "appointment-book")
    sides = ("svc-new", "echo-new", "svc-same", "echo-same")
    per_hook = {h: {s: {"ms": [1.0, 2.0, 3.0], "statuses": {"200": 3}} for s in sides} for h in hooks}
    result = {"sizes": {"33": {"per_hook": per_hook, "bytes": dict.fromkeys(hooks, 1024),
                               "resources": dict.fromkeys(hooks, 33), "determinations": {}}},
              "in_service": {"33": {"patient-view": {"svc-new": [0.5, 1.5, 2.5]}}}}
    rows = {r["hook"]: r for r in summarise(result)}
    assert (rows["patient-view"]["in-service p50"], rows["patient-view"]["in-service p99"]) == (1.5, 2.5)
    assert rows["encounter-start"]["in-service n"] == 0
    assert rows["all 4 pooled"]["in-service n"] == 3
