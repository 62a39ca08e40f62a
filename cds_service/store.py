"""Persistence: CDS Hooks feedback and the determination log, on SQLite or PostgreSQL via SQLAlchemy.

Feedback may arrive more than once for the same card (cds-hooks.md "Endpoints"). Each item is stored under a
fingerprint of its canonical JSON, with a unique constraint, so a repeated identical item is a no-op — also when
two replicas receive it at the same moment.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

metadata = MetaData()

feedback_table = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fingerprint", String(64), nullable=False, unique=True),
    Column("service_id", String(128), nullable=False, index=True),
    Column("card_uuid", String(256), nullable=False, index=True),
    Column("outcome", String(16), nullable=False),
    Column("accepted_suggestions", Text, nullable=True),  # JSON list of suggestion uuids
    Column("override_system", String(256), nullable=True),
    Column("override_code", String(128), nullable=True),
    Column("override_display", String(512), nullable=True),
    Column("user_comment", Text, nullable=True),
    Column("outcome_timestamp", String(64), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)


# The determination log: what was proposed, on which evidence, with which code, when — for an auditor. Resource
# references only (no names, no free text, no clinical dates beyond the record time).
determination_table = Table(
    "determinations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("recorded_at", DateTime(timezone=True), nullable=False, index=True),
    Column("service_id", String(128), nullable=False),
    Column("hook_instance", String(256), nullable=False),
    Column("card_uuid", String(64), nullable=False, index=True),
    Column("status", String(16), nullable=False),
    Column("code", String(8), nullable=True),
    Column("modifiers", String(64), nullable=True),
    Column("patient_ref", String(256), nullable=True, index=True),
    Column("encounter_ref", String(256), nullable=True, index=True),
    Column("practitioner_ref", String(256), nullable=True),
    Column("criteria", Text, nullable=False),  # JSON [{id, status, evidence: [refs]}]
)


def _normalise_url(url: str) -> str:
    # "postgresql://" means psycopg2 to SQLAlchemy; we ship psycopg 3.
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


class FeedbackStore:
    """Feedback items, stored once each."""

    def __init__(self, database_url: str) -> None:
        url = _normalise_url(database_url)
        kwargs: dict[str, Any] = {"pool_pre_ping": True, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 15}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._created = False

    def create_schema(self) -> None:
        """Create the tables if missing. Several workers (or replicas) may race to do it: losing is fine."""
        if self._created:
            return
        for attempt in range(10):
            try:
                metadata.create_all(self.engine)  # checks first; creates only what is missing
                break
            except (OperationalError, ProgrammingError, IntegrityError):
                # Another process created a table between our check and our CREATE: look again.
                if attempt == 9:
                    raise
                time.sleep(0.05 * (attempt + 1))
        self._created = True

    @staticmethod
    def fingerprint(service_id: str, item: dict[str, Any]) -> str:
        canonical = json.dumps([service_id, item], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def record(self, service_id: str, items: Iterable[dict[str, Any]], now: datetime | None = None) -> int:
        """Store the items not stored before; returns how many were new."""
        self.create_schema()
        received = now or datetime.now(UTC)
        new = 0
        for item in items:
            reason = (item.get("overrideReason") or {}).get("reason") or {}
            row = {
                "fingerprint": self.fingerprint(service_id, item),
                "service_id": service_id,
                "card_uuid": item["card"],
                "outcome": item["outcome"],
                "accepted_suggestions": json.dumps([s["id"] for s in item.get("acceptedSuggestions") or ()])
                if item.get("acceptedSuggestions") else None,
                "override_system": reason.get("system"),
                "override_code": reason.get("code"),
                "override_display": reason.get("display"),
                "user_comment": (item.get("overrideReason") or {}).get("userComment"),
                "outcome_timestamp": item["outcomeTimestamp"],
                "received_at": received,
            }
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(feedback_table).values(**row))
                new += 1
            except IntegrityError:
                continue  # the same item again: feedback is idempotent
        return new

    def log_determinations(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append determination records (see :func:`determination_row`)."""
        rows = list(rows)
        if not rows:
            return 0
        self.create_schema()
        with self.engine.begin() as conn:
            conn.execute(insert(determination_table), rows)
        return len(rows)

    def determinations(self, *, since: datetime | None = None, encounter: str | None = None,
                       patient: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """The auditor's query: determinations, newest first, optionally by time, encounter or patient."""
        self.create_schema()
        query = select(determination_table).order_by(determination_table.c.id.desc()).limit(limit)
        if since is not None:
            query = query.where(determination_table.c.recorded_at >= since)
        if encounter is not None:
            query = query.where(determination_table.c.encounter_ref == encounter)
        if patient is not None:
            query = query.where(determination_table.c.patient_ref == patient)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        result = []
        for row in rows:
            item = dict(row)
            item["criteria"] = json.loads(item["criteria"])
            item["modifiers"] = item["modifiers"].split(",") if item["modifiers"] else []
            result.append(item)
        return result

    def feedback_for_card(self, card_uuid: str) -> list[dict[str, Any]]:
        self.create_schema()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(feedback_table).where(feedback_table.c.card_uuid == card_uuid).order_by(feedback_table.c.id)
            ).mappings().all()
        return [dict(r) for r in rows]

    def count(self) -> int:
        self.create_schema()
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(feedback_table)).scalar_one())

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            return False

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=15000")
    cursor.close()


def determination_row(determination: Any, *, service_id: str, hook_instance: str, card_uuid: str,
                      recorded_at: datetime) -> dict[str, Any]:
    """One log row from a :class:`~cds_service.rules.model.Determination`: references and verdicts only."""
    return {
        "recorded_at": recorded_at,
        "service_id": service_id,
        "hook_instance": hook_instance[:256],
        "card_uuid": card_uuid,
        "status": determination.status,
        "code": determination.code,
        "modifiers": ",".join(determination.modifiers) or None,
        "patient_ref": determination.patient,
        "encounter_ref": determination.encounter,
        "practitioner_ref": determination.practitioner,
        "criteria": json.dumps([
            {"id": c.id, "status": c.status, "evidence": list(dict.fromkeys(c.evidence))}
            for c in determination.criteria
        ], separators=(",", ":")),
    }


@dataclass(frozen=True)
class _Pending:
    """One hook call's determinations, turned into rows by the writer thread."""

    determinations: tuple[tuple[str, Any], ...]
    service_id: str
    hook_instance: str
    recorded_at: datetime

    def rows(self) -> list[dict[str, Any]]:
        return [determination_row(determination, service_id=self.service_id, hook_instance=self.hook_instance,
                                  card_uuid=card_uuid, recorded_at=self.recorded_at)
                for card_uuid, determination in self.determinations]


class DeterminationLog:
    """Writes determination rows on a background thread so a hook call never waits for the database.

    Group commit: after the first row of a batch arrives the writer lingers up to ``linger_seconds`` (or until
    ``batch`` rows) and writes them in one transaction. Under load that is one insert and one commit (fsync) per
    batch instead of per hook call: writing row by row cost more CPU than the rules themselves. Bounded queue; on
    overflow a row is dropped and counted (``dropped``) rather than slowing clinicians down; ``flush`` (and
    ``close``, called at shutdown) write what is queued.
    """

    def __init__(self, store: FeedbackStore, *, max_queue: int = 10_000, batch: int = 500,
                 linger_seconds: float = 0.2) -> None:
        self.store = store
        self.queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=max_queue)  # None: the stop marker
        self.batch = batch
        self.linger_seconds = linger_seconds
        self.dropped = 0
        self.failed = 0
        self.batches = 0
        self._flushing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="determination-log", daemon=True)
        self._thread.start()

    def append_determinations(self, determinations: Iterable[tuple[str, Any]], *, service_id: str,
                              hook_instance: str) -> None:
        """Queue one hook call's ``(card uuid, Determination)`` pairs; the rows are built on the writer thread
        (determinations are frozen, so handing them over is safe)."""
        pending = tuple(determinations)
        if not pending:
            return
        try:
            self.queue.put_nowait(_Pending(pending, service_id, hook_instance, datetime.now(UTC)))
        except queue.Full:
            self.dropped += len(pending)

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """The batch that starts with ``first``, and whether the stop marker was met.

        The writer sleeps through the linger instead of waiting on the queue, so the hook calls appending
        meanwhile never wake it (a thread wake-up per call costs more than the insert itself)."""
        items = [first]
        if self.queue.qsize() < self.batch - 1:
            self._flushing.wait(self.linger_seconds)
        while len(items) < self.batch:
            try:
                more = self.queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return items, True
            items.append(more)
        return items, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self.queue.get()
            if first is None:
                self.queue.task_done()
                return
            items, stop = self._collect(first)
            try:
                self.store.log_determinations([row for item in items for row in item.rows()])
                self.batches += 1
            except Exception:  # the log must never take the service down; rows are counted as failed
                self.failed += sum(len(item.determinations) for item in items)
            finally:
                for _ in items:
                    self.queue.task_done()
                if stop:
                    self.queue.task_done()  # the stop marker

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) until every queued row is written; the writer stops lingering meanwhile."""
        deadline = time.monotonic() + timeout
        self._flushing.set()
        try:
            while self.queue.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            self._flushing.clear()

    def close(self) -> None:
        self.flush()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            return
        self._thread.join(timeout=5)
