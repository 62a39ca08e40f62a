"""The billing worklist in a real browser, as a coder works it: sign in, find the overdue review, act on it, export.

Debian's Chromium (headless, Playwright, tests/support/browser.py) against ``g2250-cds serve`` in its own process
(gunicorn; tests/support/worklist_server.py), twice: with the embedded defaults (SQLite, a one-time token printed
by ``serve``) and with PostgreSQL and OpenID Connect sign-in at a real provider (panva's oidc-provider;
tests/support/oidc.py). The data: synthetic rows (bench/worklist_seed.py) and rows made through a real door,
CDS Hooks calls POSTed to the served app with the fixture requests' prefetch, whose determinations reach the
worklist through the determination log. Every page is checked with axe-core (no serious or critical violation) and
every request the browser made went to loopback.

``G2250_SCREENSHOTS=DIR`` also saves the README's screenshots (login, list, detail, analytics) into DIR
(docs/screenshots).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import sqlalchemy as sa

from bench.worklist_seed import seed
from tests.conftest import fresh_postgres_schema
from tests.support.browser import Browser, LoopbackGuard, assert_accessible, axe_violations, chromium, require_browser
from tests.support.oidc import ACCOUNTS, OidcProvider, start_provider
from tests.support.worklist_server import ServedWorklist, start_worklist_server

if TYPE_CHECKING:  # playwright itself is imported once the browser is known to be there
    from playwright.sync_api import Page, Playwright

REQUESTS = Path(__file__).resolve().parent.parent / "fhir_fixtures" / "requests"
SCREENSHOTS = os.environ.get("G2250_SCREENSHOTS")
N_SEEDED = 60


# -- the served worklists ---------------------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    served: ServedWorklist
    provider: OidcProvider | None
    hook_items: set[str]  # item ids of the rows the hook calls' determinations made

    def sign_in(self, page: Page, username: str = "coder1") -> None:
        """Sign in as a person would: the printed one-time URL's token typed into the login form (token mode), or
        the provider's login form (OIDC)."""
        if self.provider is None:
            token = parse_qs(urlsplit(self.served.login_url()).query)["token"][0]
            page.goto(f"{self.served.base_url}/worklist/login")
            _shoot(page, "login")
            assert_accessible(page, "the login page")
            page.fill("#token-form input[name=token]", token)
            page.locator("#token-form button[type=submit]").click()
        else:
            page.goto(f"{self.served.base_url}/worklist/login")  # → the provider's login page
            assert page.url.startswith(self.provider.issuer + "/interaction/")
            page.fill("#login-form input[name=login]", username)
            page.fill("#login-form input[name=password]", ACCOUNTS[username]["password"])
            page.locator("#login-submit").click()
        page.wait_for_url(re.compile(r".*/worklist/(\?.*)?$"))
        assert page.locator("#whoami").is_visible()


def _call_hooks(served: ServedWorklist) -> set[str]:
    """The two fixture requests whose determinations open rows (a reply due, a charge to make), POSTed to the
    served app; the item ids their determinations produced, read back from the worklist table once the
    determination log has been copied (a background thread: poll)."""
    engine = sa.create_engine(served.database_url)
    table = sa.table("worklist_items", sa.column("item_id"), sa.column("source"))
    try:
        with engine.connect() as conn:
            before = set(conn.execute(sa.select(table.c.item_id)).scalars())
        for name in ("encounter-start.json", "encounter-discharge.json"):
            cards = served.call_hook(json.loads((REQUESTS / name).read_text("utf-8")))["cards"]
            assert cards, f"{name}: no card"
        deadline = time.monotonic() + 15
        while True:
            with engine.connect() as conn:
                new = set(conn.execute(sa.select(table.c.item_id).where(table.c.source == "hook")).scalars()) - before
            if len(new) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        engine.dispose()
    assert len(new) == 2, f"the hook calls' determinations did not reach the worklist: {new}"
    return new


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def token_scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """The embedded defaults: SQLite, token sign-in."""
    require_browser()
    work = tmp_path_factory.mktemp("token-sqlite")
    served = start_worklist_server(work)
    try:
        seed(served.database_url, N_SEEDED, now=datetime.now(UTC), seed=1)
        yield Scenario("token-sqlite", served, None, _call_hooks(served))
    finally:
        served.stop()


@pytest.fixture(scope="module")
def postgres_schema() -> Iterator[str]:
    with fresh_postgres_schema("g2250_browser_") as url:
        yield url


@pytest.fixture(scope="module")
def oidc_scenario(tmp_path_factory: pytest.TempPathFactory, postgres_schema: str) -> Iterator[Scenario]:
    """Production-like: PostgreSQL, OpenID Connect sign-in at the real provider."""
    require_browser()
    from tests.support.fhir_server import free_port

    work = tmp_path_factory.mktemp("oidc-postgres")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    provider = start_provider(work / "op", redirect_uris=[f"{base}/worklist/auth/callback"],
                              post_logout_redirect_uris=[f"{base}/worklist/login"])
    try:
        secret = provider.write_secret(work / "client-secret")
        served = start_worklist_server(work, database_url=postgres_schema, port=port, workers=2, config={
            "worklist": {"login": "oidc", "oidc": {
                "issuer": provider.issuer, "client_id": provider.client_id, "client_secret_file": str(secret),
                "roles_claim": "roles", "coder_roles": ["coder"], "viewer_roles": ["viewer"]}}})
        try:
            seed(served.database_url, N_SEEDED, now=datetime.now(UTC), seed=2)
            yield Scenario("oidc-postgres", served, provider, _call_hooks(served))
        finally:
            served.stop()
    finally:
        provider.stop()


@pytest.fixture
def browser(playwright: Playwright, tmp_path: Path) -> Iterator[Browser]:
    with chromium(playwright, tmp_path / "profile", downloads_dir=tmp_path / "downloads") as opened:
        yield opened
    assert not opened.guard.refused, f"the page tried to reach non-loopback hosts: {sorted(set(opened.guard.refused))}"
    assert not opened.errors, f"errors in the page: {opened.errors}"


def _shoot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=False)


def _rows(page: Page) -> list[tuple[str, bool]]:
    """(item id, overdue?) of every row of the table, in order."""
    return [(row.get_attribute("data-item-id") or "", "overdue" in (row.get_attribute("class") or "").split())
            for row in page.locator("#worklist-table tr[data-item-id]").all()]


def _export(page: Page) -> list[dict[str, str]]:
    with page.expect_download() as download_info:
        page.locator("#export-csv").click()
    download = download_info.value
    assert download.suggested_filename.endswith(".csv")
    text = Path(download.path()).read_text("utf-8-sig")
    return list(csv.DictReader(io.StringIO(text)))


# -- the coder's journey ----------------------------------------------------------------------------------------
def _coder_journey(scenario: Scenario, browser: Browser) -> None:
    page = browser.new_page()
    base = scenario.served.base_url

    # Signed out, every page sends the browser to the sign-in.
    for path in ("/worklist/", "/worklist/analytics", "/worklist/export.csv"):
        answer = requests.get(base + path, allow_redirects=False, timeout=10)
        assert answer.status_code in (302, 303), (path, answer.status_code)
        assert urlsplit(answer.headers["Location"]).path == "/worklist/login", path

    scenario.sign_in(page)
    assert "coder" in page.locator("#whoami").inner_text()
    hook_ids = scenario.hook_items

    # Due now: overdue rows first, then the rest by deadline.
    page.locator("a[data-queue=due]").click()
    page.wait_for_url(re.compile(r".*queue=due.*"))
    assert page.locator("a[data-queue=due]").get_attribute("aria-current") == "page"
    rows = _rows(page)
    assert rows, "the Due now queue is empty"
    flags = [overdue for _, overdue in rows]
    assert flags[0], "the first row of Due now is not overdue"
    assert flags == sorted(flags, reverse=True), f"an overdue row after a row that is not: {flags}"
    _shoot(page, "list")
    assert_accessible(page, "the list")

    # Filter by the overdue row's practitioner; the export of that view holds only that practitioner's rows.
    overdue_id = rows[0][0]
    page.locator(f"tr[data-item-id='{overdue_id}'] a.row-link").click()
    page.wait_for_url(re.compile(rf".*/worklist/item/{overdue_id}$"))
    practitioner = _detail_export_value(page, scenario, overdue_id, "practitioner")
    page.go_back()
    page.select_option("#filters select[name=practitioner]", practitioner)
    page.locator("#apply-filters").click()
    page.wait_for_url(re.compile(r".*practitioner=.*"))
    filtered = _rows(page)
    assert overdue_id in [item for item, _ in filtered]
    exported = _export(page)
    assert {row["practitioner"] for row in exported} == {practitioner}
    assert [row["item_id"] for row in exported][:len(filtered)] == [item for item, _ in filtered]
    assert all(row["queue"] == "due" for row in exported)

    # Open the overdue row: criteria, the card, days to timely filing; mark it reviewed with a reason.
    page.locator(f"tr[data-item-id='{overdue_id}'] a.row-link").click()
    page.wait_for_url(re.compile(rf".*/worklist/item/{overdue_id}$"))
    assert page.locator("#timely-filing").inner_text().strip()
    _shoot(page, "detail")
    assert_accessible(page, "the detail page")
    reason_options = [value for value in page.locator("#review-form select[name=reason] option").evaluate_all(
        "options => options.map(o => o.value)") if value]
    assert reason_options, "no override reason to choose"
    comment = f"checked the chart {secrets.token_hex(4)}"
    page.select_option("#review-form select[name=reason]", reason_options[0])
    page.fill("#review-form textarea[name=comment]", comment)
    page.locator("#review-form button[type=submit]").click()
    page.wait_for_load_state()
    assert page.locator("[role=status]").inner_text().strip(), "no confirmation shown"
    trail = page.locator("#audit-trail").inner_text()
    assert "review" in trail and comment in trail

    # It left the open list; the export of the open view no longer has it.
    page.goto(f"{base}/worklist/?queue=due")
    assert overdue_id not in [item for item, _ in _rows(page)]
    assert overdue_id not in {row["item_id"] for row in _export(page)}

    # The rows the hook calls made are there, among the open rows, from the hook.
    everything: list[dict[str, str]] = []
    for queue in ("due", "to-charge", "at-risk", "review"):
        page.goto(f"{base}/worklist/?queue={queue}&size=200")
        everything += _export(page)
    by_id = {row["item_id"]: row for row in everything}
    assert hook_ids <= set(by_id), "the hook calls' rows are not in the worklist"
    assert {by_id[item]["source"] for item in hook_ids} == {"hook"}

    # Analytics: the plots render.
    page.locator("#analytics-link").click()
    page.wait_for_url(re.compile(r".*/worklist/analytics.*"))
    plots = page.locator("svg[role=img]").all()
    assert plots, "no plot"
    for plot in plots:
        box = plot.bounding_box()
        assert box is not None and box["width"] > 0 and box["height"] > 0
    _shoot(page, "analytics")
    assert_accessible(page, "the analytics page")

    browser.guard.assert_loopback_only()

    # Sign out: every page sends the browser to the sign-in again (asked without following the redirect: with
    # OIDC, the provider's own session would sign the browser straight back in, as single sign-on does).
    # The sign-out answers a page of its own (a redirect to the sign-in would, with OIDC, go on to the provider, and
    # the CSP's form-action 'self' blocks a form submission's cross-origin redirects).
    page.locator("#logout-form button[type=submit]").click()
    page.wait_for_url(re.compile(r".*/worklist/logout$"))
    assert page.locator("h1").inner_text() == "Signed out"
    assert_accessible(page, "the signed-out page")
    for path in ("/worklist/", f"/worklist/item/{overdue_id}", "/worklist/analytics", "/worklist/export.csv"):
        answer = page.request.get(base + path, max_redirects=0)
        assert answer.status in (302, 303), (path, answer.status)
        assert urlsplit(answer.headers["location"]).path == "/worklist/login", path


def _detail_export_value(page: Page, scenario: Scenario, item_id: str, column: str) -> str:
    """A column of one row, as the export of the whole open list gives it (the detail page's wording is the web
    layer's to choose; the export's columns are the store's contract)."""
    page.goto(f"{scenario.served.base_url}/worklist/?queue=due&size=200")
    rows = {row["item_id"]: row for row in _export(page)}
    page.goto(f"{scenario.served.base_url}/worklist/item/{item_id}")
    return rows[item_id][column]


def test_a_coder_works_the_overdue_review_with_the_embedded_defaults(token_scenario: Scenario,
                                                                      browser: Browser) -> None:
    _coder_journey(token_scenario, browser)


@pytest.mark.postgres
def test_a_coder_works_the_overdue_review_with_oidc_and_postgresql(oidc_scenario: Scenario,
                                                                    browser: Browser) -> None:
    _coder_journey(oidc_scenario, browser)


@pytest.mark.postgres
def test_a_viewer_reads_but_cannot_act(oidc_scenario: Scenario, browser: Browser) -> None:
    page = browser.new_page()
    oidc_scenario.sign_in(page, "viewer1")
    assert "viewer" in page.locator("#whoami").inner_text()
    item_id = _rows(page)[0][0]
    page.locator(f"tr[data-item-id='{item_id}'] a.row-link").click()
    page.wait_for_url(re.compile(rf".*/worklist/item/{item_id}$"))
    for form in ("review-form", "assign-form", "note-form", "reopen-form"):
        assert page.locator(f"#{form}").count() == 0, f"a viewer sees #{form}"
    assert_accessible(page, "the detail page (viewer)")
    # A well-formed action with the viewer's own valid CSRF token (from the sign-out form) is still refused.
    csrf = page.locator("#logout-form input[name=csrf_token]").get_attribute("value") or ""
    answer = page.request.post(f"{oidc_scenario.served.base_url}/worklist/item/{item_id}/review",
                               form={"csrf_token": csrf, "reason": "clinical-judgement", "comment": "x"},
                               max_redirects=0)
    assert answer.status == 403
    page.reload()
    assert "review" not in page.locator("#audit-trail").inner_text().split()


@pytest.mark.postgres
def test_an_account_without_a_worklist_role_gets_no_session(oidc_scenario: Scenario, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(f"{oidc_scenario.served.base_url}/worklist/login")
    page.fill("#login-form input[name=login]", "nobody1")
    page.fill("#login-form input[name=password]", ACCOUNTS["nobody1"]["password"])
    with page.expect_response(lambda r: "/worklist/auth/callback" in r.url) as callback:
        page.locator("#login-submit").click()
    assert callback.value.status == 403
    assert page.locator("#whoami").count() == 0
    assert_accessible(page, "the refusal page")
    # Back to the list: through the provider's session straight to the same refusal, never a page of rows.
    answer = page.goto(f"{oidc_scenario.served.base_url}/worklist/")
    assert answer is not None and answer.status == 403
    assert page.locator("#worklist-table").count() == 0


# -- the infrastructure catches what it is there to catch -------------------------------------------------------
def _local_page(html: str) -> Any:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_port}/"  # type: ignore[attr-defined]
    return server  # type: ignore[return-value]


def test_the_guard_refuses_the_internet_and_axe_finds_violations(playwright: Playwright, tmp_path: Path) -> None:
    server: Any = _local_page('<!doctype html><html lang="en"><head><title>t</title>'
                              '<link rel="stylesheet" href="https://fonts.example.com/f.css"></head>'
                              '<body><main><h1>t</h1><img src="/x.png"></main></body></html>')
    try:
        with chromium(playwright, tmp_path / "profile") as opened:
            page = opened.new_page()
            page.goto(server.url)
            assert [v["id"] for v in axe_violations(page)] == ["image-alt"]
            with pytest.raises(AssertionError, match="image-alt"):
                assert_accessible(page, "a page with an image without text")
            with pytest.raises(AssertionError, match=r"fonts\.example\.com"):
                opened.guard.assert_loopback_only()
    finally:
        server.shutdown()
        server.server_close()


def test_an_empty_guard_is_not_taken_for_a_pass() -> None:
    with pytest.raises(AssertionError, match="no request"):
        LoopbackGuard().assert_loopback_only()
