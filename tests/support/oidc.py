"""A real OpenID Connect provider for the tests, and a programmatic login through it.

The provider is panva's ``oidc-provider`` (OpenID Certified; ``tests/support/oidc_provider/``, a Node.js project
installed by ``npm ci``) with our accounts and clients (``config.json`` there) and our one-form login page. It runs
as a subprocess on 127.0.0.1 and a port it picks itself (announced on its stdout, so no port race), in memory:
each :func:`start_provider` is a fresh identity provider with fresh signing keys.

:func:`follow_login` signs a ``requests.Session`` in the way a browser does: follow the redirects from a relying
party's login URL to the provider, post the login form, follow the redirects back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

from tests.support.browser import NODE_PROJECT, require_node
from tests.support.served import stop_process_group

DEFAULT_CONFIG = NODE_PROJECT / "config.json"
PROVIDER_JS = NODE_PROJECT / "provider.js"
CLIENT_ID = "g2250-worklist"

#: The test accounts (user name → password, roles) of ``config.json``.
ACCOUNTS: dict[str, dict[str, Any]] = json.loads(DEFAULT_CONFIG.read_text("utf-8"))["accounts"]


@dataclass
class OidcProvider:
    """A running test provider: its issuer URL, the registered client, its process and what it printed."""

    issuer: str
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    process: subprocess.Popen[bytes]
    output: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    def discovery(self) -> dict[str, Any]:
        response = requests.get(f"{self.issuer}/.well-known/openid-configuration", timeout=5)
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document

    def log(self) -> str:
        return "".join(self.output)[-3000:]

    def write_secret(self, path: Path) -> Path:
        """The client secret in a file (the worklist reads ``oidc.client_secret_file``), mode 0600."""
        path.write_text(self.client_secret + "\n", "utf-8")
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        stop_process_group(self.process, grace=10)
        for thread in self.readers:
            thread.join(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def _drain(stream: Any, sink: list[str]) -> None:
    for line in iter(stream.readline, b""):
        sink.append(line.decode("utf-8", "replace"))


def start_provider(work_dir: Path, *, redirect_uris: list[str],
                   post_logout_redirect_uris: list[str] | None = None, timeout: float = 20.0) -> OidcProvider:
    """Start the provider with ``config.json``'s accounts and its one client registered for ``redirect_uris``;
    returns once its discovery document answers. Skips (or fails under ``G2250_REQUIRE_BROWSER=1``) without Node.js
    or the installed packages."""
    node = require_node()
    config = json.loads(DEFAULT_CONFIG.read_text("utf-8"))
    client = config["clients"][0]
    client["redirect_uris"] = list(redirect_uris)
    client["post_logout_redirect_uris"] = list(post_logout_redirect_uris or [])
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "oidc-provider.json"
    config_path.write_text(json.dumps(config), "utf-8")
    process = subprocess.Popen([node, str(PROVIDER_JS), str(config_path), "0"], cwd=NODE_PROJECT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "NODE_ENV": "test"})
    assert process.stdout is not None and process.stderr is not None
    errors: list[str] = []
    readers = [threading.Thread(target=_drain, args=(process.stderr, errors), daemon=True)]
    readers[0].start()
    first = process.stdout.readline().decode("utf-8", "replace")  # {"issuer": ...} once listening
    provider = None
    try:
        issuer = json.loads(first)["issuer"]
        provider = OidcProvider(issuer, client["client_id"], client["client_secret"], list(redirect_uris),
                                process, errors, readers)
        readers.append(threading.Thread(target=_drain, args=(process.stdout, errors), daemon=True))
        readers[-1].start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if provider.discovery().get("issuer") == issuer:
                    return provider
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
    except Exception as exc:
        time.sleep(0.2)
        if provider is not None:
            provider.stop()
        else:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
            readers[0].join(timeout=5)
            process.stdout.close()
            process.stderr.close()
        raise RuntimeError(f"the test OIDC provider did not start: {first!r} {''.join(errors)[-3000:]}") from exc


@contextmanager
def running_provider(work_dir: Path, *, redirect_uris: list[str],
                     post_logout_redirect_uris: list[str] | None = None) -> Iterator[OidcProvider]:
    provider = start_provider(work_dir, redirect_uris=redirect_uris,
                              post_logout_redirect_uris=post_logout_redirect_uris)
    try:
        yield provider
    finally:
        provider.stop()


class _LoginForm(HTMLParser):
    """The provider's ``form#login-form``: its action and its fields, and the error shown (``role=alert``)."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.error: str | None = None
        self._in_form = False
        self._in_alert = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form" and values.get("id") == "login-form":
            self._in_form = True
            self.action = values.get("action") or ""
        elif tag == "input" and self._in_form and values.get("name"):
            self.fields[values["name"] or ""] = values.get("value") or ""
        elif values.get("role") == "alert":
            self._in_alert = True
            self.error = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False
        self._in_alert = False

    def handle_data(self, data: str) -> None:
        if self._in_alert and self.error is not None:
            self.error += data


class LoginRefused(AssertionError):
    """The provider showed its login form again: unknown user or wrong password (its message attached)."""


@dataclass
class LoginResult:
    url: str                              # where the redirects ended (or ``stop_at`` matched)
    response: requests.Response | None    # the last answer fetched; None when stopped at ``stop_at``
    steps: list[str]                      # every URL visited, in order (for assertions on the flow)


def follow_login(session: requests.Session, url: str, username: str, password: str, *,
                 stop_at: str | None = None, max_steps: int = 20) -> LoginResult:
    """GET ``url`` and follow redirects as a browser would; post ``username``/``password`` to the provider's login
    form when it is shown; go on until a page that is not a redirect, or until a redirect to a URL starting with
    ``stop_at`` (returned without being fetched: a relying party's callback that a test wants to call itself).
    :class:`LoginRefused` when the provider refuses the credentials."""
    steps = [url]
    response = session.get(url, allow_redirects=False, timeout=10)
    posted = False
    for _ in range(max_steps):
        if response.is_redirect:
            target = urljoin(response.url, response.headers["Location"])
            steps.append(target)
            if stop_at is not None and target.startswith(stop_at):
                return LoginResult(target, None, steps)
            response = session.get(target, allow_redirects=False, timeout=10)
            continue
        form = _LoginForm()
        form.feed(response.text if "html" in response.headers.get("Content-Type", "") else "")
        if form.action is None:
            return LoginResult(response.url, response, steps)
        if posted:
            raise LoginRefused(f"login refused for {username!r}: {(form.error or '').strip()} (HTTP "
                               f"{response.status_code})")
        target = urljoin(response.url, form.action)
        steps.append(target)
        response = session.post(target, data={**form.fields, "login": username, "password": password},
                                allow_redirects=False, timeout=10)
        posted = True
    raise AssertionError(f"more than {max_steps} redirects: {steps}")
