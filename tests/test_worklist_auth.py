"""Signing in to the worklist: the one-time token (single use, 15 minutes, loopback clients only), sessions and
their end, logout, the OIDC claim-to-role mapping, the OIDC login redirect (PKCE S256, state, nonce) and the
worklist's config keys. The full OIDC flow against a real provider is in test_worklist_oidc.py."""

from __future__ import annotations

import json
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_service.config import ConfigError, config_from_mapping
from cds_service.worklist import issue_login_token, login_url
from cds_service.worklist.auth import role_for, roles_from_claims, session_secret, user_name
from tests.support.worklist_app import NOW


def token_for(app: Flask, now: datetime = NOW) -> str:
    runtime = app.extensions["g2250_runtime"]
    return issue_login_token(runtime.config, now=now, engine=runtime.store.engine)


def signed_in(client: FlaskClient) -> bool:
    return client.get("/worklist/").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# One-time token
# ---------------------------------------------------------------------------------------------------------------
def test_the_printed_url_signs_in_once_and_strips_the_token(wl: Flask) -> None:
    token = token_for(wl)
    url = login_url("http://127.0.0.1:8250", token)
    assert url == f"http://127.0.0.1:8250/worklist/login?token={token}"
    client = wl.test_client()
    answer = client.get(urlsplit(url).path + "?" + urlsplit(url).query)
    assert answer.status_code == 303 and answer.headers["Location"] == "/worklist/"
    assert signed_in(client)
    assert 'id="whoami"' in client.get("/worklist/").text and "coder" in client.get("/worklist/").text
    second = wl.test_client().get(f"/worklist/login?token={token}")
    assert second.status_code == 403 and "already used" in second.text
    assert not signed_in(wl.test_client())


def test_the_token_form_signs_in_with_csrf(wl: Flask) -> None:
    client = wl.test_client()
    page = client.get("/worklist/login").text
    assert 'id="token-form"' in page and 'name="token"' in page
    csrf = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    token = token_for(wl)
    assert client.post("/worklist/login", data={"token": token}).status_code == 400  # no CSRF token
    answer = client.post("/worklist/login", data={"token": token, "csrf_token": csrf})
    assert answer.status_code == 303 and signed_in(client)


def test_a_wrong_token_is_refused(wl: Flask) -> None:
    token_for(wl)
    client = wl.test_client()
    assert client.get("/worklist/login?token=guess").status_code == 403
    assert client.get("/worklist/login?token=").status_code == 403
    assert not signed_in(client)


@pytest.mark.parametrize(("minutes", "works"), [(14, True), (16, False)])
def test_a_token_expires_after_fifteen_minutes(wl: Flask, minutes: int, works: bool) -> None:
    token = token_for(wl, NOW - timedelta(minutes=minutes))
    client = wl.test_client()
    assert (client.get(f"/worklist/login?token={token}").status_code == 303) is works
    assert signed_in(client) is works


def test_a_new_token_revokes_the_older_one(wl: Flask) -> None:
    old = token_for(wl)
    new = token_for(wl)
    assert wl.test_client().get(f"/worklist/login?token={old}").status_code == 403
    assert wl.test_client().get(f"/worklist/login?token={new}").status_code == 303


@pytest.mark.parametrize("address", ["10.1.2.3", "192.168.0.7", "2001:db8::1"])
def test_token_mode_serves_loopback_clients_only(wl: Flask, address: str) -> None:
    token = token_for(wl)
    client = wl.test_client()
    for path in ("/worklist/", f"/worklist/login?token={token}", "/worklist/login"):
        answer = client.get(path, environ_base={"REMOTE_ADDR": address})
        assert answer.status_code == 403 and answer.mimetype == "text/html"
    # The token was not spent by the refused attempt.
    assert client.get(f"/worklist/login?token={token}", environ_base={"REMOTE_ADDR": "::1"}).status_code == 303


def test_a_session_ends_after_session_minutes(make_app: Callable[..., Flask], clock: list[datetime]) -> None:
    app = make_app({"worklist": {"session_minutes": 30}})
    client = app.test_client()
    client.get(f"/worklist/login?token={token_for(app)}")
    clock[0] = NOW + timedelta(minutes=29)
    assert signed_in(client)
    clock[0] = NOW + timedelta(minutes=31)
    answer = client.get("/worklist/")
    assert answer.status_code == 303 and answer.headers["Location"] == "/worklist/login"


def test_signing_out_ends_every_copy_of_the_session_cookie(wl: Flask) -> None:
    """The cookie is only a key to a server-side session: a copy taken before sign-out (a shared machine, a stolen
    cookie) stops working when its owner signs out."""
    client = wl.test_client()
    client.get(f"/worklist/login?token={token_for(wl)}")
    cookie = client.get_cookie(wl.config["SESSION_COOKIE_NAME"], path="/worklist")
    assert cookie is not None
    thief = wl.test_client()
    thief.set_cookie(cookie.key, cookie.value, path="/worklist")
    assert signed_in(thief)
    page = client.get("/worklist/").text
    csrf = page.split('<form id="logout-form"', 1)[1].split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    assert client.post("/worklist/logout", data={"csrf_token": csrf}).status_code == 200
    assert not signed_in(thief)
    assert thief.get("/worklist/").headers["Location"] == "/worklist/login"


def test_logout_needs_csrf_and_ends_the_session(wl: Flask) -> None:
    client = wl.test_client()
    client.get(f"/worklist/login?token={token_for(wl)}")
    page = client.get("/worklist/").text
    csrf = page.split('<form id="logout-form"', 1)[1].split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    assert client.post("/worklist/logout").status_code == 400
    assert signed_in(client)
    answer = client.post("/worklist/logout", data={"csrf_token": csrf})
    # A page of its own, not a redirect to the sign-in (which, with OIDC, the CSP's form-action would block).
    assert answer.status_code == 200 and "<h1>Signed out</h1>" in answer.text
    assert 'href="/worklist/login"' in answer.text
    assert not signed_in(client)


# ---------------------------------------------------------------------------------------------------------------
# Roles from claims
# ---------------------------------------------------------------------------------------------------------------
OIDC = {"roles_claim": "roles", "coder_roles": ["coder", "billing-coder"], "viewer_roles": ["viewer"]}


@pytest.mark.parametrize(("claims", "oidc", "role"), [
    ({"roles": ["coder"]}, OIDC, "coder"),
    ({"roles": ["viewer", "billing-coder"]}, OIDC, "coder"),  # the stronger role wins
    ({"roles": ["viewer"]}, OIDC, "viewer"),
    ({"roles": "viewer other"}, OIDC, "viewer"),  # a space-separated string
    ({"roles": "a,coder"}, OIDC, "coder"),
    ({"roles": ["nurse"]}, OIDC, None),
    ({"roles": [1, None]}, OIDC, None),
    ({}, OIDC, None),
    ({"realm_access": {"roles": ["viewer"]}}, {**OIDC, "roles_claim": "realm_access.roles"}, "viewer"),
    ({"realm_access": ["viewer"]}, {**OIDC, "roles_claim": "realm_access.roles"}, None),
    ({"https://example.org/roles": ["coder"]}, {**OIDC, "roles_claim": "https://example.org/roles"}, "coder"),
    ({"groups": ["Coder"]}, {**OIDC, "roles_claim": "groups"}, None),  # names are case-sensitive
])
def test_claims_map_to_roles(claims: dict[str, Any], oidc: dict[str, Any], role: str | None) -> None:
    assert role_for(claims, oidc) == role


def test_roles_and_names_from_claims() -> None:
    assert roles_from_claims({"a": {"b": ["x", "y", ""]}}, "a.b") == {"x", "y"}
    assert user_name({"sub": "123", "preferred_username": "maria"}) == "maria"
    assert user_name({"sub": "123", "email": "m@example.org"}) == "m@example.org"
    assert user_name({"sub": "123"}) == "123"


# ---------------------------------------------------------------------------------------------------------------
# OIDC mode
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def discovery() -> Iterator[str]:
    """An OpenID Provider that serves only its discovery document (enough for the login redirect)."""
    holder: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's method name
            if self.path != "/realms/t/.well-known/openid-configuration":
                self.send_error(404)
                return
            issuer = holder["issuer"]
            body = json.dumps({"issuer": issuer, "authorization_endpoint": f"{issuer}/auth",
                               "token_endpoint": f"{issuer}/token", "jwks_uri": f"{issuer}/jwks",
                               "userinfo_endpoint": f"{issuer}/userinfo",
                               "code_challenge_methods_supported": ["S256"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    holder["issuer"] = f"http://127.0.0.1:{server.server_port}/realms/t"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder["issuer"]
    finally:
        server.shutdown()
        server.server_close()


def oidc_app(make_app: Callable[..., Flask], issuer: str) -> Flask:
    return make_app({"worklist": {"login": "oidc", "oidc": {"issuer": issuer, "client_id": "worklist-web"}}})


def test_oidc_login_redirects_with_pkce_state_and_nonce(make_app: Callable[..., Flask], discovery: str) -> None:
    app = oidc_app(make_app, discovery)
    client = app.test_client()
    assert client.get("/worklist/", environ_base={"REMOTE_ADDR": "10.0.0.9"}).headers["Location"] == "/worklist/login"
    answer = client.get("/worklist/login", base_url="https://billing.example.org",
                        environ_base={"REMOTE_ADDR": "10.0.0.9"})  # not loopback-only in OIDC mode
    assert answer.status_code == 302
    target = urlsplit(answer.headers["Location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == f"{discovery}/auth"
    query = {key: values[0] for key, values in parse_qs(target.query).items()}
    assert query["response_type"] == "code" and query["client_id"] == "worklist-web"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["state"] and query["nonce"]
    assert query["redirect_uri"] == "https://billing.example.org/worklist/auth/callback"
    assert query["scope"].split() == ["openid", "profile", "email"]
    assert "Secure" in answer.headers["Set-Cookie"]


def test_an_unverifiable_callback_is_refused_without_a_session(make_app: Callable[..., Flask],
                                                               discovery: str) -> None:
    app = oidc_app(make_app, discovery)
    client = app.test_client()
    client.get("/worklist/login")
    answer = client.get("/worklist/auth/callback?code=abc&state=forged")
    assert answer.status_code == 400 and answer.mimetype == "text/html"
    assert not signed_in(client)
    assert client.get("/worklist/auth/callback?error=access_denied").status_code == 400


def test_oidc_mode_takes_no_token(make_app: Callable[..., Flask], discovery: str) -> None:
    app = oidc_app(make_app, discovery)
    assert app.test_client().get("/worklist/login?token=abc").status_code == 400


def test_an_unreachable_provider_is_a_503_page(make_app: Callable[..., Flask]) -> None:
    app = oidc_app(make_app, "http://127.0.0.1:9/realms/none")
    answer = app.test_client().get("/worklist/login")
    assert answer.status_code == 503 and answer.mimetype == "text/html"


# ---------------------------------------------------------------------------------------------------------------
# Keys and config
# ---------------------------------------------------------------------------------------------------------------
def test_the_session_key_is_generated_once_private_and_shared(tmp_path: Path) -> None:
    config = config_from_mapping({}, "test")
    first = session_secret(config, data_dir=tmp_path)
    assert session_secret(config, data_dir=tmp_path) == first and len(first) == 64
    mode = stat.S_IMODE((tmp_path / "worklist-session.key").stat().st_mode)
    assert mode == 0o600


def test_a_configured_session_key_file_is_used(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key-material-for-the-test\n")
    config = config_from_mapping({"worklist": {"session_secret_file": str(key_file)}}, "test")
    assert session_secret(config) == b"s3cret-key-material-for-the-test"


@pytest.mark.parametrize(("data", "path", "words"), [
    ({"login": "oidc"}, "worklist.oidc.issuer", "required when worklist.login is oidc"),
    ({"login": "oidc", "oidc": {"issuer": "https://idp.example.org"}}, "worklist.oidc.client_id", "required"),
    ({"oidc": {"issuer": "http://idp.example.org/r"}}, "worklist.oidc.issuer", "plain http"),
    ({"oidc": {"issuer": "ftp://idp.example.org"}}, "worklist.oidc.issuer", "http(s)"),
    ({"login": "password"}, "worklist.login", "token, oidc"),
    ({"page_size": 30}, "worklist.page_size", "25, 50, 100, 200"),
    ({"cookie_secure": "maybe"}, "worklist.cookie_secure", "auto"),
    ({"session_minutes": 0}, "worklist.session_minutes", "out of range"),
    ({"oidc": {"scope": ["openid"]}}, "worklist.oidc.scope", "did you mean scopes"),
    ({"colour": "blue"}, "worklist.colour", "unknown key"),
])
def test_worklist_config_errors_name_the_key(data: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"worklist": data}, "test")
    assert any(problem_path == path and words in message for problem_path, message in caught.value.problems), \
        caught.value.problems


def test_worklist_config_defaults() -> None:
    settings = config_from_mapping(None).worklist
    assert settings["enabled"] is True and settings["login"] == "token" and settings["page_size"] == 50
    assert settings["session_minutes"] == 480 and settings["cookie_secure"] == "auto"
    assert settings["oidc"]["scopes"] == ["openid", "profile", "email"]
    assert settings["oidc"]["coder_roles"] == ["coder"] and settings["oidc"]["viewer_roles"] == ["viewer"]
    loopback = config_from_mapping({"worklist": {"login": "oidc", "oidc": {
        "issuer": "http://localhost:8080/realms/x", "client_id": "w", "roles_claim": "realm_access.roles"}}})
    assert loopback.worklist["oidc"]["verify_tls"] is True


@pytest.mark.postgres
def test_token_sign_in_and_a_one_time_form_on_postgresql(make_app: Callable[..., Flask], postgres_url: str) -> None:
    """The token table and the form nonces as production keeps them: PostgreSQL, shared by every worker."""
    app = make_app({"database_url": postgres_url})
    assert app.extensions["g2250_runtime"].store.engine.url.get_backend_name() == "postgresql"
    token = token_for(app)
    client = app.test_client()
    assert client.get(f"/worklist/login?token={token}").status_code == 303
    assert app.test_client().get(f"/worklist/login?token={token}").status_code == 403
    assert signed_in(client)


def test_a_replica_losing_the_race_to_create_the_token_table_looks_again(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two replicas starting together on one PostgreSQL both find the table missing; the loser's CREATE fails
    on a duplicate catalogue row (IntegrityError). Seen once in CI's two-replica test; now it looks again."""
    import sqlalchemy as sa

    from cds_service.worklist import auth

    real = auth.login_token_table.create
    attempts: list[int] = []

    def racing(engine: Any, checkfirst: bool = False) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            real(engine, checkfirst=checkfirst)  # the other replica wins...
            raise sa.exc.IntegrityError("CREATE TABLE", {}, Exception("duplicate key in pg_type"))  # ...we lose
        real(engine, checkfirst=checkfirst)

    monkeypatch.setattr(auth.login_token_table, "create", racing)
    config = config_from_mapping({"database_url": f"sqlite:///{tmp_path / 'w.db'}"})
    token = issue_login_token(config, now=NOW)
    assert token and len(attempts) == 2
    engine = sa.create_engine(config.database_url)
    try:
        assert auth.consume_login_token(engine, token, now=NOW)
    finally:
        engine.dispose()
