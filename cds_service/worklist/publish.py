"""Feeding the billing worklist: hook determinations (from the determination log's writer) and population-audit
findings (``publish_findings``), both upserted by :func:`upsert_items` under one key per assessment.

The key is ``audit.findings.assessment_id([*submissions, encounter])``, exactly as ``audit/patient.py`` computes it,
so what a hook decided this morning and what last month's audit found about the same assessment are one row.

Ordering rules (model.py): a row holds its latest evaluation by evaluation time (a hook's ``recorded_at``, an audit
run's ``as_of``); an older one arriving later — a journal replayed after a crash, an old run published again — does
not replace it. People's fields (reviewed, review_reason, assignee) are never written by an evaluation, except that a
row marked reviewed whose new evaluation puts it in another queue is reopened (see :func:`upsert_items`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from ..audit import findings
from ..jsonbytes import compact_json
from ..store import FeedbackStore, worklist_actions_table, worklist_items_table
from . import model
from .store import db_time, read_time

_items = worklist_items_table

NOT_ALREADY_BILLED = "not-already-billed"
SYSTEM_ACTOR = "system"

# Columns an evaluation writes; the rest (reviewed, review_reason, assignee) are people's.
EVALUATION_COLUMNS: tuple[str, ...] = (
    "queue", "source", "evaluated_at", "status", "code", "modifiers", "patient_ref", "encounter_ref",
    "practitioner_ref", "organization_ref", "payer_profile", "received_at", "deadline_at", "follow_up_at", "charges",
    "billed_code", "audit_class", "reason", "question", "estimated_amount", "timely_filing_deadline", "criteria",
    "card_summary", "card_detail", "card_indicator", "extra", "updated_at",
)
_CHUNK = 500


class PublishError(Exception):
    """A findings file that cannot be read or holds rows that are no findings rows."""


# --- hook determinations ------------------------------------------------------------------------------------------
def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def hook_queue(status: str, criteria: list[dict[str, Any]], charges: list[str]) -> str:
    """The queue of a hook determination. A hook counts the assessment's own charges (it judges "may this be
    billed now"), so billable means not yet charged; not-billable with a charge is at risk when something other
    than the charge itself fails, or the charge has the wrong code; otherwise it was charged as the verdict says
    (not-already-billed failing as ``same-submission``) or is neither billable nor charged: done."""
    if status == "pending":
        return model.DUE
    if status == "billable":
        return model.TO_CHARGE
    if status == "needs-review":
        return model.REVIEW
    if charges:
        others = any(c["status"] == "not-met" and c["id"] != NOT_ALREADY_BILLED for c in criteria)
        wrong_code = any(c["id"] == NOT_ALREADY_BILLED and c["status"] == "not-met" and c.get("case") == "wrong-code"
                         for c in criteria)
        if others or wrong_code:
            return model.AT_RISK
    return model.DONE


class HookFeed:
    """The determination log writer's feed (``FeedbackStore.insert_determinations(rows, feed)``): determination
    rows → worklist rows, upserted in the writer's transaction. ``rates`` (a ``RatesTable``) and the practice time
    zone are given once, when the log is built."""

    def __init__(self, *, rates: Any = None, tz: tzinfo = UTC) -> None:
        self.rates = rates
        self.tz = tz

    def __call__(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        items = [item for item in (self.item(row) for row in rows) if item is not None]
        return upsert_items(conn, items)

    def amount(self, code: str | None) -> float | None:
        return self.rates.amount(code) if self.rates is not None and code else None

    def item(self, row: Mapping[str, Any]) -> dict[str, Any] | None:
        """The worklist row of one determination row (``cds_service.store._row``); None when it names no
        assessment (no submission, no encounter)."""
        decoded = getattr(row, "decoded", None)  # a store.DeterminationRow: its JSON columns' values at hand
        if decoded is not None:
            criteria, submissions, charges = decoded[0], decoded[1] or [], decoded[2] or []
        else:
            submissions = json.loads(row["submissions"]) if row.get("submissions") else []
            criteria = json.loads(row["criteria"]) if row.get("criteria") else []
            charges = json.loads(row["existing_charges"]) if row.get("existing_charges") else []
        references = [*submissions, row.get("encounter_ref")]
        if not any(references):
            return None
        status = row["status"]
        queue = hook_queue(status, criteria, charges)
        summary = row.get("card_summary")
        question = None
        if queue == model.REVIEW:
            question = next((c.get("detail") for c in criteria if c["status"] == "unknown" and c.get("detail")),
                            summary)
        received = _time(row.get("receipt_time"))
        evaluated = row["recorded_at"]
        if evaluated.tzinfo is None:  # determination_row callers may pass a naive UTC time
            evaluated = evaluated.replace(tzinfo=UTC)
        return {
            "item_id": findings.assessment_id(references),
            "queue": queue,
            "source": model.SOURCE_HOOK,
            "evaluated_at": evaluated,
            "status": status,
            "code": row.get("code"),
            "modifiers": row.get("modifiers"),
            "patient_ref": row.get("patient_ref"),
            "encounter_ref": row.get("encounter_ref"),
            "practitioner_ref": row.get("practitioner_ref"),
            "organization_ref": row.get("organization_ref"),
            "payer_profile": row.get("payer_profile"),
            "received_at": received,
            "deadline_at": _time(row.get("deadline")),
            "follow_up_at": _time(row.get("follow_up_time")),
            "charges": compact_json(charges),
            "billed_code": None,  # the hook knows the charges' references, not their lines
            "audit_class": None,
            "reason": summary or "",
            "question": question,
            "estimated_amount": self.amount(row.get("code")) if queue in (model.TO_CHARGE, model.AT_RISK) else None,
            # 42 CFR 424.44: 12 months from the date of service, the receipt date in the practice's zone.
            "timely_filing_deadline": (findings.timely_filing_deadline(received.astimezone(self.tz).date())
                                       if received is not None else None),
            "criteria": compact_json([{"id": c["id"], "status": c["status"], "detail": c.get("detail") or "",
                                   "evidence": c.get("evidence") or []} for c in criteria]),
            "card_summary": summary,
            "card_detail": row.get("card_detail"),
            "card_indicator": row.get("card_indicator"),
            "extra": compact_json({"service_id": row.get("service_id"), "card_uuid": row.get("card_uuid"),
                               "submissions": submissions}),
            "updated_at": evaluated,
        }


# --- audit findings -----------------------------------------------------------------------------------------------
def _criteria_of_finding(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Criterion lines of a finding row: its failed criteria ("id:status") with their evidence
    ("criterion-id=Type/id"); the audit keeps no per-criterion sentence."""
    evidence: dict[str, list[str]] = {}
    for entry in row.get("evidence") or ():
        criterion, _, ref = str(entry).partition("=")
        evidence.setdefault(criterion, []).append(ref)
    lines = []
    for entry in row.get("failed_criteria") or ():
        criterion, _, status = str(entry).partition(":")
        lines.append({"id": criterion, "status": status or "not-met", "detail": "",
                      "evidence": evidence.get(criterion, [])})
    return lines


def finding_item(row: Mapping[str, Any], *, run_id: str, as_of: datetime) -> dict[str, Any]:
    """The worklist row of one findings row (``audit.findings.COLUMN_NAMES``)."""
    klass = row.get("class")
    if klass not in model.QUEUE_OF_CLASS:
        raise PublishError(f"finding {row.get('assessment_id')!r}: unknown class {klass!r}")
    if not row.get("assessment_id"):
        raise PublishError("a finding row has no assessment_id")
    queue = model.QUEUE_OF_CLASS[klass]
    filing = row.get("timely_filing_deadline")
    if isinstance(filing, str):
        filing = date.fromisoformat(filing) if filing else None
    amount = row.get("estimated_amount")
    return {
        "item_id": str(row["assessment_id"]),
        "queue": queue,
        "source": model.SOURCE_AUDIT,
        "evaluated_at": as_of,
        "status": row.get("status"),
        "code": row.get("code"),
        "modifiers": ",".join(row.get("modifiers") or ()) or None,
        "patient_ref": row.get("patient"),
        "encounter_ref": None,  # a finding names its assessment by id, not by encounter
        "practitioner_ref": row.get("practitioner"),
        "organization_ref": row.get("organization"),
        "payer_profile": row.get("payer_profile"),
        "received_at": _time(row.get("received")),
        "deadline_at": _time(row.get("deadline")),
        "follow_up_at": _time(row.get("follow_up")),
        "charges": json.dumps(list(row.get("charge_refs") or ())),
        "billed_code": row.get("billed_code"),
        "audit_class": klass,
        "reason": row.get("reason") or "",
        "question": row.get("reason") if queue == model.REVIEW else None,
        "estimated_amount": float(amount) if amount is not None else None,
        "timely_filing_deadline": filing,
        "criteria": json.dumps(_criteria_of_finding(row)),
        "card_summary": None,
        "card_detail": None,
        "card_indicator": None,
        "extra": json.dumps({
            "run_id": run_id, "oig_screens": list(row.get("oig_screens") or ()),
            "billed_modifiers": list(row.get("billed_modifiers") or ()), "month": row.get("month"),
            "past_timely_filing": row.get("past_timely_filing"),
            "deadline_missed_hours": row.get("deadline_missed_hours"),
            "evidence": list(row.get("evidence") or ()),
        }, default=str),
        "updated_at": as_of,
    }


def publish_findings(store: FeedbackStore, rows: Iterable[Mapping[str, Any]], *, run_id: str,
                     as_of: datetime) -> int:
    """Upsert a population-audit run's findings rows into the worklist, in one transaction; returns how many rows
    the run wrote (new or newer than what the worklist held). ``as_of`` (the run's judging time, with offset) is the
    rows' evaluation time. Raises :class:`PublishError` for a row that is no findings row (nothing is written)."""
    if as_of.tzinfo is None:
        raise PublishError("as_of needs a UTC offset")
    items = [finding_item(row, run_id=run_id, as_of=as_of) for row in rows]
    store.create_schema()
    with store.engine.begin() as conn:
        return upsert_items(conn, items)


def read_findings_parquet(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], datetime | None]:
    """The rows of a ``findings.parquet`` (a file, or the ``--out`` directory holding one) and the run's as-of time
    from the ``summary.json`` beside it (None when there is none). Raises :class:`PublishError` naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..audit.outputs import FINDINGS_PARQUET

    target = Path(path)
    if target.is_dir():
        target = target / FINDINGS_PARQUET
    if not target.is_file():
        raise PublishError(f"{target}: no such file (give findings.parquet or the population-audit --out directory)")
    try:
        table = pq.read_table(target)
    except (OSError, pa.ArrowException) as exc:
        raise PublishError(f"{target}: cannot read it as Parquet ({type(exc).__name__})") from exc
    missing = sorted(set(findings.COLUMN_NAMES) - set(table.column_names))
    if missing:
        raise PublishError(f"{target}: not a findings file (missing columns: {', '.join(missing[:5])})")
    as_of = None
    summary = target.parent / "summary.json"
    if summary.is_file():
        try:
            text = json.loads(summary.read_text(encoding="utf-8")).get("run", {}).get("as_of")
            as_of = _time(text.replace("Z", "+00:00")) if isinstance(text, str) else None
        except (OSError, ValueError, AttributeError):
            as_of = None
    return table.to_pylist(), as_of


# --- the upsert ---------------------------------------------------------------------------------------------------
def upsert_items(conn: Connection, items: list[dict[str, Any]]) -> int:
    """Write worklist rows (evaluation columns, times with offsets) in ``conn``'s transaction; returns how many
    were written. Per item id the newest evaluation wins — within ``items`` and against the stored row; an older
    one is skipped. People's fields are written only for new rows (not reviewed, unassigned).

    A row marked reviewed whose new evaluation moves it to another queue is reopened (reviewed = false) with a
    "reopen" action by "system" in its trail: the review judged the old situation (say, "pending, leave it"), and
    a coder must see the new one (now billable, or now at risk) rather than have it hidden behind an old decision.
    A new evaluation in the same queue keeps the review."""
    if not items:
        return 0
    dialect = conn.dialect.name
    latest: dict[str, dict[str, Any]] = {}
    for item in items:
        held = latest.get(item["item_id"])
        if held is None or item["evaluated_at"] >= held["evaluated_at"]:
            latest[item["item_id"]] = item
    ids = list(latest)
    existing: dict[str, Any] = {}
    for start in range(0, len(ids), _CHUNK):
        query = select(_items.c.item_id, _items.c.queue, _items.c.reviewed, _items.c.evaluated_at).where(
            _items.c.item_id.in_(ids[start:start + _CHUNK]))
        if dialect == "postgresql":
            query = query.with_for_update()  # a concurrent writer's reopen decision waits for ours
        for row in conn.execute(query):
            existing[row.item_id] = row
    writes: list[dict[str, Any]] = []
    reopened: list[tuple[str, str, str, datetime]] = []
    for item_id, item in latest.items():
        old = existing.get(item_id)
        if old is not None and read_time(old.evaluated_at) > item["evaluated_at"]:  # type: ignore[operator]
            continue
        if old is not None and old.reviewed and old.queue != item["queue"]:
            reopened.append((item_id, old.queue, item["queue"], item["evaluated_at"]))
        row = dict(item)
        for name in ("evaluated_at", "received_at", "deadline_at", "follow_up_at", "updated_at"):
            row[name] = db_time(row[name], dialect)
        row.setdefault("reviewed", False)
        writes.append(row)
    if not writes:
        return 0
    insert = postgresql_insert(_items) if dialect == "postgresql" else sqlite_insert(_items)
    statement = insert.on_conflict_do_update(
        index_elements=[_items.c.item_id],
        set_={name: insert.excluded[name] for name in EVALUATION_COLUMNS},
        where=_items.c.evaluated_at <= insert.excluded.evaluated_at,
    )
    for start in range(0, len(writes), _CHUNK):
        conn.execute(statement, writes[start:start + _CHUNK])
    for item_id, old_queue, new_queue, at in reopened:
        conn.execute(update(_items).where(_items.c.item_id == item_id).values(reviewed=False, review_reason=None))
        conn.execute(worklist_actions_table.insert().values(
            item_id=item_id, at=db_time(at, dialect), actor=SYSTEM_ACTOR, action=model.ACTION_REOPEN,
            note=f"reopened: a new evaluation moved it from {model.QUEUE_LABELS.get(old_queue, old_queue)} to "
                 f"{model.QUEUE_LABELS.get(new_queue, new_queue)}"))
    return len(writes)
