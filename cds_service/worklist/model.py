"""What the billing worklist shows: its queues, a row, a filter, a page — the words shared by the store that keeps
the rows (``worklist/store.py``) and the blueprint that shows them (``worklist/views.py``).

A row is one remote assessment (one patient submission episode), keyed by the same ``assessment_id`` the population
audit writes (``audit.findings.assessment_id`` of its submissions and review encounter), so a determination made by
a hook today and a finding of last month's audit about the same assessment are one row. The row holds the latest
evaluation of either source (by evaluation time) and the people's work on it (reviewed, assignee, notes), which a
newer evaluation never erases.

The worklist never calls the rules or the FHIR server: it reads what the hooks' determination log and a published
audit run recorded (style.md "The worklist is a blueprint ...").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

# The queues (tabs), in the order a coder works them.
DUE = "due"              # a patient's submission waits for the practitioner's reply: deadline counting down
TO_CHARGE = "to-charge"  # billable and not charged (the audit's missed-revenue)
AT_RISK = "at-risk"      # charged but not billable, or with the wrong code or modifiers (the audit's at-risk-charge)
REVIEW = "review"        # the rules cannot decide: the card asked a question (needs-review)
DONE = "done"            # nothing to do: charged as the verdict says, or not billable and not charged
QUEUES: tuple[str, ...] = (DUE, TO_CHARGE, AT_RISK, REVIEW)
QUEUE_LABELS: dict[str, str] = {DUE: "Due now", TO_CHARGE: "To charge", AT_RISK: "At risk", REVIEW: "Needs review",
                                DONE: "Done"}

# The audit's classes → queues (billing-rules.md §8).
QUEUE_OF_CLASS: dict[str, str] = {"pending": DUE, "missed-revenue": TO_CHARGE, "at-risk-charge": AT_RISK,
                                  "needs-review": REVIEW, "ok": DONE}

# Where a row's latest evaluation came from.
SOURCE_HOOK = "hook"
SOURCE_AUDIT = "audit"

# Actions people take on a row (each one a row of the audit trail, never a change to the EHR record).
ACTION_REVIEW = "review"    # mark reviewed, with a reason code (the cards' override reasons, hooks/card_texts.json)
ACTION_REOPEN = "reopen"    # undo "reviewed"
ACTION_ASSIGN = "assign"    # assign to a person (free text user name, or empty to unassign)
ACTION_NOTE = "note"        # a note
ACTIONS: tuple[str, ...] = (ACTION_REVIEW, ACTION_REOPEN, ACTION_ASSIGN, ACTION_NOTE)

# Sort keys a page may ask for (column names of the list); anything else is refused with a 400.
SORT_KEYS: tuple[str, ...] = ("deadline", "received", "practitioner", "organization", "payer", "status", "queue",
                              "amount", "timely_filing", "updated")
PAGE_SIZES: tuple[int, ...] = (25, 50, 100, 200)


@dataclass(frozen=True)
class WorklistFilter:
    """A view of the worklist. Every field is optional; ``None`` means "any"."""

    queue: str | None = None            # one of QUEUES or DONE; None: every open queue (QUEUES)
    practitioner: str | None = None     # "Practitioner/id"
    organization: str | None = None     # "Organization/id"
    payer: str | None = None            # payer profile id
    status: str | None = None           # billable | not-billable | pending | needs-review
    audit_class: str | None = None      # the audit's class (audit rows only)
    received_from: date | None = None   # receipt date (practice time zone), inclusive
    received_to: date | None = None     # inclusive
    assignee: str | None = None
    include_reviewed: bool = False      # rows marked reviewed are hidden unless asked for


@dataclass(frozen=True)
class CriterionLine:
    id: str
    status: str                          # met | not-met | unknown | pending
    detail: str                          # the criterion's sentence (what the card said about it)
    evidence: tuple[str, ...] = ()       # "Type/id" references


@dataclass(frozen=True)
class Action:
    at: datetime
    actor: str                           # the signed-in user's name (OIDC subject / preferred_username)
    action: str                          # one of ACTIONS
    reason: str | None = None            # override reason code (ACTION_REVIEW)
    assignee: str | None = None          # ACTION_ASSIGN
    note: str | None = None              # ACTION_NOTE (and an optional comment on review)


@dataclass(frozen=True)
class WorklistItem:
    item_id: str                         # the assessment_id (16 hex): the only identifier that appears in URLs
    queue: str
    source: str                          # SOURCE_HOOK | SOURCE_AUDIT
    evaluated_at: datetime               # when that source judged it
    status: str
    code: str | None
    modifiers: tuple[str, ...]
    patient: str | None
    encounter: str | None
    practitioner: str | None
    organization: str | None
    payer: str | None
    received: datetime | None
    deadline: datetime | None            # the reply deadline (24 business hours after receipt)
    follow_up: datetime | None
    charges: tuple[str, ...]             # ChargeItem/Claim references found for it
    billed_code: str | None
    audit_class: str | None              # the audit's class, or None for hook rows
    reason: str                          # one sentence: why this queue (the audit's reason, or the card's summary)
    question: str | None                 # needs-review: the question the card asked
    estimated_amount: float | None       # money at stake (missed or at risk), from the rules' rates table
    timely_filing_deadline: date | None  # date of service + 12 months (42 CFR 424.44)
    reviewed: bool
    review_reason: str | None
    assignee: str | None
    updated_at: datetime                 # last evaluation or action



@dataclass(frozen=True)
class ItemDetail:
    item: WorklistItem
    criteria: tuple[CriterionLine, ...]
    card_summary: str | None             # the card the clinician saw (hook rows), else None
    card_detail: str | None              # its markdown detail
    card_indicator: str | None
    actions: tuple[Action, ...]          # the audit trail, oldest first
    extra: dict[str, Any] = field(default_factory=dict)  # source-specific fields (audit: oig_screens, evidence)


@dataclass(frozen=True)
class WorklistPage:
    items: tuple[WorklistItem, ...]
    total: int                           # rows matching the filter (all pages)
    counts: dict[str, int]               # open rows per queue under the same filter minus its queue
    page: int                            # 1-based
    page_size: int
