"""The finding row of the population audit (contract.md ``population-audit``, billing-rules.md §8).

One row per assessment (and one per G2250/G2010 charge no assessment claims). Every engine, output and the report
read rows through ``COLUMNS``: the name, the Arrow type (as a string ``outputs`` maps to pyarrow) and what it holds.
List columns are Python lists of strings; CSV writes them joined with ``"; "``.
"""

from __future__ import annotations

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
    return {name: ([] if name in LIST_COLUMNS else None) for name in COLUMN_NAMES}
