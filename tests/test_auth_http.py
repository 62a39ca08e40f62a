"""Authentication through HTTP: every discovery, service and feedback call needs a valid JWT when auth is on;
401 carries no detail; the fhirServer allowlist is the client's own; replicas share the Redis replay cache."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
import responses
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cds_service.app import create_app, runtime_of
from cds_service.config import Config

ROOT = Path(__file__).resolve().parents[1]
DISCHARGE = json.loads((ROOT / "fhir_fixtures" / "requests" / "encounter-discharge.json").read_text("utf-8"))
NOW = datetime.fromisoformat("2026-11-18T15:40:00-05:00")
AUDIENCE = "http://localhost:8080/cds-services"
SANDBOX = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
EPIC = "https://fhir.epic.example.org/interconnect-fhir-oauth"
SANDBOX_FHIR = "https://launch.smarthealthit.org/v/r4/fhir"
EPIC_FHIR = "https://fhir.epic.example.org/api/FHIR/R4"

EC_KEY = ec.generate_private_key(ec.SECP384R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = ECAlgorithm if alg == "ES384" else RSAAlgorithm
    jwk = algorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def sandbox_token(path: str, **claims: Any) -> str:
    """The sandbox's style: ES384, jku header, aud = the exact URL called, 300 s lifetime."""
    now = int(time.time())
    payload = {"iss": SANDBOX, "aud": AUDIENCE + path.removeprefix("/cds-services"), "exp": now + 300,
               "iat": now, "jti": str(uuid.uuid4()), **claims}
    return jwt.encode(payload, EC_KEY, algorithm="ES384",
                      headers={"kid": "sandbox-kid", "jku": SANDBOX_JKU, "typ": "JWT"})


def epic_token(**claims: Any) -> str:
    """Epic's style: RS384, sub and nbf, aud = the configured base URL."""
    now = int(time.time())
    payload = {"iss": EPIC, "aud": AUDIENCE, "sub": "epic-client-id", "nbf": now - 5, "exp": now + 240,
               "iat": now, "jti": str(uuid.uuid4()), **claims}
    return jwt.encode(payload, RSA_KEY, algorithm="RS384", headers={"kid": "epic-kid", "typ": "JWT"})


def auth_config(make_config: Callable[..., Config], **overrides: Any) -> Config:
    return make_config({
        "auth": {
            "required": True,
            "audience": AUDIENCE,
            "clients": [
                {"issuer": SANDBOX, "allowed_jku": [SANDBOX_JKU], "fhir_servers": [SANDBOX_FHIR]},
                {"issuer": EPIC, "jwks": {"keys": [_jwk(RSA_KEY, "epic-kid", "RS384")]},
                 "fhir_servers": [EPIC_FHIR]},
            ],
        },
        "server": {"workers": 1},
        **overrides,
    })


@pytest.fixture
def sandbox_jwks() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(SANDBOX_JKU, json={"keys": [_jwk(EC_KEY, "sandbox-kid", "ES384")]})
        yield mock


@pytest.fixture
def auth_app(make_config: Callable[..., Config]) -> Iterator[Flask]:
    app = create_app(auth_config(make_config), clock=lambda: NOW)
    yield app
    runtime_of(app).close()


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_endpoint_needs_a_token(auth_app: Flask) -> None:
    client = auth_app.test_client()
    for method, url in (("get", "/cds-services"), ("post", "/cds-services/g2250-encounter-discharge"),
                        ("post", "/cds-services/g2250-encounter-discharge/feedback"),
                        ("post", "/cds-services/no-such-service")):
        response = getattr(client, method)(url, json={})
        assert response.status_code == 401, url
        assert response.get_data() == b""  # no detail
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/healthz").status_code == 200  # probes stay open


def test_garbage_and_wrong_scheme_are_401(auth_app: Flask) -> None:
    client = auth_app.test_client()
    for header in ("Bearer", "Bearer x.y.z", "Basic dXNlcjpwYXNz", "bearer " + "a" * 5000):
        assert client.get("/cds-services", headers={"Authorization": header}).status_code == 401


def test_preflight_needs_no_token(auth_app: Flask) -> None:
    response = auth_app.test_client().options("/cds-services", headers={
        "Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert response.status_code == 200


def test_sandbox_style_es384_with_jku(auth_app: Flask, sandbox_jwks: responses.RequestsMock) -> None:
    client = auth_app.test_client()
    assert client.get("/cds-services", headers=_h(sandbox_token("/cds-services"))).status_code == 200
    path = "/cds-services/g2250-encounter-discharge"
    token = sandbox_token(path)
    response = client.post(path, json=DISCHARGE, headers={**_h(token), "Origin": "https://sandbox.cds-hooks.org"})
    assert response.status_code == 200
    assert response.get_json()["cards"][0]["extension"]["g2250-cds.determination"]["status"] == "billable"
    # The same token again is a replay.
    assert client.post(path, json=DISCHARGE, headers=_h(token)).status_code == 401
    feedback = path + "/feedback"
    card = response.get_json()["cards"][0]["uuid"]
    assert client.post(feedback, headers=_h(sandbox_token(feedback)), json={"feedback": [
        {"card": card, "outcome": "accepted", "outcomeTimestamp": "2026-11-18T16:00:00Z"}]}).status_code == 200


def test_epic_style_rs384_with_sub_and_nbf(auth_app: Flask) -> None:
    response = auth_app.test_client().post("/cds-services/g2250-encounter-discharge", json=DISCHARGE,
                                           headers=_h(epic_token(tenant="hospital-a")))
    assert response.status_code == 200


def test_token_for_another_endpoint_is_refused(auth_app: Flask, sandbox_jwks: responses.RequestsMock) -> None:
    token = sandbox_token("/cds-services/g2250-patient-view")
    response = auth_app.test_client().post("/cds-services/g2250-encounter-discharge", json=DISCHARGE,
                                           headers=_h(token))
    assert response.status_code == 401


def test_fhir_server_allowlist_is_the_clients_own(auth_app: Flask, sandbox_jwks: responses.RequestsMock) -> None:
    body: dict[str, Any] = {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p1"},
                            "fhirServer": EPIC_FHIR}  # allowed for Epic, not for the sandbox
    path = "/cds-services/g2250-patient-view"
    response = auth_app.test_client().post(path, json=body, headers=_h(sandbox_token(path)))
    assert response.status_code == 403
    assert not [c for c in sandbox_jwks.calls if EPIC_FHIR in c.request.url]


@pytest.mark.integration
def test_replicas_share_the_replay_cache_in_redis(make_config: Callable[..., Config]) -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError:
        import os

        if os.environ.get("G2250_REQUIRE_INTEGRATION") == "1":
            pytest.fail("Redis not reachable on 127.0.0.1:6379")
        pytest.skip("Redis not reachable on 127.0.0.1:6379")
    finally:
        client.close()
    config = auth_config(make_config, redis_url="redis://127.0.0.1:6379/0")
    first, second = create_app(config, clock=lambda: NOW), create_app(config, clock=lambda: NOW)
    try:
        token = epic_token()
        path = "/cds-services/g2250-encounter-discharge"
        assert first.test_client().post(path, json=DISCHARGE, headers=_h(token)).status_code == 200
        assert second.test_client().post(path, json=DISCHARGE, headers=_h(token)).status_code == 401
        assert second.test_client().post(path, json=DISCHARGE, headers=_h(epic_token())).status_code == 200
    finally:
        runtime_of(first).close()
        runtime_of(second).close()


def test_auth_off_logs_a_loud_warning(make_config: Callable[..., Config]) -> None:
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("g2250_cds")
    logger.addHandler(handler)
    try:
        app = create_app(make_config({"logging": {"level": "WARNING", "format": "json"}}))
        runtime_of(app).close()
    finally:
        logger.removeHandler(handler)
    warnings = [r for r in records if r.levelname == "WARNING" and "AUTHENTICATION IS OFF" in r.getMessage()]
    assert warnings
