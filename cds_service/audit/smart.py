"""SMART Backend Services: the access token the population audit sends to a FHIR server's Bulk Data ``$export``.

What the SMART App Launch IG, "Backend Services" (http://hl7.org/fhir/smart-app-launch/backend-services.html),
asks of a client, and where it is done here:

- discovery: the token endpoint is ``token_endpoint`` of ``[base]/.well-known/smart-configuration`` ("the client
  discovers the token endpoint from the server's SMART configuration") unless the operator configured one;
- authentication: ``client_credentials`` grant with ``client_assertion_type``
  ``urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` and a ``client_assertion`` JWT signed with the client's
  private key — RS384 or ES384 ("the client SHALL support RS384 or ES384"); header ``alg``, ``kid`` (the key's id
  as registered; its RFC 7638 thumbprint when none is configured) and ``typ: JWT``; claims ``iss`` = ``sub`` =
  client_id, ``aud`` = the token endpoint URL, ``exp`` "no more than five minutes in the future", and a ``jti``
  that "uniquely identifies this authentication JWT" (never reused: servers reject replays);
- scope: ``system/*.read`` by default (SMART v1 system scopes, understood by v2 servers too), configurable;
- the access token is reused until shortly before ``expires_in`` runs out, and a 401 from the FHIR server makes the
  client get a fresh one once ("the client SHOULD request a new access token" when the old one is rejected).

Signing and JWK conversion are PyJWT's (``jwt.encode``, ``RSAAlgorithm.to_jwk``); nothing here hand-writes a JWT.
No token, assertion or key material is ever logged or put in an exception message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_SCOPE = "system/*.read"
ASSERTION_LIFETIME = 300  # seconds: SMART "no more than five minutes in the future"
SUPPORTED_ALGS = ("RS384", "ES384", "RS256", "ES256", "RS512", "ES512")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class SmartAuthError(Exception):
    """Getting an access token failed. The message is one line, names the step and the server's OAuth ``error``
    code, and never holds a token, an assertion or key material."""


def load_private_key(source: str | Path | bytes, password: bytes | None = None) -> PrivateKey:
    """A PEM private key from a file path or PEM bytes; RSA or EC only (what Backend Services signs with)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise SmartAuthError(f"the private key is not a readable PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise SmartAuthError(f"unsupported private key type {type(key).__name__} (use RSA or EC P-384)")
    return key


def default_alg(key: PrivateKey | PublicKey) -> str:
    """RS384 for RSA and ES384 for P-384: the two algorithms SMART Backend Services requires servers to accept.
    Other curves get the ES algorithm their curve implies (RFC 7518 §3.4)."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS384"
    return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name, "ES384")


def _public(key: PrivateKey | PublicKey) -> PublicKey:
    return key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 §3: SHA-256 over the JSON of the key's required members, sorted, without whitespace; base64url."""
    if jwk.get("kty") == "RSA":
        members = {"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}
    elif jwk.get("kty") == "EC":
        members = {"crv": jwk["crv"], "kty": "EC", "x": jwk["x"], "y": jwk["y"]}
    else:
        raise SmartAuthError(f"unsupported JWK kty {jwk.get('kty')!r}")
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def public_jwk(key: PrivateKey | PublicKey, *, alg: str | None = None, kid: str | None = None) -> dict[str, Any]:
    """The public half of ``key`` as a JWK with ``alg``, ``use: sig`` and ``kid`` (the thumbprint unless given):
    what a server registers for the client (SMART: "the client's public key(s) ... as a JWK Set")."""
    pub = _public(key)
    converter = RSAAlgorithm if isinstance(pub, rsa.RSAPublicKey) else ECAlgorithm
    jwk: dict[str, Any] = dict(converter.to_jwk(pub, as_dict=True))
    jwk.update({"alg": alg or default_alg(pub), "use": "sig", "key_ops": ["verify"]})
    jwk["kid"] = kid or jwk_thumbprint(jwk)
    return jwk


def public_jwks(key: PrivateKey | PublicKey | str | Path, *, alg: str | None = None,
                kid: str | None = None) -> dict[str, Any]:
    """``{"keys": [public JWK]}`` for a key or a PEM private key file: the JWK Set to register the client with."""
    loaded = load_private_key(key) if isinstance(key, str | Path) else key
    return {"keys": [public_jwk(loaded, alg=alg, kid=kid)]}


def discover_token_endpoint(base_url: str, session: requests.Session | None = None, *,
                            timeout: float = 10.0) -> str:
    """``token_endpoint`` of ``{base}/.well-known/smart-configuration`` (SMART App Launch, "Discovery": servers
    SHALL host it at that location relative to the FHIR base)."""
    url = base_url.rstrip("/") + "/.well-known/smart-configuration"
    http = session or requests.Session()
    try:
        response = http.get(url, headers={"Accept": "application/json"}, timeout=timeout)
    except requests.RequestException as exc:
        raise SmartAuthError(f"SMART discovery failed: {type(exc).__name__} at {url}") from None
    finally:
        if session is None:
            http.close()
    if response.status_code != 200:
        raise SmartAuthError(f"SMART discovery failed: HTTP {response.status_code} from {url}")
    try:
        endpoint = response.json().get("token_endpoint")
    except (ValueError, AttributeError):
        endpoint = None
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise SmartAuthError(f"SMART discovery failed: {url} has no token_endpoint URL")
    return endpoint


@dataclass
class SmartBackendAuth:
    """Access tokens for one registered backend client at one FHIR server.

    ``token()`` returns a cached token, or gets a new one when none is cached or it expires within
    ``renew_margin`` seconds (the smaller of that and a fifth of its lifetime, so short-lived tokens are still
    reused). ``send(session, method, url, ...)`` sends a request with the token and, on a 401, renews the token
    once and sends it again. Thread-safe: the export downloads files one at a time today, but a pool may share it.
    """

    base_url: str
    client_id: str
    private_key: PrivateKey
    alg: str | None = None
    kid: str | None = None
    token_url: str | None = None
    scope: str = DEFAULT_SCOPE
    timeout: float = 10.0
    renew_margin: float = 60.0
    jku: str | None = None
    _token: str | None = field(default=None, init=False, repr=False)
    _expires_at: float = field(default=0.0, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    tokens_issued: int = field(default=0, init=False)  # how many times a token was fetched (tests, timings)

    def __post_init__(self) -> None:
        self.alg = self.alg or default_alg(self.private_key)
        if self.alg not in SUPPORTED_ALGS:
            raise SmartAuthError(f"unsupported signing algorithm {self.alg} (use RS384 or ES384)")
        if self.alg.startswith("RS") != isinstance(self.private_key, rsa.RSAPrivateKey):
            raise SmartAuthError(f"algorithm {self.alg} does not match the {type(self.private_key).__name__}")
        self.kid = self.kid or public_jwk(self.private_key, alg=self.alg)["kid"]

    @classmethod
    def from_config(cls, base_url: str, settings: Mapping[str, Any], *,
                    relative_to: Path | None = None) -> SmartBackendAuth:
        """From the ``audit.bulk`` config block (config schema names): ``client_id`` and ``private_key_file`` (a PEM
        file path, relative to ``relative_to`` when not absolute) are required; ``algorithm``, ``kid``,
        ``token_url``, ``scope``, ``jku`` and ``timeout_seconds`` are optional. (``private_key`` / ``alg`` are
        accepted as older spellings.)"""
        client_id = settings.get("client_id")
        key_path = settings.get("private_key_file") or settings.get("private_key")
        if not isinstance(client_id, str) or not client_id:
            raise SmartAuthError("audit.bulk.client_id is required for SMART Backend Services")
        if not isinstance(key_path, str) or not key_path:
            raise SmartAuthError("audit.bulk.private_key_file (a PEM file) is required for SMART Backend Services")
        path = Path(key_path)
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            raise SmartAuthError(f"audit.bulk.private_key_file: no such file {path}")
        return cls(
            base_url=base_url, client_id=client_id, private_key=load_private_key(path),
            alg=settings.get("algorithm") or settings.get("alg"), kid=settings.get("kid"),
            token_url=settings.get("token_url"),
            scope=settings.get("scope") or DEFAULT_SCOPE, jku=settings.get("jku"),
            timeout=float(settings.get("timeout_seconds", 10.0)),
        )

    # -- the assertion and the token --------------------------------------------------------------------------

    def client_assertion(self, token_url: str, *, now: float | None = None) -> str:
        """A fresh signed authentication JWT for ``token_url`` (new ``jti`` on every call)."""
        issued = int(now if now is not None else time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": token_url, "iat": issued,
                  "exp": issued + ASSERTION_LIFETIME, "jti": uuid.uuid4().hex}
        headers: dict[str, Any] = {"kid": self.kid, "typ": "JWT"}
        if self.jku:
            headers["jku"] = self.jku
        return jwt.encode(claims, self.private_key, algorithm=self.alg, headers=headers)

    def resolve_token_url(self, session: requests.Session | None = None) -> str:
        if not self.token_url:
            self.token_url = discover_token_endpoint(self.base_url, session, timeout=self.timeout)
        return self.token_url

    def _fetch(self, session: requests.Session | None) -> None:
        token_url = self.resolve_token_url(session)
        form = {"grant_type": "client_credentials", "scope": self.scope,
                "client_assertion_type": ASSERTION_TYPE, "client_assertion": self.client_assertion(token_url)}
        http = session or requests.Session()
        try:
            response = http.post(token_url, data=form, headers={"Accept": "application/json"}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise SmartAuthError(f"token request failed: {type(exc).__name__} at {token_url}") from None
        finally:
            if session is None:
                http.close()
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            described = body.get("error_description") if isinstance(body, dict) else None
            detail = f" {error}" if isinstance(error, str) else ""
            if isinstance(described, str):  # the server's words about this client's request, not about patients
                detail += ": " + " ".join(described.split())[:200]
            raise SmartAuthError(f"token request refused: HTTP {response.status_code}{detail}")
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise SmartAuthError("token response has no access_token")
        try:
            lifetime = float(body.get("expires_in", ASSERTION_LIFETIME))
        except (TypeError, ValueError):
            lifetime = ASSERTION_LIFETIME  # SMART requires expires_in; without it assume a short-lived token
        self._token = token
        self._expires_at = time.monotonic() + lifetime - min(self.renew_margin, lifetime / 5)
        self.tokens_issued += 1
        log.info("SMART access token obtained", extra={"event": "smart-token", "reason": f"expires_in={lifetime:g}"})

    def token(self, session: requests.Session | None = None) -> str:
        """A valid access token, fetched when none is cached or it is about to expire."""
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._fetch(session)
            assert self._token is not None
            return self._token

    def invalidate(self, rejected: str | None = None) -> None:
        """Forget the cached token (only if it is still ``rejected``, so two threads renew once)."""
        with self._lock:
            if rejected is None or rejected == self._token:
                self._token, self._expires_at = None, 0.0

    def headers(self, session: requests.Session | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(session)}"}

    def send(self, session: requests.Session, method: str, url: str, **kwargs: Any) -> requests.Response:
        """``session.request`` with the token; a 401 renews the token once and repeats the request."""
        headers = dict(kwargs.pop("headers", None) or {})
        used = self.token(session)
        response = session.request(method, url, headers={**headers, "Authorization": f"Bearer {used}"}, **kwargs)
        if response.status_code != 401:
            return response
        response.close()
        log.info("FHIR server rejected the access token; renewing once", extra={"event": "smart-token-renew"})
        self.invalidate(used)
        fresh = self.token(session)
        return session.request(method, url, headers={**headers, "Authorization": f"Bearer {fresh}"}, **kwargs)
