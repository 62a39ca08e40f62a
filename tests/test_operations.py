"""Operations: liveness, readiness, Prometheus metrics, and the determination log an auditor queries."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from cds_service.app import create_app, runtime_of
from cds_service.config import Config

ROOT = Path(__file__).resolve().parents[1]
DISCHARGE = json.loads((ROOT / "fhir_fixtures" / "requests" / "encounter-discharge.json").read_text("utf-8"))
NOW = datetime.fromisoformat("2026-11-18T15:40:00-05:00")


def test_healthz(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz_ok_and_unavailable(make_config: Callable[..., Config], tmp_path: Path) -> None:
    app = create_app(make_config())
    assert app.test_client().get("/readyz").status_code == 200
    runtime_of(app).close()
    bad = create_app(make_config({"redis_url": "redis://127.0.0.1:1/0"}))
    response = bad.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["redis"] == "unreachable"
    runtime_of(bad).close()


def test_readyz_with_redis(make_config: Callable[..., Config], redis_url: str) -> None:
    app = create_app(make_config({"redis_url": redis_url}))  # G2250_TEST_REDIS_URL, checked to answer
    response = app.test_client().get("/readyz")
    runtime_of(app).close()
    assert response.get_json()["checks"] == {"config": "ok", "database": "ok", "redis": "ok", "journal": "ok"}


def test_metrics_count_hooks_cards_and_feedback(make_config: Callable[..., Config]) -> None:
    app = create_app(make_config(), clock=lambda: NOW)
    client = app.test_client()
    response = client.post("/cds-services/g2250-encounter-discharge", json=DISCHARGE)
    card = response.get_json()["cards"][0]
    client.post("/cds-services/g2250-encounter-discharge/feedback", json={"feedback": [
        {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-11-18T16:00:00Z",
         "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]}]})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'g2250_hook_duration_seconds_count{service="g2250-encounter-discharge",status="200"}' in text
    assert 'g2250_cards_total{determination="billable",indicator="info",service="g2250-encounter-discharge"}' in text
    assert 'g2250_feedback_total{outcome="accepted",service="g2250-encounter-discharge"}' in text
    assert "s01-pat" not in text  # labels never carry ids
    runtime_of(app).close()


def _audit(make_config: Callable[..., Config], database_url: str | None = None) -> None:
    overrides = {"database_url": database_url} if database_url else {}
    app = create_app(make_config(overrides), clock=lambda: NOW)
    runtime = runtime_of(app)
    before = datetime.now(UTC) - timedelta(seconds=1)
    response = app.test_client().post("/cds-services/g2250-encounter-discharge", json=DISCHARGE)
    card = response.get_json()["cards"][0]
    runtime.determination_log.flush()
    rows = runtime.store.determinations(since=before, encounter="Encounter/s01-enc-vr")
    assert len(rows) == 1
    row = rows[0]
    assert row["card_uuid"] == card["uuid"]
    assert (row["status"], row["code"], row["modifiers"]) == ("billable", "G2250", ["GP"])
    assert row["patient_ref"] == "Patient/s01-pat" and row["practitioner_ref"] == "Practitioner/pr-pt-1"
    assert [c["id"] for c in row["criteria"]] == [c["id"] for c in
                                                 card["extension"]["g2250-cds.determination"]["criteria"]]
    assert "Communication/s01-com-in" in row["criteria"][1]["evidence"]
    # The rules' own sentences and facts (what the worklist shows); no names, nothing copied from the record.
    criterion_keys = {"id", "status", "evidence", "detail", "case", "business_hours_left"}
    assert all(set(c) <= criterion_keys for c in row["criteria"])
    assert "_determination" not in json.dumps(response.get_json())  # the internal hand-off never leaves
    runtime.close()


def test_determination_log_on_sqlite(make_config: Callable[..., Config]) -> None:
    _audit(make_config)


@pytest.mark.postgres
def test_determination_log_on_postgresql(make_config: Callable[..., Config], postgres_url: str) -> None:
    _audit(make_config, postgres_url)


def test_audit_command_prints_the_log(make_config: Callable[..., Config], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from cds_service.cli import main

    database = tmp_path / "audit.db"
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"database_url: sqlite:///{database}\nlogging: {{level: ERROR}}\n", "utf-8")
    app = create_app(make_config({"database_url": f"sqlite:///{database}"}), clock=lambda: NOW)
    app.test_client().post("/cds-services/g2250-encounter-discharge", json=DISCHARGE)
    runtime_of(app).close()
    assert main(["audit", "--config", str(config_file), "--encounter", "Encounter/s01-enc-vr"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["status"] == "billable"
    assert main(["audit", "--config", str(config_file), "--since", "yesterday"]) == 2  # a usage error
    assert "--since: not an ISO 8601" in capsys.readouterr().err


def test_determination_log_commits_in_groups_and_loses_nothing_at_close(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from cds_service.store import DeterminationLog, FeedbackStore

    store = FeedbackStore(f"sqlite:///{tmp_path / 'group.db'}")
    writer = DeterminationLog(store, batch=40, linger_seconds=5.0)
    determination = SimpleNamespace(status="billable", code="G2250", modifiers=(), patient=None, encounter=None,
                                    practitioner=None, criteria=())

    def call(i: int, cards: int = 1) -> None:
        writer.append_determinations([(f"c{i}-{n}", determination) for n in range(cards)],
                                     service_id="g2250-encounter-discharge", hook_instance=f"h{i}")

    for i in range(100):
        call(i)
    writer.flush()  # does not wait out the 5 s linger
    assert writer.batches <= 4 and writer.failed == 0  # 100 calls, batches of at most 40: not 100 commits
    call(100, cards=3)
    writer.close()  # the stop marker ends the linger and the tail is written
    assert len(store.determinations(limit=500)) == 103
    store.dispose()


# -- readiness that checks, and the journal in /metrics -------------------------------------------------------------
DOWN = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"  # a closed port: refused at once


def test_readyz_degraded_while_the_database_is_down_and_hook_calls_still_answer(
        make_config: Callable[..., Config], tmp_path: Path) -> None:
    app = create_app(make_config({"database_url": DOWN, "journal": {"dir": str(tmp_path / "j")}}),
                     clock=lambda: NOW)  # boots although the database is down
    client = app.test_client()
    try:
        assert client.post("/cds-services/g2250-encounter-discharge", json=DISCHARGE).status_code == 200
        response = client.get("/readyz")
        body = response.get_json()
        assert response.status_code == 200 and body["status"] == "degraded", body
        assert body["checks"]["database"] == "unreachable" and body["checks"]["journal"] == "draining"
        assert body["journal"]["backlog_rows"] == 1 and body["journal"]["backlog_bytes"] > 0
        text = client.get("/metrics").get_data(as_text=True)
        assert "g2250_journal_backlog_rows 1.0" in text
        for name in ("g2250_journal_rows_appended_total", "g2250_journal_rows_written_total",
                     "g2250_journal_rows_replayed_total", "g2250_journal_write_errors_total",
                     "g2250_journal_backlog_bytes"):
            assert name in text
    finally:
        runtime_of(app).close()
    assert list((tmp_path / "j").glob("*/*.jnl"))  # not lost at shutdown: kept for the next start


def test_readyz_failed_when_the_config_file_no_longer_validates(tmp_path: Path) -> None:
    from cds_service.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(f"database_url: sqlite:///{tmp_path / 'c.db'}\nlogging: {{level: WARNING}}\n", "utf-8")
    app = create_app(load_config(path))
    client = app.test_client()
    try:
        assert client.get("/readyz").get_json()["checks"]["config"] == "ok"
        path.write_text(f"database_url: sqlite:///{tmp_path / 'c.db'}\ndeadline_second: 4\n", "utf-8")
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.get_json()["status"] == "failed"
        assert response.get_json()["checks"]["config"].startswith("invalid (1 problem")
        path.write_text("database_url: [unclosed\n", "utf-8")
        assert client.get("/readyz").get_json()["checks"]["config"] == "invalid (not readable YAML)"
    finally:
        runtime_of(app).close()


def test_readyz_answers_quickly_whatever_hangs(make_config: Callable[..., Config], tmp_path: Path) -> None:
    app = create_app(make_config())
    runtime = runtime_of(app)
    runtime._check_database = lambda: time.sleep(5) or "ok"  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        response = app.test_client().get("/readyz")
        assert time.monotonic() - started < 2.0
        assert response.get_json()["checks"]["database"] == "timeout"
        started = time.monotonic()
        app.test_client().get("/readyz")  # the stuck probe is waited on again, not started twice
        assert time.monotonic() - started < 2.0
    finally:
        runtime.close()


def test_past_the_journal_bound_hook_calls_are_refused_and_readyz_fails(
        make_config: Callable[..., Config], tmp_path: Path) -> None:
    app = create_app(make_config({"database_url": DOWN,
                                  "journal": {"dir": str(tmp_path / "j"), "max_bytes": 65536}}), clock=lambda: NOW)
    client = app.test_client()
    try:
        statuses = [client.post("/cds-services/g2250-encounter-discharge", json=DISCHARGE).status_code
                    for _ in range(100)]
        assert 200 in statuses and 503 in statuses and statuses.index(503) == statuses.count(200)
        refused = client.post("/cds-services/g2250-encounter-discharge", json=DISCHARGE)
        assert refused.status_code == 503 and refused.get_json()["issue"][0]["code"] == "transient"
        assert refused.headers["Retry-After"].isdigit()  # the EHR may retry later
        response = client.get("/readyz")
        assert response.status_code == 503 and response.get_json()["checks"]["journal"] == "over bound"
        assert "g2250_journal_refused_total" in client.get("/metrics").get_data(as_text=True)
    finally:
        runtime_of(app).close()
