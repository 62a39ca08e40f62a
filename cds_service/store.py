"""Persistence: CDS Hooks feedback and the determination log, on SQLite or PostgreSQL via SQLAlchemy.

Feedback may arrive more than once for the same card (cds-hooks.md "Endpoints"). Each item is stored under a
fingerprint of its canonical JSON, with a unique constraint, so a repeated identical item is a no-op — also when
two replicas receive it at the same moment. A feedback POST is one transaction: all its items or none, so an EHR
that retries after a 503 stores each item exactly once.

The determination log is journaled first (``cds_service/journal.py``: on local disk, before the hook call is
answered) and copied into the ``determinations`` table by :class:`DeterminationLog`'s writer thread, each row
under a unique ``row_key`` with insert-or-ignore, so replaying a journal after a crash never duplicates a row.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, tzinfo
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

from . import metrics
from .journal import Batch, Journal, JournalError, encode, journal_directory
from .jsonbytes import compact_json

log = logging.getLogger("g2250_cds")

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
    # One answered determination: "<journal token>-<record>.<card index>". Unique, so a journal replayed after a
    # crash inserts nothing twice. Nullable only for rows logged before the journal existed.
    Column("row_key", String(80), nullable=True),
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
    Column("criteria", Text, nullable=False),  # JSON [{id, status, evidence: [refs], detail?, case?, ...}]
    # Added for the billing worklist (issue 15); null on rows logged before it. Times are ISO 8601 with offset.
    Column("deadline", String(40), nullable=True),
    Column("receipt_time", String(40), nullable=True),
    Column("follow_up_time", String(40), nullable=True),
    Column("organization_ref", String(256), nullable=True),
    Column("payer_profile", String(128), nullable=True),
    Column("submissions", Text, nullable=True),  # JSON list of references
    Column("existing_charges", Text, nullable=True),  # JSON list of references
    Column("card_summary", Text, nullable=True),
    Column("card_detail", Text, nullable=True),  # Markdown, as the clinician saw it
    Column("card_indicator", String(16), nullable=True),
    # The criteria the card is about, comma separated (card_criteria below): what the worklist's analytics count,
    # computed once by the writer so the page never parses every card's criteria JSON.
    Column("card_criteria", Text, nullable=True),
)
Index("ux_determinations_row_key", determination_table.c.row_key, unique=True)

# Columns added to ``determinations`` after its first release, with their SQL types: create_schema adds the missing
# ones to an existing database (see FeedbackStore._add_columns).
_ADDED_DETERMINATION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("deadline", "VARCHAR(40)"), ("receipt_time", "VARCHAR(40)"), ("follow_up_time", "VARCHAR(40)"),
    ("organization_ref", "VARCHAR(256)"), ("payer_profile", "VARCHAR(128)"), ("submissions", "TEXT"),
    ("existing_charges", "TEXT"), ("card_summary", "TEXT"), ("card_detail", "TEXT"), ("card_indicator", "VARCHAR(16)"),
    ("card_criteria", "TEXT"),
)


def card_criteria(status: str | None, criteria: Iterable[tuple[str, str]]) -> list[str]:
    """The criteria a card is about, as the worklist's analytics count them: ``all-met`` for a billable card;
    else the ids of its criteria that are ``not-met`` or ``unknown``; when there are none (a pending card), those
    that are ``pending``. ``criteria``: (id, status) pairs."""
    if status == "billable":
        return ["all-met"]
    pairs = list(criteria)
    open_ = [cid for cid, state in pairs if state in ("not-met", "unknown")]
    return open_ or [cid for cid, state in pairs if state == "pending"]

# --- the billing worklist (cds_service/worklist/) -------------------------------------------------------------------
# One row per remote assessment, keyed by audit.findings.assessment_id; fed by the determination log's writer (hook
# evaluations) and by published population-audit runs (worklist/publish.py); read by worklist/store.py. Times are
# stored in UTC (SQLite keeps no offset: every writer converts first, so text order is time order).
worklist_items_table = Table(
    "worklist_items",
    metadata,
    Column("item_id", String(32), primary_key=True),
    # the latest evaluation (by evaluated_at), from either source
    Column("queue", String(16), nullable=False),
    Column("source", String(8), nullable=False),
    Column("evaluated_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=True),  # null: an audit row for a charge no assessment claims
    Column("code", String(8), nullable=True),
    Column("modifiers", String(64), nullable=True),  # comma separated
    Column("patient_ref", String(256), nullable=True),
    Column("encounter_ref", String(256), nullable=True),
    Column("practitioner_ref", String(256), nullable=True),
    Column("organization_ref", String(256), nullable=True),
    Column("payer_profile", String(128), nullable=True),
    Column("received_at", DateTime(timezone=True), nullable=True),
    Column("deadline_at", DateTime(timezone=True), nullable=True),
    Column("follow_up_at", DateTime(timezone=True), nullable=True),
    Column("charges", Text, nullable=True),  # JSON list of references
    Column("billed_code", String(32), nullable=True),
    Column("audit_class", String(16), nullable=True),
    Column("reason", Text, nullable=True),
    Column("question", Text, nullable=True),
    Column("estimated_amount", Float, nullable=True),
    Column("timely_filing_deadline", Date, nullable=True),
    Column("criteria", Text, nullable=True),  # JSON [{id, status, detail, evidence}]
    Column("card_summary", Text, nullable=True),
    Column("card_detail", Text, nullable=True),
    Column("card_indicator", String(16), nullable=True),
    Column("extra", Text, nullable=True),  # JSON: source-specific fields
    # the people's work: never overwritten by an evaluation (except a reopen, see worklist/publish.py)
    Column("reviewed", Boolean, nullable=False, default=False),
    Column("review_reason", String(128), nullable=True),
    Column("assignee", String(256), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
# The page's queries: a queue ordered by deadline / receipt / update, filters by practitioner, organization, payer.
Index("ix_worklist_queue_deadline", worklist_items_table.c.queue, worklist_items_table.c.deadline_at)
Index("ix_worklist_queue_received", worklist_items_table.c.queue, worklist_items_table.c.received_at)
Index("ix_worklist_practitioner", worklist_items_table.c.practitioner_ref)
Index("ix_worklist_organization", worklist_items_table.c.organization_ref)
Index("ix_worklist_payer", worklist_items_table.c.payer_profile)
Index("ix_worklist_updated", worklist_items_table.c.updated_at)

# The audit trail of people's actions on worklist rows: append only.
worklist_actions_table = Table(
    "worklist_actions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("item_id", String(32), nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(256), nullable=False),
    Column("action", String(16), nullable=False),
    Column("reason", String(128), nullable=True),
    Column("assignee", String(256), nullable=True),
    Column("note", Text, nullable=True),
)

# One-time form tokens: a form posted twice (replayed) or never issued is refused.
worklist_nonces_table = Table(
    "worklist_form_nonces",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("issued_at", DateTime(timezone=True), nullable=False, index=True),
    Column("used_at", DateTime(timezone=True), nullable=True),
)

# A feedback POST or a readiness probe must not hang on a database that does not answer the TCP handshake.
_CONNECT_TIMEOUT_SECONDS = 3


def reachable(engine: Engine) -> bool:
    """The database answers a ``SELECT 1``."""
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True
    except Exception:
        return False


def create_racing(engine: Engine, create: Callable[[], None]) -> None:
    """Run ``create`` (DDL on ``engine`` that checks first), which several workers or replicas may run at once: the
    loser of a race — another process created a table between our check and our CREATE; on PostgreSQL a duplicate
    catalogue row, an IntegrityError — looks again, up to ten times. A database that does not answer is no race:
    its error goes to the caller at once."""
    for attempt in range(10):
        try:
            create()
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == 9 or not reachable(engine):
                raise
            time.sleep(0.05 * (attempt + 1))


class StoreUnavailable(Exception):
    """The database could not take the write (down, unreachable, timed out); the caller may retry later."""


def _normalise_url(url: str) -> str:
    # "postgresql://" means psycopg2 to SQLAlchemy; we ship psycopg 3.
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


class FeedbackStore:
    """Feedback items, stored once each; the determinations table."""

    def __init__(self, database_url: str) -> None:
        url = _normalise_url(database_url)
        self.database_url = url
        kwargs: dict[str, Any] = {"pool_pre_ping": True, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 15}
        elif url.startswith("postgresql"):
            kwargs["connect_args"] = {"connect_timeout": _CONNECT_TIMEOUT_SECONDS}
            kwargs["pool_timeout"] = _CONNECT_TIMEOUT_SECONDS
        self.engine: Engine = create_engine(url, **kwargs)
        self._insert = postgresql_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._created = False
        self._schema_lock = threading.Lock()

    def create_schema(self) -> None:
        """Create the tables if missing. Several workers (or replicas) may race to do it: losing is fine."""
        if self._created:
            return
        with self._schema_lock:
            if self._created:
                return
            def create() -> None:
                metadata.create_all(self.engine)  # checks first; creates only what is missing
                self._add_row_key()
                self._add_columns()

            create_racing(self.engine, create)
            self._created = True

    def _add_row_key(self) -> None:
        """Databases created before the journal have no ``row_key``: add it and its unique index."""
        columns = {c["name"] for c in inspect(self.engine).get_columns("determinations")}
        if "row_key" in columns:
            return
        with self.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE determinations ADD COLUMN row_key VARCHAR(80)")
            conn.exec_driver_sql(
                "CREATE UNIQUE INDEX IF NOT EXISTS ux_determinations_row_key ON determinations (row_key)")

    def _add_columns(self) -> None:
        """Databases created before the worklist lack the determination columns it reads: add them (nullable, so
        old rows stay valid). A replica racing us to it fails on the duplicate column and create_schema looks
        again."""
        columns = {c["name"] for c in inspect(self.engine).get_columns("determinations")}
        missing = [(name, kind) for name, kind in _ADDED_DETERMINATION_COLUMNS if name not in columns]
        if not missing:
            return
        # PostgreSQL 9.6+ knows ADD COLUMN IF NOT EXISTS; SQLite does not (its race ends in create_schema's retry).
        guard = " IF NOT EXISTS" if self.engine.dialect.name == "postgresql" else ""
        with self.engine.begin() as conn:
            for name, kind in missing:
                conn.exec_driver_sql(f"ALTER TABLE determinations ADD COLUMN{guard} {name} {kind}")

    @staticmethod
    def fingerprint(service_id: str, item: dict[str, Any]) -> str:
        import hashlib

        canonical = json.dumps([service_id, item], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def record(self, service_id: str, items: Iterable[dict[str, Any]], now: datetime | None = None) -> int:
        """Store the items not stored before, in one transaction; returns how many were new.

        Raises :class:`StoreUnavailable` when the database cannot take them (nothing is stored then)."""
        return sum(self.record_outcomes(service_id, items, now).values())

    def record_outcomes(self, service_id: str, items: Iterable[dict[str, Any]],
                        now: datetime | None = None) -> dict[str, int]:
        """:meth:`record`, returning how many items were newly stored per ``outcome`` (none for a repeat)."""
        received = now or datetime.now(UTC)
        rows: dict[str, dict[str, Any]] = {}
        for item in items:
            reason = (item.get("overrideReason") or {}).get("reason") or {}
            fingerprint = self.fingerprint(service_id, item)
            rows[fingerprint] = {  # the same item twice in one POST is one item
                "fingerprint": fingerprint,
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
        if not rows:
            return {}
        statement = self._insert(feedback_table).on_conflict_do_nothing(index_elements=["fingerprint"]).returning(
            feedback_table.c.outcome)
        try:
            self.create_schema()
            with self.engine.begin() as conn:
                inserted = conn.execute(statement, list(rows.values())).scalars().all()
        except SQLAlchemyError as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
        new: dict[str, int] = {}
        for outcome in inserted:
            new[outcome] = new.get(outcome, 0) + 1
        return new

    def insert_determinations(self, rows: list[dict[str, Any]],
                              feed: Callable[[Connection, list[dict[str, Any]]], Any] | None = None) -> int:
        """Insert determination rows in one transaction, ignoring those whose ``row_key`` is already stored (a
        replay). Returns how many were new. ``feed`` (the worklist's, ``worklist/publish.py``), when given, gets
        the new rows in the same transaction: the worklist never shows a determination the log lost, nor misses
        one it kept. Database errors propagate: the caller keeps the rows journaled."""
        if not rows:
            return 0
        self.create_schema()
        statement = self._insert(determination_table).on_conflict_do_nothing(
            index_elements=["row_key"]).returning(determination_table.c.row_key)
        with self.engine.begin() as conn:
            inserted = set(conn.execute(statement, rows).scalars().all())
            if feed is not None and inserted:
                feed(conn, [row for row in rows if row["row_key"] in inserted or row["row_key"] is None])
            return len(inserted)

    def log_determinations(self, rows: Iterable[dict[str, Any]],
                           feed: Callable[[Connection, list[dict[str, Any]]], Any] | None = None) -> int:
        """Insert determination rows (see :func:`determination_row`) directly, bypassing the journal."""
        return self.insert_determinations(list(rows), feed)

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
            for name in ("submissions", "existing_charges"):
                item[name] = json.loads(item[name]) if item[name] else []
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
        return reachable(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=15000")
    cursor.close()


def determination_row(determination: Any, *, service_id: str, hook_instance: str, card_uuid: str,
                      recorded_at: datetime, row_key: str | None = None,
                      card: dict[str, Any] | None = None) -> dict[str, Any]:
    """One log row from a :class:`~cds_service.rules.model.Determination` (and the card it was shown on, if any):
    references, verdicts, times and the card's text (no names: cards carry none)."""
    return _row(row_key, recorded_at, service_id, hook_instance, _compact(card_uuid, determination, card))


_FOLLOW_UP = "follow-up-within-24-business-hours"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _compact(card_uuid: str, determination: Any, card: dict[str, Any] | None = None) -> list[Any]:
    """A determination as the journal stores it (positional, built on the hook path, so kept small).

    Elements 0-7 are the first version's (card uuid, status, code, modifiers, patient, encounter, practitioner,
    criteria as [id, status, evidence]); the worklist (issue 15) appended element 8 — [deadline, receipt time,
    follow-up time, organization, payer profile, submissions, existing charges, card summary, card detail, card
    indicator] — and per criterion [detail, facts.case, facts.business_hours_left (follow-up only)]. Only ever
    append: a journal written by an older version is replayed by a newer one (:func:`_row` reads both)."""
    card = card or {}
    # The fields the worklist added are read with defaults: callers (and tests) may log a determination-like object
    # of the first version's shape.
    return [card_uuid, determination.status, determination.code, ",".join(determination.modifiers) or None,
            determination.patient, determination.encounter, determination.practitioner,
            [[c.id, c.status, list(dict.fromkeys(c.evidence)), c.detail, c.facts.get("case"),
              c.facts.get("business_hours_left") if c.id == _FOLLOW_UP else None] for c in determination.criteria],
            [_iso(getattr(determination, "deadline", None)), _iso(getattr(determination, "receipt_time", None)),
             _iso(getattr(determination, "follow_up_time", None)), getattr(determination, "organization", None),
             getattr(determination, "payer_profile", None), list(getattr(determination, "submissions", ())),
             list(getattr(determination, "existing_charges", ())), card.get("summary"), card.get("detail"),
             card.get("indicator")]]


def _criterion_json(c: list[Any]) -> dict[str, Any]:
    document: dict[str, Any] = {"id": c[0], "status": c[1], "evidence": c[2]}
    if len(c) > 3:  # written by a version that knows the worklist
        if c[3]:
            document["detail"] = c[3]
        if c[4] is not None:
            document["case"] = c[4]
        if c[5] is not None:
            document["business_hours_left"] = c[5]
    return document


def _criteria_text(documents: list[dict[str, Any]]) -> str:
    """The criteria column: compact JSON (``compact_json``), or the stdlib's text when a business-hours figure is
    not finite (orjson would write it as null)."""
    for document in documents:
        hours = document.get("business_hours_left")
        if type(hours) is float and not math.isfinite(hours):
            return json.dumps(documents, separators=(",", ":"))
    return compact_json(documents)


class DeterminationRow(dict):  # type: ignore[type-arg]
    """A determination row (column → value) that also carries its JSON columns' values as Python objects
    (``decoded``: criteria documents, submissions, charges), so the worklist feed in the same transaction reads
    them without decoding the text just encoded. To the database it is a plain mapping."""

    __slots__ = ("decoded",)
    decoded: tuple[list[dict[str, Any]], list[Any] | None, list[Any] | None]


def _row(row_key: str | None, recorded_at: datetime, service_id: str, hook_instance: str,
         compact: list[Any]) -> dict[str, Any]:
    card_uuid, status, code, modifiers, patient, encounter, practitioner, criteria = compact[:8]
    more = compact[8] if len(compact) > 8 else [None] * 10  # an 8-element record of the first version
    (deadline, receipt, follow_up, organization, payer, submissions, charges, summary, detail,
     indicator) = more[:10]
    documents = [_criterion_json(c) for c in criteria]
    row = DeterminationRow({
        "row_key": row_key,
        "recorded_at": recorded_at,
        "service_id": service_id,
        "hook_instance": hook_instance[:256],
        "card_uuid": card_uuid,
        "status": status,
        "code": code,
        "modifiers": modifiers,
        "patient_ref": patient,
        "encounter_ref": encounter,
        "practitioner_ref": practitioner,
        "criteria": _criteria_text(documents),
        "deadline": deadline,
        "receipt_time": receipt,
        "follow_up_time": follow_up,
        "organization_ref": organization,
        "payer_profile": payer,
        "submissions": compact_json(submissions) if submissions is not None else None,
        "existing_charges": compact_json(charges) if charges is not None else None,
        "card_summary": summary,
        "card_detail": detail,
        "card_indicator": indicator,
        "card_criteria": ",".join(card_criteria(status, ((c[0], c[1]) for c in criteria))),
    })
    row.decoded = (documents, submissions, charges)
    return row


def rows_of(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Database rows of journal records (see :meth:`DeterminationLog.append_determinations`)."""
    rows = []
    for record in records:
        recorded_at = datetime.fromisoformat(record["t"])
        for i, compact in enumerate(record["r"]):
            rows.append(_row(f"{record['k']}.{i}", recorded_at, record["s"], record["h"], compact))
    return rows


class DeterminationLog:
    """Journals determination rows on the hook path, writes them to the database on a background thread.

    ``append_determinations`` writes the call's rows to the journal (and, with ``journal.fsync: always``, waits for
    them to be on disk) before the hook call is answered; it raises :class:`~cds_service.journal.JournalError`
    (``JournalFull`` past the bound) when it cannot, and the call is then refused, never answered unrecorded.

    The writer thread reads the journal in order and inserts in batches (group commit: after the first append it
    lingers up to ``linger_seconds`` or until ``batch`` rows, one transaction per batch — writing row by row cost
    more CPU than the rules themselves). A failed insert is counted, logged and retried with backoff; the rows stay
    in the journal until a commit succeeds. Every ``scan_seconds`` (and at start) it adopts the journal segments of
    dead processes — a worker killed by ``kill -9``, the previous run — and replays them.
    """

    def __init__(self, store: FeedbackStore, journal: Journal | None = None, *, batch: int = 500,
                 linger_seconds: float = 0.2, scan_seconds: float = 2.0, retry_max_seconds: float = 5.0,
                 rates: Any = None, tz: tzinfo = UTC, worklist: bool = True, process: bool = False) -> None:
        self.store = store
        # The billing worklist is fed in the writer's transaction (worklist/publish.py); rates (a RatesTable) and
        # the practice time zone are taken once here, not per row. Imported here: the worklist package imports
        # this module.
        self.worklist_feed: Callable[[Connection, list[dict[str, Any]]], Any] | None = None
        if worklist and not process:  # with ``process``, the child builds its own
            from .worklist.publish import HookFeed

            self.worklist_feed = HookFeed(rates=rates, tz=tz)
        # ``process``: the database writes run in a child process (logwriter.py: they held the worker's GIL for
        # tens of milliseconds per batch, the hook path's p99); this thread keeps the journal's bookkeeping.
        self.writer_process: Any = None
        if process:
            from .logwriter import WriterProcess

            self.writer_process = WriterProcess(store.database_url, rates=rates, tz=tz, worklist=worklist)
        self.journal = journal or Journal(journal_directory(store.database_url, None))
        # The child reads the lines itself: this thread only checks them (issue 13: reading each record here took
        # the worker's GIL from the hook calls, ~8 µs a record, a stall of about 1 ms a batch).
        self.journal.lines_only = self.writer_process is not None
        self.batch = batch
        self.linger_seconds = linger_seconds
        self.scan_seconds = scan_seconds
        self.retry_max_seconds = retry_max_seconds
        self.failed = 0  # failed database writes (batches); their rows stayed in the journal
        self.batches = 0
        self.written = 0  # rows newly inserted
        self.replayed = 0  # rows inserted from segments adopted from dead processes
        self.duplicates = 0  # rows the database already had (a replay of rows written before a crash)
        self.refused = 0  # hook calls whose rows the journal could not take
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self._counter = itertools.count(1)  # next() on a count is atomic under the GIL: no lock on the hot path
        self._token = self.journal.token
        self._last_complaint = 0.0
        self._wake = threading.Event()
        self._flushing = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="determination-log", daemon=True)
        self._thread.start()
        # A gunicorn worker stopping gracefully exits through sys.exit: write what is journaled then (briefly; what
        # is left stays in the journal for the next start). A weak reference: tests make many of these.
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- the hook path -----------------------------------------------------------------------------------------
    def append_determinations(self, determinations: Iterable[tuple[Any, ...]], *, service_id: str,
                              hook_instance: str) -> None:
        """Journal one hook call's ``(card uuid, Determination)`` pairs — or ``(card uuid, Determination, card)``
        triples, the card as answered (its summary, detail and indicator go to the worklist) — on return they
        survive a crash."""
        pending = tuple(determinations)
        if not pending:
            return
        record = {"k": f"{self._token}-{next(self._counter)}", "t": datetime.now(UTC).isoformat(),
                  "s": service_id, "h": hook_instance[:256], "r": [_compact(*item) for item in pending]}
        try:
            self.journal.append(encode(record), len(pending))
        except JournalError:
            self.refused += 1
            metrics.JOURNAL_REFUSED.inc()
            raise
        metrics.JOURNAL_APPENDED.inc(len(pending))
        if not self._wake.is_set():  # one wake-up per linger period, not per call
            self._wake.set()

    # -- the writer --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_scan = 0.0
        backoff = 0.0
        while True:
            stopping = self._stop.is_set()
            if time.monotonic() >= next_scan:
                self._scan()
                next_scan = time.monotonic() + self.scan_seconds
            ok = self._drain()
            self.publish_metrics()
            if stopping:
                return
            if not ok:
                backoff = min(max(backoff * 2, 0.25), self.retry_max_seconds)
                self._stop.wait(backoff)
                continue
            backoff = 0.0
            self._wake.wait(min(self.scan_seconds, 1.0))
            self._wake.clear()  # before draining: an append after this point wakes the next round
            if not self._flushing.is_set() and not self._stop.is_set():
                self._flushing.wait(self.linger_seconds)

    def _scan(self) -> None:
        try:
            adopted = self.journal.scan()
        except OSError as exc:
            log.error(f"determination journal: cannot scan {self.journal.directory} ({type(exc).__name__})",
                      extra={"event": "journal-scan-failed", "error_type": type(exc).__name__})
            return
        if adopted:
            log.warning(f"determination journal: replaying {adopted} segment(s) left by a stopped process",
                        extra={"event": "journal-replay"})

    def _drain(self) -> bool:
        """Write what is journaled, up to the appends in flight; False when the database refused (the rows
        stay journaled)."""
        while True:
            try:
                batch = self.journal.read_batch(self.batch)
            except OSError as exc:
                self._failure(exc, "read")
                return False
            if batch is None:
                return True
            try:
                rows = batch.rows
                if self.writer_process is not None:
                    new, unreadable = self.writer_process.insert(batch.lines)
                    batch.corrupt += unreadable
                else:
                    new = self.store.insert_determinations(rows_of(batch.records), self.worklist_feed)
            except Exception as exc:  # never dropped, never silent: counted, logged, retried
                self._failure(exc, "write")
                return False
            self._success(batch, rows, new)
            if batch.rows < self.batch and self.journal.is_current(batch.segment):
                # Caught up with the appends: linger for the next group rather than chase every call.
                return True

    def _success(self, batch: Batch, rows: int, new: int) -> None:
        self.journal.commit(batch)
        self.batches += 1
        self.written += new
        self.duplicates += rows - new
        metrics.JOURNAL_WRITTEN.inc(new)
        if batch.segment.adopted:
            self.replayed += new
            metrics.JOURNAL_REPLAYED.inc(new)
        if batch.torn or batch.corrupt:
            metrics.JOURNAL_UNREADABLE.inc(batch.torn + batch.corrupt)
            log.error(f"determination journal: {batch.corrupt} corrupt and {batch.torn} torn record(s) skipped in "
                      f"{batch.segment.name}", extra={"event": "journal-unreadable"})
        if self.failing_since is not None:
            log.warning(f"determination log: database writes recovered after "
                        f"{time.monotonic() - self.failing_since:.1f} s; replaying the journal",
                        extra={"event": "determination-log-recovered"})
            self.failing_since = None
            self.last_error = None

    def _failure(self, exc: Exception, what: str) -> None:
        self.failed += 1
        metrics.JOURNAL_WRITE_ERRORS.inc()
        now = time.monotonic()
        first = self.failing_since is None
        self.last_error = getattr(exc, "error_type", None) or type(exc).__name__  # the writer process's, if any
        if first:
            self.failing_since = now
            self._last_complaint = now
        if first or now - self._last_complaint >= 30:  # loud, not a log line per retry
            self._last_complaint = now
            log.error(f"determination log: database {what} failed; {self.journal.pending_rows()} row(s) kept in "
                      f"the journal and retried", extra={"event": "determination-log-write-failed",
                                                         "error_type": self.last_error})

    def publish_metrics(self) -> None:
        """Set the backlog gauges (the writer does it every round; ``/metrics`` just before a scrape)."""
        metrics.JOURNAL_BACKLOG_ROWS.set(self.journal.pending_rows())
        metrics.JOURNAL_BACKLOG_BYTES.set(self.journal.pending_bytes)

    # -- control -----------------------------------------------------------------------------------------------
    @property
    def backlog_rows(self) -> int:
        return self.journal.pending_rows()

    def flush(self, timeout: float = 10.0, *, until_failure: bool = False) -> bool:
        """Wait (up to ``timeout``; with ``until_failure``, only until a database write fails) until every
        journaled row is in the database; the writer stops lingering meanwhile. False when rows are still pending
        (the database is down, say)."""
        deadline = time.monotonic() + timeout
        failures = self.failed
        self._flushing.set()
        self._wake.set()
        try:
            while self.journal.pending_rows() and time.monotonic() < deadline:
                if until_failure and self.failed > failures:
                    break
                self._wake.set()
                time.sleep(0.005)
            return not self.journal.pending_rows()
        finally:
            self._flushing.clear()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is journaled (up to ``timeout``), stop the writer, release the journal. Rows the database
        did not take stay in the journal file for the next start (or another worker) to replay."""
        if self._closed:
            return
        self._closed = True
        if self.failing_since is None:
            # Stop at the first failed write: the journal keeps the rows, a down database must not hold shutdown.
            self.flush(timeout, until_failure=True)
        self._stop.set()
        self._wake.set()
        self._flushing.set()
        self._thread.join(timeout=5)
        if self.writer_process is not None:
            self.writer_process.stop()
        self.journal.close()
        self.publish_metrics()


def _close_at_exit(reference: weakref.ReferenceType[DeterminationLog]) -> None:
    writer = reference()
    if writer is not None:
        writer.close(timeout=2.0)
