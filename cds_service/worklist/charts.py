"""The analytics page's plots: the store's monthly numbers (``WorklistStore.analytics``) → inline SVG figures.

The drawing is the population audit report's (``audit/report.py`` ``column_chart`` / ``bar_chart``: each an
``<svg role="img">`` with ``<title>`` and ``<desc>``), so both pages read alike; every figure also carries its
numbers as a table (WCAG 2.2 SC 1.1.1: a text alternative for non-text content that presents information).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from ..audit.report import BLUE, GOLD, GREEN, GREY, INK, PURPLE, RED, bar_chart, column_chart

#: Series colours: the audit report's Okabe–Ito hues (≥ 3:1 on white, WCAG 2.2 SC 1.4.11), then two more and ink.
PALETTE = (BLUE, RED, GOLD, PURPLE, GREEN, GREY, "#1f5f8b", "#a0522d", INK)


@dataclass(frozen=True)
class Figure:
    """One plot: its SVG, a caption, and the numbers behind it (already formatted cells)."""

    figure_id: str
    heading: str
    svg: Markup
    caption: str
    head: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: frozenset[int]


def _percent(value: float) -> str:
    return f"{value:.0f} %"


def _rate(value: Any) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


def _money(value: float) -> str:
    return f"${value:,.2f}"


def _short_money(value: float) -> str:
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"${value / size:.3g}{suffix}"
    return f"${value:,.0f}"


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _empty(figure_id: str, heading: str, what: str) -> Figure:
    return Figure(figure_id, heading, Markup(""), f"No {what} in this period.", (), (), frozenset())


def _rate_series(totals: Mapping[str, Sequence[int]], keys: Sequence[str]) -> list[tuple[str, str, list[float]]]:
    """The accepted and overridden series, in percent of shown, of ``totals`` (key → [shown, accepted,
    overridden])."""
    def share(index: int) -> list[float]:
        return [100.0 * totals[k][index] / totals[k][0] if totals[k][0] else 0.0 for k in keys]

    return [("accepted", GREEN, share(1)), ("overridden", RED, share(2))]


def rates_over_time(numbers: Mapping[str, Any]) -> Figure:
    """All cards together, per month: the share of shown cards the clinician accepted, and overrode."""
    heading = "Card acceptance and override rates per month"
    rows = numbers.get("criteria") or []
    months = sorted({row["month"] for row in rows})
    if not months:
        return _empty("rates-by-month", heading, "cards shown")
    # Each card once (a card about two criteria is one card here, two rows in the table below).
    totals = {month: [0, 0, 0] for month in months}
    for row in numbers.get("cards") or []:
        if row["month"] in totals:
            totals[row["month"]] = [row["shown"], row["accepted"], row["overridden"]]
    svg = column_chart(
        chart_id="rates-by-month", title=heading,
        desc="For each month, accepted and overridden cards as a percentage of the cards first shown that month; "
             "the table below lists every month and criterion.",
        categories=months, series=_rate_series(totals, months),
        axis_format=_percent, value_format=lambda v: f"{v:.1f} %")
    table = tuple((row["month"], row["criterion"], f"{row['shown']:,}", f"{row['accepted']:,}",
                   f"{row['overridden']:,}", _rate(row.get("acceptance_rate")), _rate(row.get("override_rate")))
                  for row in rows)
    return Figure("rates-by-month", heading, Markup(svg),
                  "Each card counts once, in the month it was first shown, with the feedback the EHR sent for it "
                  "(CDS Hooks feedback) whenever that came.",
                  ("Month", "Criterion", "Shown", "Accepted", "Overridden", "Acceptance rate", "Override rate"),
                  table, frozenset({2, 3, 4, 5, 6}))


def rates_by_criterion(numbers: Mapping[str, Any]) -> Figure:
    """The whole period, per criterion: which rules clinicians accept, and which they override."""
    heading = "Acceptance and override rates per criterion"
    rows = numbers.get("criteria") or []
    totals: dict[str, list[int]] = {}
    for row in rows:
        total = totals.setdefault(row["criterion"], [0, 0, 0])
        total[0] += row["shown"]
        total[1] += row["accepted"]
        total[2] += row["overridden"]
    labels = sorted(totals)
    if not labels:
        return _empty("rates-by-criterion", heading, "cards shown")
    svg = bar_chart(
        chart_id="rates-by-criterion", title=heading,
        desc="For each criterion over the whole period, accepted and overridden cards as a percentage of the "
             "cards shown about it.",
        labels=labels, series=_rate_series(totals, labels),
        axis_format=_percent, value_format=lambda v: f"{v:.1f} %")
    table = tuple((c, f"{totals[c][0]:,}", f"{totals[c][1]:,}", f"{totals[c][2]:,}",
                   _rate(totals[c][1] / totals[c][0] if totals[c][0] else None),
                   _rate(totals[c][2] / totals[c][0] if totals[c][0] else None)) for c in labels)
    return Figure("rates-by-criterion", heading, Markup(svg), "A card about several criteria counts for each.",
                  ("Criterion", "Shown", "Accepted", "Overridden", "Acceptance rate", "Override rate"), table,
                  frozenset({1, 2, 3, 4, 5}))


def reasons_over_time(numbers: Mapping[str, Any], labels: Mapping[str, str]) -> Figure:
    """Overrides per month, stacked by the reason the clinician chose (the cards' override reasons)."""
    heading = "Override reasons per month"
    rows = numbers.get("reasons") or []
    months = sorted({row["month"] for row in rows})
    if not months:
        return _empty("reasons-by-month", heading, "overrides")
    codes: list[str] = []
    for row in sorted(rows, key=lambda r: -r["count"]):
        if row["reason"] not in codes:
            codes.append(row["reason"])

    def name(code: str) -> str:
        if code == "none":
            return "no reason given"
        return labels.get(code) or next((r["display"] for r in rows if r["reason"] == code and r.get("display")),
                                        None) or code

    counts = {(row["month"], row["reason"]): row["count"] for row in rows}
    series = [(name(code), PALETTE[i % len(PALETTE)], [float(counts.get((m, code), 0)) for m in months])
              for i, code in enumerate(codes)]
    svg = column_chart(chart_id="reasons-by-month", title=heading,
                       desc="For each month, the number of overridden cards, stacked by override reason.",
                       categories=months, series=series, axis_format=_count, value_format=_count, stacked=True,
                       integer=True)
    table = tuple((row["month"], name(row["reason"]), row["reason"], f"{row['count']:,}") for row in rows)
    return Figure("reasons-by-month", heading, Markup(svg), "Each overridden card counts once, under its reason.",
                  ("Month", "Reason", "Code", "Overrides"), table, frozenset({3}))


def money_over_time(numbers: Mapping[str, Any]) -> Figure:
    """Missed revenue (billable, not charged) and money at risk (charged, not billable) by month of receipt."""
    heading = "Missed revenue and money at risk per month"
    rows: Sequence[Mapping[str, Any]] = numbers.get("money") or []
    if not rows:
        return _empty("money-by-month", heading, "open money")
    months = [row["month"] for row in rows]
    svg = column_chart(
        chart_id="money-by-month", title=heading,
        desc="For each month of receipt, the estimated amount of billable assessments not charged (missed "
             "revenue) and of charges the rules do not support (at risk).",
        categories=months,
        series=[("missed revenue", BLUE, [float(r["missed_revenue"]) for r in rows]),
                ("at risk", RED, [float(r["at_risk"]) for r in rows])],
        axis_format=_short_money, value_format=_money)
    table = tuple((r["month"], _money(r["missed_revenue"]), f"{r['missed_count']:,}", _money(r["at_risk"]),
                   f"{r['at_risk_count']:,}") for r in rows)
    return Figure("money-by-month", heading, Markup(svg),
                  "Estimates from the rules' rates table; rows whose amount is unknown count in the row counts only.",
                  ("Month", "Missed revenue", "Rows to charge", "At risk", "Rows at risk"), table,
                  frozenset({1, 2, 3, 4}))


def figures(numbers: Mapping[str, Any], reason_labels: Mapping[str, str]) -> list[Figure]:
    """Every plot of the analytics page, in reading order."""
    return [rates_over_time(numbers), rates_by_criterion(numbers), reasons_over_time(numbers, reason_labels),
            money_over_time(numbers)]
