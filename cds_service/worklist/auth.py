"""Who may see the worklist, and how they sign in.

Two ways in (config ``worklist.login``):

* ``token`` (the embedded default, a developer's or a single coder's machine): the pages are served to loopback
  clients only, and the person at the machine signs in with a one-time token printed when the server starts (as
  Jupyter does). The token is kept hashed (SHA-256) in the database — every gunicorn worker checks the same table
  — expires after :data:`LOGIN_TOKEN_SECONDS` and is deleted when used (single use). A token sign-in is a coder.
* ``oidc`` (production): OpenID Connect authorization code flow with PKCE S256, state and nonce (OpenID Connect
  Core 1.0 §3.1; RFC 7636), through Authlib's Flask client, which validates the ID token's signature, ``iss``,
  ``aud``, ``exp`` and ``nonce`` (Authlib docs, "Flask OAuth Client" / "OpenID Connect"). The user's roles come
  from a configured claim (``worklist.oidc.roles_claim``, a dotted path such as ``realm_access.roles``):
  ``coder`` may act, ``viewer`` may only read, anyone else gets no session.

The session is Flask's signed cookie carrying a random session id whose hash is a row of ``worklist_sessions``:
a cookie is honoured only while its row is there and not revoked, so signing out (or an administrator deleting the
rows) ends it everywhere, even for a copy of the cookie. The cookie is limited to ``/worklist``, HttpOnly,
SameSite=Lax, Secure unless the request came over plain http to a loopback host (``cookie_secure: auto``), and the
session ends ``session_minutes`` after sign-in. The signing key is shared by every worker and restart:
``session_secret_file``, else a random key generated once into a 0600 file in the data directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from flask import Flask, request
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy.engine import Engine

from ..config import Config, default_data_dir
from ..store import create_racing, metadata

log = logging.getLogger("g2250_cds")

ROLE_CODER = "coder"
ROLE_VIEWER = "viewer"
LOGIN_TOKEN_SECONDS = 15 * 60
SESSION_KEY_FILE = "worklist-session.key"
#: The URL prefix of the worklist: the session cookie's path, and the requests this package answers.
PREFIX = "/worklist"

#: One-time login tokens (``login: token``), hashed: a database dump does not let anyone sign in.
login_token_table = sa.Table(
    "worklist_login_tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("expires_at", sa.BigInteger, nullable=False),  # Unix seconds: no time zone ambiguity in SQLite
)


class WorklistConfigError(ValueError):
    """A worklist setting that names a file which cannot be read (the message names the key and the file)."""

#: Server-side sessions: the cookie holds the id, this table its hash (a database dump signs nobody in).
session_table = sa.Table(
    "worklist_sessions",
    metadata,
    sa.Column("session_hash", sa.String(64), primary_key=True),
    sa.Column("expires_at", sa.BigInteger, nullable=False),  # Unix seconds
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
)


def open_session(engine: Engine, *, now: datetime, seconds: int) -> str:
    """A new session id (256 random bits), stored hashed until ``now + seconds``; expired rows are swept."""
    session_id = secrets.token_urlsafe(32)
    with engine.begin() as conn:
        conn.execute(session_table.delete().where(session_table.c.expires_at <= _epoch(now)))
        conn.execute(session_table.insert().values(session_hash=_token_hash(session_id),
                                                   expires_at=_epoch(now) + seconds))
    return session_id


def session_is_live(engine: Engine, session_id: str, *, now: datetime) -> bool:
    """True while the session's row exists, is not revoked and has not expired."""
    if not session_id or len(session_id) > 200:
        return False
    with engine.connect() as conn:
        row = conn.execute(sa.select(session_table.c.expires_at, session_table.c.revoked_at).where(
            session_table.c.session_hash == _token_hash(session_id))).first()
    return row is not None and row.revoked_at is None and row.expires_at > _epoch(now)


def close_session(engine: Engine, session_id: str, *, now: datetime) -> None:
    """Sign-out: the session's row is revoked, so every copy of its cookie stops working at once."""
    if session_id:
        with engine.begin() as conn:
            conn.execute(session_table.update().where(session_table.c.session_hash == _token_hash(session_id))
                         .values(revoked_at=_epoch(now)))


# ---------------------------------------------------------------------------------------------------------------
# One-time login tokens
# ---------------------------------------------------------------------------------------------------------------
def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _epoch(moment: datetime | None) -> int:
    return int(moment.timestamp()) if moment is not None else int(time.time())


def issue_login_token(config: Config, *, now: datetime | None = None, engine: Engine | None = None) -> str:
    """A new one-time login token for ``login: token``: 256 random bits (``secrets``), valid for 15 minutes, stored
    hashed in the database every worker reads. Tokens issued before are revoked: a restart prints a new one.

    ``g2250-cds serve`` calls this once at start and prints :func:`login_url`."""
    token = secrets.token_urlsafe(32)
    own = engine is None
    engine = engine or sa.create_engine(config.database_url)
    try:
        # Replicas starting together race to create it.
        create_racing(engine, lambda: login_token_table.create(engine, checkfirst=True))
        with engine.begin() as conn:
            conn.execute(login_token_table.delete())
            conn.execute(login_token_table.insert().values(token_hash=_token_hash(token),
                                                           expires_at=_epoch(now) + LOGIN_TOKEN_SECONDS))
    finally:
        if own:
            engine.dispose()
    return token


def consume_login_token(engine: Engine, token: str, *, now: datetime) -> bool:
    """True once for a valid, unexpired token; the row is deleted in the same statement, so two workers racing
    with one token cannot both succeed."""
    if not token or len(token) > 200:
        return False
    try:
        with engine.begin() as conn:
            deleted = conn.execute(login_token_table.delete().where(
                login_token_table.c.token_hash == _token_hash(token),
                login_token_table.c.expires_at > _epoch(now)))
            conn.execute(login_token_table.delete().where(login_token_table.c.expires_at <= _epoch(now)))
            return deleted.rowcount == 1
    except sa.exc.OperationalError:
        return False  # no token table: no token was ever issued against this database
    except sa.exc.ProgrammingError:
        return False


def login_url(base_url: str, token: str) -> str:
    """``http://HOST:PORT/worklist/login?token=…``: the URL ``serve`` prints (the page strips the token at once)."""
    return f"{base_url.rstrip('/')}{PREFIX}/login?{urlencode({'token': token})}"


# ---------------------------------------------------------------------------------------------------------------
# Roles
# ---------------------------------------------------------------------------------------------------------------
def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at a dotted path (``realm_access.roles``: Keycloak's realm roles); a claim whose own name holds
    dots (``https://example.org/roles``, as Auth0 requires) is read as a whole first."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def roles_from_claims(claims: Mapping[str, Any], path: str) -> frozenset[str]:
    """The role names at ``path``: a JSON array of strings, or one string of names separated by spaces or commas
    (both occur in providers' tokens)."""
    value = claim_at(claims, path)
    if isinstance(value, str):
        return frozenset(part for part in value.replace(",", " ").split() if part)
    if isinstance(value, list | tuple):
        return frozenset(item for item in value if isinstance(item, str) and item)
    return frozenset()


def role_for(claims: Mapping[str, Any], oidc: Mapping[str, Any]) -> str | None:
    """``coder`` when the user holds any of ``coder_roles``, else ``viewer`` for any of ``viewer_roles``, else
    ``None`` (no access: the user gets a 403 page and no session)."""
    roles = roles_from_claims(claims, str(oidc.get("roles_claim") or "roles"))
    if roles & set(oidc.get("coder_roles") or ()):
        return ROLE_CODER
    if roles & set(oidc.get("viewer_roles") or ()):
        return ROLE_VIEWER
    return None


def user_name(claims: Mapping[str, Any]) -> str:
    """What the audit trail records as the actor: ``preferred_username``, else ``email``, else ``sub`` (OpenID
    Connect Core 1.0 §5.1 standard claims)."""
    for key in ("preferred_username", "email", "sub"):
        value = claims.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()[:200]
    return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# Clients, cookies, keys
# ---------------------------------------------------------------------------------------------------------------
def is_loopback(address: str | None) -> bool:
    """127.0.0.0/8 or ::1 (also IPv4-mapped ``::ffff:127.0.0.1``)."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def _relative_to_config(path: str, config: Config) -> Path:
    """A relative path in the config file is relative to that file (as ``audit.bulk.private_key_file`` is)."""
    candidate = Path(path).expanduser()
    source = Path(config.source)
    if not candidate.is_absolute() and source.is_file():
        return source.parent / candidate
    return candidate


def read_secret_file(path: str, config: Config, key: str) -> str:
    """The stripped text of a secret file; :class:`WorklistConfigError` naming the key otherwise."""
    file = _relative_to_config(path, config)
    try:
        text = file.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise WorklistConfigError(f"{config.source}: {key}: cannot read {file} ({type(exc).__name__}) — check "
                                  "the path and its permissions") from exc
    if not text:
        raise WorklistConfigError(f"{config.source}: {key}: {file} is empty — write the secret into it")
    return text


def session_secret(config: Config, *, data_dir: Path | None = None) -> bytes:
    """The key that signs session cookies and CSRF tokens, the same in every worker and after a restart.

    ``worklist.session_secret_file`` when set; else ``<data dir>/worklist-session.key``, created once with 256
    random bits, mode 0600. Workers starting together race to create it: each writes its own temporary file and
    links it into place (``os.link`` fails if the name exists), so every worker reads the one winner's key."""
    configured = config.worklist.get("session_secret_file")
    if configured:
        return read_secret_file(configured, config, "worklist.session_secret_file").encode("utf-8")
    directory = data_dir or default_data_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / SESSION_KEY_FILE
    if not target.exists():
        temporary = directory / f".{SESSION_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="ascii") as handle:
                handle.write(secrets.token_hex(32))
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another worker won the race: use its key
                os.link(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
    key = target.read_text("ascii").strip()
    if len(key) < 32:
        raise WorklistConfigError(f"{target}: the worklist session key file is damaged — delete it (everyone "
                                  "signs in again)")
    return key.encode("ascii")


def cookie_secure(setting: Any) -> bool:
    """``cookie_secure: auto``: Secure unless this request came over plain http to a loopback host (a browser on
    the same machine: no network to sniff, and browsers drop Secure cookies set over http)."""
    if setting is True or setting is False:
        return setting
    return not (request.scheme == "http" and is_loopback(request.remote_addr))


class WorklistSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, confined to ``/worklist``: other paths (the CDS Hooks API, on the hot path)
    neither read nor write a cookie. HttpOnly and SameSite=Lax (OWASP Session Management Cheat Sheet)."""

    def __init__(self, secure: Any) -> None:
        self.secure_setting = secure

    def open_session(self, app: Flask, request_: Any) -> Any:
        if not _under_prefix(request_.path):
            return self.session_class()
        return super().open_session(app, request_)

    def save_session(self, app: Flask, session: Any, response: Any) -> None:
        if not _under_prefix(request.path):
            return
        super().save_session(app, session, response)

    def get_cookie_path(self, app: Flask) -> str:
        return (request.script_root or "") + PREFIX

    def get_cookie_secure(self, app: Flask) -> bool:
        return cookie_secure(self.secure_setting)

    def get_cookie_httponly(self, app: Flask) -> bool:
        return True

    def get_cookie_samesite(self, app: Flask) -> str:
        return "Lax"


def _under_prefix(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def configure_sessions(app: Flask, config: Config) -> None:
    """Signing key, lifetime and cookie attributes of the worklist's session (and Flask-WTF's CSRF tokens, which
    live in it and are signed with the same key)."""
    settings = config.worklist
    if not app.secret_key:
        try:
            app.secret_key = session_secret(config)
        except OSError as exc:
            # An unwritable data directory must not take the CDS Hooks API down with it: this process signs its
            # own sessions (a sign-in then holds only in this worker, until it restarts) — and says so.
            log.warning("worklist session key file unusable; set worklist.session_secret_file",
                        extra={"event": "worklist-session-key", "error_type": type(exc).__name__})
            app.secret_key = secrets.token_hex(32)
    minutes = int(settings["session_minutes"])
    app.config["PERMANENT_SESSION_LIFETIME"] = minutes * 60
    app.config["SESSION_COOKIE_NAME"] = "g2250_worklist"
    # Flask-WTF: a form's CSRF token is good as long as the sign-in (docs "CSRF Protection", WTF_CSRF_TIME_LIMIT).
    app.config["WTF_CSRF_TIME_LIMIT"] = minutes * 60
    app.session_interface = WorklistSessionInterface(settings["cookie_secure"])


# ---------------------------------------------------------------------------------------------------------------
# OpenID Connect
# ---------------------------------------------------------------------------------------------------------------
OIDC_CLIENT = "worklist"


def register_oidc(app: Flask, config: Config) -> Any:
    """The Authlib Flask client for ``login: oidc``: discovery from ``{issuer}/.well-known/openid-configuration``
    (OpenID Connect Discovery 1.0 §4), PKCE S256 (RFC 7636 §4.2), ``openid`` always among the scopes."""
    from authlib.integrations.flask_client import OAuth

    oidc = config.worklist["oidc"]
    secret = None
    if oidc.get("client_secret_file"):
        secret = read_secret_file(oidc["client_secret_file"], config, "worklist.oidc.client_secret_file")
    scopes = list(oidc.get("scopes") or ["openid"])
    if "openid" not in scopes:
        scopes.insert(0, "openid")
    oauth = OAuth(app)
    issuer = str(oidc["issuer"]).rstrip("/")
    return oauth.register(
        OIDC_CLIENT,
        client_id=oidc["client_id"],
        client_secret=secret,
        server_metadata_url=f"{issuer}/.well-known/openid-configuration",
        client_kwargs={"scope": " ".join(scopes), "code_challenge_method": "S256",
                       "token_endpoint_auth_method": "client_secret_basic" if secret else "none",
                       "verify": bool(oidc.get("verify_tls", True)), "timeout": 10},
    )


def claims_of(token: Mapping[str, Any]) -> dict[str, Any]:
    """The claims of the ID token Authlib validated (``token["userinfo"]``). An answer without an ID token is
    refused: only the ID token proves who signed in (OpenID Connect Core 1.0 §3.1.3.7)."""
    userinfo = token.get("userinfo")
    if not isinstance(userinfo, Mapping):
        raise PermissionError("the provider's answer holds no ID token")
    return dict(userinfo)


def with_userinfo(claims: dict[str, Any], client: Any, roles_claim: str) -> dict[str, Any]:
    """The ID token's claims completed from the UserInfo endpoint when the roles claim is not among them
    (providers may put roles only there; Core §5.3); the ID token's own claims win."""
    if claim_at(claims, roles_claim) is not None:
        return claims
    try:
        extra = client.userinfo()
    except Exception:  # network or provider error: the ID token alone decides
        return claims
    if isinstance(extra, Mapping) and extra.get("sub") == claims.get("sub"):  # Core §5.3.2: sub must match
        merged = dict(extra)
        merged.update(claims)
        return merged
    return claims
