"""The billing worklist's data layer (cds_service/worklist/store.py, publish.py; the determination log's feed), on
SQLite and PostgreSQL: richer determination rows (and old journals still readable), the queue of each hook verdict,
the upsert's ordering rules and reopen, people's actions and their trail, one-time nonces, page / export / facets,
analytics on a hand-made data set, and the page's speed with 10,000 open rows. Synthetic identifiers only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bench.worklist_seed import seed
from cds_service.journal import Journal
from cds_service.rules.model import CRITERION_IDS, CriterionResult, Determination
from cds_service.rules.rules_data import Rate, RatesTable
from cds_service.store import DeterminationLog, FeedbackStore, determination_row, determination_table, rows_of
from cds_service.worklist import model
from cds_service.worklist.model import WorklistFilter
from cds_service.worklist.publish import HookFeed, publish_findings
from cds_service.worklist.store import EXPORT_COLUMNS, WorklistStore
from tests.support.worklist_app import counted_statements

NOW = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
RATES = RatesTable([Rate("G2250", 12.5, "USD", "non-facility", "test", date(2026, 1, 1)),
                    Rate("G2010", 11.0, "USD", "non-facility", "test", date(2026, 1, 1))])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FeedbackStore]:
    url = f"sqlite:///{tmp_path / 'w.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    result = FeedbackStore(url)
    result.create_schema()
    yield result
    result.dispose()


def _worklist(store: FeedbackStore) -> WorklistStore:
    return WorklistStore(store.engine, tz=UTC)


def _determination(status: str, *, n: int = 1, failing: dict[str, tuple[str, str | None]] | None = None,
                   charges: tuple[str, ...] = (), code: str | None = "G2250",
                   received: datetime = datetime(2026, 11, 30, 14, 0, tzinfo=UTC)) -> Determination:
    """A determination of the synthetic assessment ``n``: every criterion met unless ``failing`` says
    ``{id: (status, case)}``."""
    failing = failing or {}
    criteria = []
    for criterion in CRITERION_IDS:
        state, case = failing.get(criterion, ("met", None))
        facts: dict[str, Any] = {"case": case} if case else {}
        if criterion == "follow-up-within-24-business-hours" and state == "pending":
            facts["business_hours_left"] = 5.5
        criteria.append(CriterionResult(criterion, state, f"{criterion} is {state}", (f"Encounter/syn-{n}",), facts))
    return Determination(status=status, criteria=tuple(criteria), code=code, modifiers=("GP",),  # type: ignore[arg-type]
                         deadline=received + timedelta(days=1), receipt_time=received, patient=f"Patient/syn-{n}",
                         encounter=f"Encounter/syn-{n}", practitioner="Practitioner/syn-pr-1",
                         submissions=(f"Media/syn-{n}",), existing_charges=charges, payer_profile="medicare",
                         organization="Organization/syn-org-1")


def _log(store: FeedbackStore, determination: Determination, at: datetime, *, summary: str = "Card summary",
         key: str | None = None) -> None:
    card = {"summary": summary, "detail": "**detail** markdown", "indicator": "info"}
    row = determination_row(determination, service_id="g2250-encounter-discharge", hook_instance="h",
                            card_uuid=f"card-{determination.encounter}", recorded_at=at, row_key=key or at.isoformat()
                            + (determination.encounter or ""), card=card)
    store.log_determinations([row], HookFeed(rates=RATES, tz=UTC))


def _only(store: FeedbackStore) -> model.ItemDetail:
    page = _worklist(store).page(WorklistFilter(queue=None, include_reviewed=True), sort="updated", descending=True,
                                 page=1, page_size=50, now=NOW)
    everything = page.items or _worklist(store).page(WorklistFilter(queue=model.DONE, include_reviewed=True),
                                                     sort="updated", descending=True, page=1, page_size=50,
                                                     now=NOW).items
    assert len(everything) == 1, everything
    detail = _worklist(store).detail(everything[0].item_id)
    assert detail is not None
    return detail


# --- the determination log ------------------------------------------------------------------------------------------
def test_the_log_keeps_times_card_text_and_criterion_details(store: FeedbackStore, tmp_path: Path) -> None:
    log = DeterminationLog(store, Journal(tmp_path / "journal"), rates=RATES, tz=UTC, linger_seconds=0.01)
    try:
        determination = _determination("pending", failing={"follow-up-within-24-business-hours": ("pending", None)},
                                       charges=("ChargeItem/syn-c",))
        log.append_determinations([("card-1", determination, {"summary": "Reply by Tue", "detail": "## d",
                                                              "indicator": "info"})],
                                  service_id="g2250-encounter-discharge", hook_instance="h-1")
        assert log.flush()
    finally:
        log.close()
    (row,) = store.determinations()
    assert row["receipt_time"] == "2026-11-30T14:00:00+00:00" and row["deadline"] == "2026-12-01T14:00:00+00:00"
    assert (row["organization_ref"], row["payer_profile"]) == ("Organization/syn-org-1", "medicare")
    assert row["submissions"] == ["Media/syn-1"] and row["existing_charges"] == ["ChargeItem/syn-c"]
    assert (row["card_summary"], row["card_detail"], row["card_indicator"]) == ("Reply by Tue", "## d", "info")
    follow_up = next(c for c in row["criteria"] if c["id"] == "follow-up-within-24-business-hours")
    assert follow_up == {"id": "follow-up-within-24-business-hours", "status": "pending",
                         "evidence": ["Encounter/syn-1"], "detail": "follow-up-within-24-business-hours is pending",
                         "business_hours_left": 5.5}
    # ... and the writer fed the worklist in the same transaction.
    detail = _only(store)
    assert detail.item.queue == model.DUE and detail.card_summary == "Reply by Tue" and detail.card_detail == "## d"
    assert detail.item.deadline == datetime(2026, 12, 1, 14, 0, tzinfo=UTC)


def test_a_journal_of_the_previous_version_is_still_replayed(store: FeedbackStore) -> None:
    old_record = {"k": "old-1", "t": "2026-11-01T10:00:00+00:00", "s": "g2250-patient-view", "h": "h",
                  "r": [["card-old", "billable", "G2250", "GP", "Patient/syn-9", "Encounter/syn-9",
                         "Practitioner/syn-pr-2", [["established-patient", "met", ["Encounter/syn-8"]]]]]}
    rows = rows_of([json.loads(json.dumps(old_record))])
    assert store.insert_determinations(rows, HookFeed(rates=RATES, tz=UTC)) == 1
    (row,) = store.determinations()
    assert row["criteria"] == [{"id": "established-patient", "status": "met", "evidence": ["Encounter/syn-8"]}]
    assert row["receipt_time"] is None and row["card_summary"] is None and row["submissions"] == []
    item = _only(store).item
    assert item.queue == model.TO_CHARGE and item.estimated_amount == 12.5 and item.received is None


def test_an_old_database_gets_the_new_columns(store: FeedbackStore) -> None:
    key = "id SERIAL PRIMARY KEY" if store.engine.dialect.name == "postgresql" else "id INTEGER PRIMARY KEY"
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE determinations")
        conn.exec_driver_sql(
            f"CREATE TABLE determinations ({key}, row_key VARCHAR(80), recorded_at TIMESTAMP NOT NULL,"
            " service_id VARCHAR(128) NOT NULL, hook_instance VARCHAR(256) NOT NULL, card_uuid VARCHAR(64) NOT NULL,"
            " status VARCHAR(16) NOT NULL, code VARCHAR(8), modifiers VARCHAR(64), patient_ref VARCHAR(256),"
            " encounter_ref VARCHAR(256), practitioner_ref VARCHAR(256), criteria TEXT NOT NULL)")
        conn.exec_driver_sql("CREATE UNIQUE INDEX IF NOT EXISTS ux_determinations_row_key ON determinations (row_key)")
    upgraded = FeedbackStore(store.database_url)
    try:
        upgraded.create_schema()
        columns = {c["name"] for c in sa.inspect(upgraded.engine).get_columns("determinations")}
        assert {"deadline", "receipt_time", "card_detail", "organization_ref", "existing_charges"} <= columns
        _log(upgraded, _determination("billable"), NOW)
        assert upgraded.determinations()[0]["card_summary"] == "Card summary"
    finally:
        upgraded.dispose()


# --- the queue of a hook verdict ------------------------------------------------------------------------------------
NAB = "not-already-billed"


@pytest.mark.parametrize(("status", "failing", "charges", "queue", "amount"), [
    ("pending", {"follow-up-within-24-business-hours": ("pending", None)}, (), model.DUE, None),
    ("billable", {}, (), model.TO_CHARGE, 12.5),
    ("needs-review", {"no-related-service-prior-7-days": ("unknown", None)}, (), model.REVIEW, None),
    ("not-billable", {"consent-documented": ("not-met", None)}, ("ChargeItem/syn-c",), model.AT_RISK, 12.5),
    ("not-billable", {NAB: ("not-met", "wrong-code")}, ("ChargeItem/syn-c",), model.AT_RISK, 12.5),
    ("not-billable", {NAB: ("not-met", "same-submission")}, ("ChargeItem/syn-c",), model.DONE, None),
    ("not-billable", {"consent-documented": ("not-met", None)}, (), model.DONE, None),
])
def test_the_queue_of_a_hook_verdict(store: FeedbackStore, status: str, failing: dict[str, Any],
                                     charges: tuple[str, ...], queue: str, amount: float | None) -> None:
    _log(store, _determination(status, failing=failing, charges=charges), NOW)
    item = _only(store).item
    assert (item.queue, item.estimated_amount, item.source) == (queue, amount, model.SOURCE_HOOK)
    assert item.timely_filing_deadline == date(2027, 11, 30)  # 42 CFR 424.44: receipt date + 12 months
    if queue == model.REVIEW:
        assert item.question == "no-related-service-prior-7-days is unknown"


# --- ordering rules ---------------------------------------------------------------------------------------------------
def test_a_newer_evaluation_wins_an_older_one_replayed_later_does_not(store: FeedbackStore) -> None:
    _log(store, _determination("pending", failing={"follow-up-within-24-business-hours": ("pending", None)}), NOW)
    _log(store, _determination("billable"), NOW + timedelta(hours=2), summary="Bill it")
    assert _only(store).item.queue == model.TO_CHARGE
    _log(store, _determination("pending", failing={"follow-up-within-24-business-hours": ("pending", None)}),
         NOW + timedelta(hours=1), summary="stale")  # replayed journal: older than what the row holds
    detail = _only(store)
    assert (detail.item.queue, detail.card_summary) == (model.TO_CHARGE, "Bill it")
    assert detail.item.evaluated_at == NOW + timedelta(hours=2)


def test_people_s_fields_survive_evaluations_and_a_queue_change_reopens(store: FeedbackStore) -> None:
    worklist = _worklist(store)
    _log(store, _determination("billable"), NOW)
    item_id = _only(store).item.item_id
    worklist.act(item_id, actor="coder-a", action=model.ACTION_ASSIGN, assignee="coder-b", at=NOW)
    worklist.act(item_id, actor="coder-a", action=model.ACTION_REVIEW, reason="documented-elsewhere", at=NOW)
    _log(store, _determination("billable"), NOW + timedelta(hours=1))  # same queue: the review stands
    item = _only(store).item
    assert (item.reviewed, item.review_reason, item.assignee) == (True, "documented-elsewhere", "coder-b")
    _log(store, _determination("not-billable", failing={"consent-documented": ("not-met", None)},
                               charges=("ChargeItem/syn-c",)), NOW + timedelta(hours=2))
    detail = _only(store)
    assert (detail.item.queue, detail.item.reviewed, detail.item.assignee) == (model.AT_RISK, False, "coder-b")
    assert [(a.actor, a.action) for a in detail.actions] == [
        ("coder-a", "assign"), ("coder-a", "review"), ("system", "reopen")]
    assert "To charge" in (detail.actions[-1].note or "") and "At risk" in (detail.actions[-1].note or "")


def test_hook_and_audit_rows_of_one_assessment_are_one_row(store: FeedbackStore) -> None:
    from cds_service.audit import findings

    _log(store, _determination("billable"), NOW)
    row = findings.empty_row()
    row.update({"patient": "Patient/syn-1", "class": "at-risk-charge", "status": "billable", "code": "G2250",
                "assessment_id": findings.assessment_id(["Media/syn-1", "Encounter/syn-1"]),
                "reason": "At-risk charge: charged 2 times for one assessment (duplicate).", "estimated_amount": 12.5,
                "failed_criteria": [], "charge_refs": ["ChargeItem/a", "ChargeItem/b"], "oig_screens": [],
                "received": "2026-11-30T09:00:00-05:00", "timely_filing_deadline": "2027-11-30"})
    assert publish_findings(store, [row], run_id="r1", as_of=NOW + timedelta(days=1)) == 1
    detail = _only(store)
    assert (detail.item.source, detail.item.queue, detail.item.audit_class) == ("audit", model.AT_RISK,
                                                                                  "at-risk-charge")
    assert detail.item.charges == ("ChargeItem/a", "ChargeItem/b") and detail.extra["run_id"] == "r1"
    # The same run published again a day earlier than what the row holds changes nothing.
    assert publish_findings(store, [{**row, "class": "ok"}], run_id="r0", as_of=NOW - timedelta(days=1)) == 0
    assert _only(store).item.queue == model.AT_RISK


# --- actions ----------------------------------------------------------------------------------------------------------
def test_actions_validate_and_leave_a_trail(store: FeedbackStore) -> None:
    worklist = _worklist(store)
    _log(store, _determination("billable"), NOW)
    item_id = _only(store).item.item_id
    with pytest.raises(ValueError, match="unknown action"):
        worklist.act(item_id, actor="a", action="delete", at=NOW)
    with pytest.raises(ValueError, match="reason"):
        worklist.act(item_id, actor="a", action=model.ACTION_REVIEW, at=NOW)
    with pytest.raises(ValueError, match="empty"):
        worklist.act(item_id, actor="a", action=model.ACTION_NOTE, note="   ", at=NOW)
    with pytest.raises(ValueError, match="2000"):
        worklist.act(item_id, actor="a", action=model.ACTION_NOTE, note="x" * 2001, at=NOW)
    with pytest.raises(ValueError, match="actor"):
        worklist.act(item_id, actor="", action=model.ACTION_NOTE, note="n", at=NOW)
    with pytest.raises(KeyError):
        worklist.act("0000000000000000", actor="a", action=model.ACTION_NOTE, note="n", at=NOW)
    worklist.act(item_id, actor="coder-a", action=model.ACTION_NOTE, note="called the clinic", at=NOW)
    worklist.act(item_id, actor="coder-a", action=model.ACTION_REVIEW, reason="clinical-judgement",
                 at=NOW + timedelta(minutes=1))
    worklist.act(item_id, actor="coder-b", action=model.ACTION_REOPEN, at=NOW + timedelta(minutes=2))
    detail = worklist.detail(item_id)
    assert detail is not None
    assert [(a.actor, a.action, a.reason, a.note) for a in detail.actions] == [
        ("coder-a", "note", None, "called the clinic"), ("coder-a", "review", "clinical-judgement", None),
        ("coder-b", "reopen", None, None)]
    assert detail.item.reviewed is False and detail.item.updated_at == NOW + timedelta(minutes=2)
    assert worklist.detail("ffffffffffffffff") is None


# --- nonces -----------------------------------------------------------------------------------------------------------
def test_a_nonce_is_good_once_and_not_after_it_expires(store: FeedbackStore) -> None:
    worklist = _worklist(store)
    nonce = worklist.issue_nonce(now=NOW)
    assert worklist.consume_nonce(nonce, max_age_seconds=600, now=NOW + timedelta(seconds=5))
    assert not worklist.consume_nonce(nonce, max_age_seconds=600, now=NOW + timedelta(seconds=6))  # replayed
    late = worklist.issue_nonce(now=NOW)
    assert not worklist.consume_nonce(late, max_age_seconds=600, now=NOW + timedelta(seconds=601))
    assert not worklist.consume_nonce("forged-" + nonce[:20], max_age_seconds=600, now=NOW)
    assert not worklist.consume_nonce("", max_age_seconds=600)
    fresh = worklist.issue_nonce()  # the real clock
    assert fresh != nonce and worklist.consume_nonce(fresh, max_age_seconds=60)


# --- page, export, facets ---------------------------------------------------------------------------------------------
def test_pages_filter_sort_count_and_refuse_unknown_keys(store: FeedbackStore) -> None:
    seed(store, 200, now=NOW, seed=1)
    worklist = _worklist(store)
    first = worklist.page(WorklistFilter(queue=model.DUE), sort="deadline", descending=False, page=1, page_size=25,
                          now=NOW)
    assert first.total == 50 and len(first.items) == 25
    assert first.counts == {model.DUE: 50, model.TO_CHARGE: 50, model.AT_RISK: 50, model.REVIEW: 50,
                            model.DONE: 20}
    deadlines = [i.deadline for i in first.items]
    assert deadlines == sorted(deadlines) and deadlines[0] < NOW  # overdue first  # type: ignore[operator]
    second = worklist.page(WorklistFilter(queue=model.DUE), sort="deadline", descending=False, page=2, page_size=25,
                           now=NOW)
    assert {i.item_id for i in first.items}.isdisjoint(i.item_id for i in second.items)
    assert second.items[0].deadline >= first.items[-1].deadline  # type: ignore[operator]
    everything = worklist.page(WorklistFilter(), sort="amount", descending=True, page=1, page_size=200, now=NOW)
    assert everything.total == 200 and all(not i.reviewed and i.queue in model.QUEUES for i in everything.items)
    amounts = [i.estimated_amount for i in everything.items if i.estimated_amount is not None]
    assert amounts == sorted(amounts, reverse=True) and everything.items[-1].estimated_amount is None  # nulls last
    with_reviewed = worklist.page(WorklistFilter(include_reviewed=True), sort="queue", descending=False, page=1,
                                  page_size=25, now=NOW)
    assert with_reviewed.total == 210
    facets = worklist.facets()
    assert facets["payers"] == sorted({"medicare", "medicare-advantage", "medicaid", "commercial"})
    assert facets["assignees"] == ["coder-a", "coder-b"] and len(facets["practitioners"]) == 12
    mine = worklist.page(WorklistFilter(practitioner=facets["practitioners"][0], payer="medicare",
                                        received_from=(NOW - timedelta(days=100)).date(), received_to=NOW.date()),
                         sort="received", descending=True, page=1, page_size=100, now=NOW)
    assert all(i.practitioner == facets["practitioners"][0] and i.payer == "medicare" for i in mine.items)
    assert all(i.received >= NOW - timedelta(days=101) for i in mine.items)  # type: ignore[operator]
    assert mine.total == sum(mine.counts[q] for q in model.QUEUES)
    for bad in ({"sort": "patient"}, {"page": 0}, {"page_size": 10_000}):
        arguments: dict[str, Any] = {"sort": "deadline", "descending": False, "page": 1, "page_size": 50, **bad}
        with pytest.raises(ValueError):
            worklist.page(WorklistFilter(), now=NOW, **arguments)
    with pytest.raises(ValueError, match="queue"):
        worklist.page(WorklistFilter(queue="trash"), sort="deadline", descending=False, page=1, page_size=50, now=NOW)
    with pytest.raises(ValueError):
        worklist.export(WorklistFilter(), sort="card_detail", descending=False, now=NOW)
    exported = list(worklist.export(WorklistFilter(queue=model.TO_CHARGE), sort="deadline", descending=False, now=NOW))
    assert len(exported) == 50 and tuple(exported[0]) == EXPORT_COLUMNS
    page_ids = [i.item_id for i in worklist.page(WorklistFilter(queue=model.TO_CHARGE), sort="deadline",
                                                 descending=False, page=1, page_size=50, now=NOW).items]
    assert [r["item_id"] for r in exported] == page_ids
    row = exported[0]
    assert row["days_to_timely_filing"] == (date.fromisoformat(row["timely_filing_deadline"]) - NOW.date()).days
    assert all("**" not in str(value) for value in row.values())  # no card Markdown


def test_a_page_of_10000_open_rows_costs_the_same_queries_as_any_page(store: FeedbackStore) -> None:
    """Milliseconds are ``bench.worklist``'s (issue 15: p95 ≤ 200 ms with 10,000 open rows, served); here, what
    keeps a page there on any machine: every view, page number and page size runs the same two queries (the
    page's rows, the per-queue counts) — none per row."""
    seed(store, 10_000, now=NOW)
    worklist = _worklist(store)
    views = [(WorklistFilter(), "deadline", False), (WorklistFilter(queue=model.DUE), "deadline", False),
             (WorklistFilter(queue=model.TO_CHARGE, payer="medicare"), "amount", True),
             (WorklistFilter(practitioner="Practitioner/syn-pr-3"), "received", True)]
    counts = set()
    for view, sort, descending in views:
        for page, size in ((1, 50), (20, 50), (1, 200)):
            with counted_statements(store.engine) as statements:
                result = worklist.page(view, sort=sort, descending=descending, page=page, page_size=size, now=NOW)
            assert len(result.items) == min(size, max(0, result.total - (page - 1) * size))
            counts.add(len(statements))
    assert len(counts) == 1 and counts.pop() <= 3


# --- analytics --------------------------------------------------------------------------------------------------------
def _feedback(store: FeedbackStore, card: str, outcome: str, at: datetime, code: str | None = None) -> None:
    item: dict[str, Any] = {"card": card, "outcome": outcome, "outcomeTimestamp": at.isoformat()}
    if code:
        item["overrideReason"] = {"reason": {"code": code, "system": "https://example.org/r", "display": code.upper()}}
    assert store.record("g2250-encounter-discharge", [item], now=at) == 1


def test_analytics_on_a_hand_made_data_set(store: FeedbackStore) -> None:
    november, december = datetime(2026, 11, 10, tzinfo=UTC), datetime(2026, 12, 3, tzinfo=UTC)
    consent = {"consent-documented": ("not-met", None)}
    _log(store, _determination("billable", n=1), november)  # card-Encounter/syn-1: all met
    _log(store, _determination("billable", n=1), november + timedelta(hours=1))  # shown again
    _log(store, _determination("not-billable", n=2, failing=consent, charges=("ChargeItem/x",)), november)
    _log(store, _determination("needs-review", n=3, failing={"payer-covers-code": ("unknown", None)}), december)
    _feedback(store, "card-Encounter/syn-1", "accepted", november + timedelta(hours=2))
    _feedback(store, "card-Encounter/syn-2", "overridden", november + timedelta(hours=2), "documented-elsewhere")
    _feedback(store, "card-Encounter/syn-2", "overridden", december + timedelta(hours=2))  # no reason given
    _feedback(store, "card-Encounter/syn-3", "accepted", december + timedelta(hours=2))
    _feedback(store, "card-unknown", "overridden", december + timedelta(hours=2), "documented-elsewhere")
    result = _worklist(store).analytics(since=None, until=None)
    assert result["months"] == ["2026-11", "2026-12"]
    # Per card, in the month it was first shown: syn-1 (shown twice) is one card; syn-2's two overrides (November
    # and December) are one overridden card, in November; so no rate exceeds 1.
    assert result["criteria"] == [
        {"month": "2026-11", "criterion": "all-met", "shown": 1, "accepted": 1, "overridden": 0,
         "acceptance_rate": 1.0, "override_rate": 0.0},
        {"month": "2026-11", "criterion": "consent-documented", "shown": 1, "accepted": 0, "overridden": 1,
         "acceptance_rate": 0.0, "override_rate": 1.0},
        {"month": "2026-12", "criterion": "payer-covers-code", "shown": 1, "accepted": 1, "overridden": 0,
         "acceptance_rate": 1.0, "override_rate": 0.0},
    ]
    # syn-2's reasons in its card's month; the unknown card's in the month its feedback came.
    assert result["reasons"] == [
        {"month": "2026-11", "reason": "documented-elsewhere", "display": "DOCUMENTED-ELSEWHERE", "count": 1},
        {"month": "2026-11", "reason": "none", "display": None, "count": 1},
        {"month": "2026-12", "reason": "documented-elsewhere", "display": "DOCUMENTED-ELSEWHERE", "count": 1},
    ]
    assert result["cards"] == [{"month": "2026-11", "shown": 2, "accepted": 1, "overridden": 1},
                               {"month": "2026-12", "shown": 1, "accepted": 1, "overridden": 0}]
    assert result["unmatched_feedback"] == 1
    # Money: syn-1 to charge (12.50), syn-2 at risk (12.50), both received in November (_determination's default).
    assert result["money"] == [{"month": "2026-11", "missed_revenue": 12.5, "missed_count": 1, "at_risk": 12.5,
                                "at_risk_count": 1}]
    december_only = _worklist(store).analytics(since=date(2026, 12, 1), until=date(2026, 12, 31))
    assert december_only["months"] == ["2026-12"] and december_only["money"] == []
    # The period selects cards by when they were first shown (syn-2's December override stays with November).
    assert [r["criterion"] for r in december_only["criteria"]] == ["payer-covers-code"]
    assert december_only["reasons"] == [
        {"month": "2026-12", "reason": "documented-elsewhere", "display": "DOCUMENTED-ELSEWHERE", "count": 1}]
    assert december_only["unmatched_feedback"] == 1


def test_analytics_counts_determinations_logged_before_card_criteria_existed(store: FeedbackStore) -> None:
    """A row of the previous version's log (no card_criteria) is counted like a new one: the analytics fill the
    column in once, from its criteria."""
    november = datetime(2026, 11, 10, tzinfo=UTC)
    _log(store, _determination("not-billable", n=7, failing={"consent-documented": ("not-met", None)}), november)
    with store.engine.begin() as conn:
        conn.execute(sa.update(determination_table).values(card_criteria=None))
    _feedback(store, "card-Encounter/syn-7", "overridden", november + timedelta(hours=1), "documented-elsewhere")
    result = _worklist(store).analytics(since=None, until=None)
    assert result["criteria"] == [{"month": "2026-11", "criterion": "consent-documented", "shown": 1, "accepted": 0,
                                   "overridden": 1, "acceptance_rate": 0.0, "override_rate": 1.0}]
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(determination_table.c.card_criteria)).scalars().all() == ["consent-documented"]


def test_the_feed_reads_a_rows_values_as_it_would_read_their_text() -> None:
    """store.DeterminationRow carries its JSON columns' values to the feed: the worklist row is the one the feed
    builds from the columns' text (a plain mapping, as a caller outside the writer passes), key for key; the JSON
    text written (compact, orjson) decodes to the same values."""
    feed = HookFeed(rates=RATES, tz=UTC)
    for status, failing, charges in [
        ("pending", {"follow-up-within-24-business-hours": ("pending", None)}, ("ChargeItem/syn-c",)),
        ("not-billable", {"no-resulting-service": ("not-met", "visit")}, ()),
        ("needs-review", {"consent-documented": ("unknown", None)}, ("ChargeItem/syn-ç",)),
    ]:
        determination = _determination(status, failing=failing, charges=charges)
        row = determination_row(determination, service_id="g2250-encounter-discharge", hook_instance="h",
                                card_uuid="card-1", recorded_at=NOW, row_key="k-1",
                                card={"summary": "Résumé — ×", "detail": "d", "indicator": "warning"})
        assert getattr(row, "decoded", None) is not None
        plain = dict(row)
        assert feed.item(row) == feed.item(plain)
        for name, value in zip(("criteria", "submissions", "existing_charges"), row.decoded, strict=True):
            assert json.loads(row[name]) == value
        item = feed.item(row)
        assert item is not None
        assert json.loads(item["charges"]) == list(charges)
        assert json.loads(item["extra"])["submissions"] == ["Media/syn-1"]


def test_a_non_finite_business_hours_figure_keeps_the_stdlib_text() -> None:
    """orjson would write NaN as null: a criteria list holding one is written by the stdlib, as before."""
    determination = _determination("pending", failing={"follow-up-within-24-business-hours": ("pending", None)})
    nan = {"business_hours_left": float("nan")}
    criteria = tuple(CriterionResult(c.id, c.status, c.detail, c.evidence, {**c.facts, **nan})
                     if c.id == "follow-up-within-24-business-hours" else c for c in determination.criteria)
    determination = Determination(**{**determination.__dict__, "criteria": criteria})
    row = determination_row(determination, service_id="s", hook_instance="h", card_uuid="c", recorded_at=NOW,
                            row_key="k")
    assert '"business_hours_left":NaN' in row["criteria"]
