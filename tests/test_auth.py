"""JWT authentication of CDS clients (cds_service.web.auth; CDS Hooks 2.0 "Trusting CDS Clients").

Key pairs are generated per test session with ``cryptography``; JWK Sets served over HTTP are mocked with
``responses``. The Redis tests use a real server at ``G2250_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``; skipped when unreachable, failed when ``G2250_REQUIRE_INTEGRATION=1``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cds_service.config import Config, config_from_mapping
from cds_service.web.auth import (
    MAX_TOKEN_LIFETIME_SECONDS,
    Authenticator,
    AuthError,
    DatabaseReplayCache,
    JwksCache,
    MemoryReplayCache,
    RedisReplayCache,
    ReplayCacheUnavailable,
    parse_jwks,
    replay_cache_for,
)
from tests.conftest import REDIS_URL

DATA = Path(__file__).parent / "data"
REQUIRE_INTEGRATION = os.environ.get("G2250_REQUIRE_INTEGRATION") == "1"
REDIS_TEST_URL = REDIS_URL  # G2250_TEST_REDIS_URL (tests/conftest.py)

AUDIENCE = "https://cds.example.org/cds-services"
PATH = "/cds-services/g2250-patient-view"
ENDPOINT = AUDIENCE + "/g2250-patient-view"

TRUSTED_ISS = "https://ehr.example.com"
TRUSTED_JKU = "https://ehr.example.com/.well-known/jwks.json"
SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
EPIC_ISS = "https://epic.example.org/interconnect-cds"
ROTATING_ISS = "https://rotating.example.net"
ROTATING_JWKS_URL = "https://rotating.example.net/jwks"
EVIL_JKU = "https://evil.example/jwks.json"
FHIR = "https://fhir.example.org/r4"

NOW = 1_800_000_000


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def public_jwk(private_key: Any, kid: str, alg: str | None) -> dict[str, Any]:
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    jwk.update(kid=kid, use="sig")
    if alg:
        jwk["alg"] = alg
    return jwk


def jwks_of(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def sign(private_key: Any, alg: str, kid: str | None, claims: dict[str, Any],
         headers: dict[str, Any] | None = None) -> str:
    all_headers = {"typ": "JWT", **(headers or {})}
    if kid is not None:
        all_headers["kid"] = kid
    return jwt.encode(claims, private_key, algorithm=alg, headers=all_headers)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def make_config(clients: list[dict[str, Any]], *, skew: float = 30, audience: str = AUDIENCE) -> Config:
    return config_from_mapping({"auth": {"required": True, "audience": audience, "clock_skew_seconds": skew,
                                         "clients": clients}}, "test")


@pytest.fixture(scope="session")
def es_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="session")
def es_key_2() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="session")
def rs_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Env:
    """One configured authenticator with a trusted ES384 + RS384 issuer (inline keys), the sandbox (jku), Epic
    (inline RSA key without "alg") and a rotating issuer (jwks_url); injected wall and monotonic clocks."""

    es: ec.EllipticCurvePrivateKey
    es2: ec.EllipticCurvePrivateKey
    rs: rsa.RSAPrivateKey
    skew: float = 30
    clock: FakeClock = field(default_factory=lambda: FakeClock(NOW))
    mono: FakeClock = field(default_factory=lambda: FakeClock(1_000))

    def __post_init__(self) -> None:
        self.config = make_config([
            {"issuer": TRUSTED_ISS, "fhir_servers": [FHIR],
             "jwks": jwks_of(public_jwk(self.es, "es-1", "ES384"), public_jwk(self.rs, "rs-1", "RS384")),
             "allowed_jku": [TRUSTED_JKU]},
            {"issuer": SANDBOX_ISS, "allowed_jku": [SANDBOX_JKU], "fhir_servers": ["https://launch.smarthealthit.org/v/r4/fhir"]},
            {"issuer": EPIC_ISS, "jwks": jwks_of(public_jwk(self.rs, "epic-1", None)), "fhir_servers": [FHIR]},
            {"issuer": ROTATING_ISS, "jwks_url": ROTATING_JWKS_URL},
        ], skew=self.skew)
        self.replay = MemoryReplayCache(clock=self.mono)
        self.jwks = JwksCache(clock=self.mono)
        self.auth = self.authenticator()

    def authenticator(self, **kwargs: Any) -> Authenticator:
        kwargs.setdefault("replay", self.replay)
        kwargs.setdefault("jwks", self.jwks)
        kwargs.setdefault("clock", self.clock)
        return Authenticator(self.config, **kwargs)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(self.clock())
        claims: dict[str, Any] = {"iss": TRUSTED_ISS, "aud": ENDPOINT, "iat": now, "exp": now + 300,
                                  "jti": str(uuid.uuid4())}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def es_token(self, headers: dict[str, Any] | None = None, kid: str | None = "es-1", **claims: Any) -> str:
        return sign(self.es, "ES384", kid, self.claims(**claims), headers)

    def rs_token(self, headers: dict[str, Any] | None = None, kid: str | None = "rs-1", **claims: Any) -> str:
        return sign(self.rs, "RS384", kid, self.claims(**claims), headers)


@pytest.fixture
def env(es_key: ec.EllipticCurvePrivateKey, es_key_2: ec.EllipticCurvePrivateKey, rs_key: rsa.RSAPrivateKey) -> Env:
    return Env(es_key, es_key_2, rs_key)


def refused(auth: Authenticator, authorization: str | None, path: str = PATH) -> AuthError:
    with pytest.raises(AuthError) as info:
        auth.authenticate(authorization, path)
    return info.value


# --------------------------------------------------------------------------------------------------------------
# the attack table: each row is refused (→ bare 401), with a log reason free of token material
# --------------------------------------------------------------------------------------------------------------


def _alg_none(e: Env) -> str:
    header = {"alg": "none", "typ": "JWT", "kid": "es-1"}
    return bearer(f"{b64url_json(header)}.{b64url_json(e.claims())}.")


def _hs256_with_public_key(e: Env) -> str:
    # The classic algorithm-confusion attack: HMAC "signed" with the issuer's public key as the shared secret.
    pem = e.rs.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rs-1'})}.{b64url_json(e.claims())}"
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return bearer(f"{signing_input}.{b64url(signature)}")


def _tampered_payload(e: Env) -> str:
    token = e.es_token(aud=AUDIENCE + "/some-other-service")
    head, _, signature = token.split(".")
    forged = {**jwt.decode(token, options={"verify_signature": False}), "aud": ENDPOINT}
    return bearer(f"{head}.{b64url_json(forged)}.{signature}")


def _replayed(e: Env) -> str:
    authorization = bearer(e.es_token())
    e.auth.authenticate(authorization, PATH)  # first use is fine
    return authorization


def _replayed_with_other_aud(e: Env) -> str:
    # The same jti in a second, validly signed token for the same endpoint (a client replaying a captured jti).
    jti = str(uuid.uuid4())
    e.auth.authenticate(bearer(e.es_token(jti=jti)), PATH)
    return bearer(e.es_token(jti=jti, aud=[ENDPOINT, AUDIENCE]))


def _rs384_with_short_key(e: Env) -> str:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    e.auth = Authenticator(make_config([{"issuer": TRUSTED_ISS, "jwks": jwks_of(public_jwk(weak, "weak", "RS384"))}]),
                           replay=e.replay, jwks=e.jwks, clock=e.clock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bearer(sign(weak, "RS384", "weak", e.claims()))


ATTACKS: dict[str, tuple[Callable[[Env], str | None], str]] = {
    "alg none": (_alg_none, "algorithm not allowed"),
    "HS256 signed with the public key": (_hs256_with_public_key, "algorithm not allowed"),
    "ES256 (wrong curve/algorithm)": (
        lambda e: bearer(sign(ec.generate_private_key(ec.SECP256R1()), "ES256", "es-1", e.claims())),
        "algorithm not allowed"),
    "RS256": (lambda e: bearer(sign(e.rs, "RS256", "rs-1", e.claims())), "algorithm not allowed"),
    "PS384": (lambda e: bearer(sign(e.rs, "PS384", "rs-1", e.claims())), "algorithm not allowed"),
    "ES384 header naming the RSA key": (
        lambda e: bearer(sign(e.es, "ES384", "rs-1", e.claims())), "algorithm does not match key"),
    "RS384 with a 1024-bit key": (_rs384_with_short_key, "key does not fit algorithm"),
    "expired": (lambda e: bearer(e.es_token(iat=NOW - 400, exp=NOW - 100)), "expired"),
    "not yet valid (nbf)": (lambda e: bearer(e.es_token(nbf=NOW + 120)), "not yet valid"),
    "wrong aud": (lambda e: bearer(e.es_token(aud=AUDIENCE + "/other-service")), "wrong audience"),
    "aud of another host": (lambda e: bearer(e.es_token(aud="https://cds.example.org.evil/cds-services")),
                            "wrong audience"),
    "unknown iss": (lambda e: bearer(e.es_token(iss="https://evil.example")), "unknown issuer"),
    "missing iss": (lambda e: bearer(e.es_token(iss=None)), "missing issuer"),
    "unknown kid": (lambda e: bearer(e.es_token(kid="no-such-kid")), "unknown kid"),
    "missing kid": (lambda e: bearer(e.es_token(kid=None)), "missing kid"),
    "typ not JWT": (lambda e: bearer(e.es_token(headers={"typ": "at+jwt"})), "typ is not JWT"),
    "signed by another key under a trusted kid": (
        lambda e: bearer(sign(e.es2, "ES384", "es-1", e.claims())), "bad signature"),
    "tampered payload": (_tampered_payload, "bad signature"),
    "replayed jti": (_replayed, "replayed jti"),
    "missing jti": (lambda e: bearer(e.es_token(jti=None)), "missing required claim"),
    "missing exp": (lambda e: bearer(e.es_token(exp=None)), "missing required claim"),
    "missing iat": (lambda e: bearer(e.es_token(iat=None)), "missing required claim"),
    "missing aud": (lambda e: bearer(e.es_token(aud=None)), "missing required claim"),
    "non-numeric exp": (lambda e: bearer(e.es_token(exp="tomorrow")), "malformed exp"),
    "lifetime too long": (lambda e: bearer(e.es_token(exp=NOW + MAX_TOKEN_LIFETIME_SECONDS + 1)),
                          "lifetime too long"),
    "missing header": (lambda e: None, "missing Authorization header"),
    "empty header": (lambda e: "", "missing Authorization header"),
    "Basic scheme": (lambda e: "Basic dXNlcjpwYXNz", "not a Bearer token"),
    "Bearer without token": (lambda e: "Bearer ", "missing token"),
    "garbage token": (lambda e: "Bearer garbage", "malformed token"),
    "garbage with dots": (lambda e: "Bearer aaaaaaaaaa.bbbbbbbbbb.cccccccccc", "malformed token"),
    "alg as a list": (
        lambda e: bearer(f"{b64url_json({'alg': ['ES384'], 'kid': 'es-1'})}.{b64url_json(e.claims())}.AA"),
        "algorithm not allowed"),
    "crit header": (lambda e: bearer(e.es_token(headers={"crit": ["exp"], "exp": 1})), "malformed token"),
    # held-out style: kid / alg / aud / jku mismatches
    "RS384 header naming the EC key": (
        lambda e: bearer(sign(e.rs, "RS384", "es-1", e.claims())), "algorithm does not match key"),
    "kid of another issuer": (
        lambda e: bearer(sign(e.rs, "RS384", "epic-1", e.claims())), "unknown kid"),
    "jku allowed for another issuer": (
        lambda e: bearer(e.es_token(headers={"jku": SANDBOX_JKU})), "jku not allowed"),
    "jku with another scheme": (
        lambda e: bearer(e.es_token(headers={"jku": TRUSTED_JKU.replace("https://", "http://")})), "jku not allowed"),
    "jku with a trailing slash": (lambda e: bearer(e.es_token(headers={"jku": TRUSTED_JKU + "/"})), "jku not allowed"),
    "jku as a list": (lambda e: bearer(e.es_token(headers={"jku": [TRUSTED_JKU]})), "malformed jku"),
    "aud on 127.0.0.1 for a localhost audience": (
        lambda e: bearer(e.es_token(aud=ENDPOINT.replace("cds.example.org", "127.0.0.1"))), "wrong audience"),
    "aud with another port": (
        lambda e: bearer(e.es_token(aud=ENDPOINT.replace("cds.example.org", "cds.example.org:8443"))),
        "wrong audience"),
    "aud with another scheme": (lambda e: bearer(e.es_token(aud=ENDPOINT.replace("https:", "http:"))),
                                "wrong audience"),
    "aud as a prefix of the endpoint": (lambda e: bearer(e.es_token(aud=ENDPOINT + "-and-more")), "wrong audience"),
    "aud with dot segments": (lambda e: bearer(e.es_token(aud=AUDIENCE + "/x/../g2250-patient-view")),
                              "wrong audience"),
    "aud list of other services only": (
        lambda e: bearer(e.es_token(aud=[AUDIENCE + "/a", AUDIENCE + "/b"])), "wrong audience"),
    "replayed jti with another aud": (
        lambda e: _replayed_with_other_aud(e), "replayed jti"),
}


@pytest.mark.parametrize("case", list(ATTACKS), ids=list(ATTACKS))
def test_attack_is_refused(env: Env, case: str) -> None:
    build, expected_reason = ATTACKS[case]
    authorization = build(env)
    error = refused(env.auth, authorization)
    assert error.reason == expected_reason
    if authorization:
        token = authorization.partition(" ")[2]
        for part in token.split("."):
            if len(part) >= 8:
                assert part not in str(error)
        if token.count(".") == 2:
            try:
                jti = jwt.decode(token, options={"verify_signature": False}).get("jti")
            except jwt.PyJWTError:
                jti = None
            if jti:
                assert jti not in str(error)


def test_jku_not_on_allowlist_is_refused_without_any_request(env: Env) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(EVIL_JKU, json=jwks_of(public_jwk(env.es2, "evil", "ES384")))
        token = sign(env.es2, "ES384", "evil", env.claims(), {"jku": EVIL_JKU})
        assert refused(env.auth, bearer(token)).reason == "jku not allowed"
        # also for an issuer that has a jku allowlist of its own, and for the sandbox with a look-alike URL
        look_alike = SANDBOX_JKU + "?x=1"
        rsps.get(look_alike, json=jwks_of(public_jwk(env.es2, "evil", "ES384")))
        token = sign(env.es2, "ES384", "evil", env.claims(iss=SANDBOX_ISS), {"jku": look_alike})
        assert refused(env.auth, bearer(token)).reason == "jku not allowed"
        assert len(rsps.calls) == 0


# --------------------------------------------------------------------------------------------------------------
# pinned keys: inline keys answer for an allow-listed jku, with no outbound request
# --------------------------------------------------------------------------------------------------------------


def test_pinned_keys_answer_for_an_allowlisted_jku_without_any_request(env: Env) -> None:
    # TRUSTED_ISS pins es-1/rs-1 and allow-lists TRUSTED_JKU. Were the jku fetched, it would serve another key.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(TRUSTED_JKU, json=jwks_of(public_jwk(env.es2, "es-1", "ES384")))
        assert env.auth.authenticate(bearer(env.es_token(headers={"jku": TRUSTED_JKU})), PATH).issuer == TRUSTED_ISS
        assert env.auth.authenticate(bearer(env.rs_token(headers={"jku": TRUSTED_JKU})), PATH).issuer == TRUSTED_ISS
        # a kid that is not pinned is unknown: still no request (an issuer with pinned keys is never fetched)
        assert refused(env.auth, bearer(env.es_token(kid="es-2", headers={"jku": TRUSTED_JKU}))).reason \
            == "unknown kid"
        # the key the jku would serve is not trusted
        forged = sign(env.es2, "ES384", "es-1", env.claims(), {"jku": TRUSTED_JKU})
        assert refused(env.auth, bearer(forged)).reason == "bad signature"
        assert len(rsps.calls) == 0


def test_pinned_keys_plus_jwks_url_still_rotate(env: Env) -> None:
    pinned = ec.generate_private_key(ec.SECP384R1())
    rotated = ec.generate_private_key(ec.SECP384R1())
    jku = "https://pinned.example.net/.well-known/jwks.json"
    jwks_url = "https://pinned.example.net/keys"
    config = make_config([{"issuer": "https://pinned.example.net", "jwks": jwks_of(public_jwk(pinned, "p1", "ES384")),
                           "jwks_url": jwks_url, "allowed_jku": [jku]}])
    auth = Authenticator(config, replay=MemoryReplayCache(), jwks=JwksCache(clock=env.mono), clock=env.clock)
    claims = {"iss": "https://pinned.example.net"}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(jku, json=jwks_of(public_jwk(env.es2, "r2", "ES384")))
        rsps.get(jwks_url, json=jwks_of(public_jwk(rotated, "r2", "ES384")))
        assert auth.authenticate(bearer(sign(pinned, "ES384", "p1", env.claims(**claims), {"jku": jku})), PATH)
        assert len(rsps.calls) == 0  # the pinned key answers
        # the client rotates to r2, published at its jwks_url: fetched from there, never from the jku
        assert auth.authenticate(bearer(sign(rotated, "ES384", "r2", env.claims(**claims), {"jku": jku})), PATH)
        assert auth.authenticate(bearer(sign(rotated, "ES384", "r2", env.claims(**claims))), PATH)
        assert [c.request.url for c in rsps.calls] == [jwks_url]


def test_sandbox_keys_pinned_the_way_the_sandbox_config_does(env: Env) -> None:
    # deploy/config.sandbox.yaml: issuer https://sandbox.cds-hooks.org, allowed_jku = its hard-coded jku, keys
    # inline. A token shaped exactly like the sandbox's (ES384, kid, jku, 300 s) is verified with no request.
    sandbox_jwks = json.loads((DATA / "cds-hooks-sandbox-jwks.json").read_text("utf-8"))
    sandbox_kid = sandbox_jwks["keys"][0]["kid"]
    local = ec.generate_private_key(ec.SECP384R1())  # the sandbox's private key is not in the data file
    pinned = jwks_of(public_jwk(local, sandbox_kid, "ES384"))
    config = make_config([{"issuer": SANDBOX_ISS, "allowed_jku": [SANDBOX_JKU], "jwks": pinned}])
    auth = Authenticator(config, replay=MemoryReplayCache(), jwks=JwksCache(), clock=env.clock)
    header = {"typ": "JWT", "jku": SANDBOX_JKU}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(SANDBOX_JKU, json=sandbox_jwks)
        token = sign(local, "ES384", sandbox_kid, env.claims(iss=SANDBOX_ISS, exp=NOW + 300), header)
        assert auth.authenticate(bearer(token), PATH).issuer == SANDBOX_ISS
        assert refused(auth, bearer(token)).reason == "replayed jti"
        assert len(rsps.calls) == 0


# --------------------------------------------------------------------------------------------------------------
# valid tokens
# --------------------------------------------------------------------------------------------------------------


def test_valid_es384_sandbox_style_with_allowlisted_jku(env: Env) -> None:
    sandbox_key = ec.generate_private_key(ec.SECP384R1())
    with responses.RequestsMock() as rsps:
        rsps.get(SANDBOX_JKU, json=jwks_of(public_jwk(sandbox_key, "sandbox-kid", "ES384")))
        token = sign(sandbox_key, "ES384", "sandbox-kid",
                     env.claims(iss=SANDBOX_ISS, aud=ENDPOINT, exp=NOW + 300), {"jku": SANDBOX_JKU})
        client = env.auth.authenticate(bearer(token), PATH)
        assert client.issuer == SANDBOX_ISS
        assert client.fhir_servers == ("https://launch.smarthealthit.org/v/r4/fhir",)
        assert len(rsps.calls) == 1
        assert rsps.calls[0].request.url == SANDBOX_JKU
        # a second token is served from the cache
        token = sign(sandbox_key, "ES384", "sandbox-kid", env.claims(iss=SANDBOX_ISS), {"jku": SANDBOX_JKU})
        env.auth.authenticate(bearer(token), PATH)
        assert len(rsps.calls) == 1


def test_valid_es384_with_inline_keys_on_discovery_and_feedback(env: Env) -> None:
    assert env.auth.authenticate(bearer(env.es_token(aud=AUDIENCE)), "/cds-services").issuer == TRUSTED_ISS
    feedback = "/cds-services/g2250-patient-view/feedback"
    assert env.auth.authenticate(bearer(env.es_token(aud=AUDIENCE + "/g2250-patient-view/feedback")), feedback)
    # the endpoint URL of one service is not valid for another
    assert refused(env.auth, bearer(env.es_token(aud=ENDPOINT)), feedback).reason == "wrong audience"


def test_valid_rs384_epic_style(env: Env) -> None:
    # Epic: RS384, sub + nbf, aud = the configured base audience; inline JWK Set whose key has no "alg".
    claims = env.claims(iss=EPIC_ISS, aud=AUDIENCE, sub="epic-client-id", nbf=NOW, tenant="org-1")
    token = sign(env.rs, "RS384", "epic-1", claims)
    client = env.auth.authenticate(f"bearer   {token}  ", PATH)  # scheme is case-insensitive
    assert client.issuer == EPIC_ISS
    assert client.fhir_servers == (FHIR,)


def test_valid_rs384_of_trusted_issuer(env: Env) -> None:
    assert env.auth.authenticate(bearer(env.rs_token()), PATH).issuer == TRUSTED_ISS


def test_typ_is_optional_and_case_insensitive(env: Env) -> None:
    assert env.auth.authenticate(bearer(env.es_token(headers={"typ": "jwt"})), PATH)
    token = jwt.encode(env.claims(), env.es, algorithm="ES384", headers={"kid": "es-1"})
    assert "typ" in jwt.get_unverified_header(token)  # PyJWT adds typ; strip it by hand
    payload = token.split(".")[1]
    header = {"alg": "ES384", "kid": "es-1"}
    signing_input = f"{b64url_json(header)}.{payload}"
    untyped = f"{signing_input}.{b64url(_es384_raw_signature(env.es, signing_input.encode()))}"
    assert env.auth.authenticate(bearer(untyped), PATH)


def _es384_raw_signature(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    return ECAlgorithm(ECAlgorithm.SHA384).sign(message, key)


def test_aud_as_a_list(env: Env) -> None:
    assert env.auth.authenticate(bearer(env.es_token(aud=["https://other.example/cds", ENDPOINT])), PATH)
    assert env.auth.authenticate(bearer(env.es_token(aud=[AUDIENCE])), PATH)
    error = refused(env.auth, bearer(env.es_token(aud=["https://other.example/cds", AUDIENCE + "/x"])))
    assert error.reason == "wrong audience"


def test_audience_with_trailing_slash_in_config(env: Env) -> None:
    config = make_config([{"issuer": TRUSTED_ISS, "jwks": jwks_of(public_jwk(env.es, "es-1", "ES384"))}],
                         audience=AUDIENCE + "/")
    auth = Authenticator(config, replay=MemoryReplayCache(), clock=env.clock)
    assert auth.expected_audiences(PATH) == [AUDIENCE + "/", ENDPOINT]
    assert auth.authenticate(bearer(env.es_token()), PATH)


def test_clock_skew(env: Env) -> None:
    assert env.skew == 30
    assert env.auth.authenticate(bearer(env.es_token(iat=NOW + 20, exp=NOW + 320)), PATH)
    assert refused(env.auth, bearer(env.es_token(iat=NOW + 60, exp=NOW + 360))).reason == "issued in the future"
    assert env.auth.authenticate(bearer(env.es_token(nbf=NOW + 20)), PATH)
    assert refused(env.auth, bearer(env.es_token(nbf=NOW + 31))).reason == "not yet valid"
    assert env.auth.authenticate(bearer(env.es_token(iat=NOW - 300, exp=NOW - 20)), PATH)
    assert refused(env.auth, bearer(env.es_token(iat=NOW - 300, exp=NOW - 30))).reason == "expired"


def test_token_lifetime_bound(env: Env) -> None:
    assert env.auth.authenticate(bearer(env.es_token(exp=NOW + MAX_TOKEN_LIFETIME_SECONDS)), PATH)
    assert refused(env.auth, bearer(env.es_token(exp=NOW + 86_400))).reason == "lifetime too long"
    assert refused(env.auth, bearer(env.es_token(iat=NOW, exp=NOW))).reason == "expires before issued"


def test_jku_equal_to_the_configured_jwks_url_is_accepted(env: Env) -> None:
    # contract.md's sample config gives the sandbox a jwks_url and an empty allowed_jku; the sandbox sends a jku
    # equal to that URL, which must not be refused.
    key = ec.generate_private_key(ec.SECP384R1())
    with responses.RequestsMock() as rsps:
        rsps.get(ROTATING_JWKS_URL, json=jwks_of(public_jwk(key, "k", "ES384")))
        token = sign(key, "ES384", "k", env.claims(iss=ROTATING_ISS), {"jku": ROTATING_JWKS_URL})
        assert env.auth.authenticate(bearer(token), PATH).issuer == ROTATING_ISS
        assert len(rsps.calls) == 1


def test_issuer_with_only_a_jku_allowlist_needs_a_jku(env: Env) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    token = sign(key, "ES384", "k", env.claims(iss=SANDBOX_ISS))
    assert refused(env.auth, bearer(token)).reason == "no key source for issuer"


# --------------------------------------------------------------------------------------------------------------
# JWK Set fetching: rotation, rate limit, ttl, failures
# --------------------------------------------------------------------------------------------------------------


def test_key_rotation_at_jwks_url(env: Env) -> None:
    old = ec.generate_private_key(ec.SECP384R1())
    new = ec.generate_private_key(ec.SECP384R1())
    with responses.RequestsMock() as rsps:
        rsps.get(ROTATING_JWKS_URL, json=jwks_of(public_jwk(old, "k1", "ES384")))
        assert env.auth.authenticate(bearer(sign(old, "ES384", "k1", env.claims(iss=ROTATING_ISS))), PATH)
        assert len(rsps.calls) == 1

        # the issuer rotates: k1 is gone, k2 is published
        rsps.replace(responses.GET, ROTATING_JWKS_URL, json=jwks_of(public_jwk(new, "k2", "ES384")))
        env.mono.advance(60)
        assert env.auth.authenticate(bearer(sign(new, "ES384", "k2", env.claims(iss=ROTATING_ISS))), PATH)
        assert len(rsps.calls) == 2  # exactly one refetch

        # the retired key no longer works; an unknown kid right after a fetch does not refetch (rate limit)
        env.mono.advance(1)
        assert refused(env.auth, bearer(sign(old, "ES384", "k1", env.claims(iss=ROTATING_ISS)))).reason \
            == "unknown kid"
        assert len(rsps.calls) == 2
        # known keys keep working without a fetch
        assert env.auth.authenticate(bearer(sign(new, "ES384", "k2", env.claims(iss=ROTATING_ISS))), PATH)
        assert len(rsps.calls) == 2


def test_rotation_within_the_refresh_interval_waits_for_it(env: Env) -> None:
    old = ec.generate_private_key(ec.SECP384R1())
    new = ec.generate_private_key(ec.SECP384R1())
    with responses.RequestsMock() as rsps:
        rsps.get(ROTATING_JWKS_URL, json=jwks_of(public_jwk(old, "k1", "ES384")))
        assert env.auth.authenticate(bearer(sign(old, "ES384", "k1", env.claims(iss=ROTATING_ISS))), PATH)
        rsps.replace(responses.GET, ROTATING_JWKS_URL,
                     json=jwks_of(public_jwk(old, "k1", "ES384"), public_jwk(new, "k2", "ES384")))
        env.mono.advance(5)
        token = sign(new, "ES384", "k2", env.claims(iss=ROTATING_ISS))
        assert refused(env.auth, bearer(token)).reason == "unknown kid"
        assert len(rsps.calls) == 1
        env.mono.advance(5)  # min_refresh_interval (10 s) has passed
        assert env.auth.authenticate(bearer(token), PATH)
        assert len(rsps.calls) == 2


def test_flood_of_unknown_kids_fetches_at_most_once_per_interval(env: Env) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with responses.RequestsMock() as rsps:
        rsps.get(ROTATING_JWKS_URL, json=jwks_of(public_jwk(key, "k1", "ES384")))
        for i in range(50):
            token = sign(key, "ES384", f"made-up-{i}", env.claims(iss=ROTATING_ISS))
            assert refused(env.auth, bearer(token)).reason == "unknown kid"
            env.mono.advance(0.1)  # 5 s in all
        assert len(rsps.calls) == 1
        env.mono.advance(5)
        for i in range(50):
            refused(env.auth, bearer(sign(key, "ES384", f"again-{i}", env.claims(iss=ROTATING_ISS))))
        assert len(rsps.calls) == 2


def test_flood_from_many_threads_fetches_once(env: Env) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    tokens = [bearer(sign(key, "ES384", f"t-{i}", env.claims(iss=ROTATING_ISS))) for i in range(40)]
    errors: list[str] = []
    with responses.RequestsMock() as rsps:
        rsps.get(ROTATING_JWKS_URL, json=jwks_of(public_jwk(key, "k1", "ES384")))

        def call(authorization: str) -> None:
            try:
                env.auth.authenticate(authorization, PATH)
            except AuthError as exc:
                errors.append(exc.reason)

        threads = [threading.Thread(target=call, args=(t,)) for t in tokens]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(rsps.calls) == 1
    assert errors == ["unknown kid"] * 40


def test_jwks_ttl_expiry_refetches(env: Env) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with responses.RequestsMock() as rsps:
        rsps.get(ROTATING_JWKS_URL, json=jwks_of(public_jwk(key, "k1", "ES384")))
        assert env.auth.authenticate(bearer(sign(key, "ES384", "k1", env.claims(iss=ROTATING_ISS))), PATH)
        env.mono.advance(299)
        assert env.auth.authenticate(bearer(sign(key, "ES384", "k1", env.claims(iss=ROTATING_ISS))), PATH)
        assert len(rsps.calls) == 1
        env.mono.advance(2)
        assert env.auth.authenticate(bearer(sign(key, "ES384", "k1", env.claims(iss=ROTATING_ISS))), PATH)
        assert len(rsps.calls) == 2


def test_failed_refresh_keeps_the_previous_keys(env: Env) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with responses.RequestsMock() as rsps:
        rsps.get(ROTATING_JWKS_URL, json=jwks_of(public_jwk(key, "k1", "ES384")))
        assert env.auth.authenticate(bearer(sign(key, "ES384", "k1", env.claims(iss=ROTATING_ISS))), PATH)
        rsps.replace(responses.GET, ROTATING_JWKS_URL, status=503)
        env.mono.advance(301)
        assert env.auth.authenticate(bearer(sign(key, "ES384", "k1", env.claims(iss=ROTATING_ISS))), PATH)
        assert len(rsps.calls) == 2


@pytest.mark.parametrize("reply", [
    {"status": 500, "body": "oops"},
    {"status": 200, "body": "not json"},
    {"status": 200, "json": {"not": "a jwk set"}},
    {"status": 200, "body": json.dumps({"keys": [], "pad": "x" * 300_000})},
], ids=["500", "not-json", "not-a-jwk-set", "too-large"])
def test_unusable_jwks_response_is_refused(env: Env, reply: dict[str, Any]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with responses.RequestsMock() as rsps:
        rsps.get(ROTATING_JWKS_URL, **reply)
        token = sign(key, "ES384", "k1", env.claims(iss=ROTATING_ISS))
        assert refused(env.auth, bearer(token)).reason == "JWK Set unavailable"
        # ... and the failure is rate-limited as well
        assert refused(env.auth, bearer(sign(key, "ES384", "k1", env.claims(iss=ROTATING_ISS)))).reason \
            == "JWK Set unavailable"
        assert len(rsps.calls) == 1


def test_jwks_redirect_is_not_followed(env: Env) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(ROTATING_JWKS_URL, status=302, headers={"Location": EVIL_JKU})
        rsps.get(EVIL_JKU, json=jwks_of(public_jwk(key, "k1", "ES384")))
        token = sign(key, "ES384", "k1", env.claims(iss=ROTATING_ISS))
        assert refused(env.auth, bearer(token)).reason == "JWK Set unavailable"
        assert [call.request.url for call in rsps.calls] == [ROTATING_JWKS_URL]


def test_jwks_cache_fetch_settings() -> None:
    assert JwksCache()._session.trust_env is False  # no proxy or netrc settings from the environment

    class RecordingSession(requests.Session):
        def __init__(self) -> None:
            super().__init__()
            self.kwargs: list[dict[str, Any]] = []

        def get(self, url: str | bytes, **kwargs: Any) -> requests.Response:  # type: ignore[override]
            self.kwargs.append(kwargs)
            return super().get(url, **kwargs)

    session = RecordingSession()
    cache = JwksCache(session)
    with responses.RequestsMock() as rsps:
        rsps.get(ROTATING_JWKS_URL, json=jwks_of())
        with pytest.raises(AuthError):
            cache.key_for(ROTATING_JWKS_URL, "k")
    assert session.kwargs[0]["timeout"] == 2.0
    assert session.kwargs[0]["allow_redirects"] is False


def test_parse_jwks_skips_unusable_keys(es_key: ec.EllipticCurvePrivateKey, rs_key: rsa.RSAPrivateKey) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    private = ECAlgorithm.to_jwk(es_key, as_dict=True) | {"kid": "private"}
    document = jwks_of(
        public_jwk(es_key, "good-ec", "ES384"),
        public_jwk(rs_key, "good-rsa-no-alg", None),
        public_jwk(p256, "p256", None),
        public_jwk(es_key, "enc", "ES384") | {"use": "enc"},
        public_jwk(es_key, "dup", "ES384"),
        public_jwk(rs_key, "dup", "RS384"),
        private,
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "EC", "crv": "P-384", "kid": "broken", "x": "AA", "y": "AA"},
        public_jwk(es_key, "", "ES384"),
    )
    keys = parse_jwks(document)
    assert sorted(keys) == ["good-ec", "good-rsa-no-alg"]
    assert keys["good-rsa-no-alg"].algorithm_name == "RS384"
    with pytest.raises(AuthError):
        parse_jwks({"keys": "nope"})


# --------------------------------------------------------------------------------------------------------------
# the CDS Hooks spec's own example key pair, and the public sandbox's JWK Set
# --------------------------------------------------------------------------------------------------------------

SPEC = json.loads((DATA / "cds-hooks-spec-example.json").read_text("utf-8"))


def _spec_authenticator(clock: FakeClock) -> Authenticator:
    config = make_config([{"issuer": SPEC["payload"]["iss"], "allowed_jku": [SPEC["header"]["jku"]]}],
                         audience="https://cds.example.org/cds-services")
    return Authenticator(config, replay=MemoryReplayCache(), jwks=JwksCache(), clock=clock)


def test_spec_example_private_key_matches_its_public_key() -> None:
    private = ECAlgorithm.from_jwk(SPEC["private_jwk"])
    public = jwt.PyJWK(SPEC["public_jwks"]["keys"][0])
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.key.public_numbers()


def test_token_signed_with_the_spec_example_private_key_is_accepted() -> None:
    # The spec (CDS Hooks 2.0 "Trusting CDS Clients" → "Example") publishes the private JWK ("d") of its example;
    # tests/data/cds-hooks-spec-example.json holds it unchanged. We sign the example header and payload with it,
    # with one change: exp = iat + 300, because the example's own lifetime (exp − iat ≈ 3.5 years) exceeds
    # MAX_TOKEN_LIFETIME_SECONDS. The time check is relaxed by setting the clock to the example's iat.
    private = ECAlgorithm.from_jwk(SPEC["private_jwk"])
    payload = {**SPEC["payload"], "exp": SPEC["payload"]["iat"] + 300}
    headers = {k: v for k, v in SPEC["header"].items() if k != "alg"}
    token = jwt.encode(payload, private, algorithm="ES384", headers=headers)
    assert jwt.get_unverified_header(token) == SPEC["header"]
    auth = _spec_authenticator(FakeClock(SPEC["payload"]["iat"]))
    with responses.RequestsMock() as rsps:
        rsps.get(SPEC["header"]["jku"], json=SPEC["public_jwks"])
        client = auth.authenticate(bearer(token), "/cds-services/some-service")
        assert client.issuer == "https://fhir-ehr.example.com/"
        assert len(rsps.calls) == 1


def test_the_spec_example_token_itself() -> None:
    # The example token verifies against the example public key (PyJWT, expiry not checked: it expired in 2015) ...
    public = jwt.PyJWK(SPEC["public_jwks"]["keys"][0])
    claims = jwt.decode(SPEC["token"], public, algorithms=["ES384"], audience=SPEC["payload"]["aud"],
                        options={"verify_exp": False})
    assert claims == SPEC["payload"]
    # ... but this service refuses it even with the clock inside its validity: a 3.5-year token defeats replay
    # protection (MAX_TOKEN_LIFETIME_SECONDS). Every check before the lifetime bound passes.
    auth = _spec_authenticator(FakeClock(SPEC["payload"]["iat"] + 60))
    with responses.RequestsMock() as rsps:
        rsps.get(SPEC["header"]["jku"], json=SPEC["public_jwks"])
        assert refused(auth, bearer(SPEC["token"]), "/cds-services/some-service").reason == "lifetime too long"


def test_sandbox_jwks_loads_and_refuses_tokens_it_did_not_sign(env: Env) -> None:
    sandbox_jwks = json.loads((DATA / "cds-hooks-sandbox-jwks.json").read_text("utf-8"))
    sandbox_kid = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"
    pyjwk = jwt.PyJWK(sandbox_jwks["keys"][0])
    assert pyjwk.algorithm_name == "ES384"
    assert isinstance(pyjwk.key, ec.EllipticCurvePublicKey) and pyjwk.key.curve.name == "secp384r1"
    assert list(parse_jwks(sandbox_jwks)) == [sandbox_kid]

    config = make_config([{"issuer": SANDBOX_ISS, "jwks": sandbox_jwks}])
    auth = Authenticator(config, replay=MemoryReplayCache(), jwks=JwksCache(), clock=env.clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        unknown = sign(env.es, "ES384", "not-the-sandbox-kid", env.claims(iss=SANDBOX_ISS))
        assert refused(auth, bearer(unknown)).reason == "unknown kid"
        forged = sign(env.es, "ES384", sandbox_kid, env.claims(iss=SANDBOX_ISS))
        assert refused(auth, bearer(forged)).reason == "bad signature"
        assert len(rsps.calls) == 0


# --------------------------------------------------------------------------------------------------------------
# replay caches
# --------------------------------------------------------------------------------------------------------------


def test_memory_replay_cache_expiry() -> None:
    clock = FakeClock(0)
    cache = MemoryReplayCache(clock=clock)
    assert cache.add_if_new("iss|a", 10)
    assert not cache.add_if_new("iss|a", 10)
    clock.advance(9.9)
    assert not cache.add_if_new("iss|a", 10)
    clock.advance(0.1)
    assert cache.add_if_new("iss|a", 10)
    assert len(cache) == 1
    clock.advance(10)
    assert len(cache) == 0


def test_memory_replay_cache_is_bounded_and_evicts_expired_first() -> None:
    clock = FakeClock(0)
    cache = MemoryReplayCache(max_entries=3, clock=clock)
    assert cache.add_if_new("short", 1)
    assert cache.add_if_new("long-1", 100)
    assert cache.add_if_new("long-2", 200)
    clock.advance(2)  # "short" expired
    assert cache.add_if_new("long-3", 300)
    assert not cache.add_if_new("long-1", 100)  # still remembered: the expired entry made room
    assert cache.add_if_new("long-4", 400)  # full of live entries: the one closest to expiry goes
    assert len(cache) == 3
    assert cache.add_if_new("long-1", 100)
    assert not cache.add_if_new("long-4", 400)


def test_memory_replay_cache_is_thread_safe() -> None:
    cache = MemoryReplayCache()
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def add() -> None:
        barrier.wait()
        results.append(cache.add_if_new("iss|same", 60))

    threads = [threading.Thread(target=add) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1


def test_two_authenticators_sharing_a_memory_cache(env: Env) -> None:
    other = env.authenticator()
    authorization = bearer(env.es_token())
    assert env.auth.authenticate(authorization, PATH)
    assert refused(other, authorization).reason == "replayed jti"


def test_same_jti_from_different_issuers_is_not_a_replay(env: Env) -> None:
    jti = str(uuid.uuid4())
    assert env.auth.authenticate(bearer(env.es_token(jti=jti)), PATH)
    epic = sign(env.rs, "RS384", "epic-1", env.claims(iss=EPIC_ISS, jti=jti))
    assert env.auth.authenticate(bearer(epic), PATH)


def test_replay_cache_for(tmp_path: Path) -> None:
    # No shared store named (a bare Authenticator in one process), or an in-memory SQLite database: memory.
    assert isinstance(replay_cache_for(None), MemoryReplayCache)
    assert isinstance(replay_cache_for("", "sqlite://"), MemoryReplayCache)
    # The configured database otherwise — shared by every worker and replica — and Redis when configured.
    assert isinstance(replay_cache_for(None, f"sqlite:///{tmp_path / 'x.db'}"), DatabaseReplayCache)
    cache = replay_cache_for(REDIS_TEST_URL, f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(cache, RedisReplayCache)


def test_redis_down_fails_closed(env: Env) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    auth = env.authenticator(replay=RedisReplayCache(dead, prefix=f"g2250:test:{uuid.uuid4().hex}:"))
    error = refused(auth, bearer(env.es_token()))
    assert isinstance(error, ReplayCacheUnavailable)
    assert error.reason == "replay cache unavailable"


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        reason = f"Redis not reachable at {REDIS_TEST_URL} ({type(exc).__name__})"
        if REQUIRE_INTEGRATION:
            pytest.fail(f"{reason} (G2250_REQUIRE_INTEGRATION=1)")
        pytest.skip(reason)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"g2250:test:{uuid.uuid4().hex}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=prefix + "*"))
    if keys:
        redis_client.delete(*keys)


def test_redis_replay_cache(redis_client: redis.Redis, redis_prefix: str) -> None:
    cache = RedisReplayCache(redis_client, prefix=redis_prefix)
    assert cache.add_if_new("iss|jti-1", 2.2)
    assert not cache.add_if_new("iss|jti-1", 2.2)
    assert cache.add_if_new("iss|jti-2", 0.2)
    stored = list(redis_client.scan_iter(match=redis_prefix + "*"))
    assert len(stored) == 2
    assert all(b"jti" not in key for key in stored)  # keys are hashed, the raw jti is not stored
    assert 0 < redis_client.ttl(cache.redis_key("iss|jti-1")) <= 3  # EX ceil(2.2)
    assert 0 < redis_client.ttl(cache.redis_key("iss|jti-2")) <= 1  # at least 1 s


def test_two_replicas_sharing_redis_reject_the_replay(env: Env, redis_client: redis.Redis, redis_prefix: str) -> None:
    # Two Authenticator instances (two replicas), each with its own Redis connection, one shared Redis.
    first = env.authenticator(replay=RedisReplayCache(redis_client, prefix=redis_prefix))
    second_client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        second = env.authenticator(replay=RedisReplayCache(second_client, prefix=redis_prefix))
        authorization = bearer(env.es_token())
        assert first.authenticate(authorization, PATH).issuer == TRUSTED_ISS
        assert refused(second, authorization).reason == "replayed jti"
        assert refused(first, authorization).reason == "replayed jti"
        assert second.authenticate(bearer(env.es_token()), PATH)
        ttls = [redis_client.ttl(key) for key in redis_client.scan_iter(match=redis_prefix + "*")]
        assert len(ttls) == 2
        assert all(300 < ttl <= 330 for ttl in ttls)  # exp − now + skew
    finally:
        second_client.close()


# --------------------------------------------------------------------------------------------------------------
# no token material in logs
# --------------------------------------------------------------------------------------------------------------


def test_nothing_secret_is_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    key = ec.generate_private_key(ec.SECP384R1())
    tokens = [env.es_token(jti="secret-jti-1"), env.es_token(jti="secret-jti-1"),
              sign(key, "ES384", "k1", env.claims(iss=ROTATING_ISS, jti="secret-jti-2"))]
    with responses.RequestsMock() as rsps:
        rsps.get(ROTATING_JWKS_URL, status=500)
        for token in tokens:
            with contextlib.suppress(AuthError):
                env.auth.authenticate(bearer(token), PATH)
    text = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert "secret-jti" not in text
    for token in tokens:
        for part in token.split("."):
            assert part not in text


def test_authenticator_needs_an_audience() -> None:
    config = config_from_mapping({"auth": {"required": False}}, "test")
    with pytest.raises(ValueError, match="audience"):
        Authenticator(config, replay=MemoryReplayCache())


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
_headers = st.fixed_dictionaries(
    {}, optional={"alg": st.sampled_from(["ES384", "RS384", "none", "HS256"]) | _json_values,
                  "kid": st.sampled_from(["es-1", "rs-1"]) | _json_values, "typ": _json_values,
                  "jku": st.sampled_from([TRUSTED_JKU, EVIL_JKU]) | _json_values, "crit": _json_values})
_claims = st.fixed_dictionaries(
    {}, optional={"iss": st.sampled_from([TRUSTED_ISS, EPIC_ISS]) | _json_values,
                  "aud": st.sampled_from([ENDPOINT, AUDIENCE, [ENDPOINT]]) | _json_values,
                  "exp": st.integers(NOW - 100, NOW + 100_000) | _json_values,
                  "iat": st.integers(NOW - 100, NOW + 100) | _json_values,
                  "nbf": _json_values, "jti": st.text(max_size=5) | _json_values, "sub": _json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_headers, claims=_claims, signature=st.binary(max_size=120))
def test_forged_tokens_only_ever_raise_auth_error(env: Env, header: dict[str, Any], claims: dict[str, Any],
                                                  signature: bytes) -> None:
    token = f"{b64url_json(header)}.{b64url_json(claims)}.{b64url(signature)}"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        with pytest.raises(AuthError):
            env.auth.authenticate(bearer(token), PATH)
        # Both issuers in play pin their keys: not even their allow-listed jku is ever contacted.
        assert [c.request.url for c in rsps.calls] == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(authorization=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: "Bearer " + b64url(b)))
def test_arbitrary_authorization_headers_only_ever_raise_auth_error(env: Env, authorization: str) -> None:
    with pytest.raises(AuthError):
        env.auth.authenticate(authorization, PATH)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claims=_claims)
def test_validly_signed_tokens_with_arbitrary_claims_never_crash(env: Env, claims: dict[str, Any]) -> None:
    # Signed with the trusted key: whatever the claims, the answer is a client or an AuthError, never a crash.
    try:
        token = sign(env.es, "ES384", "es-1", claims)
    except (TypeError, ValueError):
        return  # not JSON-serialisable (e.g. NaN is fine, but some floats/objects are not)
    try:
        client = env.auth.authenticate(bearer(token), PATH)
    except AuthError:
        return
    assert client.issuer == TRUSTED_ISS
    assert claims["iss"] == TRUSTED_ISS
