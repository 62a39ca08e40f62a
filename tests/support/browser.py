"""A real browser for the worklist's tests: Debian's Chromium driven by Playwright for Python, and axe-core.

Playwright's own browser downloads cannot be fetched on these machines (only PyPI, Debian and npm are reachable),
so the tests drive the distribution's ``/usr/bin/chromium`` (``executable_path``), headless, with a new empty
profile each time and the flags that stop its background traffic (update checks, sync, field trials, QUIC): the
browser talks to loopback only, and :class:`LoopbackGuard` aborts and records any request that would leave the
machine, so a page that pulls a font or a script from the internet fails its test instead of phoning out.

axe-core (Deque's accessibility engine, the one Lighthouse and the axe browser extensions run) comes from the npm
package installed beside the test identity provider (``tests/support/oidc_provider``, ``npm ci``). It is evaluated
through the DevTools protocol, not injected as a ``<script>``, so the page's Content-Security-Policy stays in force
for everything else the test checks.

Missing tools skip a test with the reason on a developer machine and fail it when ``G2250_REQUIRE_BROWSER=1``
(set by ``.ci/run``): a green CI run always includes the browser tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page, Playwright, Route

REQUIRE_BROWSER = os.environ.get("G2250_REQUIRE_BROWSER") == "1"
CHROMIUM = os.environ.get("G2250_CHROMIUM", "/usr/bin/chromium")
NODE_PROJECT = Path(__file__).parent / "oidc_provider"
AXE_JS = NODE_PROJECT / "node_modules" / "axe-core" / "axe.min.js"

#: Chromium flags: headless, no GPU, and none of the background services that call Google (component updater,
#: sync, variations/field trials, safe browsing lists...) — ``--disable-background-networking`` covers most;
#: QUIC off so every request is plain HTTP the guard sees. ``--no-sandbox``: CI runs as root, where Chromium's
#: sandbox refuses to start.
CHROMIUM_ARGS: tuple[str, ...] = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                  "--disable-background-networking", "--disable-component-update",
                                  "--disable-sync")

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

#: axe impacts that fail a page (axe's scale: minor < moderate < serious < critical).
FAILING_IMPACTS = frozenset({"serious", "critical"})


def unavailable(reason: str) -> None:
    """Skip the test with ``reason``, or fail it when the browser tests are required (``G2250_REQUIRE_BROWSER=1``)."""
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason} (G2250_REQUIRE_BROWSER=1: .ci/run installs it)")
    pytest.skip(reason)


def require_browser() -> None:
    """Chromium, Playwright and axe-core are all there, else :func:`unavailable`."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium; or set G2250_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("Playwright for Python is not installed (pip install -e '.[test]')")
    if not AXE_JS.is_file():
        unavailable(f"axe-core not installed at {AXE_JS} (cd {NODE_PROJECT} && npm ci)")


def require_node() -> str:
    """The ``node`` executable with the test project's packages installed, else :func:`unavailable`."""
    node = shutil.which("node")
    if node is None:
        unavailable("Node.js is not installed (apt-get install nodejs npm)")
    if not (NODE_PROJECT / "node_modules" / "oidc-provider").is_dir():
        unavailable(f"the test identity provider's packages are not installed (cd {NODE_PROJECT} && npm ci)")
    return str(node)


@dataclass
class LoopbackGuard:
    """Every request the browser context makes: loopback ones go through, any other is aborted and kept in
    ``refused`` (scheme and host only: URLs of the worklist never carry PHI, but an outside URL is not ours to
    log whole)."""

    seen: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def route(self, route: Route) -> None:
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about") or (parts.hostname or "") in LOOPBACK_HOSTS:
            self.seen.append(url)
            route.continue_()
        else:
            self.refused.append(f"{parts.scheme}://{parts.hostname}")
            route.abort("blockedbyclient")

    def assert_loopback_only(self) -> None:
        assert not self.refused, f"the page tried to reach non-loopback hosts: {sorted(set(self.refused))}"
        assert self.seen, "no request went through the guard: is it installed?"


@dataclass
class Browser:
    """One headless Chromium with its own empty profile, the guard on every request and the page errors seen."""

    context: BrowserContext
    guard: LoopbackGuard
    errors: list[str] = field(default_factory=list)  # uncaught exceptions and console errors (CSP violations...)

    def new_page(self) -> Page:
        page = self.context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)
        page.on("response", self._response)
        return page

    def _console(self, message: Any) -> None:
        # Chromium logs every HTTP error status as "Failed to load resource"; a page answered 403 or 404 on
        # purpose is the test's to judge, and a failing sub-resource is caught by _response.
        if message.type == "error" and not message.text.startswith("Failed to load resource: the server responded"):
            self.errors.append(f"console: {message.text}")

    def _response(self, response: Any) -> None:
        if response.status >= 400 and response.request.resource_type != "document":
            self.errors.append(f"{response.request.resource_type} {urlsplit(response.url).path}: HTTP "
                               f"{response.status}")


@contextmanager
def chromium(playwright: Playwright, profile_dir: Path, *, downloads_dir: Path | None = None,
             viewport: dict[str, int] | None = None) -> Iterator[Browser]:
    """Debian's Chromium, headless, on a new empty user data dir ``profile_dir``, every request through a
    :class:`LoopbackGuard`. Closes the browser on exit."""
    require_browser()
    profile_dir.mkdir(parents=True, exist_ok=True)
    assert not any(profile_dir.iterdir()), f"profile dir {profile_dir} is not empty"
    context = playwright.chromium.launch_persistent_context(
        str(profile_dir), executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS),
        accept_downloads=True, downloads_path=str(downloads_dir) if downloads_dir else None,
        viewport=viewport or {"width": 1280, "height": 900}, locale="en-US", timezone_id="America/New_York")
    guard = LoopbackGuard()
    context.route("**/*", guard.route)
    context.set_default_timeout(15_000)
    browser = Browser(context, guard)
    try:
        yield browser
    finally:
        context.close()


def axe_violations(page: Page, *, impacts: frozenset[str] = FAILING_IMPACTS) -> list[dict[str, Any]]:
    """axe-core's violations on the page as it is now, those of the given ``impacts`` only (WCAG 2.x A/AA rules
    and axe's best practices, its defaults). Each: rule id, impact, help text and the failing nodes' selectors."""
    require_browser()
    if not page.evaluate("() => typeof window.axe === 'object'"):
        # Evaluated through CDP: not subject to the page's CSP, unlike a <script> tag.
        page.evaluate(f"() => {{ {AXE_JS.read_text('utf-8')}\n }}")
        if not page.evaluate("() => typeof window.axe === 'object'"):
            page.evaluate("() => { window.axe = axe; }")
    result = page.evaluate("async () => { const r = await window.axe.run(document, {resultTypes: ['violations']});"
                           " return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
                           " nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)})); }")
    return [violation for violation in result if violation.get("impact") in impacts]


def assert_accessible(page: Page, what: str) -> None:
    """No serious or critical axe-core violation on ``page`` (``what`` names it in the failure)."""
    violations = axe_violations(page)
    assert not violations, f"axe-core: serious/critical violations on {what}: " + "; ".join(
        f"{v['id']} ({v['impact']}): {v['help']} at {v['nodes']}" for v in violations)
