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
import responses
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cds_service.app import create_app, runtime_of
from cds_service.cli import DEFAULT_PORT, build_parser, startup_summary
from cds_service.config import Config, config_from_mapping, read_config_file
from cds_service.web.errors import ApiError
from tests.conftest import require_redis

ROOT = Path(__file__).resolve().parents[1]
DISCHARGE = json.loads((ROOT / "fhir_fixtures" / "requests" / "encounter-discharge.json").read_text("utf-8"))
NOW = datetime.fromisoformat("2026-11-18T15:40:00-05:00")
AUDIENCE = "http://localhost:8250/cds-services"
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
    config = auth_config(make_config, redis_url=require_redis())  # G2250_TEST_REDIS_URL
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


# --------------------------------------------------------------------------------------------------------------
# deploy/config.sandbox.yaml: the CDS Hooks sandbox, hosted or on the user's own machine, with no outbound request
# --------------------------------------------------------------------------------------------------------------

SANDBOX_CONFIG = ROOT / "deploy" / "config.sandbox.yaml"
SANDBOX_DATA_JWKS = json.loads((ROOT / "tests" / "data" / "cds-hooks-sandbox-jwks.json").read_text("utf-8"))
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"


def _sandbox_app(tmp_path: Path, *, pin_local_key: bool) -> Flask:
    """The shipped sandbox config, on a temporary database; with ``pin_local_key`` the sandbox's public key is
    swapped for a local key pair under the same kid (the sandbox's private key is not in the data file)."""
    document = read_config_file(SANDBOX_CONFIG)
    document["database_url"] = f"sqlite:///{tmp_path / 'sandbox.db'}"
    document["logging"] = {"level": "WARNING", "format": "json"}
    (client,) = document["auth"]["clients"]
    if pin_local_key:
        client["jwks"] = {"keys": [_jwk(EC_KEY, SANDBOX_KID, "ES384")]}
    return create_app(config_from_mapping(document, "sandbox test"))


def _sandbox_token(url: str, **claims: Any) -> str:
    """Exactly the sandbox's JWT generator: ES384, typ JWT, its kid, its hard-coded jku, aud = URL called, 300 s."""
    now = int(time.time())
    payload = {"iss": SANDBOX, "aud": url, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4()), **claims}
    return jwt.encode(payload, EC_KEY, algorithm="ES384",
                      headers={"alg": "ES384", "typ": "JWT", "kid": SANDBOX_KID, "jku": SANDBOX_JKU})


@pytest.fixture
def no_outbound() -> Iterator[responses.RequestsMock]:
    """Every outbound request is recorded; the jku answers (so a fetch would be noticed, not just fail)."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(SANDBOX_JKU, json={"keys": [_jwk(EC_KEY, SANDBOX_KID, "ES384")]})
        yield mock


def test_shipped_sandbox_config_pins_the_sandbox_keys() -> None:
    document = read_config_file(SANDBOX_CONFIG)
    (client,) = document["auth"]["clients"]
    assert client["issuer"] == SANDBOX
    assert client["allowed_jku"] == [SANDBOX_JKU]
    assert client["jwks"]["keys"] == SANDBOX_DATA_JWKS["keys"]  # the published JWK Set, key for key
    assert f":{DEFAULT_PORT}/cds-services" in " ".join(document["auth"]["audience"])


@pytest.mark.parametrize("base", ["http://localhost:8250/cds-services", "http://127.0.0.1:8250/cds-services"])
def test_sandbox_tokens_accepted_offline_as_the_user_typed_the_url(
        tmp_path: Path, no_outbound: responses.RequestsMock, base: str) -> None:
    app = _sandbox_app(tmp_path, pin_local_key=True)
    try:
        client = app.test_client()
        origin = {"Origin": "http://localhost:8080"}  # the sandbox served locally (npm run dev)
        discovery = client.get("/cds-services", headers={**_h(_sandbox_token(base)), **origin})
        assert discovery.status_code == 200
        assert discovery.headers["Access-Control-Allow-Origin"] == "http://localhost:8080"
        path = "/cds-services/g2250-encounter-discharge"
        response = client.post(path, json=DISCHARGE, headers={**_h(_sandbox_token(base + path[13:])), **origin})
        assert response.status_code == 200
        card = response.get_json()["cards"][0]["uuid"]
        feedback = path + "/feedback"
        assert client.post(feedback, headers=_h(_sandbox_token(base + feedback[13:])), json={"feedback": [
            {"card": card, "outcome": "accepted", "outcomeTimestamp": "2026-11-18T16:00:00Z"}]}).status_code == 200
        assert len(no_outbound.calls) == 0  # the jku was never contacted
    finally:
        runtime_of(app).close()


def test_sandbox_config_refuses_what_the_sandbox_did_not_sign(
        tmp_path: Path, no_outbound: responses.RequestsMock) -> None:
    # The shipped keys, unmodified: a token from a local key under the sandbox's kid is refused — and still
    # nothing is fetched, not even to look for another key.
    app = _sandbox_app(tmp_path, pin_local_key=False)
    try:
        client = app.test_client()
        base = "http://localhost:8250/cds-services"
        assert client.get("/cds-services", headers=_h(_sandbox_token(base))).status_code == 401
        assert len(no_outbound.calls) == 0
    finally:
        runtime_of(app).close()


@pytest.mark.parametrize(("aud", "why"), [
    ("http://localhost:8080/cds-services", "the old default port"),
    ("https://localhost:8250/cds-services", "https typed, http served"),
    ("http://[::1]:8250/cds-services", "a spelling not listed in auth.audience"),
    ("http://localhost:8250/cds-services/", "a trailing slash typed"),
])
def test_sandbox_aud_must_be_a_configured_spelling(
        tmp_path: Path, no_outbound: responses.RequestsMock, aud: str, why: str) -> None:
    app = _sandbox_app(tmp_path, pin_local_key=True)
    try:
        assert app.test_client().get("/cds-services", headers=_h(_sandbox_token(aud))).status_code == 401, why
    finally:
        runtime_of(app).close()


@pytest.mark.parametrize(("origin", "allowed"), [
    ("https://sandbox.cds-hooks.org", True),
    ("http://localhost:8080", True),
    ("http://127.0.0.1:8080", True),
    ("http://localhost:3000", False),
    ("https://sandbox.cds-hooks.org.evil.example", False),
])
def test_sandbox_cors_origins(tmp_path: Path, origin: str, allowed: bool) -> None:
    app = _sandbox_app(tmp_path, pin_local_key=True)
    try:
        response = app.test_client().options("/cds-services/g2250-patient-view", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert (response.headers.get("Access-Control-Allow-Origin") == origin) is allowed
    finally:
        runtime_of(app).close()


def test_sandbox_fhir_servers_as_the_browser_spells_them(tmp_path: Path) -> None:
    app = _sandbox_app(tmp_path, pin_local_key=True)
    try:
        runtime = runtime_of(app)
        (client,) = runtime.config.clients
        for allowed in ("https://launch.smarthealthit.org/v/r4/fhir", "http://localhost:8090/fhir",
                        "http://127.0.0.1:8090/fhir/", "HTTP://LOCALHOST:8090/fhir"):
            runtime.check_fhir_server(allowed, client)
        for refused in ("http://host.docker.internal:8090/fhir", "http://localhost:8080/fhir",
                        "https://launch.smarthealthit.org/v/r2/fhir"):
            with pytest.raises(ApiError) as info:
                runtime.check_fhir_server(refused, client)
            assert info.value.status == 403
    finally:
        runtime_of(app).close()


def test_origins_with_a_path_or_trailing_slash_are_config_errors(make_config: Callable[..., Config]) -> None:
    from cds_service.config import ConfigError

    for origin in ("http://localhost:8080/", "http://localhost:8080/sandbox", "localhost:8080"):
        with pytest.raises(ConfigError, match="cors_allowed_origins"):
            make_config({"server": {"cors_allowed_origins": [origin]}})


def test_serve_default_port_collides_with_nothing_usual() -> None:
    args = build_parser().parse_args(["serve"])
    assert args.port == DEFAULT_PORT == 8250
    assert args.port not in (8080, 8090, 3000, 5000, 8000)  # HAPI/sandbox dev server, SEKMET, common dev servers


def test_startup_summary_of_the_sandbox_config(tmp_path: Path) -> None:
    document = read_config_file(SANDBOX_CONFIG)
    text = "\n".join(startup_summary(config_from_mapping(document, "sandbox"), "127.0.0.1", DEFAULT_PORT))
    assert text.splitlines()[0] == "g2250-cds serve: listening on http://127.0.0.1:8250/cds-services (2 workers)"
    assert "auth: required" in text
    assert "http://localhost:8250/cds-services, http://127.0.0.1:8250/cds-services" in text
    assert "https://sandbox.cds-hooks.org, http://localhost:8080, http://127.0.0.1:8080" in text
    assert "never fetched" in text
    assert "https://launch.smarthealthit.org/v/r4/fhir" in text
    assert "warning" not in text
    # served on the old port, every sandbox token would be refused: said at start-up
    other = "\n".join(startup_summary(config_from_mapping(document, "sandbox"), "127.0.0.1", 8080))
    assert "warning: no auth.audience names port 8080" in other
