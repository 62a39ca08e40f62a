"""summary.json's content and the self-contained report.html of the population audit (billing-rules.md §8).

Rows are made by hand here (synthetic references, no names), so every expected total is worked out below the
fixture; the report is checked as a reader's browser and an attacker would see it: one file, no load from
anywhere, well-formed, one titled SVG per plot, every record value escaped.
"""

from __future__ import annotations

import json
import random
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from cds_service.audit import findings, report
from cds_service.audit.engine import EngineResult
from cds_service.audit.report import render_report, write_report
from cds_service.audit.summary import rates_source, summarize

AS_OF = "2025-04-01T12:00:00-04:00"
FOLLOW_UP = "follow-up-within-24-business-hours"
CONSENT = "consent-documented"


def row(**values: Any) -> dict[str, Any]:
    out = findings.empty_row()
    out.update({"patient": "Patient/p1", "assessment_id": "0" * 16, "received": "2025-01-06T09:00:00-05:00",
                "status": "billable", "code": "G2250", "modifiers": ["GP"], "reason": "synthetic"})
    out.update(values)
    return out


def sample_rows() -> list[dict[str, Any]]:
    """One or two rows per class, two months, two practitioners and one without, two OIG screens."""
    return [
        row(assessment_id="a1", **{"class": "missed-revenue"}, month="2025-01", practitioner="Practitioner/a",
            estimated_amount=40.0, evidence=[f"{FOLLOW_UP}=Communication/c1"]),
        row(assessment_id="a2", **{"class": "missed-revenue"}, month="2025-02", practitioner="Practitioner/b",
            estimated_amount=40.0),
        row(assessment_id="a3", **{"class": "at-risk-charge"}, month="2025-01", practitioner="Practitioner/a",
            estimated_amount=12.5, failed_criteria=[f"{FOLLOW_UP}:not-met", f"{CONSENT}:unknown"],
            oig_screens=["screen-a"], deadline_missed_hours=30.0, past_timely_filing=True,
            billed_code="G2250", charge_refs=["ChargeItem/ch3"]),
        row(assessment_id="a4", **{"class": "at-risk-charge"}, month="2025-02", practitioner="Practitioner/b",
            estimated_amount=20.0, failed_criteria=[f"{FOLLOW_UP}:not-met"], oig_screens=["screen-a", "screen-b"],
            deadline_missed_hours=2.0),
        row(assessment_id="a5", **{"class": "pending"}, month="2025-02", practitioner="Practitioner/a",
            estimated_amount=40.0, failed_criteria=[f"{FOLLOW_UP}:pending"], past_timely_filing=True),
        row(assessment_id="a6", **{"class": "needs-review"}, month="2025-01", practitioner=None,
            estimated_amount=None, failed_criteria=[f"{CONSENT}:unknown"]),
        row(assessment_id="a7", **{"class": "ok"}, month="2025-02", practitioner="Practitioner/b",
            estimated_amount=None, billed_code="G2250"),
    ]


def sample_result() -> EngineResult:
    return EngineResult(
        rows=[],
        input={"files": 2, "bytes": 12345, "lines": 120, "resources": 117, "patients": 40, "candidates": 7,
               "by_type": {"Patient": 40, "Communication": 30}},
        skipped=[{"file": "Communication.ndjson", "reason": "not-json", "count": 2},
                 {"file": "Patient.ndjson", "reason": "invalid-resource: Patient.birthDate value_error", "count": 1}],
        timings={"group": 1.25, "evaluate": 2.5},
    )


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return sample_rows()


@pytest.fixture
def result() -> EngineResult:
    return sample_result()


def summary_of(rows: list[dict[str, Any]], result: EngineResult) -> dict[str, Any]:
    return summarize(rows, result, as_of=AS_OF, since="2025-01-01", until="2025-04-01", engine="local",
                     rates_source={"source": "Synthetic rates for tests", "as_of": "2025-01-01"})


# ----------------------------------------------------------------------------------------------------- summarize


def test_summary_counts_and_money_per_class_keep_pending_outside(rows, result) -> None:
    summary = summary_of(rows, result)
    classes = summary["classes"]
    assert list(classes) == list(findings.CLASSES)
    assert {c: v["count"] for c, v in classes.items()} == {
        "missed-revenue": 2, "at-risk-charge": 2, "pending": 1, "needs-review": 1, "ok": 1}
    assert classes["missed-revenue"]["amount"] == 80.0
    assert classes["at-risk-charge"]["amount"] == 32.5
    assert classes["pending"]["in_money_totals"] is False
    # 80 + 32.5; the pending row's 40 is not in it (§8).
    assert summary["totals"] == {"missed_revenue": 80.0, "at_risk": 32.5, "amount": 112.5, "count": 6, "pending": 1}
    assert summary["rows"] == 7
    assert summary["run"] == {"as_of": AS_OF, "since": "2025-01-01", "until": "2025-04-01", "engine": "local",
                              "rates_source": {"source": "Synthetic rates for tests", "as_of": "2025-01-01"}}


def test_summary_per_month_and_practitioner(rows, result) -> None:
    summary = summary_of(rows, result)
    assert list(summary["months"]) == ["2025-01", "2025-02"]
    jan, feb = summary["months"]["2025-01"], summary["months"]["2025-02"]
    assert (jan["count"], jan["missed_revenue"], jan["at_risk"]) == (3, 40.0, 12.5)
    assert (feb["count"], feb["missed_revenue"], feb["at_risk"]) == (4, 40.0, 20.0)  # pending's 40 not counted
    assert feb["by_class"]["pending"] == 1
    # Most money at stake first: b (40 + 20) before a (40 + 12.5); the row without a practitioner last.
    practitioners = summary["practitioners"]
    assert [p["practitioner"] for p in practitioners] == ["Practitioner/b", "Practitioner/a", None]
    assert (practitioners[0]["missed_revenue"], practitioners[0]["at_risk"]) == (40.0, 20.0)
    assert practitioners[1]["count"] == 3


def test_summary_oig_pareto_deadlines_timely_filing(rows, result) -> None:
    summary = summary_of(rows, result)
    screens = summary["oig_screens"]
    assert screens["screen-a"]["count"] == 2 and screens["screen-a"]["amount"] == 32.5
    assert screens["screen-b"]["count"] == 1 and screens["screen-b"]["amount"] == 20.0
    assert screens["screen-a"]["by_class"]["at-risk-charge"] == 2
    # The screens findings declares come first, even at zero ("none found" is a finding too), then others sorted.
    declared = list(getattr(findings, "OIG_SCREENS", ()))
    assert list(screens) == [*declared, "screen-a", "screen-b"]
    assert all(screens[s]["count"] == 0 for s in declared)

    pareto = summary["failed_criteria"]
    assert [(p["criterion"], p["count"]) for p in pareto] == [(FOLLOW_UP, 3), (CONSENT, 2)]
    assert pareto[0]["by_status"] == {"not-met": 2, "unknown": 0, "pending": 1}
    assert [p["cumulative_share"] for p in pareto] == [0.6, 1.0]

    late = summary["deadlines_missed"]
    assert late["count"] == 2 and late["max_hours"] == 30.0
    assert {b["label"]: b["count"] for b in late["histogram"] if b["count"]} == {"0–4 h": 1, "24–48 h": 1}
    assert sum(b["count"] for b in late["histogram"]) == 2

    # Two rows past the limit, but only the at-risk one's money counts (the other is pending).
    assert summary["timely_filing"]["count"] == 2
    assert summary["timely_filing"]["amount"] == 12.5


def test_summary_input_skipped_quality_timings(rows, result) -> None:
    summary = summary_of(rows, result)
    assert summary["input"]["candidates"] == 7
    assert summary["skipped"]["total"] == 3
    assert summary["skipped"]["by_reason"] == {"not-json": 2, "invalid-resource: Patient.birthDate value_error": 1}
    assert summary["skipped"]["lines"][0] == {"file": "Communication.ndjson", "reason": "not-json", "count": 2}
    quality = summary["data_quality"]
    assert quality["needs_review"] == 1
    assert quality["rows_with_unknown_criteria"] == 2
    assert quality["unknown_criteria"] == {CONSENT: 2}
    assert quality["without_practitioner"] == 1
    assert summary["timings"] == {"group": 1.25, "evaluate": 2.5}


def test_summary_is_json_and_independent_of_row_order(rows, result) -> None:
    text = json.dumps(summary_of(rows, result), allow_nan=False)
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    assert json.dumps(summary_of(shuffled, result), allow_nan=False) == text


def test_summary_survives_garbage_amounts_and_unpriced_rows(result) -> None:
    rows = [row(**{"class": "at-risk-charge"}, estimated_amount=float("nan"), month=None),
            row(**{"class": "missed-revenue"}, estimated_amount=0.1),
            row(**{"class": "missed-revenue"}, estimated_amount=0.2)]
    summary = summary_of(rows, result)
    json.dumps(summary, allow_nan=False)
    assert summary["classes"]["at-risk-charge"]["unpriced"] == 1
    assert summary["classes"]["missed-revenue"]["amount"] == 0.3  # not 0.30000000000000004
    assert list(summary["months"]) == ["unknown"]


# -------------------------------------------------------------------------------------------------------- report


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SVG_LEAVES = {"rect", "line", "circle", "polyline", "path"}


class PageParser(HTMLParser):
    """Collects what a browser would load or run, and checks that every element is closed where it was opened."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.styles: list[str] = []
        self.svgs: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._in: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "svg":
            self.svgs.append({"attrs": dict(attrs), "title": None})
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))  # <rect .../>: self-closed, nothing to pop

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "style":
            self.styles.append(data)
        if self.stack[-2:] == ["svg", "title"] and self.svgs[-1]["title"] is None:  # the svg's own, not a bar's
            self.svgs[-1]["title"] = data
        self.text.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == [], parser.errors[:5]
    assert parser.stack == [], parser.stack
    return parser


def assert_self_contained(parser: PageParser) -> None:
    for tag, attrs in parser.tags:
        assert tag not in {"script", "link", "iframe", "img", "object", "embed", "image", "use", "base"}, tag
        for name in ("src", "href", "xlink:href", "action", "poster", "data", "srcset", "style"):
            value = attrs.get(name)
            if value is None:
                continue
            if name == "style":
                assert "url(" not in value and "@import" not in value
            else:
                assert value.startswith("#"), f"{tag} {name}={value!r} leaves the page"
    css = "".join(parser.styles)
    assert "@import" not in css and "url(" not in css and "@font-face" not in css


def test_report_is_one_self_contained_well_formed_page(tmp_path, rows, result) -> None:
    summary = summary_of(rows, result)
    path = tmp_path / "report.html"
    write_report(path, rows, summary)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left beside it
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page  # synthetic rows hold no URL: nothing may add one
    parser = parse(page)
    assert_self_contained(parser)
    html_tag = next(attrs for tag, attrs in parser.tags if tag == "html")
    assert html_tag["lang"] == "en"
    csp = next(attrs for tag, attrs in parser.tags if tag == "meta" and attrs.get("http-equiv"))
    assert "default-src 'none'" in (csp["content"] or "")
    assert [tag for tag, _ in parser.tags].count("h1") == 1
    headings = "".join(parser.text)
    for section in ("Totals per class", "per month", "per practitioner", "Pareto", "OIG", "deadlines missed",
                    "Data quality", "Findings"):
        assert section in headings, section


def test_report_has_one_titled_accessible_svg_per_plot(rows, result) -> None:
    parser = parse(render_report(rows, summary_of(rows, result)))
    ids = [svg["attrs"].get("id") for svg in parser.svgs]
    # months, practitioners, Pareto, OIG screens, hours late, skipped lines
    assert ids == ["chart-months", "chart-practitioners", "chart-pareto", "chart-oig", "chart-deadlines",
                   "chart-skipped"]
    for svg in parser.svgs:
        assert svg["attrs"]["role"] == "img"
        assert svg["title"], svg["attrs"]["id"]
        assert svg["attrs"]["aria-labelledby"] == f"{svg['attrs']['id']}-title {svg['attrs']['id']}-desc"
    # Each plot's numbers are also there as text (the text alternative), e.g. January's at-risk money.
    assert "$12.50" in "".join(parser.text)


def test_report_shows_money_classes_evidence_and_rates_footnote(rows, result) -> None:
    page = render_report(rows, summary_of(rows, result))
    text = "".join(parse(page).text)
    assert "$80.00" in text and "$32.50" in text  # headline missed revenue and at-risk
    assert "Synthetic rates for tests" in text and "rates as of 2025-01-01" in text
    assert f"{FOLLOW_UP}=Communication/c1" in text and "charge=ChargeItem/ch3" in text
    assert "All 7 rows" in text


def test_report_escapes_hostile_values(rows, result) -> None:
    hostile = '<script>alert("x")</script>'
    rows[0]["practitioner"] = f"Practitioner/{hostile}"
    rows[0]["reason"] = '"><img src=x onerror=alert(1)>'
    rows[2]["evidence"] = [f"{CONSENT}=Consent/{hostile}"]
    rows[3]["oig_screens"] = [hostile]
    result.skipped.append({"file": f"{hostile}.ndjson", "reason": "not-json", "count": 1})
    page = render_report(rows, summary_of(rows, result))
    assert "<script" not in page.lower() and "<img" not in page.lower()
    parser = parse(page)
    assert_self_contained(parser)
    assert all(tag not in {"script", "img"} for tag, _ in parser.tags)
    assert "&lt;script&gt;" in page
    # The value is shown to the reader as text, intact, in the table and the plot labels.
    assert f"Practitioner/{hostile}" in "".join(parser.text)


def test_report_with_no_rows_says_there_are_no_findings(tmp_path, result) -> None:
    summary = summary_of([], result)
    assert summary["totals"]["amount"] == 0.0 and summary["failed_criteria"] == []
    path = tmp_path / "report.html"
    write_report(path, [], summary)
    page = path.read_text(encoding="utf-8")
    parser = parse(page)
    assert_self_contained(parser)
    text = "".join(parser.text)
    assert "No findings" in text
    assert "There are no findings to list." in text
    # Only the data-quality plot remains: the skipped lines are why an empty result must be looked at.
    assert [svg["attrs"]["id"] for svg in parser.svgs] == ["chart-skipped"]

    bare = render_report([], summarize([], EngineResult(rows=[]), as_of=AS_OF, since=None, until=None,
                                       engine="local"))
    parser = parse(bare)
    assert parser.svgs == []
    assert "No rates table was given" in "".join(parser.text)


def synthetic_rows(n: int) -> list[dict[str, Any]]:
    rng = random.Random(14)
    criteria = [FOLLOW_UP, CONSENT, "established-patient", "patient-submitted-media", "practitioner-interpretation",
                "no-related-service-prior-7-days", "no-resulting-service", "payer-covers-code",
                "billing-practitioner-eligible", "not-already-billed"]
    out = []
    for i in range(n):
        cls = rng.choices(findings.CLASSES, weights=(8, 4, 2, 3, 20))[0]
        failed = [f"{c}:{rng.choice(['not-met', 'unknown'])}" for c in rng.sample(criteria, rng.randint(0, 3))] \
            if cls != "ok" else []
        out.append(row(
            patient=f"Patient/p{i}", assessment_id=f"{i:016x}", **{"class": cls},
            month=f"2024-{rng.randint(1, 12):02d}", practitioner=f"Practitioner/pr{rng.randint(1, 60)}",
            estimated_amount=round(rng.uniform(10, 40), 2) if cls != "ok" else None, failed_criteria=failed,
            oig_screens=["e-m-within-7-days"] if rng.random() < 0.05 else [],
            deadline_missed_hours=round(rng.expovariate(1 / 20), 1) if rng.random() < 0.2 else None,
            evidence=[f"{c.split(':')[0]}=Communication/x{i}" for c in failed],
            charge_refs=[f"ChargeItem/c{i}"] if cls == "at-risk-charge" else [],
        ))
    return out


def test_report_of_20000_rows_is_capped_small_and_quick(tmp_path, result) -> None:
    rows = synthetic_rows(20_000)
    started = time.perf_counter()
    summary = summary_of(rows, result)
    path = tmp_path / "report.html"
    write_report(path, rows, summary)
    elapsed = time.perf_counter() - started
    page = path.read_text(encoding="utf-8")
    assert elapsed < 10.0, elapsed
    assert len(page.encode()) < 3_000_000
    parser = parse(page)
    text = "".join(parser.text)
    assert f"Showing {report.MAX_TABLE_ROWS:,} of 20,000 rows" in text
    table_rows = sum(1 for tag, _ in parser.tags if tag == "tr")
    assert report.MAX_TABLE_ROWS < table_rows < report.MAX_TABLE_ROWS + 200  # the capped findings + small tables
    # What a reader acts on comes first: the first finding shown is the largest missed revenue.
    first = max((r for r in rows if r["class"] == "missed-revenue"), key=lambda r: r["estimated_amount"])
    table = page[page.index('<table class="findings">'):]
    first_row = table[table.index("<tbody><tr>"):table.index("</tr>", table.index("<tbody><tr>"))]
    assert f">{first['patient']}<" in first_row
    assert "top 15 of 60 practitioners" in text


def test_write_report_replaces_atomically_and_keeps_the_old_page_on_failure(tmp_path, rows, result,
                                                                          monkeypatch) -> None:
    path = tmp_path / "report.html"
    path.write_text("previous report", encoding="utf-8")
    write_report(path, rows, summary_of(rows, result))
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")

    path.write_text("previous report", encoding="utf-8")

    def broken(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "fsync", broken)  # fails after the temporary file was written
    with pytest.raises(OSError, match="disk full"):
        write_report(path, rows, summary_of(rows, result))
    assert path.read_text(encoding="utf-8") == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_written_file_is_what_render_returns(tmp_path: Path, rows, result) -> None:
    summary = summary_of(rows, result)
    write_report(tmp_path / "r.html", rows, summary)
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == render_report(rows, summary)


def test_rates_source_of_the_shipped_table_is_cited_in_the_footnote(rows, result) -> None:
    shipped = json.loads((Path(findings.__file__).parents[1] / "data" / "rates.json").read_text(encoding="utf-8"))
    source = rates_source(shipped["rates"], note=shipped.get("note"))
    assert [r["code"] for r in source["rates"]] == sorted(r["code"] for r in shipped["rates"])
    assert source["as_of"] == max(r["as_of"] for r in shipped["rates"])
    summary = summarize(rows, result, as_of=AS_OF, since=None, until=None, engine="spark", rates_source=source)
    json.dumps(summary, allow_nan=False)
    parser = parse(render_report(rows, summary))
    assert_self_contained(parser)  # the sources' URLs are cited as text, never loaded
    text = "".join(parser.text)
    assert f"rates as of {source['as_of']}" in text
    for rate in shipped["rates"]:
        assert f"{rate['code']}: {'$'}{rate['amount']:,.2f}" in text


def test_rates_source_reads_rate_objects_with_dates() -> None:
    from dataclasses import dataclass
    from datetime import date

    @dataclass(frozen=True)
    class Rate:  # the attributes of rules_data.Rate the summary reads
        code: str
        amount: float
        currency: str
        setting: str
        source: str
        as_of: date
        estimate: bool = False

    source = rates_source([Rate("G2250", 11.69, "USD", "non-facility", "synthetic", date(2026, 1, 1), True),
                           Rate("G2010", 12.0, "USD", "non-facility", "synthetic", date(2025, 1, 1))])
    assert source["as_of"] == "2026-01-01" and source["currency"] == "USD"
    assert [(r["code"], r["as_of"], r["estimate"]) for r in source["rates"]] == [
        ("G2010", "2025-01-01", False), ("G2250", "2026-01-01", True)]
    json.dumps(source, allow_nan=False)
