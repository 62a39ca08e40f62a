"""The determination log's database writes in a child process (cds_service/logwriter.py, issue 13's p99): the
same rows as the writer thread, on SQLite and PostgreSQL; nothing lost or doubled when the child fails, hangs or
dies; the choice of thread or process by ``journal.writer``. Synthetic data only."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from cds_service import logwriter
from cds_service.app import create_app, runtime_of
from cds_service.config import Config
from cds_service.store import DeterminationLog, FeedbackStore

ROOT = Path(__file__).resolve().parents[1]
DISCHARGE = json.loads((ROOT / "fhir_fixtures" / "requests" / "encounter-discharge.json").read_text("utf-8"))
NOW = datetime.fromisoformat("2026-11-18T15:40:00-05:00")
DOWN = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"  # a closed port: refused at once
DETERMINATION = SimpleNamespace(status="billable", code="G2250", modifiers=(), patient=None, encounter=None,
                                practitioner=None, criteria=())


def _call(writer: DeterminationLog, i: int) -> None:
    writer.append_determinations([(f"card-{i}", DETERMINATION)], service_id="g2250-encounter-discharge",
                                 hook_instance=f"h{i}")


def _hook_call_through_the_writer_process(make_config: Callable[..., Config], database_url: str | None) -> None:
    overrides: dict[str, object] = {"journal": {"writer": "process"}}
    if database_url:
        overrides["database_url"] = database_url
    app = create_app(make_config(overrides), clock=lambda: NOW)
    runtime = runtime_of(app)
    try:
        before = datetime.now(UTC) - timedelta(seconds=1)
        response = app.test_client().post("/cds-services/g2250-encounter-discharge", json=DISCHARGE)
        card = response.get_json()["cards"][0]
        assert runtime.determination_log.flush(30)
        child = runtime.determination_log.writer_process
        assert child is not None and child.pid not in (None, os.getpid())
        (row,) = runtime.store.determinations(since=before, encounter="Encounter/s01-enc-vr")
        assert row["card_uuid"] == card["uuid"]
        assert (row["status"], row["code"], row["modifiers"]) == ("billable", "G2250", ["GP"])
        assert [c["id"] for c in row["criteria"]] == [
            c["id"] for c in card["extension"]["g2250-cds.determination"]["criteria"]]
        # the worklist row is fed in the child's transaction, as the thread did
        from sqlalchemy import text

        with runtime.store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM worklist_items")).scalar() == 1
    finally:
        runtime.close()
    assert runtime.determination_log.writer_process.pid is None  # closing the log ends its child


def test_hook_rows_go_through_the_writer_process_on_sqlite(make_config: Callable[..., Config]) -> None:
    _hook_call_through_the_writer_process(make_config, None)


@pytest.mark.postgres
def test_hook_rows_go_through_the_writer_process_on_postgresql(make_config: Callable[..., Config],
                                                                postgres_url: str) -> None:
    _hook_call_through_the_writer_process(make_config, postgres_url)


def test_a_killed_child_is_a_failed_write_and_the_next_child_writes_every_row_once(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'kill.db'}")
    writer = DeterminationLog(store, batch=10, linger_seconds=0.01, retry_max_seconds=0.2, process=True)
    try:
        for i in range(15):
            _call(writer, i)
        assert writer.flush(30)
        first = writer.writer_process.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while writer.writer_process.pid is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(15, 30):
            _call(writer, i)
        assert writer.flush(30)
        assert writer.writer_process.pid not in (None, first) and writer.writer_process.starts == 2
        assert sorted(r["card_uuid"] for r in store.determinations(limit=100)) == sorted(
            f"card-{i}" for i in range(30))
    finally:
        writer.close()
        store.dispose()


def test_a_child_that_does_not_answer_in_time_is_stopped_and_its_batch_retried_without_doubles(
        tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'slow.db'}")
    writer = DeterminationLog(store, batch=50, linger_seconds=0.01, retry_max_seconds=0.2, process=True)
    writer.writer_process.timeout = 0.001  # the child's start alone takes longer: the first tries time out
    try:
        for i in range(20):
            _call(writer, i)
        deadline = time.monotonic() + 10
        while writer.failed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.failed >= 1 and writer.last_error == "TimeoutError" and writer.backlog_rows == 20
        writer.writer_process.timeout = 60.0
        assert writer.flush(30)
        rows = store.determinations(limit=100)
        assert len(rows) == 20 and len({r["card_uuid"] for r in rows}) == 20  # a timed-out batch may have landed
    finally:
        writer.close()
        store.dispose()


def test_a_database_error_in_the_child_keeps_the_rows_journaled_and_names_only_its_class(tmp_path: Path) -> None:
    from cds_service.journal import Journal

    store = FeedbackStore(DOWN)
    writer = DeterminationLog(store, Journal(tmp_path / "journal"), batch=10, linger_seconds=0.01,
                              retry_max_seconds=0.2, process=True)
    try:
        _call(writer, 1)
        deadline = time.monotonic() + 20
        while writer.failed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.failed >= 1 and writer.last_error == "OperationalError"
        assert writer.backlog_rows == 1  # kept for the retry
    finally:
        writer.close(timeout=0.5)
        store.dispose()


def test_journal_writer_chooses_the_process_under_serve_and_the_thread_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logwriter, "PROCESS_BY_DEFAULT", False)
    assert [logwriter.use_process(s) for s in (None, "auto", "process", "thread")] == [False, False, True, False]
    monkeypatch.setattr(logwriter, "PROCESS_BY_DEFAULT", True)
    assert [logwriter.use_process(s) for s in (None, "auto", "process", "thread")] == [True, True, True, False]


def test_an_unknown_journal_writer_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    from cds_service.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("journal: {writer: fork}\n", "utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    assert "journal.writer" in str(raised.value)


def test_a_script_without_a_main_guard_runs_once_and_its_rows_are_written(tmp_path: Path) -> None:
    """The child is ``python -m cds_service.logwriter``, not multiprocessing's spawn (which runs the parent's
    ``__main__`` again in the child: a script without a main guard would run twice and its writes would fail)."""
    import subprocess
    import sys

    script = tmp_path / "embedded.py"
    script.write_text(f"""
from types import SimpleNamespace
from cds_service.store import DeterminationLog, FeedbackStore
store = FeedbackStore("sqlite:///{tmp_path / 'embedded.db'}")
log = DeterminationLog(store, linger_seconds=0.01, process=True)
d = SimpleNamespace(status="billable", code="G2250", modifiers=(), patient=None, encounter=None, practitioner=None,
                    criteria=())
for i in range(3):
    log.append_determinations([(f"card-{{i}}", d)], service_id="g2250-encounter-discharge", hook_instance=f"h{{i}}")
assert log.flush(30)
print("rows", len(store.determinations()), "failed", log.failed)
log.close()
""", "utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                            cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["rows 3 failed 0"]


def test_with_the_child_the_worker_hands_over_its_own_lines_without_reading_them_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading every record again on the worker's writer thread took the worker's GIL from its hook calls (a stall
    of about 1 ms a batch, the 33-resource p99): its own appends are only checked (checksum) and sent as lines."""
    from cds_service import journal as journal_module

    reads: list[bytes] = []
    real = journal_module.decode_line
    monkeypatch.setattr(journal_module, "decode_line", lambda line: reads.append(line) or real(line))
    store = FeedbackStore(f"sqlite:///{tmp_path / 'lines.db'}")
    writer = DeterminationLog(store, batch=7, linger_seconds=0.01, process=True)
    try:
        for i in range(20):
            _call(writer, i)
        assert writer.flush(30)
        assert reads == []  # this process read none of them (the segment header is not pending work)
        assert sorted(r["card_uuid"] for r in store.determinations(limit=100)) == sorted(
            f"card-{i}" for i in range(20))
        assert (writer.written, writer.journal.rows_committed, writer.backlog_rows) == (20, 20, 0)
    finally:
        writer.close()
        store.dispose()


@pytest.mark.parametrize("process", [True, False], ids=["child", "thread"])
def test_a_line_whose_checksum_matches_but_does_not_read_is_counted_and_skipped_not_retried(
        tmp_path: Path, process: bool) -> None:
    import zlib

    store = FeedbackStore(f"sqlite:///{tmp_path / 'odd.db'}")
    writer = DeterminationLog(store, batch=50, linger_seconds=0.01, retry_max_seconds=0.2, process=process)
    try:
        _call(writer, 1)
        body = b'{"k":"x","r":[oops'
        writer.journal.append(b"%08x %s\n" % (zlib.crc32(body), body), 1)
        _call(writer, 2)
        assert writer.flush(30)
        assert sorted(r["card_uuid"] for r in store.determinations(limit=10)) == ["card-1", "card-2"]
        assert writer.failed == 0 and writer.journal.corrupt == 1 and writer.backlog_rows == 0
    finally:
        writer.close()
        store.dispose()
