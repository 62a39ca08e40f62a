"""JWT authentication of CDS clients (CDS Hooks 2.0, "Security and Safety" → "Trusting CDS Clients").

Every call a CDS client makes — discovery, service invocation, feedback — carries ``Authorization: Bearer <JWT>``
when ``auth.required`` is true (cds-hooks.md "Trusting CDS clients"). This module verifies that token:

* header (spec "Trusting CDS Clients", header table): ``alg`` ES384 or RS384 only (never ``none``, never HMAC —
  spec "JWT Signing Algorithm"), ``kid`` required, ``typ`` "JWT" when present, optional ``jku`` that must be on the
  issuer's allowlist (spec: "maintain an allowlist of ``iss`` and ``jku`` urls");
* keys: the issuer's JWK Set — pinned inline (answering for its allow-listed ``jku`` without any request), from
  its ``jwks_url``, or fetched from an allow-listed ``jku`` — cached and refetched (rate-limited) when an unknown
  ``kid`` shows up, so clients can rotate keys without a restart;
* payload (spec payload table): ``iss`` on the allowlist, ``aud`` the endpoint URL being invoked (string or array),
  ``exp``/``iat`` (and ``nbf`` when present, as Epic sends it) within a small clock skew, ``jti`` never seen before
  during the token's lifetime (replay protection shared by every worker and replica: the configured database, or
  Redis when configured — :mod:`cds_service.replay`; fail closed when the store is down). Extra claims such as
  ``sub`` and ``tenant`` are tolerated.

Any failure raises :class:`AuthError`; the HTTP layer answers a bare 401. ``AuthError.reason`` is a fixed phrase
for logs: it never contains the token, a claim value or the ``jti``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..config import ClientConfig, Config
from ..replay import (  # re-exported: the replay caches used to live here
    DatabaseReplayCache,
    MemoryReplayCache,
    RedisReplayCache,
    ReplayCache,
    ReplayStoreUnavailable,
    replay_cache_for,
)

__all__ = [
    "ALLOWED_ALGORITHMS", "AuthError", "Authenticator", "DatabaseReplayCache", "JwksCache", "MemoryReplayCache",
    "RedisReplayCache", "ReplayCache", "ReplayCacheUnavailable", "parse_jwks", "replay_cache_for",
]

log = logging.getLogger("g2250_cds.auth")

#: Signing algorithms accepted (spec "JWT Signing Algorithm": ES384 and RS384 are RECOMMENDED; ``none`` and every
#: symmetric algorithm SHALL NOT be used).
ALLOWED_ALGORITHMS: frozenset[str] = frozenset({"ES384", "RS384"})
#: Smallest RSA modulus accepted for RS384.
MIN_RSA_BITS = 2048
#: Longest accepted token lifetime (``exp`` − ``iat``). Replay protection only lasts as long as the token, and CDS
#: clients mint one token per call (the sandbox uses 300 s), so a long-lived token is refused outright.
MAX_TOKEN_LIFETIME_SECONDS = 3600
#: Upper bounds that keep a hostile request from costing memory or CPU.
MAX_TOKEN_CHARS = 16_384
MAX_JTI_CHARS = 512
MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 100
#: Outbound JWK Set fetch timeout (seconds), connect and read.
JWKS_FETCH_TIMEOUT = 2.0

_REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "jti"]
_SERVICES_PREFIX = "/cds-services"


class AuthError(Exception):
    """Authentication failed. The HTTP answer is a bare 401 (cds-hooks.md "Trusting CDS clients").

    ``reason`` is a fixed, PHI- and token-free phrase meant for logs only; it must never be sent to the caller.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ReplayCacheUnavailable(AuthError):
    """The shared replay store (database or Redis) could not be reached; the token is refused (fail closed → 401).

    A token whose ``jti`` cannot be recorded might be a replay: accepting it would turn an outage of the store into
    an open door (README "Security").
    """


# --------------------------------------------------------------------------------------------------------------
# JWK Sets (spec: "The CDS Client MUST make its public key, expressed as a JSON Web Key (JWK), available in a JWK
# Set"; the ``kid`` header selects the key; ``jku`` MAY name the set's URL)
# --------------------------------------------------------------------------------------------------------------


def _infer_algorithm(jwk: Mapping[str, Any]) -> str | None:
    """The JWS algorithm a JWK is used with: its ``alg``, else ES384 for P-384 and RS384 for RSA keys.

    (PyJWK would default an RSA key without ``alg`` to RS256, which could never verify an RS384 token.)
    """
    alg = jwk.get("alg")
    if isinstance(alg, str) and alg:
        return alg
    if jwk.get("kty") == "EC" and jwk.get("crv") == "P-384":
        return "ES384"
    if jwk.get("kty") == "RSA":
        return "RS384"
    return None


def parse_jwks(document: Any) -> dict[str, jwt.PyJWK]:
    """Index the usable verification keys of a JWK Set by ``kid``.

    Skipped: keys without a ``kid``, keys for other algorithms or uses (``use`` other than ``sig``, ``key_ops``
    without ``verify``), keys carrying private material, keys PyJWT cannot load, and a ``kid`` that appears more
    than once (ambiguous). Raises :class:`AuthError` when ``document`` is not a JWK Set at all.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise AuthError("JWK Set malformed")
    keys: dict[str, jwt.PyJWK] = {}
    duplicated: set[str] = set()
    for entry in document["keys"][:MAX_JWKS_KEYS]:
        if not isinstance(entry, Mapping):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            continue
        if kid in keys or kid in duplicated:
            keys.pop(kid, None)
            duplicated.add(kid)
            continue
        if entry.get("use", "sig") != "sig":
            continue
        key_ops = entry.get("key_ops")
        if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
            continue
        if any(member in entry for member in ("d", "p", "q", "dp", "dq", "qi", "k")):
            log.warning("JWK with private or symmetric key material ignored", extra={"event": "auth-jwks-key"})
            continue
        algorithm = _infer_algorithm(entry)
        if algorithm not in ALLOWED_ALGORITHMS:
            continue
        try:
            keys[kid] = jwt.PyJWK(dict(entry), algorithm=algorithm)
        except (jwt.PyJWTError, TypeError, ValueError, KeyError):
            log.warning("unusable JWK ignored", extra={"event": "auth-jwks-key"})
    return keys


@dataclass
class _JwksEntry:
    keys: dict[str, jwt.PyJWK]
    fetched_at: float | None = None  # last successful fetch
    attempted_at: float | None = None  # last fetch attempt, successful or not


class JwksCache:
    """JWK Sets fetched from configured URLs (``jwks_url`` or an allow-listed ``jku``), cached per URL.

    Entries live ``ttl`` seconds. An unknown ``kid`` triggers a refetch — key rotation without a restart — but a
    URL is fetched at most once per ``min_refresh_interval`` seconds, so a flood of made-up ``kid`` values cannot
    make this service hammer the issuer. A failed refresh keeps the previously fetched keys. Fetches use
    ``allow_redirects=False`` (a redirect could lead anywhere), a 2 s timeout, a size cap, and ignore proxy/netrc
    settings from the environment. Only URLs from the configuration ever reach :meth:`key_for`.
    """

    def __init__(self, session: requests.Session | None = None, *, ttl: float = 300,
                 min_refresh_interval: float = 10, clock: Callable[[], float] = time.monotonic) -> None:
        if session is None:
            session = requests.Session()
            session.trust_env = False
        self._session = session
        self._ttl = float(ttl)
        self._min_refresh_interval = float(min_refresh_interval)
        self._clock = clock
        self._entries: dict[str, _JwksEntry] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock_for(self, url: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(url, threading.Lock())

    def key_for(self, url: str, kid: str) -> jwt.PyJWK:
        """The key ``kid`` of the JWK Set at ``url``; raises :class:`AuthError` when there is none."""
        with self._lock_for(url):
            now = self._clock()
            entry = self._entries.get(url)
            if entry is None:
                entry = self._entries[url] = _JwksEntry(keys={})
            stale = entry.fetched_at is None or now - entry.fetched_at >= self._ttl
            if stale or kid not in entry.keys:
                may_fetch = entry.attempted_at is None or now - entry.attempted_at >= self._min_refresh_interval
                if may_fetch:
                    entry.attempted_at = now
                    keys = self._fetch(url)
                    if keys is not None:
                        entry.keys = keys
                        entry.fetched_at = now
            key = entry.keys.get(kid)
            if key is None:
                if entry.fetched_at is None:
                    raise AuthError("JWK Set unavailable")
                raise AuthError("unknown kid")
            return key

    def _fetch(self, url: str) -> dict[str, jwt.PyJWK] | None:
        try:
            response = self._session.get(url, timeout=JWKS_FETCH_TIMEOUT, allow_redirects=False, stream=True,
                                         headers={"Accept": "application/json, application/jwk-set+json"})
            try:
                if response.status_code != 200:
                    log.warning("JWK Set fetch refused", extra={"event": "auth-jwks-fetch",
                                                                "status": response.status_code})
                    return None
                body = bytearray()
                for chunk in response.iter_content(chunk_size=16_384):
                    body.extend(chunk)
                    if len(body) > MAX_JWKS_BYTES:
                        log.warning("JWK Set too large", extra={"event": "auth-jwks-fetch"})
                        return None
            finally:
                response.close()
            return parse_jwks(json.loads(bytes(body)))
        except (requests.RequestException, ValueError, AuthError) as exc:
            log.warning("JWK Set fetch failed", extra={"event": "auth-jwks-fetch", "error_type": type(exc).__name__})
            return None


# --------------------------------------------------------------------------------------------------------------
# The authenticator
# --------------------------------------------------------------------------------------------------------------

_PYJWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.MissingRequiredClaimError, "missing required claim"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidKeyError, "unusable key"),
    (jwt.DecodeError, "malformed token"),
)


def _pyjwt_reason(exc: jwt.PyJWTError) -> str:
    for exc_type, reason in _PYJWT_REASONS:
        if isinstance(exc, exc_type):
            return reason
    return "invalid token"


def _numeric_date(payload: Mapping[str, Any], claim: str) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError(f"malformed {claim}")
    return float(value)


class Authenticator:
    """Verifies the CDS client JWT of one request (CDS Hooks 2.0 "Trusting CDS Clients").

    ``clock`` is wall-clock seconds since the epoch; all time checks (``exp``, ``iat``, ``nbf``) use it, with
    ``auth.clock_skew_seconds`` of leeway.
    """

    def __init__(self, config: Config, *, replay: ReplayCache, jwks: JwksCache | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        audiences = config.audiences
        if not audiences:
            raise ValueError("auth.audience must be configured to verify client tokens")
        self._audiences: tuple[str, ...] = audiences
        self._skew = float(config.raw["auth"]["clock_skew_seconds"])
        self._replay = replay
        self._jwks = jwks if jwks is not None else JwksCache()
        self._clock = clock
        self._clients: dict[str, ClientConfig] = {}
        self._inline: dict[str, dict[str, jwt.PyJWK]] = {}
        for client in config.clients:
            self._clients.setdefault(client.issuer, client)
            if client.jwks is not None and client.issuer not in self._inline:
                try:
                    self._inline[client.issuer] = parse_jwks(client.jwks)
                except AuthError as exc:
                    raise ValueError("auth.clients: inline jwks is not a JWK Set") from exc

    @property
    def replay_cache(self) -> ReplayCache:
        return self._replay

    def expected_audiences(self, path: str) -> list[str]:
        """The ``aud`` values accepted for a request to ``path``.

        The spec's ``aud`` is the URL of the endpoint invoked (the sandbox sends exactly the URL it called, as the
        user typed it — ``localhost`` and ``127.0.0.1`` are different audiences); each configured base audience is
        accepted too (Epic-style clients configure one ``aud`` per service). ``auth.audience`` may list several
        base URLs (the names by which browsers and EHRs reach this one service).
        """
        audiences: list[str] = []
        in_services = path == _SERVICES_PREFIX or path.startswith(_SERVICES_PREFIX + "/")
        for audience in self._audiences:
            if audience not in audiences:
                audiences.append(audience)
            if in_services:
                endpoint = audience.rstrip("/") + path[len(_SERVICES_PREFIX):]
                if endpoint not in audiences:
                    audiences.append(endpoint)
        return audiences

    def authenticate(self, authorization: str | None, path: str) -> ClientConfig:
        """Verify the ``Authorization`` header of a request to ``path``; the verified client's configuration.

        Raises :class:`AuthError` on any failure (the caller answers a bare 401).
        """
        token = self._bearer_token(authorization)
        header = self._checked_header(token)
        alg: str = header["alg"]
        kid: str = header["kid"]
        client = self._client_for(token)
        key = self._key_for(client, header.get("jku"), kid)
        self._check_key_fits(key, alg)
        try:
            payload = jwt.decode(
                token, key, algorithms=[alg], audience=self.expected_audiences(path), issuer=client.issuer,
                leeway=self._skew,
                # Time claims are checked below against the injected clock (PyJWT reads the system clock).
                options={"require": list(_REQUIRED_CLAIMS), "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(_pyjwt_reason(exc)) from None
        exp = self._check_times(payload)
        jti = payload.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
            raise AuthError("malformed jti")
        # The entry outlives the token (exp + skew): after that the token is refused as expired anyway.
        ttl = max(1.0, exp - self._clock() + self._skew)
        try:
            new = self._replay.add_if_new(f"{client.issuer}|{jti}", ttl)
        except ReplayStoreUnavailable:
            raise ReplayCacheUnavailable("replay cache unavailable") from None  # fail closed
        if not new:
            raise AuthError("replayed jti")
        return client

    # -- steps ------------------------------------------------------------------------------------------------

    @staticmethod
    def _bearer_token(authorization: str | None) -> str:
        if not authorization or not authorization.strip():
            raise AuthError("missing Authorization header")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthError("not a Bearer token")
        token = token.strip()
        if not token:
            raise AuthError("missing token")
        if len(token) > MAX_TOKEN_CHARS or any(c.isspace() for c in token) or token.count(".") != 2:
            raise AuthError("malformed token")
        return token

    @staticmethod
    def _checked_header(token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        if not isinstance(header, dict):
            raise AuthError("malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise AuthError("algorithm not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("missing kid")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() != "jwt"):
            raise AuthError("typ is not JWT")
        if "crit" in header:
            raise AuthError("unsupported critical header")
        jku = header.get("jku")
        if jku is not None and not isinstance(jku, str):
            raise AuthError("malformed jku")
        return header

    def _client_for(self, token: str) -> ClientConfig:
        # Unverified read, only to choose the issuer's keys; ``iss`` is verified by jwt.decode afterwards.
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        iss = unverified.get("iss") if isinstance(unverified, dict) else None
        if not isinstance(iss, str) or not iss:
            raise AuthError("missing issuer")
        client = self._clients.get(iss)
        if client is None:
            raise AuthError("unknown issuer")
        return client

    def _key_for(self, client: ClientConfig, jku: str | None, kid: str) -> jwt.PyJWK:
        """The verification key for ``kid``, from the issuer's configured sources only.

        1. A ``jku`` header must be on the issuer's ``allowed_jku`` (or equal its ``jwks_url``) — spec: "CDS
           Services SHOULD limit the CDS Clients they trust by maintaining an allowlist of iss and jku urls" —
           else the token is refused and nothing is fetched.
        2. Keys listed inline (``jwks``) are *pinned*: they answer for every allow-listed ``jku`` of the issuer and
           for tokens without one, without any outbound request. An issuer with pinned keys never has its ``jku``
           fetched (the CDS Hooks sandbox hard-codes ``jku: https://sandbox.cds-hooks.org/.well-known/jwks.json``;
           with its key pinned the demo works offline).
        3. A ``kid`` that is not pinned is looked up at the issuer's ``jwks_url`` (cached, refetched on an unknown
           ``kid``: key rotation), or — for an issuer without pinned keys — at the allow-listed ``jku`` itself.
        """
        if jku is not None and jku not in client.allowed_jku and jku != client.jwks_url:
            raise AuthError("jku not allowed")
        pinned = self._inline.get(client.issuer)
        if pinned is not None:
            key = pinned.get(kid)
            if key is not None:
                return key
            if client.jwks_url:
                return self._jwks.key_for(client.jwks_url, kid)
            raise AuthError("unknown kid")
        if jku is not None:
            return self._jwks.key_for(jku, kid)
        if client.jwks_url:
            return self._jwks.key_for(client.jwks_url, kid)
        raise AuthError("no key source for issuer")

    @staticmethod
    def _check_key_fits(key: jwt.PyJWK, alg: str) -> None:
        if key.algorithm_name != alg:
            raise AuthError("algorithm does not match key")
        public = key.key
        if alg == "ES384":
            if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP384R1):
                raise AuthError("key does not fit algorithm")
        elif alg == "RS384":
            if not isinstance(public, rsa.RSAPublicKey) or public.key_size < MIN_RSA_BITS:
                raise AuthError("key does not fit algorithm")
        else:  # pragma: no cover - the header check already limits alg
            raise AuthError("algorithm not allowed")

    def _check_times(self, payload: Mapping[str, Any]) -> float:
        exp = _numeric_date(payload, "exp")
        iat = _numeric_date(payload, "iat")
        nbf = _numeric_date(payload, "nbf")
        if exp is None or iat is None:  # pragma: no cover - jwt.decode requires both
            raise AuthError("missing required claim")
        now = self._clock()
        if exp <= now - self._skew:
            raise AuthError("expired")
        if iat > now + self._skew:
            raise AuthError("issued in the future")
        if nbf is not None and nbf > now + self._skew:
            raise AuthError("not yet valid")
        if exp <= iat:
            raise AuthError("expires before issued")
        if exp - iat > MAX_TOKEN_LIFETIME_SECONDS:
            raise AuthError("lifetime too long")
        return exp
