"""The real doors feed the billing worklist: a hook call through the HTTP API (its determination log's writer), a
``population-audit --publish`` run over the bundled fixtures, and ``publish-findings`` of an earlier run's
findings.parquet — with its error exits (a missing or unreadable file, a bad --as-of: exit 2, one line naming it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cds_service.app import create_app
from cds_service.cli import main
from cds_service.config import Config
from cds_service.store import FeedbackStore
from cds_service.worklist import model
from cds_service.worklist.model import WorklistFilter
from cds_service.worklist.store import WorklistStore

ROOT = Path(__file__).resolve().parents[1]
AS_OF = "2026-12-31T17:00:00-05:00"


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("G2250_CDS_CONFIG", raising=False)



def _rows(database_url: str, queue: str | None = None) -> list[model.WorklistItem]:
    store = FeedbackStore(database_url)
    try:
        store.create_schema()
        worklist = WorklistStore(store.engine, tz=UTC)
        found: list[model.WorklistItem] = []
        for q in (queue,) if queue else model.QUEUE_LABELS:
            found += worklist.page(WorklistFilter(queue=q, include_reviewed=True), sort="updated", descending=True,
                                   page=1, page_size=200, now=datetime.now(UTC)).items
        return found
    finally:
        store.dispose()


def test_a_hook_call_puts_its_assessment_on_the_worklist(make_config: Callable[..., Config]) -> None:
    body = json.loads((ROOT / "fhir_fixtures/requests/encounter-discharge.json").read_text("utf-8"))
    now = datetime.fromisoformat("2026-11-18T15:40:00-05:00")
    config = make_config()
    app = create_app(config, clock=lambda: now)
    runtime = app.extensions["g2250_runtime"]
    try:
        response = app.test_client().post("/cds-services/g2250-encounter-discharge", json=body)
        assert response.status_code == 200, response.get_json()
        (card,) = response.get_json()["cards"]
        assert runtime.determination_log.flush()
        worklist = WorklistStore(runtime.store.engine, tz=runtime.env.calendar.tz)
        page = worklist.page(WorklistFilter(queue=model.TO_CHARGE), sort="deadline", descending=False, page=1,
                             page_size=50, now=now)
        (item,) = page.items
        assert (item.source, item.status, item.code, item.patient) == ("hook", "billable", "G2250", "Patient/s01-pat")
        assert item.estimated_amount is not None and item.estimated_amount > 0  # data/rates.json
        assert item.timely_filing_deadline is not None and item.reason == card["summary"]
        detail = worklist.detail(item.item_id)
        assert detail is not None
        assert (detail.card_summary, detail.card_detail, detail.card_indicator) == (
            card["summary"], card["detail"], card["indicator"])
        assert len(detail.criteria) == 10 and all(line.detail for line in detail.criteria)
        # The same assessment judged again (the EHR calls the hook again): still one row.
        assert app.test_client().post("/cds-services/g2250-encounter-discharge", json=body).status_code == 200
        assert runtime.determination_log.flush()
        assert worklist.page(WorklistFilter(queue=model.TO_CHARGE), sort="deadline", descending=False, page=1,
                             page_size=50, now=now).total == 1
    finally:
        runtime.close()


def test_population_audit_publish_and_publish_findings(tmp_path: Path, fixture_export: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    database = f"sqlite:///{tmp_path / 'w.db'}"
    config = tmp_path / "c.yaml"
    config.write_text(f"database_url: {database}\nlogging: {{level: ERROR}}\n", "utf-8")
    out = tmp_path / "run"
    code = main(["population-audit", "--ndjson", str(fixture_export), "--out", str(out), "--as-of", AS_OF,
                 "--config", str(config), "--workers", "1", "--no-progress", "--publish"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    findings_count = len((out / "findings.csv").read_text("utf-8").splitlines()) - 1
    assert f"published {findings_count} row(s) to the worklist" in captured.out
    rows = _rows(database)
    assert len(rows) == findings_count and {r.source for r in rows} == {"audit"}
    assert {r.evaluated_at for r in rows} == {datetime.fromisoformat(AS_OF)}
    assert any(r.queue == model.TO_CHARGE and r.estimated_amount for r in rows)
    assert any(r.queue == model.AT_RISK for r in rows)

    # The same run into a fresh database from its findings.parquet: the as-of comes from its summary.json.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    config.write_text(f"database_url: {other}\nlogging: {{level: ERROR}}\n", "utf-8")
    assert main(["publish-findings", str(out), "--config", str(config)]) == 0
    assert f"published {findings_count} row(s) of {findings_count}" in capsys.readouterr().out
    again = _rows(other)
    assert sorted((r.item_id, r.queue) for r in again) == sorted((r.item_id, r.queue) for r in rows)
    assert {r.evaluated_at for r in again} == {datetime.fromisoformat(AS_OF)}
    # An older run published later replaces nothing.
    assert main(["publish-findings", str(out / "findings.parquet"), "--config", str(config),
                 "--as-of", "2026-01-01T00:00:00Z"]) == 0
    assert "published 0 row(s)" in capsys.readouterr().out


def _one_clean_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_publish_findings_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"database_url: sqlite:///{tmp_path / 'w.db'}\nlogging: {{level: ERROR}}\n", "utf-8")
    missing = tmp_path / "nowhere" / "findings.parquet"
    assert main(["publish-findings", str(missing), "--config", str(config)]) == 2
    assert str(missing) in _one_clean_line(capsys.readouterr().err)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert main(["publish-findings", str(empty_dir), "--config", str(config)]) == 2
    assert str(empty_dir / "findings.parquet") in _one_clean_line(capsys.readouterr().err)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet")
    assert main(["publish-findings", str(garbage), "--config", str(config)]) == 2
    line = _one_clean_line(capsys.readouterr().err)
    assert str(garbage) in line and "Parquet" in line
    assert main(["publish-findings", str(garbage), "--config", str(config), "--as-of", "yesterday"]) == 2
    assert "--as-of" in _one_clean_line(capsys.readouterr().err)


def test_every_door_meets_on_one_row_and_feedback_reaches_the_analytics(tmp_path: Path, fixture_export: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A hook's card, the EHR's feedback on it, and a later audit of the same record: one worklist row (the audit's
    assessment_id is the hook's), and the card's acceptance in the analytics page's numbers."""
    from cds_service.config import load_config
    from cds_service.worklist.auth import issue_login_token

    database = f"sqlite:///{tmp_path / 'doors.db'}"
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"database_url: {database}\nlogging: {{level: ERROR}}\n", "utf-8")
    config = load_config(config_file)
    body = json.loads((ROOT / "fhir_fixtures/requests/encounter-discharge.json").read_text("utf-8"))
    now = datetime.fromisoformat("2026-11-18T15:40:00-05:00")
    app = create_app(config, clock=lambda: now)
    runtime = app.extensions["g2250_runtime"]
    client = app.test_client()
    try:
        (card,) = client.post("/cds-services/g2250-encounter-discharge", json=body).get_json()["cards"]
        feedback = {"feedback": [{"card": card["uuid"], "outcome": "accepted",
                                  "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
                                  "outcomeTimestamp": "2026-11-18T15:41:00-05:00"}]}
        assert client.post("/cds-services/g2250-encounter-discharge/feedback", json=feedback).status_code == 200
        assert runtime.determination_log.flush()
        (hook_row,) = _rows(database, model.TO_CHARGE)

        # The worklist's analytics page, signed in as the operator: the card shown once, accepted once.
        assert client.get(f"/worklist/login?token={issue_login_token(config)}").status_code == 303
        html = client.get("/worklist/analytics").text
        numbers = WorklistStore(runtime.store.engine, tz=runtime.env.calendar.tz).analytics(since=None, until=None)
        # (Placed in the month the log recorded the card: the wall clock's, not the hook's fixed clock.)
        (cards,) = numbers["cards"]
        assert (cards["shown"], cards["accepted"], cards["overridden"]) == (1, 1, 0)
        table = html.split('id="rates-by-month-table"', 1)[1].split("</table>", 1)[0]
        assert cards["month"] in table and "all-met" in table
        assert numbers["criteria"][0]["criterion"] == "all-met" and numbers["criteria"][0]["acceptance_rate"] == 1.0
    finally:
        runtime.close()

    # The population audit of the whole record, published into the same database, meets the hook's row.
    code = main(["population-audit", "--ndjson", str(fixture_export), "--out", str(tmp_path / "run"), "--as-of",
                 AS_OF, "--config", str(config_file), "--workers", "1", "--no-progress", "--publish"])
    assert code == 0, capsys.readouterr().err
    same = [r for r in _rows(database) if r.item_id == hook_row.item_id]
    assert len(same) == 1 and same[0].source == "audit" and same[0].patient == hook_row.patient
