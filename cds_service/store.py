"""Persistence: CDS Hooks feedback (and, later, the determination log) on SQLite or PostgreSQL via SQLAlchemy.

Feedback may arrive more than once for the same card (cds-hooks.md "Endpoints"). Each item is stored under a
fingerprint of its canonical JSON, with a unique constraint, so a repeated identical item is a no-op — also when
two replicas receive it at the same moment.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
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
from sqlalchemy.exc import IntegrityError

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
        if not self._created:
            metadata.create_all(self.engine)
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
