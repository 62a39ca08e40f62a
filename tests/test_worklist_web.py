"""The billing worklist's pages through the Flask test client: sessions, roles, CSRF and one-time forms, the list's
filters/sort/paging, the detail page, the CSV export, analytics, bad parameters, headers and PHI-free URLs and logs.

Rows are written with the publisher the hooks and the audit use (``worklist.publish.upsert_items``) into the app's
own database; everything else goes through HTTP.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.logs import JsonFormatter
from cds_service.worklist import issue_login_token
from cds_service.worklist.auth import open_session
from cds_service.worklist.publish import upsert_items
from tests.support.worklist_app import NOW, NY, counted_statements

PATIENT = "Patient/pat-secret-4711"


def item(item_id: str, **changes: Any) -> dict[str, Any]:
    """One worklist row as the publisher writes it (evaluation columns)."""
    row: dict[str, Any] = {
        "item_id": item_id, "queue": "due", "source": "hook", "evaluated_at": NOW - timedelta(hours=1),
        "status": "pending", "code": "G2250", "modifiers": "", "patient_ref": PATIENT,
        "encounter_ref": "Encounter/enc-1", "practitioner_ref": "Practitioner/dr-a",
        "organization_ref": "Organization/org-1", "payer_profile": "medicare", "received_at": NOW - timedelta(days=1),
        "deadline_at": NOW + timedelta(hours=23), "follow_up_at": None, "charges": "[]", "billed_code": None,
        "audit_class": None, "reason": "Waiting for the practitioner's reply", "question": None,
        "estimated_amount": 12.5, "timely_filing_deadline": date(2027, 3, 9),
        "criteria": '[{"id": "reply-within-window", "status": "pending", "detail": "No reply yet", '
                    '"evidence": ["Communication/c-1"]}]',
        "card_summary": None, "card_detail": None, "card_indicator": None, "extra": None,
        "updated_at": NOW - timedelta(hours=1),
    }
    row.update(changes)
    return row




def seed(app: Flask, rows: list[dict[str, Any]]) -> None:
    engine = app.extensions["g2250_runtime"].store.engine
    with engine.begin() as conn:
        upsert_items(conn, rows)


def sign_in(app: Flask, client: FlaskClient) -> None:
    """Sign in as the person at the machine (``login: token``), the way the printed URL does."""
    runtime = app.extensions["g2250_runtime"]
    token = issue_login_token(runtime.config, now=runtime.clock(), engine=runtime.store.engine)
    answer = client.get(f"/worklist/login?token={token}")
    assert answer.status_code == 303, answer.text


def sign_in_as_viewer(app: Flask, client: FlaskClient, name: str = "vera") -> None:
    """What the OIDC callback leaves in the session for a user holding only a viewer role (the callback itself is
    tested against a real provider in test_worklist_oidc.py)."""
    runtime = app.extensions["g2250_runtime"]
    with client.session_transaction("/worklist/") as session:
        session["sid"] = open_session(runtime.store.engine, now=runtime.clock(), seconds=3600)
        session["user"] = name
        session["role"] = "viewer"
        session["login_at"] = int(runtime.clock().timestamp())


@pytest.fixture
def coder(wl: Flask) -> FlaskClient:
    client = wl.test_client()
    sign_in(wl, client)
    return client


def form_fields(html: str, form_id: str) -> dict[str, str]:
    """The hidden fields (CSRF token, nonce) of one form on a page."""
    match = re.search(rf'<form id="{form_id}".*?</form>', html, re.S)
    assert match, f"no form {form_id}"
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', match.group(0)))


def trail(app: Flask, item_id: str) -> list[str]:
    client = app.test_client()
    sign_in(app, client)
    html = client.get(f"/worklist/item/{item_id}").text
    body = re.search(r'<table id="audit-trail">.*?</table>', html, re.S)
    assert body
    return re.findall(r"<tr><td class=\"nowrap\">", body.group(0))


def error_text(html: str) -> str:
    match = re.search(r'class="error-message"[^>]*>(.*?)</p>', html, re.S)
    return match.group(1) if match else ""


# ---------------------------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------------------------
GET_ROUTES = ["/worklist/", "/worklist/item/abc", "/worklist/export.csv", "/worklist/analytics"]
POST_ROUTES = ["/worklist/item/abc/review", "/worklist/item/abc/assign", "/worklist/item/abc/note",
               "/worklist/item/abc/reopen", "/worklist/logout"]


@pytest.mark.parametrize("path", GET_ROUTES)
def test_every_page_needs_a_session(wl: Flask, path: str) -> None:
    answer = wl.test_client().get(path)
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/worklist/login"


@pytest.mark.parametrize("path", POST_ROUTES)
def test_every_action_needs_a_session(wl: Flask, path: str) -> None:
    seed(wl, [item("abc")])
    answer = wl.test_client().post(path, data={"reason": "other", "note": "x"})
    assert answer.status_code == 401
    assert answer.mimetype == "text/html"
    assert trail(wl, "abc") == []


def test_after_sign_in_the_page_asked_for_is_shown(wl: Flask) -> None:
    client = wl.test_client()
    assert client.get("/worklist/analytics").status_code == 303
    runtime = wl.extensions["g2250_runtime"]
    token = issue_login_token(runtime.config, now=NOW, engine=runtime.store.engine)
    answer = client.get(f"/worklist/login?token={token}")
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/worklist/analytics"  # and the token is gone from the address


def test_the_static_stylesheet_needs_no_session(wl: Flask) -> None:
    answer = wl.test_client().get("/worklist/static/worklist/worklist.css")
    assert answer.status_code == 200
    assert answer.mimetype == "text/css"
    answer.close()


# ---------------------------------------------------------------------------------------------------------------
# The list
# ---------------------------------------------------------------------------------------------------------------
def test_the_list_shows_the_due_queue_with_countdowns(wl: Flask, coder: FlaskClient) -> None:
    seed(wl, [
        # The embedded calendar's mode is business-days (a working day counts whole, 24 h): Monday 15:00 →
        # Tuesday 11:00 is 20 business hours.
        item("a000000000000001", deadline_at=datetime(2026, 3, 9, 15, 0, tzinfo=NY)),
        # Tuesday 11:00 → Wednesday 10:00: 23.
        item("a000000000000002", deadline_at=datetime(2026, 3, 11, 10, 0, tzinfo=NY)),
        item("a000000000000003", queue="to-charge", status="billable", deadline_at=None),
    ])
    answer = coder.get("/worklist/")
    assert answer.status_code == 200
    html = answer.text
    assert 'id="worklist-table"' in html
    ids = re.findall(r'<tr data-item-id="([^"]+)"', html)
    assert ids == ["a000000000000001", "a000000000000002"]  # overdue first; the to-charge row is in its own tab
    overdue = re.search(r'<tr data-item-id="a000000000000001" class="overdue">.*?</tr>', html, re.S)
    assert overdue and "overdue by 20 business hours" in overdue.group(0)
    assert "23 business hours left" in html
    assert re.search(r'<a data-queue="due" href="[^"]*" aria-current="page">', html)
    assert re.search(r'<a data-queue="to-charge" href="[^"]*">To charge <span class="count">1</span>', html)
    assert 'class="row-link" href="/worklist/item/a000000000000001"' in html
    assert 'aria-sort="ascending"' in html
    for hook in ('id="filters"', 'id="apply-filters"', 'id="export-csv"', 'id="analytics-link"', 'id="whoami"',
                 'id="logout-form"', 'role="status"'):
        assert hook in html
    assert "$12.50" in html and "364 days left" in html


def test_queue_tabs_filters_sort_and_paging(wl: Flask, coder: FlaskClient) -> None:
    rows = [item(f"b{i:015d}", queue="to-charge", status="billable", estimated_amount=float(i),
                 practitioner_ref="Practitioner/dr-a" if i % 2 else "Practitioner/dr-b") for i in range(1, 31)]
    seed(wl, rows)
    html = coder.get("/worklist/?queue=to-charge&sort=amount&dir=desc&size=25").text
    ids = re.findall(r'<tr data-item-id="([^"]+)"', html)
    assert len(ids) == 25 and ids[0] == "b000000000000030" and ids[-1] == "b000000000000006"
    assert 'aria-sort="descending"' in html
    assert "page 1 of 2" in html
    page2 = coder.get("/worklist/?queue=to-charge&sort=amount&dir=desc&size=25&page=2").text
    assert re.findall(r'<tr data-item-id="([^"]+)"', page2) == [f"b{i:015d}" for i in range(5, 0, -1)]
    only_a = coder.get("/worklist/?queue=to-charge&practitioner=Practitioner/dr-a&size=100").text
    found = re.findall(r'<tr data-item-id="([^"]+)"', only_a)
    assert len(found) == 15 and all(int(x[1:]) % 2 for x in found)
    # The next-page link keeps the view's filters and sort.
    link = re.search(r'<a rel="next" href="([^"]+)"', html)
    assert link and "queue=to-charge" in link.group(1) and "sort=amount" in link.group(1) and "page=2" in link.group(1)


def test_reviewed_rows_are_hidden_unless_asked_for(wl: Flask, coder: FlaskClient) -> None:
    seed(wl, [item("c000000000000001"), item("c000000000000002")])
    page = coder.get("/worklist/item/c000000000000001").text
    answer = coder.post("/worklist/item/c000000000000001/review",
                        data={**form_fields(page, "review-form"), "reason": "payer-confirmed"})
    assert answer.status_code == 303
    assert re.findall(r'data-item-id="([^"]+)"', coder.get("/worklist/").text) == ["c000000000000002"]
    assert len(re.findall(r'data-item-id="([^"]+)"', coder.get("/worklist/?reviewed=1").text)) == 2


@pytest.mark.parametrize(("query", "name"), [
    ("sort=bogus", "sort"), ("dir=up", "dir"), ("page=0", "page"), ("page=x", "page"), ("size=7", "size"),
    ("queue=nope", "queue"), ("from=2026-13-01", "from"), ("from=2026-03-10&to=2026-03-01", "to"),
    ("practitioner=Patient/1", "practitioner"), ("status=maybe", "status"), ("class=odd", "class"),
    ("reviewed=yes", "reviewed"), ("patient=Patient/1", "patient"), ("payer=a%20b", "payer"),
    ("to=9999-12-31", "to"), ("from=0001-01-01", "from"),  # edge-of-calendar dates overflowed (a 500, found by fuzzing)
])
def test_bad_parameters_are_a_400_page_naming_them(coder: FlaskClient, query: str, name: str) -> None:
    for path in ("/worklist/", "/worklist/export.csv"):
        answer = coder.get(f"{path}?{query}")
        assert answer.status_code == 400
        assert answer.mimetype == "text/html"
        assert error_text(answer.text).startswith(f"{name}:")


@pytest.mark.parametrize("query", ["from=03/01/2026", "from=0001-01-01", "to=9999-12-31"])
def test_analytics_refuses_bad_dates(coder: FlaskClient, query: str) -> None:
    answer = coder.get(f"/worklist/analytics?{query}")
    assert answer.status_code == 400 and error_text(answer.text).startswith(query.split("=")[0] + ":")


# ---------------------------------------------------------------------------------------------------------------
# Detail and actions
# ---------------------------------------------------------------------------------------------------------------
def test_detail_shows_criteria_card_and_filing_days_with_safe_markdown(wl: Flask, coder: FlaskClient) -> None:
    seed(wl, [item(
        "d000000000000001",
        criteria='[{"id": "consent", "status": "not-met", "detail": "No consent found", '
                 '"evidence": ["Consent/k-1", "DocumentReference/d-2"]}, '
                 '{"id": "established-patient", "status": "met", "detail": "Seen in 2025", "evidence": []}]',
        card_summary="Not billable: consent <b>missing</b>",
        card_detail="First **paragraph** <script>alert(1)</script>\n\n- one\n- <img src=x onerror=alert(1)>",
        card_indicator="warning", timely_filing_deadline=date(2026, 3, 20))])
    html = coder.get("/worklist/item/d000000000000001").text
    assert "<script>" not in html and "<img" not in html and "<b>missing" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<p>First <strong>paragraph</strong>" in html
    assert "<li>one</li>" in html and "<li>&lt;img src=x onerror=alert(1)&gt;</li>" in html
    assert re.search(r'<th scope="row">consent</th>\s*<td><span class="status status-not-met">not-met</span>', html)
    assert "Consent/k-1" in html and "DocumentReference/d-2" in html
    assert "10 days left" in html
    for form in ("review-form", "assign-form", "note-form", "reopen-form"):
        fields = form_fields(html, form)
        assert fields["csrf_token"] and fields["nonce"]
    assert '<select id="reason" name="reason"' in html and 'value="payer-confirmed"' in html


def test_unknown_and_malformed_items(coder: FlaskClient) -> None:
    assert coder.get("/worklist/item/ffffffffffffffff").status_code == 404
    assert coder.get("/worklist/item/bad%20id").status_code == 400


def test_review_assign_note_reopen_are_recorded_with_post_redirect_get(wl: Flask, coder: FlaskClient) -> None:
    seed(wl, [item("e000000000000001")])
    url = "/worklist/item/e000000000000001"
    steps = [("review-form", "review", {"reason": "other", "comment": "Phoned the payer"}, "Marked reviewed."),
             ("assign-form", "assign", {"assignee": "maria"}, "Assigned to maria."),
             ("note-form", "note", {"note": "Charge next week"}, "Note added."),
             ("reopen-form", "reopen", {}, "Reopened.")]
    for form, action, data, message in steps:
        page = coder.get(url).text
        answer = coder.post(f"{url}/{action}", data={**form_fields(page, form), **data})
        assert answer.status_code == 303 and answer.headers["Location"] == url
        shown = coder.get(url).text
        assert re.search(rf'role="status"[^>]*>\s*<p>{re.escape(message)}</p>', shown)
    html = coder.get(url).text
    assert len(trail(wl, "e000000000000001")) == 4
    assert "Phoned the payer" in html and "Charge next week" in html and "maria" in html
    assert "operator" in html  # the actor of a token sign-in


def test_a_replayed_form_is_refused_and_stores_nothing(wl: Flask, coder: FlaskClient) -> None:
    seed(wl, [item("f000000000000001")])
    url = "/worklist/item/f000000000000001"
    fields = form_fields(coder.get(url).text, "note-form")
    assert coder.post(f"{url}/note", data={**fields, "note": "once"}).status_code == 303
    again = coder.post(f"{url}/note", data={**fields, "note": "twice"})
    assert again.status_code == 409
    assert "already submitted" in error_text(again.text)
    assert len(trail(wl, "f000000000000001")) == 1


def test_a_missing_or_forged_csrf_token_is_refused(wl: Flask, coder: FlaskClient) -> None:
    seed(wl, [item("f000000000000002")])
    url = "/worklist/item/f000000000000002"
    fields = form_fields(coder.get(url).text, "note-form")
    missing = coder.post(f"{url}/note", data={"nonce": fields["nonce"], "note": "x"})
    assert missing.status_code == 400
    forged = coder.post(f"{url}/note", data={"nonce": fields["nonce"], "csrf_token": "forged.token", "note": "x"})
    assert forged.status_code == 400
    # Another session's valid token is no good either.
    other = wl.test_client()
    sign_in(wl, other)
    theirs = form_fields(other.get(url).text, "note-form")
    assert coder.post(f"{url}/note", data={**theirs, "note": "x"}).status_code == 400
    assert trail(wl, "f000000000000002") == []


def test_a_viewer_reads_but_cannot_act(wl: Flask) -> None:
    seed(wl, [item("f000000000000003")])
    coder_client = wl.test_client()
    sign_in(wl, coder_client)
    fields = form_fields(coder_client.get("/worklist/item/f000000000000003").text, "note-form")
    viewer = wl.test_client()
    sign_in_as_viewer(wl, viewer)
    page = viewer.get("/worklist/item/f000000000000003")
    assert page.status_code == 200 and 'id="note-form"' not in page.text and 'id="review-form"' not in page.text
    assert "(<span class=\"role\">viewer</span>)" in page.text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf
    for action in ("review", "assign", "note", "reopen"):
        answer = viewer.post(f"/worklist/item/f000000000000003/{action}",
                             data={"csrf_token": csrf.group(1), "nonce": fields["nonce"], "reason": "other",
                                   "comment": "x", "note": "x", "assignee": "x"})
        assert answer.status_code == 403
    assert trail(wl, "f000000000000003") == []
    assert coder_client.post("/worklist/item/f000000000000003/note",
                             data={**fields, "note": "the coder's form still works"}).status_code == 303


@pytest.mark.parametrize(("action", "data", "name"), [
    ("review", {"reason": "made-up"}, "reason"), ("review", {}, "reason"),
    ("review", {"reason": "other"}, "comment"), ("note", {"note": "  "}, "note"),
    ("note", {"note": "x" * 2001}, "note"), ("assign", {"assignee": "a\x00b"}, "assignee"),
])
def test_bad_form_fields_are_400_and_do_not_burn_the_form(wl: Flask, coder: FlaskClient, action: str,
                                                          data: dict[str, str], name: str) -> None:
    seed(wl, [item("f000000000000004")])
    url = "/worklist/item/f000000000000004"
    fields = form_fields(coder.get(url).text, f"{action}-form")
    answer = coder.post(f"{url}/{action}", data={**fields, **data})
    assert answer.status_code == 400 and error_text(answer.text).startswith(f"{name}:")
    assert trail(wl, "f000000000000004") == []
    fixed = {"review": {"reason": "payer-confirmed"}, "note": {"note": "ok"}, "assign": {"assignee": "ok"}}[action]
    assert coder.post(f"{url}/{action}", data={**fields, **fixed}).status_code == 303


def test_an_action_on_an_unknown_item_is_404(wl: Flask, coder: FlaskClient) -> None:
    seed(wl, [item("f000000000000005")])
    fields = form_fields(coder.get("/worklist/item/f000000000000005").text, "note-form")
    assert coder.post("/worklist/item/0000000000000000/note", data={**fields, "note": "x"}).status_code == 404


# ---------------------------------------------------------------------------------------------------------------
# Export, analytics
# ---------------------------------------------------------------------------------------------------------------
def test_csv_export_of_the_current_view_neutralises_formulas(wl: Flask, coder: FlaskClient) -> None:
    seed(wl, [
        item("g000000000000001", reason="=HYPERLINK(\"http://evil\")", question="@SUM(A1)", estimated_amount=-3.0),
        item("g000000000000002", reason="+1", question="\tTAB", practitioner_ref="Practitioner/dr-b"),
        item("g000000000000003", queue="at-risk", status="not-billable", reason="-2"),
    ])
    answer = coder.get("/worklist/export.csv?queue=due&sort=deadline")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert answer.headers["Content-Disposition"] == 'attachment; filename="worklist-due-2026-03-10.csv"'
    rows = list(csv.DictReader(io.StringIO(answer.data.decode("utf-8"))))
    assert [r["item_id"] for r in rows] == ["g000000000000001", "g000000000000002"]
    assert rows[0]["reason"] == "'=HYPERLINK(\"http://evil\")" and rows[0]["question"] == "'@SUM(A1)"
    assert rows[1]["reason"] == "'+1" and rows[1]["question"] == "'\tTAB"
    assert rows[0]["estimated_amount"] == "-3.0"  # a number stays a number
    filtered = coder.get("/worklist/export.csv?queue=due&practitioner=Practitioner/dr-b").data.decode()
    assert [r["item_id"] for r in csv.DictReader(io.StringIO(filtered))] == ["g000000000000002"]
    empty = coder.get("/worklist/export.csv?queue=review").data.decode()
    assert empty.startswith("item_id,queue,") and empty.count("\n") == 1


def test_analytics_plots_carry_title_desc_and_their_numbers(wl: Flask, coder: FlaskClient) -> None:
    seed(wl, [item("h000000000000001", queue="to-charge", status="billable", estimated_amount=40.0),
              item("h000000000000002", queue="at-risk", status="not-billable", estimated_amount=25.5,
                   received_at=datetime(2026, 2, 3, 9, 0, tzinfo=NY))])
    html = coder.get("/worklist/analytics").text
    svg = re.search(r'<svg id="money-by-month" role="img".*?</svg>', html, re.S)
    assert svg and "<title" in svg.group(0) and "<desc" in svg.group(0)
    table = re.search(r'<table id="money-by-month-table">.*?</table>', html, re.S)
    assert table
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", table.group(0))
    assert cells == ["2026-02", "$0.00", "0", "$25.50", "1", "2026-03", "$40.00", "1", "$0.00", "0"]
    assert "No cards shown in this period." in html  # no feedback stored yet
    only_march = coder.get("/worklist/analytics?from=2026-03-01").text
    assert "2026-02" not in only_march


# ---------------------------------------------------------------------------------------------------------------
# Headers, errors, privacy
# ---------------------------------------------------------------------------------------------------------------
def test_security_headers_on_pages_and_error_pages(wl: Flask, coder: FlaskClient) -> None:
    for answer in (coder.get("/worklist/"), coder.get("/worklist/?sort=x"), coder.get("/worklist/no-such-page"),
                   wl.test_client().get("/worklist/login")):
        csp = answer.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
        assert answer.headers["Cache-Control"] == "no-store"
        assert answer.mimetype == "text/html"
    missing = coder.get("/worklist/no-such-page")
    assert missing.status_code == 404 and "<h1>Not found" in missing.text


def test_the_cds_hooks_api_keeps_its_json_errors(wl: Flask) -> None:
    client = wl.test_client()
    answer = client.get("/cds-services/no-such-service/x")
    assert answer.status_code == 404 and answer.json["resourceType"] == "OperationOutcome"
    assert "Content-Security-Policy" not in answer.headers
    assert "Set-Cookie" not in client.get("/cds-services").headers


def test_a_disabled_worklist_is_not_served(make_app: Callable[..., Flask]) -> None:
    app = make_app({"worklist": {"enabled": False}})
    answer = app.test_client().get("/worklist/")
    assert answer.status_code == 404 and answer.json["resourceType"] == "OperationOutcome"


def test_the_session_cookie_is_httponly_lax_and_scoped(wl: Flask) -> None:
    answer = wl.test_client().get("/worklist/login")
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/worklist" in cookie
    assert "Secure" not in cookie  # plain http on loopback (cookie_secure: auto)
    over_https = wl.test_client().get("/worklist/login", base_url="https://localhost")
    assert "Secure" in over_https.headers["Set-Cookie"]


def test_no_patient_reference_in_urls_or_log_lines(wl: Flask, coder: FlaskClient,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    seed(wl, [item("i000000000000001"), item("i000000000000002", queue="review", status="needs-review",
                                             question="Was the visit related?")])
    caplog.set_level(logging.INFO, logger="g2250_cds")
    pages = [coder.get("/worklist/").text, coder.get("/worklist/?queue=review").text,
             coder.get("/worklist/item/i000000000000001").text]
    for html in pages:
        for url in re.findall(r'(?:href|action)="([^"]*)"', html):
            assert "pat-secret" not in url and "Patient" not in url
    assert PATIENT in pages[2]  # shown on the page itself, to the signed-in coder
    fields = form_fields(pages[2], "note-form")
    coder.post("/worklist/item/i000000000000001/note", data={**fields, "note": f"called {PATIENT}"})
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert any(json.loads(line).get("route") == "/worklist/item/<item_id>" for line in lines)
    for line in lines:
        assert "pat-secret" not in line and "operator" not in line and "token=" not in line


def test_the_list_costs_the_same_queries_whatever_the_rows(wl: Flask, coder: FlaskClient) -> None:
    """Issue 15's p95 ≤ 200 ms with 10,000 open rows is measured by ``bench.worklist`` in a server of its own; here,
    what keeps it there on any machine: with 10,000 open rows, every view of the list runs the same few queries
    whatever its filter, sort, page or page size — none per row (the rows' countdowns and filing days are computed
    from the page's own rows)."""
    start = datetime(2026, 1, 5, 9, 0, tzinfo=NY)
    seed(wl, [item(f"p{i:015d}", deadline_at=start + timedelta(minutes=17 * i),
                   practitioner_ref=f"Practitioner/dr-{i % 40}", payer_profile=f"payer-{i % 7}",
                   assignee=None) for i in range(10_000)])
    engine = wl.extensions["g2250_runtime"].store.engine
    coder.get("/worklist/")  # warm up
    counts = {}
    for query in ("", "?sort=amount", "?practitioner=Practitioner/dr-3", "?page=50", "?size=200", "?size=25"):
        with counted_statements(engine) as statements:
            answer = coder.get(f"/worklist/{query}")
        assert answer.status_code == 200
        assert answer.text.count("data-item-id=") == (200 if query == "?size=200" else 25 if query == "?size=25"
                                                        else 50)
        counts[query] = len(statements)
    assert len(set(counts.values())) == 1 and counts[""] <= 10, counts


def test_times_and_dates_use_the_practice_time_zone(wl: Flask, coder: FlaskClient, clock: list[datetime]) -> None:
    clock[0] = datetime(2026, 3, 11, 3, 30, tzinfo=UTC)  # still 10 March at the practice (23:30)
    sign_in(wl, coder)
    seed(wl, [item("j000000000000001", timely_filing_deadline=date(2026, 3, 11))])
    assert "1 day left" in coder.get("/worklist/").text


_PARAMETERS = ("queue", "practitioner", "organization", "payer", "status", "class", "from", "to", "assignee",
               "reviewed", "sort", "dir", "page", "size", "patient")
_TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=60),
    st.sampled_from(["", "0", "-1", "1e9", "9" * 40, "0001-01-01", "9999-12-31", "2026-02-30", "due", "to-charge",
                     "deadline", "asc", "desc", "Practitioner/p-1", "x" * 3000]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.dictionaries(st.sampled_from(_PARAMETERS), _TEXT, max_size=4),
       path=st.sampled_from(["/worklist/", "/worklist/export.csv", "/worklist/analytics"]))
def test_no_query_string_makes_a_page_fail(coder: FlaskClient, query: dict[str, str], path: str) -> None:
    """Whatever a URL says, a page answers 200 or a 400 naming a parameter — never a 500."""
    answer = coder.get(path, query_string=query)
    assert answer.status_code in (200, 400), (answer.status_code, query)
    if answer.status_code == 400:
        assert error_text(answer.text).split(":", 1)[0] in _PARAMETERS
