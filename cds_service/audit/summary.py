"""``summary.json`` of the population audit (contract.md ``population-audit``, billing-rules.md §8).

Revenue-cycle and compliance staff read the totals, not 100,000 rows: counts and money per §8 class, per month, per
practitioner and per OIG A-05-23-00001 screen, which criteria fail most (a Pareto), how late the missed follow-ups
were, what is past the timely filing limit, and how trustworthy the input was (skipped lines, unknown criteria).
The report (``report.py``) draws from this dictionary only, so the page and the JSON never disagree.

Money is the sum of the rows' ``estimated_amount`` (rates table of the rules data, never the record). A ``pending``
assessment's deadline is still ahead at ``--as-of``: it is counted but kept outside every money total (§8).
Everything is JSON-serializable and in a deterministic order (same rows in → same bytes out), so two engines'
summaries can be compared as text.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from cds_service.audit import findings
from cds_service.audit.engine import EngineResult

SUMMARY_VERSION = 1

MISSED = "missed-revenue"
AT_RISK = "at-risk-charge"
PENDING = "pending"
NEEDS_REVIEW = "needs-review"
OK = "ok"
# Classes whose estimated_amount counts towards money totals (§8: pending stays outside them).
MONEY_CLASSES: tuple[str, ...] = tuple(c for c in findings.CLASSES if c != PENDING)

UNKNOWN_MONTH = "unknown"
# Upper bounds (business hours, inclusive) of the "hours late" histogram. 24 business hours is the follow-up
# window itself, so the bins separate "a few hours late" from "a whole window late" from "never answered in a week".
LATE_HOURS_BINS: tuple[float, ...] = (4.0, 8.0, 24.0, 48.0, 72.0, 168.0)
CRITERION_STATUSES = ("not-met", "unknown", "pending")


def _amount(value: Any) -> float | None:
    """A row's estimated_amount as a finite float, or None (an unpriced row, or garbage from a broken engine)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _money(values: Iterable[float]) -> float:
    # fsum: 20,000 cents-valued floats summed naively drift by fractions of a cent; the total must match the CSV's.
    return round(math.fsum(values), 2)


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list | tuple):
        return []
    return [item for item in value if isinstance(item, str)]


def _class_of(row: Mapping[str, Any]) -> str:
    cls = row.get("class")
    return cls if cls in findings.CLASSES else NEEDS_REVIEW  # an unclassed row is one a human must look at


def _split_criterion(item: str) -> tuple[str, str]:
    """``'consent-documented:not-met'`` → (id, status); a bare id is taken as not-met (it failed, status unknown)."""
    criterion, sep, status = item.rpartition(":")
    if not sep or not criterion:
        return item, "not-met"
    return criterion, status


class _Bucket:
    """Counts per class and the two monies a reader acts on (missed, at risk) for one month / practitioner."""

    __slots__ = ("amounts", "counts")

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.amounts: dict[str, list[float]] = defaultdict(list)

    def add(self, cls: str, amount: float | None) -> None:
        self.counts[cls] += 1
        if amount is not None and cls in MONEY_CLASSES:
            self.amounts[cls].append(amount)

    def money(self, cls: str) -> float:
        return _money(self.amounts.get(cls, ()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": sum(self.counts.values()),
            "by_class": {cls: self.counts.get(cls, 0) for cls in findings.CLASSES},
            "missed_revenue": self.money(MISSED),
            "at_risk": self.money(AT_RISK),
        }


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile: a value that actually occurred (a reader can find that row)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return round(sorted_values[rank - 1], 2)


def _late_bin_label(low: float, high: float | None) -> str:
    def fmt(x: float) -> str:
        return f"{x:g}"

    return f"> {fmt(low)} h" if high is None else f"{fmt(low)}–{fmt(high)} h"


def _deadline_histogram(hours: list[float]) -> dict[str, Any]:
    hours = sorted(hours)
    bins: list[dict[str, Any]] = []
    low = 0.0
    for high in (*LATE_HOURS_BINS, None):
        upper = math.inf if high is None else high
        count = sum(1 for h in hours if low < h <= upper)
        bins.append({"label": _late_bin_label(low, high), "from": low, "to": high, "count": count})
        if high is not None:
            low = high
    return {
        "count": len(hours),
        "median_hours": _percentile(hours, 0.5),
        "p90_hours": _percentile(hours, 0.9),
        "max_hours": round(hours[-1], 2) if hours else None,
        "histogram": bins,
    }


def _oig_order(seen: Iterable[str]) -> list[str]:
    """The screens findings declares, in its order (zero counts shown: "none found" is itself a finding), then any
    other id a row carries, sorted."""
    declared = [s for s in getattr(findings, "OIG_SCREENS", ()) if isinstance(s, str)]
    return declared + sorted(set(seen) - set(declared))


def _skipped(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    per_file: Counter[tuple[str, str]] = Counter()
    for entry in entries:
        count = entry.get("count", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            continue
        per_file[(str(entry.get("file", "")), str(entry.get("reason", "")))] += count
    by_reason: Counter[str] = Counter()
    for (_, reason), count in per_file.items():
        by_reason[reason] += count
    return {
        "total": sum(per_file.values()),
        "by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "lines": [{"file": f, "reason": r, "count": n} for (f, r), n in sorted(per_file.items())],
    }


def _jsonable(value: Any) -> Any:
    """Input counts and timings come from engines; keep only what JSON can carry, in a stable order."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def summarize(
    rows: list[dict[str, Any]],
    result: EngineResult,
    *,
    as_of: str,
    since: str | None,
    until: str | None,
    engine: str,
    rates_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``summary.json``: what the audit found in ``rows``, and what it read to find it.

    ``rows`` are finding rows (``findings.COLUMNS``); ``result`` supplies input counts, skipped lines and timings;
    ``rates_source`` (source and as-of date of the rates table) is carried so every figure of money can say where
    its price came from.
    """
    class_counts: Counter[str] = Counter()
    class_amounts: dict[str, list[float]] = defaultdict(list)
    unpriced: Counter[str] = Counter()
    months: dict[str, _Bucket] = defaultdict(_Bucket)
    practitioners: dict[str | None, _Bucket] = defaultdict(_Bucket)
    oig_counts: Counter[str] = Counter()
    oig_amounts: dict[str, list[float]] = defaultdict(list)
    oig_by_class: dict[str, Counter[str]] = defaultdict(Counter)
    criteria: dict[str, Counter[str]] = defaultdict(Counter)
    late_hours: list[float] = []
    timely_counts: Counter[str] = Counter()
    timely_amounts: dict[str, list[float]] = defaultdict(list)
    rows_with_unknown = 0
    no_practitioner = 0
    no_received = 0

    for row in rows:
        cls = _class_of(row)
        amount = _amount(row.get("estimated_amount"))
        class_counts[cls] += 1
        if amount is None:
            if cls in (MISSED, AT_RISK):
                unpriced[cls] += 1  # money at stake that the rates table could not price: say so, don't hide it
        else:
            class_amounts[cls].append(amount)
        in_money = amount if cls in MONEY_CLASSES else None

        month = row.get("month")
        months[month if isinstance(month, str) and month else UNKNOWN_MONTH].add(cls, amount)
        practitioner = row.get("practitioner")
        practitioner = practitioner if isinstance(practitioner, str) and practitioner else None
        practitioners[practitioner].add(cls, amount)
        if practitioner is None:
            no_practitioner += 1
        if not row.get("received"):
            no_received += 1

        for screen in dict.fromkeys(_strings(row.get("oig_screens"))):  # a screen counts once per row
            oig_counts[screen] += 1
            oig_by_class[screen][cls] += 1
            if in_money is not None:
                oig_amounts[screen].append(in_money)

        has_unknown = False
        seen: set[str] = set()
        for item in _strings(row.get("failed_criteria")):
            criterion, status = _split_criterion(item)
            if criterion in seen:
                continue
            seen.add(criterion)
            criteria[criterion][status] += 1
            has_unknown = has_unknown or status == "unknown"
        rows_with_unknown += has_unknown

        late = _amount(row.get("deadline_missed_hours"))
        if late is not None and late > 0:
            late_hours.append(late)

        if row.get("past_timely_filing") is True:
            timely_counts[cls] += 1
            if in_money is not None:
                timely_amounts[cls].append(in_money)

    classes = {
        cls: {
            "count": class_counts.get(cls, 0),
            "amount": _money(class_amounts.get(cls, ())),
            "unpriced": unpriced.get(cls, 0),
            "in_money_totals": cls in MONEY_CLASSES,
        }
        for cls in findings.CLASSES
    }

    pareto_items = sorted(criteria.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    pareto_total = sum(sum(c.values()) for _, c in pareto_items)
    pareto: list[dict[str, Any]] = []
    running = 0
    for criterion, statuses in pareto_items:
        count = sum(statuses.values())
        running += count
        pareto.append({
            "criterion": criterion,
            "count": count,
            "by_status": {s: statuses.get(s, 0) for s in (*CRITERION_STATUSES, *sorted(set(statuses) -
                                                                                    set(CRITERION_STATUSES)))},
            "cumulative_share": round(running / pareto_total, 4),
        })

    month_keys = sorted(k for k in months if k != UNKNOWN_MONTH) + ([UNKNOWN_MONTH] if UNKNOWN_MONTH in months else [])
    practitioner_items = sorted(
        practitioners.items(),
        key=lambda kv: (-(kv[1].money(MISSED) + kv[1].money(AT_RISK)), -sum(kv[1].counts.values()),
                        kv[0] is None, kv[0] or ""),
    )

    return {
        "summary_version": SUMMARY_VERSION,
        "run": {
            "as_of": as_of,
            "since": since,
            "until": until,
            "engine": engine,
            "rates_source": _jsonable(rates_source) if rates_source is not None else None,
        },
        "rows": len(rows),
        "classes": classes,
        "totals": {
            # The two figures a reader acts on; "amount" is everything priced outside pending (§8).
            "missed_revenue": classes[MISSED]["amount"],
            "at_risk": classes[AT_RISK]["amount"],
            "amount": _money(a for cls in MONEY_CLASSES for a in class_amounts.get(cls, ())),
            "count": sum(class_counts.get(cls, 0) for cls in MONEY_CLASSES),
            "pending": class_counts.get(PENDING, 0),
        },
        "months": {key: months[key].as_dict() for key in month_keys},
        "practitioners": [{"practitioner": ref, **bucket.as_dict()} for ref, bucket in practitioner_items],
        "oig_screens": {
            screen: {
                "count": oig_counts.get(screen, 0),
                "amount": _money(oig_amounts.get(screen, ())),
                "by_class": {cls: oig_by_class[screen].get(cls, 0) for cls in findings.CLASSES},
            }
            for screen in _oig_order(oig_counts)
        },
        "failed_criteria": pareto,
        "deadlines_missed": _deadline_histogram(late_hours),
        "timely_filing": {
            "count": sum(timely_counts.values()),
            "amount": _money(a for values in timely_amounts.values() for a in values),
            "by_class": {
                cls: {"count": timely_counts.get(cls, 0), "amount": _money(timely_amounts.get(cls, ()))}
                for cls in findings.CLASSES
            },
        },
        "input": _jsonable(_sorted_input(result.input)),
        "skipped": _skipped(result.skipped),
        "data_quality": {
            "needs_review": class_counts.get(NEEDS_REVIEW, 0),
            "rows_with_unknown_criteria": rows_with_unknown,
            "unknown_criteria": {
                criterion: counts["unknown"]
                for criterion, counts in sorted(criteria.items(), key=lambda kv: (-kv[1]["unknown"], kv[0]))
                if counts.get("unknown")
            },
            "unpriced": {cls: unpriced.get(cls, 0) for cls in (MISSED, AT_RISK)},
            "without_practitioner": no_practitioner,
            "without_receipt": no_received,
        },
        "timings": {str(k): round(float(v), 3) for k, v in result.timings.items()
                    if isinstance(v, int | float) and math.isfinite(v)},
    }


def rates_source(rates: Iterable[Any], *, note: str | None = None) -> dict[str, Any]:
    """``summarize``'s ``rates_source`` from the rates the audit priced with (``rules_data.Rate`` objects, or
    mappings with the same keys): every figure of money in summary.json and the report can then say which rate,
    from which source, as of which date (§8)."""
    entries = []
    for rate in rates:
        def get(key: str, rate: Any = rate) -> Any:
            return rate.get(key) if isinstance(rate, Mapping) else getattr(rate, key, None)

        as_of = get("as_of")
        entries.append({
            "code": get("code"),
            "amount": get("amount"),
            "currency": get("currency"),
            "setting": get("setting"),
            "estimate": bool(get("estimate")),
            "as_of": as_of.isoformat() if hasattr(as_of, "isoformat") else as_of,
            "source": get("source"),
        })
    entries.sort(key=lambda e: str(e["code"]))
    dates = sorted(str(e["as_of"]) for e in entries if e["as_of"])
    currencies = sorted({str(e["currency"]) for e in entries if e["currency"]})
    return {
        "as_of": dates[-1] if dates else None,  # the newest rate's date: "rates as of" in the footnote
        "currency": currencies[0] if len(currencies) == 1 else None,
        "note": note,
        "rates": entries,
    }


def _sorted_input(counts: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(counts)
    by_type = out.get("by_type")
    if isinstance(by_type, Mapping):
        out["by_type"] = dict(sorted(by_type.items(), key=lambda kv: str(kv[0])))
    return out
