"""JWT authentication of CDS clients (CDS Hooks 2.0, "Security and Safety" → "Trusting CDS Clients").

Every call a CDS client makes — discovery, service invocation, feedback — carries ``Authorization: Bearer <JWT>``
when ``auth.required`` is true (cds-hooks.md "Trusting CDS clients"). This module verifies that token:

* header (spec "Trusting CDS Clients", header table): ``alg`` ES384 or RS384 only (never ``none``, never HMAC —
  spec "JWT Signing Algorithm"), ``kid`` required, ``typ`` "JWT" when present, optional ``jku`` that must be on the
  issuer's allowlist (spec: "maintain an allowlist of ``iss`` and ``jku`` urls");
* keys: the issuer's JWK Set — inline, from its ``jwks_url`` or from an allow-listed ``jku`` — cached and refetched
  (rate-limited) when an unknown ``kid`` shows up, so clients can rotate keys without a restart;
* payload (spec payload table): ``iss`` on the allowlist, ``aud`` the endpoint URL being invoked (string or array),
  ``exp``/``iat`` (and ``nbf`` when present, as Epic sends it) within a small clock skew, ``jti`` never seen before
  during the token's lifetime (replay protection, shared through Redis when configured). Extra claims such as
  ``sub`` and ``tenant`` are tolerated.

Any failure raises :class:`AuthError`; the HTTP layer answers a bare 401. ``AuthError.reason`` is a fixed phrase
for logs: it never contains the token, a claim value or the ``jti``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
import redis
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..config import ClientConfig, Config

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
    """The shared replay cache (Redis) could not be reached; the token is refused (fail closed).

    A subclass of :class:`AuthError` so the default handling is still a 401; the app may map it to a 503 instead.
    """


# --------------------------------------------------------------------------------------------------------------
# Replay protection (spec payload table: ``jti`` "used to protect against replay attacks")
# --------------------------------------------------------------------------------------------------------------


class ReplayCache(Protocol):
    """Remembers token ids for their remaining lifetime."""

    def add_if_new(self, key: str, ttl_seconds: float) -> bool:
        """Record ``key`` for ``ttl_seconds``; ``False`` when it is already recorded (a replay)."""
        ...


class MemoryReplayCache:
    """Per-process replay cache: thread-safe, entries expire, size bounded.

    When full, expired entries go first; if it is still full the entries closest to expiry are evicted (their
    tokens are about to expire anyway). Only verified tokens reach the cache, so filling it takes a valid key.
    Not shared between worker processes or replicas — use :class:`RedisReplayCache` for that.
    """

    def __init__(self, max_entries: int = 100_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        with self._lock:
            self._purge_expired(self._clock())
            return len(self._expiry)

    def _purge_expired(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expiry, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expiry:
                del self._expiry[key]

    def _evict_soonest(self) -> None:
        while self._heap:
            expiry, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expiry:
                del self._expiry[key]
                return

    def add_if_new(self, key: str, ttl_seconds: float) -> bool:
        now = self._clock()
        with self._lock:
            expiry = self._expiry.get(key)
            if expiry is not None and expiry > now:
                return False
            self._purge_expired(now)
            while len(self._expiry) >= self._max_entries:
                self._evict_soonest()
            new_expiry = now + max(float(ttl_seconds), 0.0)
            self._expiry[key] = new_expiry
            heapq.heappush(self._heap, (new_expiry, key))
            if len(self._heap) > 2 * self._max_entries:  # drop stale heap entries now and then
                self._heap = [(e, k) for e, k in self._heap if self._expiry.get(k) == e]
                heapq.heapify(self._heap)
            return True


class RedisReplayCache:
    """Replay cache in Redis, shared by every worker and replica: ``SET <prefix><sha256(key)> 1 NX EX ceil(ttl)``.

    The key is hashed so the raw ``jti`` is not stored. Redis errors fail closed (:class:`ReplayCacheUnavailable`).
    """

    def __init__(self, client: redis.Redis, prefix: str = "g2250:jti:") -> None:
        self._client = client
        self._prefix = prefix

    def redis_key(self, key: str) -> str:
        return self._prefix + hashlib.sha256(key.encode("utf-8")).hexdigest()

    def add_if_new(self, key: str, ttl_seconds: float) -> bool:
        ttl = max(1, math.ceil(ttl_seconds))
        try:
            created = self._client.set(self.redis_key(key), b"1", nx=True, ex=ttl)
        except redis.RedisError as exc:
            log.warning("replay cache unavailable", extra={"event": "auth-replay-cache-error",
                                                           "error_type": type(exc).__name__})
            raise ReplayCacheUnavailable("replay cache unavailable") from None
        return bool(created)


def replay_cache_for(redis_url: str | None) -> ReplayCache:
    """Redis-backed cache when ``redis_url`` is configured (shared across replicas), else in-process memory."""
    if redis_url:
        client = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return RedisReplayCache(client)
    return MemoryReplayCache()


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
        audience = config.audience
        if not audience:
            raise ValueError("auth.audience must be configured to verify client tokens")
        self._audience = audience
        self._audience_base = audience.rstrip("/")
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

    def expected_audiences(self, path: str) -> list[str]:
        """The ``aud`` values accepted for a request to ``path``.

        The spec's ``aud`` is the URL of the endpoint invoked (the sandbox sends exactly that); the configured base
        audience is accepted too (Epic-style clients configure one ``aud`` per service).
        """
        audiences = [self._audience]
        if path == _SERVICES_PREFIX or path.startswith(_SERVICES_PREFIX + "/"):
            endpoint = self._audience_base + path[len(_SERVICES_PREFIX):]
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
        ttl = max(1.0, exp - self._clock() + self._skew)
        if not self._replay.add_if_new(f"{client.issuer}|{jti}", ttl):
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
        if jku is not None:
            # Spec: "CDS Services SHOULD limit the CDS Clients they trust by maintaining an allowlist of iss and jku
            # urls." The issuer's own configured jwks_url counts as allow-listed. Nothing else is ever fetched.
            if jku not in client.allowed_jku and jku != client.jwks_url:
                raise AuthError("jku not allowed")
            return self._jwks.key_for(jku, kid)
        inline = self._inline.get(client.issuer)
        if inline is not None:
            key = inline.get(kid)
            if key is not None:
                return key
            if not client.jwks_url:
                raise AuthError("unknown kid")
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
