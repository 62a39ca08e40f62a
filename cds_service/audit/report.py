"""``report.html`` of the population audit: one page a revenue-cycle or compliance reader opens from a mail or a
share drive, offline, and acts on (contract.md ``population-audit``, billing-rules.md §8).

Why it is built this way:

- **Self-contained.** Inline CSS, plots as inline SVG drawn here in Python, no script, no font, no image, no URL:
  the page opens on an air-gapped laptop and leaks nothing when opened. A Content-Security-Policy forbids every
  load and every script, so even a value that slipped through escaping could not run or call out.
- **Untrusted text.** Every value of a row (references, reasons, file names) comes from a FHIR export and is
  escaped (``html.escape``) wherever it lands, including SVG labels; long values are cut for display.
  Rows carry references only, never names: the page shows what the rows hold and nothing more.
- **Plots where a reader would rather look**, each an ``<svg role="img">`` with a ``<title>`` and ``<desc>``, and
  the numbers behind it in a ``<details>`` table (the text alternative, and what a reader copies into a ticket).
  Colours are the Okabe–Ito palette darkened to ≥ 3:1 against white; classes are named in text, never by colour
  alone.
- **Bounded.** The findings table shows the rows that matter first (missed revenue, at-risk charges, largest
  amounts) up to ``max_rows`` and says how many it left out; every row is in findings.csv / findings.parquet.
- **Written atomically**, so a reader (or a web server publishing the directory) never sees half a page.

The page draws from ``summary.summarize``'s dictionary only (plus the rows for the table), so it never disagrees
with summary.json.
"""

from __future__ import annotations

import heapq
import html
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cds_service.audit import findings

MAX_TABLE_ROWS = 1000
TOP_PRACTITIONERS = 15

CLASS_LABELS = {
    "missed-revenue": "Missed revenue",
    "at-risk-charge": "At-risk charge",
    "pending": "Pending",
    "needs-review": "Needs review",
    "ok": "OK",
}
# Table order: what a reader acts on first.
TABLE_CLASS_ORDER = ("missed-revenue", "at-risk-charge", "needs-review", "pending", "ok")

# Okabe–Ito hues, darkened where needed for ≥ 3:1 non-text contrast on white (WCAG 1.4.11).
BLUE = "#0066a1"      # missed revenue
RED = "#c24f00"       # at-risk charges, not-met
GOLD = "#8a6a00"      # unknown
GREY = "#5f6368"      # pending, neutral counts
PURPLE = "#8e3b78"    # needs review
GREEN = "#00735a"     # ok
INK = "#1a1a1a"
CLASS_COLOURS = {"missed-revenue": BLUE, "at-risk-charge": RED, "pending": GREY, "needs-review": PURPLE, "ok": GREEN}
STATUS_COLOURS = {"not-met": RED, "unknown": GOLD, "pending": GREY}

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1a1a1a; background: #fff; }
header, main, footer { max-width: 1240px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 24px; border-bottom: 1px solid #d0d4d9; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
h2 { font-size: 1.25rem; margin: 40px 0 8px; padding-top: 8px; border-top: 1px solid #e3e6ea; }
h3 { font-size: 1.05rem; margin: 20px 0 6px; }
p { margin: 6px 0; }
.meta { color: #444; margin: 0 0 12px; }
nav ul { list-style: none; padding: 0; margin: 8px 0 16px; display: flex; flex-wrap: wrap; gap: 4px 16px; }
a { color: #0b57a4; }
.cards { list-style: none; padding: 0; margin: 12px 0; display: grid; gap: 12px;
         grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); }
.card { border: 1px solid #d0d4d9; border-left: 6px solid var(--accent, #5f6368); border-radius: 6px;
        padding: 10px 14px; }
.card .label { font-weight: 600; margin: 0; }
.card .value { font-size: 1.6rem; font-weight: 700; margin: 2px 0; font-variant-numeric: tabular-nums; }
.card .sub { color: #444; font-size: 0.9rem; margin: 0; }
figure { margin: 12px 0; }
figcaption { color: #444; font-size: 0.9rem; }
svg { display: block; width: 100%; height: auto; max-width: 980px; }
svg text { font: 12px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; fill: #1a1a1a; }
svg .axis { stroke: #5f6368; stroke-width: 1; }
svg .grid { stroke: #e3e6ea; stroke-width: 1; }
details { margin: 6px 0; }
summary { cursor: pointer; color: #0b57a4; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #e3e6ea; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table caption { text-align: left; }
.scroll { overflow-x: auto; }
.findings { width: 100%; }
/* break-word, not anywhere: long hostile tokens still wrap, but short ids do not squeeze their columns */
.findings td { overflow-wrap: break-word; max-width: 36ch; }
.findings td.nowrap { white-space: nowrap; }
.findings td:nth-child(7) { min-width: 24ch; }
.findings td:nth-child(8) { min-width: 24ch; }
.findings ul { margin: 0; padding-left: 16px; }
.cls { font-weight: 600; border-left: 4px solid var(--accent, #5f6368); padding-left: 6px; white-space: nowrap; }
.small { font-size: 0.85rem; color: #444; }
.empty { font-style: italic; color: #444; }
footer { margin-top: 40px; padding-top: 12px; padding-bottom: 32px; border-top: 1px solid #d0d4d9; color: #444;
         font-size: 0.9rem; }
dl.counts { display: grid; grid-template-columns: max-content max-content; gap: 2px 16px; margin: 8px 0; }
dl.counts dt { color: #444; }
dl.counts dd { margin: 0; text-align: right; font-variant-numeric: tabular-nums; }
@media print { details { display: block; } summary { display: none; } h2 { break-after: avoid; } }
"""


# ----------------------------------------------------------------------------------------------------- formatting


def _e(value: Any, limit: int | None = None) -> str:
    """Escape any value for HTML text or a quoted attribute; control characters (not legal in HTML) become U+FFFD;
    ``limit`` cuts hostile megabyte-long values for display."""
    text = "" if value is None else str(value)
    if limit is not None and len(text) > limit:
        text = text[: max(1, limit - 1)] + "…"
    return html.escape(_CONTROL.sub("\ufffd", text), quote=True)


def _money(value: Any) -> str:
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
    sign = "−" if number < 0 else ""
    return f"{sign}${abs(number):,.2f}"


def _short_money(value: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"${value / size:.3g}{suffix}"
    return f"${value:.0f}" if value == int(value) else f"${value:.2f}"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "0"


def _short_count(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def _hours(value: Any) -> str:
    return "—" if not isinstance(value, int | float) else f"{value:,.1f} h"


def _nice_max(top: float, ticks: int = 5, *, integer: bool = False) -> tuple[float, float]:
    """An axis end at or above ``top`` and its tick step, on 1/2/2.5/5 × 10^n (what a reader reads at a glance);
    ``integer`` axes (counts) never tick at fractions."""
    if top <= 0 or not math.isfinite(top):
        return (1.0, 1.0) if integer else (1.0, 0.25)
    raw = max(top / ticks, 1.0) if integer else top / ticks
    power = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        step = mult * power
        if step >= raw:
            break
    return step * math.ceil(top / step - 1e-9), step


def _n(x: float) -> str:
    """SVG coordinate: short, locale-free."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


# ---------------------------------------------------------------------------------------------------------- plots

Series = tuple[str, str, Sequence[float]]  # (label, colour, one value per category)


def _legend(series: Sequence[tuple[str, str]], x: float, y: float) -> list[str]:
    out = []
    for label, colour in series:
        out.append(f'<rect x="{_n(x)}" y="{_n(y - 10)}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{_n(x + 17)}" y="{_n(y)}">{_e(label)}</text>')
        x += 30 + 7 * len(label)
    return out


def _svg_open(chart_id: str, title: str, desc: str, width: float, height: float) -> str:
    return (f'<svg id="{chart_id}" role="img" viewBox="0 0 {_n(width)} {_n(height)}" width="{_n(width)}" '
            f'height="{_n(height)}" aria-labelledby="{chart_id}-title {chart_id}-desc">'
            f'<title id="{chart_id}-title">{_e(title)}</title><desc id="{chart_id}-desc">{_e(desc)}</desc>')


def column_chart(
    *,
    chart_id: str,
    title: str,
    desc: str,
    categories: Sequence[str],
    series: Sequence[Series],
    axis_format: Callable[[float], str],
    value_format: Callable[[float], str],
    stacked: bool = False,
    cumulative: Sequence[float] | None = None,
    integer: bool = False,
) -> str:
    """Vertical bars per category (grouped, or stacked), with an optional cumulative-share line on a right-hand
    0–100 % axis (the Pareto). Returns one ``<svg role="img">`` element."""
    width, plot_h = 980.0, 260.0
    n = max(1, len(categories))
    left, right = 78.0, 56.0 if cumulative is not None else 20.0
    legend = len(series) > 1 or bool(cumulative)
    top = 40.0 if legend else 16.0
    plot_w = width - left - right
    band = plot_w / n
    longest = max((len(c) for c in categories), default=0)
    rotate = longest * 7.0 > band - 4
    label_len = min(longest, 34)
    bottom = 30.0 + (label_len * 6.2 * 0.64 if rotate else 0.0)
    height = top + plot_h + bottom
    totals = [sum(s[2][i] for s in series) for i in range(len(categories))] if stacked else [
        max((s[2][i] for s in series), default=0.0) for i in range(len(categories))]
    y_max, step = _nice_max(max(totals, default=0.0), integer=integer)

    def y_of(value: float) -> float:
        return top + plot_h - (value / y_max) * plot_h

    parts = [_svg_open(chart_id, title, desc, width, height)]
    if legend:
        parts += _legend([(s[0], s[1]) for s in series] + ([("cumulative share", INK)] if cumulative else []),
                         left, 18)
    tick = 0.0
    while tick <= y_max + 1e-9:
        y = y_of(tick)
        parts.append(f'<line class="grid" x1="{_n(left)}" x2="{_n(left + plot_w)}" y1="{_n(y)}" y2="{_n(y)}"/>')
        parts.append(f'<text x="{_n(left - 6)}" y="{_n(y + 4)}" text-anchor="end">{_e(axis_format(tick))}</text>')
        tick += step
    parts.append(f'<line class="axis" x1="{_n(left)}" x2="{_n(left + plot_w)}" y1="{_n(top + plot_h)}" '
                 f'y2="{_n(top + plot_h)}"/>')
    for i, category in enumerate(categories):
        x0 = left + i * band
        if stacked:
            bar_w = min(56.0, band * 0.7)
            x = x0 + (band - bar_w) / 2
            base = 0.0
            for label, colour, values in series:
                value = values[i]
                if value > 0:
                    y1, y2 = y_of(base + value), y_of(base)
                    parts.append(f'<rect x="{_n(x)}" y="{_n(y1)}" width="{_n(bar_w)}" height="{_n(y2 - y1)}" '
                                 f'fill="{colour}" stroke="#fff" stroke-width="1"><title>{_e(category, 80)} — '
                                 f'{_e(label)}: {_e(value_format(value))}</title></rect>')
                base += value
        else:
            group_w = min(band * 0.8, 40.0 * len(series))
            bar_w = group_w / max(1, len(series))
            for j, (label, colour, values) in enumerate(series):
                value = values[i]
                x = x0 + (band - group_w) / 2 + j * bar_w
                if value > 0:
                    y1 = y_of(value)
                    parts.append(f'<rect x="{_n(x)}" y="{_n(y1)}" width="{_n(bar_w - 1)}" '
                                 f'height="{_n(top + plot_h - y1)}" fill="{colour}"><title>{_e(category, 80)} — '
                                 f'{_e(label)}: {_e(value_format(value))}</title></rect>')
        cx, cy = x0 + band / 2, top + plot_h + 14
        if rotate:
            parts.append(f'<text x="{_n(cx)}" y="{_n(cy)}" text-anchor="end" '
                         f'transform="rotate(-40 {_n(cx)} {_n(cy)})">{_e(category, 34)}</text>')
        else:
            parts.append(f'<text x="{_n(cx)}" y="{_n(cy + 2)}" text-anchor="middle">{_e(category, 34)}</text>')
    if cumulative:
        right_x = left + plot_w
        parts.append(f'<line class="axis" x1="{_n(right_x)}" x2="{_n(right_x)}" y1="{_n(top)}" '
                     f'y2="{_n(top + plot_h)}"/>')
        for pct in (0, 25, 50, 75, 100):
            y = top + plot_h - pct / 100 * plot_h
            parts.append(f'<text x="{_n(right_x + 6)}" y="{_n(y + 4)}">{pct}%</text>')
        y80 = top + plot_h * 0.2
        parts.append(f'<line x1="{_n(left)}" x2="{_n(right_x)}" y1="{_n(y80)}" y2="{_n(y80)}" stroke="{GREY}" '
                     f'stroke-dasharray="4 4"><title>80 % of all failed criteria</title></line>')
        points = [(left + (i + 0.5) * band, top + plot_h - share * plot_h) for i, share in enumerate(cumulative)]
        parts.append(f'<polyline fill="none" stroke="{INK}" stroke-width="2" '
                     f'points="{" ".join(f"{_n(x)},{_n(y)}" for x, y in points)}"/>')
        for (x, y), share, category in zip(points, cumulative, categories, strict=True):
            parts.append(f'<circle cx="{_n(x)}" cy="{_n(y)}" r="3.5" fill="{INK}"><title>{_e(category, 80)}: '
                         f'{share * 100:.1f} % cumulative</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(
    *,
    chart_id: str,
    title: str,
    desc: str,
    labels: Sequence[str],
    series: Sequence[Series],
    axis_format: Callable[[float], str],
    value_format: Callable[[float], str],
    integer: bool = False,
) -> str:
    """Horizontal stacked bars, one row per label (practitioners, screens, reasons: long names read better along
    a row than under a column), the total printed at the bar's end. Returns one ``<svg role="img">`` element."""
    width, row_h, bar_h = 980.0, 26.0, 16.0
    label_chars = min(max((len(x) for x in labels), default=8), 44)
    left = 16.0 + label_chars * 6.6
    right = 110.0
    top = 36.0 if len(series) > 1 else 14.0
    plot_w = width - left - right
    plot_h = row_h * max(1, len(labels))
    height = top + plot_h + 30.0
    totals = [sum(s[2][i] for s in series) for i in range(len(labels))]
    x_max, step = _nice_max(max(totals, default=0.0), integer=integer)

    def x_of(value: float) -> float:
        return left + value / x_max * plot_w

    parts = [_svg_open(chart_id, title, desc, width, height)]
    if len(series) > 1:
        parts += _legend([(s[0], s[1]) for s in series], left, 18)
    tick = 0.0
    while tick <= x_max + 1e-9:
        x = x_of(tick)
        parts.append(f'<line class="grid" x1="{_n(x)}" x2="{_n(x)}" y1="{_n(top)}" y2="{_n(top + plot_h)}"/>')
        parts.append(f'<text x="{_n(x)}" y="{_n(top + plot_h + 18)}" text-anchor="middle">'
                     f'{_e(axis_format(tick))}</text>')
        tick += step
    parts.append(f'<line class="axis" x1="{_n(left)}" x2="{_n(left)}" y1="{_n(top)}" y2="{_n(top + plot_h)}"/>')
    for i, label in enumerate(labels):
        y = top + i * row_h + (row_h - bar_h) / 2
        parts.append(f'<text x="{_n(left - 8)}" y="{_n(y + bar_h - 4)}" text-anchor="end">{_e(label, 44)}'
                     f'<title>{_e(label, 300)}</title></text>')
        base = 0.0
        for name, colour, values in series:
            value = values[i]
            if value > 0:
                x1, x2 = x_of(base), x_of(base + value)
                parts.append(f'<rect x="{_n(x1)}" y="{_n(y)}" width="{_n(x2 - x1)}" height="{_n(bar_h)}" '
                             f'fill="{colour}" stroke="#fff" stroke-width="1"><title>{_e(label, 80)} — '
                             f'{_e(name)}: {_e(value_format(value))}</title></rect>')
            base += value
        parts.append(f'<text x="{_n(x_of(base) + 6)}" y="{_n(y + bar_h - 4)}">{_e(value_format(base))}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------------- sections


def _figure(svg: str, caption: str, table: str) -> str:
    return (f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"
            f"<details><summary>The numbers behind this plot</summary>{table}</details>")


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = (), caption: str = "",
           *, nowrap: Iterable[int] = (), table_class: str = "") -> str:
    """``head`` and cells are already escaped HTML; ``numeric`` columns align right, ``nowrap`` ones never wrap."""
    classes: dict[int, str] = {}
    for i in numeric:
        classes[i] = "num"
    for i in nowrap:
        classes[i] = f"{classes[i]} nowrap" if i in classes else "nowrap"
    attr = {i: f' class="{c}"' for i, c in classes.items()}
    cap = f'<caption class="small">{caption}</caption>' if caption else ""
    ths = "".join(f'<th scope="col"{attr.get(i, "")}>{h}</th>' for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f'<td{attr.get(i, "")}>{c}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    opening = f'<table class="{table_class}">' if table_class else "<table>"
    return f"{opening}{cap}<thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table>"


def _empty(text: str) -> str:
    return f'<p class="empty">{_e(text)}</p>'


def _section(section_id: str, heading: str, body: str) -> str:
    return f'<section id="{section_id}" aria-labelledby="{section_id}-h"><h2 id="{section_id}-h">{heading}</h2>' \
           f"{body}</section>"


def _class(summary: Mapping[str, Any], cls: str) -> Mapping[str, Any]:
    value = summary.get("classes", {}).get(cls)
    return value if isinstance(value, Mapping) else {}


def _totals_section(summary: Mapping[str, Any]) -> str:
    total_rows = summary.get("rows", 0)
    timely = summary.get("timely_filing", {})
    missed, at_risk = _class(summary, "missed-revenue"), _class(summary, "at-risk-charge")

    def card(label: str, value: str, sub: str, colour: str) -> str:
        return (f'<li class="card" style="--accent:{colour}"><p class="label">{label}</p>'
                f'<p class="value">{value}</p><p class="sub">{sub}</p></li>')

    def unpriced(entry: Mapping[str, Any]) -> str:
        n = entry.get("unpriced", 0)
        return f" · {_count(n)} without a rate" if n else ""

    if not total_rows:
        return _section("totals", "Totals per class", _empty(
            "No findings: the input held no store-and-forward assessment and no G2250/G2010 charge in this "
            "period. The data-quality section below says what was read and what was skipped."))
    cards = [
        card("Missed revenue", _money(missed.get("amount")) + '<a href="#money-note" aria-label="about money">*</a>',
             f"{_count(missed.get('count'))} billable, never charged{unpriced(missed)}", BLUE),
        card("At-risk charges", _money(at_risk.get("amount")) + '<a href="#money-note" aria-label="about money">*</a>',
             f"{_count(at_risk.get('count'))} charged but should not be, or coded wrong{unpriced(at_risk)}", RED),
        card("Needs review", _count(_class(summary, "needs-review").get("count")),
             "the data cannot decide; a person must look", PURPLE),
        card("Pending", _count(_class(summary, "pending").get("count")),
             "follow-up deadline still ahead; outside the money totals", GREY),
        card("OK", _count(_class(summary, "ok").get("count")), "billed as the verdict says, or rightly not billed",
             GREEN),
        card("Past timely filing", _count(timely.get("count")),
             f"over 12 months after the date of service (42 CFR 424.44); {_money(timely.get('amount'))} at stake",
             INK),
    ]
    intro = (f"<p>{_count(total_rows)} assessments and unclaimed G2250/G2010 charges were judged. Missed revenue "
             "and at-risk charges are what to act on; money is estimated from the rules' rates table.</p>")
    return _section("totals", "Totals per class", intro + f'<ul class="cards">{"".join(cards)}</ul>')


def _months_section(summary: Mapping[str, Any]) -> str:
    months = summary.get("months", {})
    keys = list(months)
    missed = [float(months[k].get("missed_revenue", 0.0)) for k in keys]
    at_risk = [float(months[k].get("at_risk", 0.0)) for k in keys]
    heading = "Missed revenue and at-risk money per month"
    if not any(missed) and not any(at_risk):
        return _section("months", heading, _empty("No missed revenue or at-risk money in any month."))
    worst = max(range(len(keys)), key=lambda i: missed[i] + at_risk[i])
    desc = (f"Bars per month of receipt, {keys[0]} to {keys[-1]}: missed revenue and at-risk money. Largest month "
            f"{keys[worst]}: {_money(missed[worst])} missed, {_money(at_risk[worst])} at risk.")
    svg = column_chart(chart_id="chart-months", title=heading, desc=desc, categories=keys,
                       series=[("Missed revenue", BLUE, missed), ("At-risk charges", RED, at_risk)],
                       axis_format=_short_money, value_format=_money)
    table = _table(["Month", "Missed revenue", "At risk", "Assessments"],
                   ([_e(k), _money(m), _money(a), _count(months[k].get("count"))]
                    for k, m, a in zip(keys, missed, at_risk, strict=True)), numeric=(1, 2, 3))
    return _section("months", heading, _figure(svg, _e(desc), table))


def _practitioners_section(summary: Mapping[str, Any], top_n: int) -> str:
    entries = [p for p in summary.get("practitioners", []) if isinstance(p, Mapping)]
    with_money = [p for p in entries if p.get("missed_revenue", 0) or p.get("at_risk", 0)]
    heading = "Missed revenue and at-risk money per practitioner"
    if not with_money:
        return _section("practitioners", heading, _empty("No practitioner has missed revenue or at-risk money."))
    shown = with_money[:top_n]
    labels = [p.get("practitioner") or "(no billing practitioner)" for p in shown]
    missed = [float(p.get("missed_revenue", 0.0)) for p in shown]
    at_risk = [float(p.get("at_risk", 0.0)) for p in shown]
    scope = (f"the top {len(shown)} of {len(with_money)} practitioners with money at stake"
             if len(with_money) > len(shown) else f"all {len(shown)} practitioners with money at stake")
    desc = (f"Horizontal bars for {scope}, largest first: missed revenue and at-risk money stacked. Largest: "
            f"{labels[0][:80]} with {_money(missed[0] + at_risk[0])}.")
    svg = bar_chart(chart_id="chart-practitioners", title=heading, desc=desc, labels=labels,
                    series=[("Missed revenue", BLUE, missed), ("At-risk charges", RED, at_risk)],
                    axis_format=_short_money, value_format=_money)
    table = _table(["Practitioner", "Missed revenue", "At risk", "Assessments"],
                   ([_e(lbl, 200), _money(m), _money(a), _count(p.get("count"))]
                    for lbl, m, a, p in zip(labels, missed, at_risk, shown, strict=True)), numeric=(1, 2, 3))
    return _section("practitioners", heading + f" <span class=\"small\">({_e(scope)})</span>",
                    _figure(svg, _e(desc), table))


def _pareto_section(summary: Mapping[str, Any]) -> str:
    pareto = [p for p in summary.get("failed_criteria", []) if isinstance(p, Mapping)]
    heading = "Why assessments fail: Pareto of criteria"
    if not pareto:
        return _section("criteria", heading, _empty("No criterion failed in any assessment."))
    names = [str(p.get("criterion")) for p in pareto]
    statuses: list[str] = []
    for p in pareto:
        statuses += [s for s in p.get("by_status", {}) if s not in statuses]
    series = [(s, STATUS_COLOURS.get(s, PURPLE), [float(p.get("by_status", {}).get(s, 0)) for p in pareto])
              for s in statuses]
    series = [s for s in series if any(s[2])]
    cumulative = [float(p.get("cumulative_share", 0.0)) for p in pareto]
    k80 = next((i + 1 for i, share in enumerate(cumulative) if share >= 0.8 - 1e-9), len(pareto))
    desc = (f"Bars: how many assessments failed each criterion, most frequent first, split by status (not met, "
            f"unknown, pending); line: cumulative share. {names[0]} fails most often ({_count(pareto[0].get('count'))}"
            f"); the first {k80} of {len(pareto)} criteria account for 80 % of all failures.")
    svg = column_chart(chart_id="chart-pareto", title=heading, desc=desc, categories=names, series=series,
                       axis_format=_short_count, value_format=lambda v: f"{v:,.0f}", integer=True, stacked=True,
                       cumulative=cumulative)
    table = _table(["Criterion", *(_e(s) for s in statuses), "Total", "Cumulative"],
                   ([_e(n, 120), *(_count(p.get("by_status", {}).get(s, 0)) for s in statuses),
                     _count(p.get("count")), f"{float(p.get('cumulative_share', 0)) * 100:.1f} %"]
                    for n, p in zip(names, pareto, strict=True)),
                   numeric=range(1, len(statuses) + 3))
    return _section("criteria", heading, _figure(svg, _e(desc), table))


def _oig_description(screen: str) -> str:
    declared = getattr(findings, "OIG_SCREENS", None)
    if isinstance(declared, Mapping):
        value = declared.get(screen)
        if isinstance(value, str):
            return value
    return ""


def _oig_section(summary: Mapping[str, Any]) -> str:
    screens = summary.get("oig_screens", {})
    heading = "OIG A-05-23-00001 screens"
    intro = ("<p>The patterns the HHS Office of Inspector General found in virtual check-ins and remote evaluations: "
             "within 7 days after or 1 day before an E/M with the same diagnosis, within 7 days of another e-visit "
             "with the same diagnosis, modifier 25/95/GT on the related visit or the code.</p>")
    if not screens or not any(s.get("count") for s in screens.values()):
        return _section("oig", heading, intro + _empty("No row matches any OIG screen."))
    names = list(screens)
    counts = [float(screens[s].get("count", 0)) for s in names]
    desc = "Horizontal bars: assessments and charges matching each OIG screen. " + "; ".join(
        f"{s[:60]}: {int(c):,}" for s, c in zip(names, counts, strict=True)) + "."
    svg = bar_chart(chart_id="chart-oig", title=heading, desc=desc, labels=names,
                    series=[("Rows matching", RED, counts)], axis_format=_short_count,
                    value_format=lambda v: f"{v:,.0f}", integer=True)
    table = _table(["Screen", "What it catches", "Rows", "At-risk charges", "Money*"],
                   ([_e(s, 120), _e(_oig_description(s)), _count(screens[s].get("count")),
                     _count(screens[s].get("by_class", {}).get("at-risk-charge")), _money(screens[s].get("amount"))]
                    for s in names), numeric=(2, 3, 4))
    return _section("oig", heading, intro + _figure(svg, _e(desc), table))


def _deadlines_section(summary: Mapping[str, Any]) -> str:
    late = summary.get("deadlines_missed", {})
    heading = "Follow-up deadlines missed, by how much"
    bins = [b for b in late.get("histogram", []) if isinstance(b, Mapping)]
    if not late.get("count") or not bins:
        return _section("deadlines", heading, _empty("No follow-up came after its deadline."))
    labels = [str(b.get("label")) for b in bins]
    counts = [float(b.get("count", 0)) for b in bins]
    desc = (f"Histogram of business hours late for the {_count(late.get('count'))} follow-ups that came (or are still "
            f"missing) after the 24-business-hour deadline: median {_hours(late.get('median_hours'))}, 90th "
            f"percentile {_hours(late.get('p90_hours'))}, worst {_hours(late.get('max_hours'))}.")
    svg = column_chart(chart_id="chart-deadlines", title=heading, desc=desc, categories=labels,
                       series=[("Follow-ups late", GREY, counts)], axis_format=_short_count,
                       value_format=lambda v: f"{v:,.0f}", integer=True)
    table = _table(["Business hours late", "Follow-ups"], ([_e(lbl), f"{int(c):,}"]
                                                           for lbl, c in zip(labels, counts, strict=True)),
                   numeric=(1,))
    return _section("deadlines", heading, _figure(svg, _e(desc), table))


def _quality_section(summary: Mapping[str, Any]) -> str:
    heading = "Data quality"
    parts: list[str] = []
    counts = summary.get("input", {})
    names = [("files", "Files read"), ("bytes", "Bytes"), ("lines", "Lines"), ("resources", "Resources"),
             ("patients", "Patients"), ("candidates", "Patients with a submission or charge (evaluated)")]
    items = "".join(f"<dt>{label}</dt><dd>{_count(counts.get(key))}</dd>" for key, label in names if key in counts)
    parts.append("<h3>What was read</h3>" + (f'<dl class="counts">{items}</dl>' if items else _empty(
        "The engine reported no input counts.")))
    by_type = counts.get("by_type")
    if isinstance(by_type, Mapping) and by_type:
        parts.append("<details><summary>Resources by type</summary>" + _table(
            ["Resource type", "Count"], ([_e(t, 80), _count(n)] for t, n in by_type.items()), numeric=(1,)) +
            "</details>")

    skipped = summary.get("skipped", {})
    parts.append("<h3>Skipped input lines</h3>")
    by_reason = skipped.get("by_reason", {})
    if not skipped.get("total"):
        parts.append(_empty("No input line was skipped."))
    else:
        reasons = list(by_reason)
        values = [float(by_reason[r]) for r in reasons]
        desc = (f"{_count(skipped.get('total'))} lines were skipped (not JSON, not a resource, no readable patient, "
                "or invalid), by reason.")
        svg = bar_chart(chart_id="chart-skipped", title="Skipped input lines by reason", desc=desc, labels=reasons,
                        series=[("Lines", GREY, values)], axis_format=_short_count,
                        value_format=lambda v: f"{v:,.0f}", integer=True)
        lines = [x for x in skipped.get("lines", []) if isinstance(x, Mapping)]
        table = _table(["File", "Reason", "Lines"], ([_e(x.get("file"), 120), _e(x.get("reason"), 200),
                                                      _count(x.get("count"))] for x in lines), numeric=(2,),
                       caption="Skipped lines by file and reason")
        parts.append(_figure(svg, _e(desc), table))

    quality = summary.get("data_quality", {})
    parts.append("<h3>Incomplete data</h3>")
    dq = [("needs_review", "Assessments needing review (the data cannot decide)"),
          ("rows_with_unknown_criteria", "Rows with at least one criterion 'unknown'"),
          ("without_practitioner", "Rows without a billing practitioner"),
          ("without_receipt", "Rows without a receipt time (charges no assessment claims)")]
    items = "".join(f"<dt>{label}</dt><dd>{_count(quality.get(key))}</dd>" for key, label in dq)
    unpriced = quality.get("unpriced", {})
    if isinstance(unpriced, Mapping):
        items += "".join(f"<dt>{_e(CLASS_LABELS.get(c, c))} rows without a rate</dt><dd>{_count(n)}</dd>"
                         for c, n in unpriced.items())
    parts.append(f'<dl class="counts">{items}</dl>')
    unknown = quality.get("unknown_criteria", {})
    if isinstance(unknown, Mapping) and unknown:
        parts.append(_table(["Criterion", "Rows where it is unknown"],
                            ([_e(c, 120), _count(n)] for c, n in unknown.items()), numeric=(1,),
                            caption="Criteria the data could not decide"))
    return _section("data-quality", heading, "".join(parts))


def _row_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    cls = row.get("class")
    order = TABLE_CLASS_ORDER.index(cls) if cls in TABLE_CLASS_ORDER else len(TABLE_CLASS_ORDER)
    amount = row.get("estimated_amount")
    amount = float(amount) if isinstance(amount, int | float) and math.isfinite(amount) else 0.0
    return order, -amount, str(row.get("patient") or ""), str(row.get("assessment_id") or "")


def _list_of(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else []


def _code_cell(row: Mapping[str, Any]) -> str:
    def code(c: Any, mods: Any) -> str:
        if not c:
            return "—"
        mods = _list_of(mods)
        return _e(c, 20) + (f" ({_e(', '.join(mods), 60)})" if mods else "")

    verdict = code(row.get("code"), row.get("modifiers"))
    return f'{verdict} → {code(row.get("billed_code"), row.get("billed_modifiers"))}'


def _evidence_cell(row: Mapping[str, Any]) -> str:
    evidence = _list_of(row.get("evidence"))
    charges = _list_of(row.get("charge_refs"))
    items = [f"charge={c}" for c in charges] + evidence
    if not items:
        return "—"
    # <wbr> after "=" and "/": "criterion=Type/id" wraps at its joints, not mid-word (neither is in an entity).
    listing = "<ul>" + "".join(f"<li>{_e(item, 160).replace('=', '=<wbr>').replace('/', '/<wbr>')}</li>"
                               for item in items[:200]) + "</ul>"
    if len(items) > 200:
        listing += f'<p class="small">… and {len(items) - 200:,} more (findings.csv)</p>'
    if len(items) <= 3:
        return listing
    return f"<details><summary>{len(items):,} references</summary>{listing}</details>"


def _reason_cell(row: Mapping[str, Any]) -> str:
    parts = [_e(row.get("reason") or "", 500)]
    failed = _list_of(row.get("failed_criteria"))
    if failed:
        parts.append(f'<br><span class="small">Failed: {_e(", ".join(failed), 400)}</span>')
    screens = _list_of(row.get("oig_screens"))
    if screens:
        parts.append(f'<br><span class="small">OIG: {_e(", ".join(screens), 200)}</span>')
    if row.get("past_timely_filing") is True:
        parts.append('<br><span class="small">Past the timely filing limit</span>')
    return "".join(parts)


def _received_cell(value: Any) -> str:
    """Date over time: the column stays narrow without breaking an instant at its hyphens."""
    if not value:
        return "—"
    day, sep, clock = str(value).partition("T")
    return f"{_e(day, 20)}<br>{_e(clock, 30)}" if sep else _e(value, 40)


def _findings_section(rows: Sequence[Mapping[str, Any]], max_rows: int) -> str:
    heading = "Findings"
    if not rows:
        return _section("findings", heading, _empty("There are no findings to list."))
    # nsmallest: the first max_rows in table order without sorting a whole population's rows.
    shown = heapq.nsmallest(max_rows, rows, key=_row_key) if len(rows) > max_rows else sorted(rows, key=_row_key)
    if len(shown) < len(rows):
        note = (f"<p><strong>Showing {len(shown):,} of {len(rows):,} rows</strong>: missed revenue and at-risk "
                "charges first, largest amounts first. Every row is in findings.csv and findings.parquet.</p>")
    else:
        note = (f"<p>All {len(rows):,} rows, missed revenue and at-risk charges first, largest amounts first "
                "(also in findings.csv and findings.parquet).</p>")
    head = ["Class", "Patient", "Received", "Practitioner", "Code: verdict → billed", "Amount*", "Reason",
            "Evidence"]
    body = []
    for row in shown:
        cls = row.get("class")
        amount = row.get("estimated_amount")
        body.append([
            f'<span class="cls" style="--accent:{CLASS_COLOURS.get(str(cls), GREY)}">'
            f'{_e(CLASS_LABELS.get(str(cls), cls), 40)}</span>',
            _e(row.get("patient") or "—", 120),
            _received_cell(row.get("received")),
            _e(row.get("practitioner") or "—", 120),
            _code_cell(row),
            _money(amount) if isinstance(amount, int | float) and not isinstance(amount, bool) else "—",
            _reason_cell(row),
            _evidence_cell(row),
        ])
    table = _table(head, body, numeric=(5,), nowrap=(0, 2, 4, 5), table_class="findings")
    return _section("findings", heading, note + f'<div class="scroll">{table}</div>')


def _rates_text(rates: Any) -> str:
    """The footnote's sentence on where money comes from: ``summary.rates_source``'s shape (a list of rates, each
    with its source and as-of date), or a plain ``{"source", "as_of"}``."""
    if not isinstance(rates, Mapping) or not rates:
        return "No rates table was given: amounts were not estimated. "
    parts = ["Money is estimated from the rates table of the rules data"]
    if rates.get("source"):
        parts.append(f": {_e(rates['source'], 300)}")
    if rates.get("as_of"):
        parts.append(f", rates as of {_e(rates['as_of'], 40)}")
    text = "".join(parts) + ". "
    entries = [r for r in rates.get("rates", []) if isinstance(r, Mapping)] if isinstance(
        rates.get("rates"), list) else []
    if entries:
        items = []
        for r in entries[:20]:
            amount = r.get("amount")
            price = _money(amount) if isinstance(amount, int | float) else "no amount"
            detail = ", ".join(_e(x, 40) for x in (r.get("currency"), r.get("setting")) if x)
            estimate = "; an estimate" if r.get("estimate") else ""
            items.append(f"<li>{_e(r.get('code'), 20)}: {price}{f' ({detail})' if detail else ''}{estimate}, as of "
                         f"{_e(r.get('as_of'), 40)}; source: {_e(r.get('source'), 600)}</li>")
        text += f'</p><ul class="small">{"".join(items)}</ul><p>'
    if rates.get("note"):
        text += f"{_e(rates['note'], 600)} "
    return text


def _footer(summary: Mapping[str, Any]) -> str:
    run = summary.get("run", {})
    rates = run.get("rates_source")
    currency = rates.get("currency") if isinstance(rates, Mapping) else None
    note = (f'<p id="money-note">* {_rates_text(rates)}Amounts are in {_e(currency or "US dollars", 20)}, '
            f"estimated from the rates, never read from the record; verdicts as of {_e(run.get('as_of'), 40)}. "
            "Pending assessments are outside every money total.</p>")
    timings = summary.get("timings", {})
    timing_text = ", ".join(f"{_e(k, 40)} {float(v):,.1f} s" for k, v in timings.items()
                            if isinstance(v, int | float)) if isinstance(timings, Mapping) else ""
    timing = f"<p>Timings: {timing_text}.</p>" if timing_text else ""
    return (f"<footer>{note}{timing}<p>Generated by g2250-cds population-audit (summary version "
            f"{_e(summary.get('summary_version'))}); rows hold references only, never names.</p></footer>")


def render_report(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], *,
                  max_rows: int = MAX_TABLE_ROWS, top_practitioners: int = TOP_PRACTITIONERS) -> str:
    """The whole page as a string (``write_report`` writes it); pure, so tests and a web view can call it."""
    run = summary.get("run", {})
    period = []
    if run.get("since"):
        period.append(f"received from {_e(run['since'], 40)}")
    if run.get("until"):
        period.append(f"until {_e(run['until'], 40)}")
    meta = (f"Verdicts as of {_e(run.get('as_of'), 40)}"
            f"{' · ' + ' '.join(period) if period else ' · all receipts in the input'}"
            f" · engine {_e(run.get('engine'), 20)} · {_count(summary.get('rows', 0))} rows")
    nav_items = [("totals", "Totals"), ("months", "Per month"), ("practitioners", "Per practitioner"),
                 ("criteria", "Failed criteria"), ("oig", "OIG screens"), ("deadlines", "Deadlines missed"),
                 ("data-quality", "Data quality"), ("findings", "Findings")]
    nav = '<nav aria-label="Sections"><ul>' + "".join(
        f'<li><a href="#{i}">{label}</a></li>' for i, label in nav_items) + "</ul></nav>"
    body = "".join([
        _totals_section(summary),
        _months_section(summary),
        _practitioners_section(summary, top_practitioners),
        _pareto_section(summary),
        _oig_section(summary),
        _deadlines_section(summary),
        _quality_section(summary),
        _findings_section(rows, max_rows),
    ])
    title = f"G2250/G2010 population audit — as of {run.get('as_of') or 'unknown'}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # Opened from a share drive with attacker-influenced text inside: forbid every script and every load.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{_e(title, 120)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>Population audit: store-and-forward reviews billed right (G2250 / G2010)</h1>"
        f'<p class="meta">{meta}</p>{nav}</header>\n'
        f"<main>{body}</main>\n{_footer(summary)}\n</body>\n</html>\n"
    )


def write_report(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any], *,
                 max_rows: int = MAX_TABLE_ROWS) -> None:
    """Write ``report.html`` atomically: a temporary file beside ``path``, flushed to disk, then renamed over it,
    so a reader never opens half a page and a failed run leaves the previous report intact."""
    text = render_report(rows, summary, max_rows=max_rows)
    path = Path(path)
    # A fresh name opened with "x" (not mkstemp's 0600): the page gets the umask's mode, like the CSV beside it.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with tmp.open("x", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
