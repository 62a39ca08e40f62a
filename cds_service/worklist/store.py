"""The billing worklist's queries: pages, detail, actions, facets, export, one-time form nonces and analytics.

The rows live in the ``worklist_items`` table (defined with the other tables in ``cds_service/store.py``, so
``FeedbackStore.create_schema`` creates them); the hooks' determination log and published population-audit runs
fill it (``worklist/publish.py``). This module only reads rows and records people's actions: it never calls the
rules or the FHIR server (style.md "The worklist is a blueprint ...").

Times are stored in UTC (see :func:`db_time`); dates a person reads or filters on (receipt date, month) are in the
practice time zone ``tz`` given to :class:`WorklistStore`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any

from sqlalchemy import case, func, nullslast, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import ColumnElement

from ..store import (
    card_criteria,
    determination_table,
    feedback_table,
    worklist_actions_table,
    worklist_items_table,
    worklist_nonces_table,
)
from . import model
from .model import Action, CriterionLine, ItemDetail, WorklistFilter, WorklistItem, WorklistPage

_items = worklist_items_table
_actions = worklist_actions_table
_nonces = worklist_nonces_table

# Sort key (model.SORT_KEYS) → column.
_SORT_COLUMNS: dict[str, Any] = {
    "deadline": _items.c.deadline_at, "received": _items.c.received_at, "practitioner": _items.c.practitioner_ref,
    "organization": _items.c.organization_ref, "payer": _items.c.payer_profile, "status": _items.c.status,
    "queue": _items.c.queue, "amount": _items.c.estimated_amount, "timely_filing": _items.c.timely_filing_deadline,
    "updated": _items.c.updated_at,
}
assert set(_SORT_COLUMNS) == set(model.SORT_KEYS)

# Field limits of people's input (the column sizes of cds_service/store.py).
MAX_NOTE = 2000
MAX_ACTOR = 256
MAX_REASON = 128
MAX_ASSIGNEE = 256
_EXPORT_CHUNK = 1000
# Used nonces older than this are deleted when new ones are issued (no form lives a day).
_NONCE_RETENTION = timedelta(days=1)

#: Columns of :meth:`WorklistStore.export`, in spreadsheet order.
EXPORT_COLUMNS: tuple[str, ...] = (
    "item_id", "queue", "status", "code", "modifiers", "patient", "encounter", "practitioner", "organization",
    "payer", "received", "deadline", "follow_up", "timely_filing_deadline", "days_to_timely_filing",
    "estimated_amount", "charges", "billed_code", "audit_class", "reason", "question", "reviewed", "review_reason",
    "assignee", "source", "evaluated_at", "updated_at",
)


def db_time(moment: datetime | None, dialect: str) -> datetime | None:
    """A time as stored: UTC; naive on SQLite, which keeps no offset (so text order is time order)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError("times must carry a UTC offset")
    moment = moment.astimezone(UTC)
    return moment.replace(tzinfo=None) if dialect == "sqlite" else moment


def read_time(value: datetime | None) -> datetime | None:
    """A stored time back with its offset (UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else ()


def _json(text: str | None, default: Any) -> Any:
    return json.loads(text) if text else default


class WorklistStore:
    """Queries over the worklist tables of ``engine`` (the :class:`~cds_service.store.FeedbackStore`'s engine)."""

    def __init__(self, engine: Engine, *, tz: tzinfo) -> None:
        self.engine = engine
        self.tz = tz
        self.dialect = engine.dialect.name
        # Rows of the previous version's log lack card_criteria; every row written since has it (store._row), so
        # one pass per process fills them in (analytics).
        self._card_criteria_filled = False

    # -- reading -----------------------------------------------------------------------------------------------
    def _conditions(self, filter: WorklistFilter, *, with_queue: bool) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if with_queue:
            if filter.queue is None:
                conditions.append(_items.c.queue.in_(model.QUEUES))
            elif filter.queue in model.QUEUE_LABELS:
                conditions.append(_items.c.queue == filter.queue)
            else:
                raise ValueError(f"unknown queue {filter.queue!r}")
        for column, value in ((_items.c.practitioner_ref, filter.practitioner),
                              (_items.c.organization_ref, filter.organization), (_items.c.payer_profile, filter.payer),
                              (_items.c.status, filter.status), (_items.c.audit_class, filter.audit_class),
                              (_items.c.assignee, filter.assignee)):
            if value is not None:
                conditions.append(column == value)
        if filter.received_from is not None:
            conditions.append(_items.c.received_at >= self._day_start(filter.received_from))
        if filter.received_to is not None:
            conditions.append(_items.c.received_at < self._day_start(filter.received_to + timedelta(days=1)))
        if not filter.include_reviewed:
            conditions.append(_items.c.reviewed.is_(False))
        return conditions

    def _day_start(self, day: date) -> datetime | None:
        return db_time(datetime.combine(day, time(), tzinfo=self.tz), self.dialect)

    def _order(self, sort: str, descending: bool) -> list[Any]:
        column = _SORT_COLUMNS.get(sort)
        if column is None:
            raise ValueError(f"unknown sort key {sort!r}; one of {', '.join(model.SORT_KEYS)}")
        if descending:
            return [nullslast(column.desc()), _items.c.item_id.desc()]
        return [nullslast(column.asc()), _items.c.item_id.asc()]

    def page(self, filter: WorklistFilter, *, sort: str, descending: bool, page: int, page_size: int,
             now: datetime) -> WorklistPage:
        """One page of the rows matching ``filter``, ordered by ``sort`` (one of ``model.SORT_KEYS``; anything else
        raises ValueError, as do ``page`` < 1, ``page_size`` outside 1..max(``model.PAGE_SIZES``) and an unknown
        queue), with the total and the per-queue counts (every queue of ``model.QUEUE_LABELS``, "done" included,
        under the same filter minus its queue; 0 for an empty queue).

        ``sort="deadline"`` ascending is the due queue's order: overdue first (their deadlines are the earliest),
        then the soonest deadline; rows without the sort value come last either way; ties by item id (stable
        paging). ``now`` is accepted for views that page relative to it; the order does not depend on it.

        Cost: one GROUP BY over the filtered rows (the counts, and so the total) and one indexed ORDER BY ... LIMIT
        / OFFSET."""
        if page < 1:
            raise ValueError("page must be 1 or more")
        if not 1 <= page_size <= max(model.PAGE_SIZES):
            raise ValueError(f"page_size must be 1-{max(model.PAGE_SIZES)}")
        order = self._order(sort, descending)
        rows_where = self._conditions(filter, with_queue=True)
        counts_where = self._conditions(filter, with_queue=False)
        counts = dict.fromkeys(model.QUEUE_LABELS, 0)
        with self.engine.connect() as conn:
            for queue, count in conn.execute(select(_items.c.queue, func.count()).where(*counts_where)
                                             .group_by(_items.c.queue)):
                if queue in counts:
                    counts[queue] = int(count)
            rows = conn.execute(select(_items).where(*rows_where).order_by(*order)
                                .limit(page_size).offset((page - 1) * page_size)).mappings().all()
        total = sum(counts[q] for q in model.QUEUES) if filter.queue is None else counts[filter.queue]
        return WorklistPage(items=tuple(_item(row) for row in rows), total=total, counts=counts, page=page,
                            page_size=page_size)

    def detail(self, item_id: str) -> ItemDetail | None:
        """Everything about one row: its criteria lines, the card the clinician saw (hook rows), the source's extra
        fields, the audit trail oldest first; None for an unknown id."""
        with self.engine.connect() as conn:
            row = conn.execute(select(_items).where(_items.c.item_id == item_id)).mappings().first()
            if row is None:
                return None
            trail = conn.execute(select(_actions).where(_actions.c.item_id == item_id)
                                 .order_by(_actions.c.at, _actions.c.id)).mappings().all()
        criteria = tuple(CriterionLine(id=c["id"], status=c["status"], detail=c.get("detail") or "",
                                       evidence=tuple(c.get("evidence") or ()))
                         for c in _json(row["criteria"], []))
        actions = tuple(Action(at=read_time(a["at"]), actor=a["actor"], action=a["action"],  # type: ignore[arg-type]
                               reason=a["reason"], assignee=a["assignee"], note=a["note"]) for a in trail)
        return ItemDetail(item=_item(row), criteria=criteria, card_summary=row["card_summary"],
                          card_detail=row["card_detail"], card_indicator=row["card_indicator"], actions=actions,
                          extra=_json(row["extra"], {}))

    def facets(self) -> dict[str, list[str]]:
        """The values the filters offer, sorted: ``practitioners``, ``organizations``, ``payers``, ``assignees``
        (over every row, reviewed and done included, so a filter that was valid stays offered)."""
        result: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for key, column in (("practitioners", _items.c.practitioner_ref),
                                ("organizations", _items.c.organization_ref), ("payers", _items.c.payer_profile),
                                ("assignees", _items.c.assignee)):
                values = conn.execute(select(column).where(column.is_not(None)).distinct()).scalars().all()
                result[key] = sorted(v for v in values if v)
        return result

    def export(self, filter: WorklistFilter, *, sort: str, descending: bool, now: datetime) -> Iterator[dict[str, Any]]:
        """The rows of the current view (every page), one dict per row with ``EXPORT_COLUMNS`` as keys, in page
        order; lists joined with ``"; "``, times ISO 8601 in the practice time zone, ``days_to_timely_filing`` the
        days from ``now``'s date (practice time zone) to the timely filing deadline (negative: past it). No card
        Markdown. Read in chunks of 1,000 rows, so a large view does not sit in memory."""
        order = self._order(sort, descending)  # a bad key fails here, before the first row is asked for
        where = self._conditions(filter, with_queue=True)
        today = now.astimezone(self.tz).date()
        return self._export(where, order, today)

    def _export(self, where: list[ColumnElement[bool]], order: list[Any], today: date) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(select(_items).where(*where).order_by(*order).limit(_EXPORT_CHUNK)
                                    .offset(offset)).mappings().all()
            for row in rows:
                yield self._export_row(_item(row), today)
            if len(rows) < _EXPORT_CHUNK:
                return
            offset += _EXPORT_CHUNK

    def _export_row(self, item: WorklistItem, today: date) -> dict[str, Any]:
        def local(moment: datetime | None) -> str | None:
            return moment.astimezone(self.tz).isoformat() if moment is not None else None

        filing = item.timely_filing_deadline
        return {
            "item_id": item.item_id, "queue": item.queue, "status": item.status, "code": item.code,
            "modifiers": "; ".join(item.modifiers), "patient": item.patient, "encounter": item.encounter,
            "practitioner": item.practitioner, "organization": item.organization, "payer": item.payer,
            "received": local(item.received), "deadline": local(item.deadline), "follow_up": local(item.follow_up),
            "timely_filing_deadline": filing.isoformat() if filing else None,
            "days_to_timely_filing": (filing - today).days if filing else None,
            "estimated_amount": item.estimated_amount, "charges": "; ".join(item.charges),
            "billed_code": item.billed_code, "audit_class": item.audit_class, "reason": item.reason,
            "question": item.question, "reviewed": item.reviewed, "review_reason": item.review_reason,
            "assignee": item.assignee, "source": item.source, "evaluated_at": local(item.evaluated_at),
            "updated_at": local(item.updated_at),
        }

    # -- people's actions --------------------------------------------------------------------------------------
    def act(self, item_id: str, *, actor: str, action: str, reason: str | None = None, assignee: str | None = None,
            note: str | None = None, at: datetime) -> None:
        """Record one person's action on a row, in one transaction: the action row (the audit trail, append only),
        the row's people's fields and ``updated_at``.

        ``review`` needs ``reason`` (an override reason code, hooks/card_texts.json) and sets reviewed; ``reopen``
        clears it; ``assign`` sets ``assignee`` (None or "" unassigns); ``note`` needs ``note`` (1-2000
        characters); a note may go with any action. Raises ValueError for an unknown action, an empty actor or a
        missing/oversized field, KeyError for an unknown item."""
        if action not in model.ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(model.ACTIONS)}")
        actor = (actor or "").strip()
        if not actor or len(actor) > MAX_ACTOR:
            raise ValueError(f"actor must be 1-{MAX_ACTOR} characters")
        reason = (reason or "").strip() or None
        assignee = (assignee or "").strip() or None
        note = note.strip() if note is not None else None
        if reason is not None and len(reason) > MAX_REASON:
            raise ValueError(f"reason must be at most {MAX_REASON} characters")
        if assignee is not None and len(assignee) > MAX_ASSIGNEE:
            raise ValueError(f"assignee must be at most {MAX_ASSIGNEE} characters")
        if note is not None and len(note) > MAX_NOTE:
            raise ValueError(f"note must be at most {MAX_NOTE} characters")
        if action == model.ACTION_REVIEW and reason is None:
            raise ValueError("marking reviewed needs a reason")
        if action == model.ACTION_NOTE and not note:
            raise ValueError("a note must not be empty")
        note = note or None
        when = db_time(at, self.dialect)
        changes: dict[str, Any] = {"updated_at": when}
        if action == model.ACTION_REVIEW:
            changes.update(reviewed=True, review_reason=reason)
        elif action == model.ACTION_REOPEN:
            changes.update(reviewed=False, review_reason=None)
        elif action == model.ACTION_ASSIGN:
            changes["assignee"] = assignee
        with self.engine.begin() as conn:
            updated = conn.execute(update(_items).where(_items.c.item_id == item_id).values(**changes)).rowcount
            if updated != 1:
                raise KeyError(item_id)  # the transaction rolls back: no trail row for an unknown item
            conn.execute(_actions.insert().values(
                item_id=item_id, at=when, actor=actor, action=action,
                reason=reason if action == model.ACTION_REVIEW else None,
                assignee=assignee if action == model.ACTION_ASSIGN else None, note=note))

    # -- one-time forms ----------------------------------------------------------------------------------------
    def issue_nonce(self, *, now: datetime | None = None) -> str:
        """A new one-time form token (URL-safe, 43 characters, 256 random bits). Tokens used or issued more than a
        day ago are deleted meanwhile (no form lives that long)."""
        moment = now or datetime.now(UTC)
        nonce = secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(_nonces.delete().where(_nonces.c.issued_at < db_time(moment - _NONCE_RETENTION,
                                                                              self.dialect)))
            conn.execute(_nonces.insert().values(nonce=nonce, issued_at=db_time(moment, self.dialect)))
        return nonce

    def consume_nonce(self, nonce: str, *, max_age_seconds: float, now: datetime | None = None) -> bool:
        """True exactly once for an issued token younger than ``max_age_seconds``; False when unknown, already
        used or expired. One conditional UPDATE: two requests racing with the same token cannot both win."""
        if not isinstance(nonce, str) or not nonce or len(nonce) > 64:
            return False
        moment = now or datetime.now(UTC)
        oldest = db_time(moment - timedelta(seconds=max_age_seconds), self.dialect)
        with self.engine.begin() as conn:
            used = conn.execute(update(_nonces).where(
                _nonces.c.nonce == nonce, _nonces.c.used_at.is_(None), _nonces.c.issued_at >= oldest,
                _nonces.c.issued_at <= db_time(moment, self.dialect),
            ).values(used_at=db_time(moment, self.dialect))).rowcount
        return used == 1

    # -- analytics ---------------------------------------------------------------------------------------------
    def analytics(self, *, since: date | None, until: date | None) -> dict[str, Any]:
        """Numbers for the worklist's plots, by month (``"YYYY-MM"`` of the practice time zone ``tz``).

        ``since`` / ``until`` (inclusive dates, practice time zone; None: unbounded) bound the moment each number
        is placed by (given below). Returns::

            {
              "months":   ["YYYY-MM", ...],            # sorted; every month that has a number below
              "cards":    [{"month", "shown", "accepted", "overridden"}, ...],     # sorted by month (each card once)
              "criteria": [{"month", "criterion", "shown", "accepted", "overridden",
                            "acceptance_rate", "override_rate"}, ...],      # sorted by month, criterion
              "reasons":  [{"month", "reason", "display", "count"}, ...],   # sorted by month, then count desc
              "money":    [{"month", "missed_revenue", "missed_count", "at_risk", "at_risk_count"}, ...],
              "unmatched_feedback": int,
            }

        (a) ``criteria`` — from the determination log and stored CDS Hooks feedback, per **card**: a card is one
        ``card_uuid`` (stable for one assessment's verdict, hooks/cards.py ``stable_uuid``, so the card an EHR shows on
        three hook calls is one card), placed in the month it was **first shown** (its earliest ``recorded_at``;
        ``since``/``until`` select cards by that moment).

        * a card's criteria: for a billable card the single pseudo-criterion ``"all-met"``; otherwise the ids of its
          criteria whose status is ``not-met`` or ``unknown``; when there are none (a pending card), those whose
          status is ``pending``.
        * ``shown``: the cards about the criterion first shown that month.
        * ``accepted`` / ``overridden``: those of them with at least one stored ``feedback`` item with outcome
          ``accepted`` / ``overridden`` (whenever it arrived: a card's feedback counts in the card's month, so a
          rate never exceeds 1; a card with both counts in both).
        * ``acceptance_rate`` = accepted / shown and ``override_rate`` = overridden / shown, rounded to 4 places.

        (b) ``reasons`` — every overridden card counts 1 under each override reason ``code`` its feedback gave
        (``"none"`` when the clinician gave none), in the card's month; feedback whose card is not in the
        determination log counts in ``unmatched_feedback`` (those received in the period) and its reasons in the
        month it was received. ``display`` is the latest display text seen for that code (None if none).

        (c) ``money`` — from the worklist rows now in the to-charge (``missed_revenue``: sum of
        ``estimated_amount``, ``missed_count``: rows) and at-risk (``at_risk``, ``at_risk_count``) queues, reviewed
        or not, in the month of their receipt (else of their evaluation); amounts unknown to the rates table count
        as 0 in the sums but 1 in the counts; sums rounded to cents.
        """
        low = self._day_start(since) if since is not None else None
        high = self._day_start(until + timedelta(days=1)) if until is not None else None
        shown: dict[tuple[str, str], int] = {}
        accepted: dict[tuple[str, str], int] = {}
        overridden: dict[tuple[str, str], int] = {}
        reasons: dict[tuple[str, str], int] = {}
        displays: dict[str, str] = {}
        per_month: dict[str, list[int]] = {}
        d = determination_table
        f = feedback_table
        self._backfill_card_criteria()
        first_shown = func.min(d.c.recorded_at)
        cards_query = select(d.c.card_uuid.label("uuid"), first_shown.label("first"),
                             func.max(d.c.card_criteria).label("about")).group_by(d.c.card_uuid)
        if low is not None:
            cards_query = cards_query.having(first_shown >= low)
        if high is not None:
            cards_query = cards_query.having(first_shown < high)
        cards = cards_query.subquery()
        with self.engine.connect() as conn:
            # Everything is counted by the database, grouped by (month first shown, the card's criteria, accepted,
            # overridden): a few hundred groups come back, however many cards there are.
            # The months to bucket by: from the log's own bounds (its recorded_at index), not from the grouped cards.
            earliest, latest = conn.execute(select(func.min(d.c.recorded_at), func.max(d.c.recorded_at))
                                            .where(*_between(d.c.recorded_at, low, high))).one()
            buckets = self._months_between(read_time(earliest), read_time(latest)) if earliest is not None else []
            if buckets:
                bucket = case(*[(cards.c.first < start, index) for index, (_, start) in enumerate(buckets[1:])],
                              else_=len(buckets) - 1)
                card_feedback = (select(f.c.card_uuid.label("uuid"),
                                        func.max(case((f.c.outcome == "accepted", 1), else_=0)).label("yes"),
                                        func.max(case((f.c.outcome == "overridden", 1), else_=0)).label("no"))
                                 .group_by(f.c.card_uuid).subquery())
                yes = func.coalesce(card_feedback.c.yes, 0)
                no = func.coalesce(card_feedback.c.no, 0)
                grouped = conn.execute(
                    select(bucket, cards.c.about, yes, no, func.count())
                    .select_from(cards.outerjoin(card_feedback, card_feedback.c.uuid == cards.c.uuid))
                    .group_by(bucket, cards.c.about, yes, no)).all()
                reason_code = func.coalesce(f.c.override_code, "none")
                reason_groups = conn.execute(
                    select(bucket, reason_code, func.count(func.distinct(f.c.card_uuid)))
                    .select_from(cards.join(f, f.c.card_uuid == cards.c.uuid))
                    .where(f.c.outcome == "overridden").group_by(bucket, reason_code)).all()
            else:
                grouped, reason_groups = [], []
            for code, display in conn.execute(
                    select(f.c.override_code, f.c.override_display)
                    .where(f.c.outcome == "overridden", f.c.override_code.is_not(None),
                           f.c.override_display.is_not(None)).order_by(f.c.received_at, f.c.id)):
                displays[code] = display
            logged = select(d.c.card_uuid).where(d.c.card_uuid == f.c.card_uuid).exists()
            orphans = conn.execute(
                select(f.c.outcome, f.c.override_code, f.c.received_at)
                .where(*_between(f.c.received_at, low, high), ~logged)).all()
            money_rows = conn.execute(
                select(_items.c.queue, _items.c.estimated_amount, _items.c.received_at, _items.c.evaluated_at)
                .where(_items.c.queue.in_((model.TO_CHARGE, model.AT_RISK)))).all()
        for index, about, was_accepted, was_overridden, count in grouped:
            month = buckets[index][0]
            totals = per_month.setdefault(month, [0, 0, 0])
            totals[0] += count
            totals[1] += count if was_accepted else 0
            totals[2] += count if was_overridden else 0
            for criterion in (about.split(",") if about else ()):
                key = (month, criterion)
                shown[key] = shown.get(key, 0) + count
                if was_accepted:
                    accepted[key] = accepted.get(key, 0) + count
                if was_overridden:
                    overridden[key] = overridden.get(key, 0) + count
        for index, code, count in reason_groups:
            key = (buckets[index][0], code)
            reasons[key] = reasons.get(key, 0) + count
        unmatched = len(orphans)
        for outcome, code, received in orphans:
            if outcome == "overridden":
                key = (self._month(received), code or "none")
                reasons[key] = reasons.get(key, 0) + 1
        money: dict[str, dict[str, Any]] = {}
        for queue, amount, received, evaluated in money_rows:
            placed = read_time(received) or read_time(evaluated)
            local_day = placed.astimezone(self.tz).date()  # type: ignore[union-attr]
            if (since is not None and local_day < since) or (until is not None and local_day > until):
                continue
            entry = money.setdefault(f"{local_day:%Y-%m}", {"missed_revenue": 0.0, "missed_count": 0,
                                                            "at_risk": 0.0, "at_risk_count": 0})
            prefix = "missed" if queue == model.TO_CHARGE else "at_risk"
            entry["missed_revenue" if prefix == "missed" else "at_risk"] += amount or 0.0
            entry[f"{prefix}_count"] += 1
        keys = sorted(set(shown) | set(accepted) | set(overridden))
        criteria_rows = []
        for month, criterion in keys:
            count = shown.get((month, criterion), 0)
            yes = accepted.get((month, criterion), 0)
            no = overridden.get((month, criterion), 0)
            criteria_rows.append({"month": month, "criterion": criterion, "shown": count, "accepted": yes,
                                  "overridden": no, "acceptance_rate": round(yes / count, 4) if count else None,
                                  "override_rate": round(no / count, 4) if count else None})
        reason_rows = [{"month": month, "reason": code, "display": displays.get(code), "count": count}
                       for (month, code), count in sorted(reasons.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1]))]
        money_rows_out = [{"month": month, "missed_revenue": round(entry["missed_revenue"], 2),
                           "missed_count": entry["missed_count"], "at_risk": round(entry["at_risk"], 2),
                           "at_risk_count": entry["at_risk_count"]} for month, entry in sorted(money.items())]
        months = sorted({m for m, _ in keys} | {m for m, _ in reasons} | set(money))
        card_rows = [{"month": month, "shown": n[0], "accepted": n[1], "overridden": n[2]}
                     for month, n in sorted(per_month.items())]
        return {"months": months, "cards": card_rows, "criteria": criteria_rows, "reasons": reason_rows,
                "money": money_rows_out, "unmatched_feedback": unmatched}

    def _months_between(self, earliest: datetime | None, latest: datetime | None) -> list[tuple[str, Any]]:
        """("YYYY-MM", start of that month in the practice time zone, as stored) for every month from
        ``earliest``'s to the one after ``latest``'s."""
        assert earliest is not None and latest is not None
        first, last = earliest.astimezone(self.tz), latest.astimezone(self.tz)
        year, month = first.year, first.month
        out: list[tuple[str, Any]] = []
        # One month past ``latest`` too: the CASE that buckets cards needs a boundary after the last month (no card
        # falls in that extra one).
        end = (last.year + 1, 1) if last.month == 12 else (last.year, last.month + 1)
        while (year, month) <= end:
            start = datetime(year, month, 1, tzinfo=self.tz)
            out.append((f"{year:04d}-{month:02d}", db_time(start, self.dialect)))
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return out

    def _backfill_card_criteria(self) -> None:
        """Determination rows logged before the ``card_criteria`` column existed get it: once per process (in
        batches), not a scan of the log on every analytics page."""
        if self._card_criteria_filled:
            return
        d = determination_table
        with self.engine.begin() as conn:
            while True:
                rows = conn.execute(select(d.c.id, d.c.status, d.c.criteria)
                                    .where(d.c.card_criteria.is_(None)).limit(2000)).all()
                if not rows:
                    self._card_criteria_filled = True
                    return
                for row_id, status, criteria in rows:
                    conn.execute(update(d).where(d.c.id == row_id)
                                 .values(card_criteria=",".join(_card_criteria(status, criteria))))

    def _month(self, moment: datetime) -> str:
        return f"{read_time(moment).astimezone(self.tz):%Y-%m}"  # type: ignore[union-attr]


def _between(column: Any, low: datetime | None, high: datetime | None) -> list[ColumnElement[bool]]:
    conditions = []
    if low is not None:
        conditions.append(column >= low)
    if high is not None:
        conditions.append(column < high)
    return conditions


def _card_criteria(status: str, criteria_json: str) -> list[str]:
    """The criteria a card is about (store.card_criteria), from its criteria JSON: rows logged before the
    ``card_criteria`` column existed."""
    criteria = json.loads(criteria_json) if criteria_json else []
    return card_criteria(status, ((c.get("id"), c.get("status")) for c in criteria if isinstance(c, dict)))


def _item(row: Any) -> WorklistItem:
    return WorklistItem(
        item_id=row["item_id"], queue=row["queue"], source=row["source"],
        evaluated_at=read_time(row["evaluated_at"]),  # type: ignore[arg-type]
        status=row["status"] or "", code=row["code"], modifiers=_split(row["modifiers"]), patient=row["patient_ref"],
        encounter=row["encounter_ref"], practitioner=row["practitioner_ref"], organization=row["organization_ref"],
        payer=row["payer_profile"], received=read_time(row["received_at"]), deadline=read_time(row["deadline_at"]),
        follow_up=read_time(row["follow_up_at"]), charges=tuple(_json(row["charges"], [])),
        billed_code=row["billed_code"], audit_class=row["audit_class"], reason=row["reason"] or "",
        question=row["question"], estimated_amount=row["estimated_amount"],
        timely_filing_deadline=row["timely_filing_deadline"], reviewed=bool(row["reviewed"]),
        review_reason=row["review_reason"], assignee=row["assignee"],
        updated_at=read_time(row["updated_at"]),  # type: ignore[arg-type]
    )
