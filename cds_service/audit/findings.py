"""The finding row of the population audit (contract.md ``population-audit``, billing-rules.md §8).

One row per assessment (and one per G2250/G2010 charge no assessment claims). Every engine, output and the report
read rows through ``COLUMNS``: the name, the Arrow type (as a string ``outputs`` maps to pyarrow) and what it holds.
List columns are Python lists of strings; CSV writes them joined with ``"; "``.
"""

from __future__ import annotations

import hashlib
from calendar import monthrange
from collections.abc import Iterable
from datetime import date
from typing import Any

CLASSES = ("missed-revenue", "at-risk-charge", "pending", "needs-review", "ok")

# (name, arrow type, meaning). The first 17 are the contract's, in its order; the rest are ours (additions only).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("patient", "string", "Patient/{id}"),
    ("assessment_id", "string", "stable id: sha256 of the sorted submission / encounter references, first 16 hex"),
    ("received", "string", "receipt instant of the first submission, ISO 8601 with offset (practice time zone)"),
    ("follow_up", "string", "the follow-up Communication's instant, ISO 8601, or null"),
    ("practitioner", "string", "billing practitioner reference, or null"),
    ("organization", "string", "billing organization reference (encounter serviceProvider / role organization)"),
    ("status", "string", "billable | not-billable | pending | needs-review (the §7 verdict, own charge absent)"),
    ("code", "string", "G2250 | G2010 | null"),
    ("modifiers", "list<string>", "modifiers the verdict calls for"),
    ("class", "string", "missed-revenue | at-risk-charge | pending | needs-review | ok"),
    ("billed_code", "string", "code of the charge / claim line found for it, or null"),
    ("billed_modifiers", "list<string>", "modifiers on that charge / claim line"),
    ("charge_refs", "list<string>", "ChargeItem/… and Claim/… found for it"),
    ("failed_criteria", "list<string>", "criterion ids whose status is not 'met', each as 'id:status'"),
    ("oig_screens", "list<string>", "OIG A-05-23-00001 screens the row matches (ids in findings.OIG_SCREENS)"),
    ("estimated_amount", "double", "money at stake from the rules' rates table (missed or at risk), or null"),
    ("evidence", "list<string>", "'criterion-id=Type/id' for every evidence reference of every criterion"),
    ("deadline", "string", "follow-up due time, ISO 8601, or null"),
    ("month", "string", "YYYY-MM of the receipt (practice time zone); of the charge when no receipt"),
    ("payer_profile", "string", "payer profile id the verdict used, or null"),
    ("reason", "string", "one sentence: why this class"),
    ("timely_filing_deadline", "string", "date of service + 12 months (42 CFR 424.44), ISO date, or null"),
    ("past_timely_filing", "bool", "true when --as-of is past the timely filing limit"),
    ("deadline_missed_hours", "double", "business hours the follow-up came (or is) past its deadline, or null"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _, _ in COLUMNS)
LIST_COLUMNS: frozenset[str] = frozenset(name for name, kind, _ in COLUMNS if kind.startswith("list"))


def empty_row() -> dict[str, Any]:
    """A row with every column, lists empty and the rest null, in ``COLUMNS`` order."""
    return {name: ([] if name in LIST_COLUMNS else None) for name in COLUMN_NAMES}


# --- §8 classes, screens, money and timely filing ---------------------------------------------------------------------
# (Shared by every engine, output and the report: the ids and words here are what summary.json and report.html count.)

MISSED_REVENUE, AT_RISK_CHARGE, PENDING, NEEDS_REVIEW, OK = CLASSES
# Classes whose estimated_amount enters the money totals (§8: pending is reported outside them).
MONEY_CLASSES: frozenset[str] = frozenset({MISSED_REVENUE, AT_RISK_CHARGE})

# The OIG screens of report A-05-23-00001 (§8), each derived from the §7 verdict's own criteria and evidence.
OIG_EM_WINDOW = "oig-em-within-7-days-after-or-1-day-before"
OIG_E_VISIT = "oig-e-visit-within-7-days"
OIG_MODIFIERS = "oig-modifier-25-95-gt"
OIG_SCREENS: dict[str, str] = {
    OIG_EM_WINDOW: "A billed check-in / remote evaluation within 7 days after, or 1 day before, an E/M visit with the "
                   "same diagnosis (ICD-10-CM category): the no-related-service-prior-7-days or no-resulting-service "
                   "criterion found that visit.",
    OIG_E_VISIT: "A billed remote evaluation within 7 days of an online e-visit (99421-99423, 98970-98972) for the "
                 "same diagnosis: the not-already-billed criterion found that e-visit.",
    OIG_MODIFIERS: "Modifier 25, 95 or GT on the billed G2250/G2010 line, or on the charge of the related visit the "
                   "rules found.",
}
OIG_MODIFIER_CODES: frozenset[str] = frozenset({"25", "95", "GT"})

# §8 "at-risk charge": telehealth place of service or modifiers on a claim for a service that is not telehealth.
TELEHEALTH_POS: frozenset[str] = frozenset({"02", "10"})
TELEHEALTH_MODIFIERS: frozenset[str] = frozenset({"95", "GT", "GQ"})

TIMELY_FILING_MONTHS = 12  # 42 CFR 424.44: claims filed no later than 12 months after the date of service


def assessment_id(references: Iterable[str | None]) -> str:
    """Stable id of an assessment (or of a charge no assessment claims): the first 16 hex digits of the sha256 of
    its sorted references, so a rerun over the same record, by any engine, names it the same way."""
    text = "\n".join(sorted({r for r in references if r}))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def timely_filing_deadline(service_date: date) -> date:
    """Date of service + 12 months (42 CFR 424.44); the 29th of February becomes the 28th in a common year."""
    index = service_date.year * 12 + service_date.month - 1 + TIMELY_FILING_MONTHS
    year, month = divmod(index, 12)
    month += 1
    return service_date.replace(year=year, month=month, day=min(service_date.day, monthrange(year, month)[1]))


def check_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row itself, after checking it has exactly ``COLUMN_NAMES`` and a known class (an engine that drifts
    from the schema fails here, not in the Parquet writer)."""
    if tuple(row) != COLUMN_NAMES:
        missing = sorted(set(COLUMN_NAMES) - set(row))
        extra = sorted(set(row) - set(COLUMN_NAMES))
        raise ValueError(f"finding row columns differ: missing {missing}, extra {extra}")
    if row["class"] not in CLASSES:
        raise ValueError(f"unknown class {row['class']!r}")
    return row
