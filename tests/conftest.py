"""Shared fixtures: app/client on embedded defaults, the real FHIR server, PostgreSQL, Redis.

Integration fixtures skip when their service is missing on a developer machine, but fail when
``G2250_REQUIRE_INTEGRATION=1`` (set by ``tests/run-all.sh`` and so by CI): a green CI run always includes them.

Where the services are (README "Set up"):

* PostgreSQL: ``G2250_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``: a
  passwordless user and a database the tests may create schemas in; each test gets a throw-away schema);
* Redis: ``G2250_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``; tests write only keys under a random
  ``g2250:test:…`` prefix, or ``g2250:jti:<hash>`` keys of random tokens that expire within minutes);
* FHIR: SEKMET from ``.venv-sekmet`` (``SEKMET_BIN``), or ``FHIR_BASE_URL``/``FHIR_TOKEN``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from cds_service.app import create_app
from cds_service.cli import load_fixtures
from cds_service.config import Config, config_from_mapping
from tests.support.fhir_server import FhirServer, external_server, sekmet_binary, start_sekmet

# The worklist's in-process app fixtures (clock, make_app, wl), shared by its two test modules.
pytest_plugins = ["tests.support.worklist_app"]

REQUIRE_INTEGRATION = os.environ.get("G2250_REQUIRE_INTEGRATION") == "1"
POSTGRES_URL = os.environ.get("G2250_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("G2250_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
STRICT = {"Prefer": "handling=strict"}


def _unavailable(reason: str) -> None:
    if REQUIRE_INTEGRATION:
        pytest.fail(f"{reason} (G2250_REQUIRE_INTEGRATION=1)")
    pytest.skip(reason)


def require_redis(url: str = REDIS_URL) -> str:
    """``url`` when Redis answers a PING there; else skip the test (fail under ``G2250_REQUIRE_INTEGRATION=1``)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis not reachable at {url} ({type(exc).__name__}; set G2250_TEST_REDIS_URL)")
    finally:
        client.close()
    return url


@pytest.fixture
def redis_url() -> str:
    """The test Redis (``G2250_TEST_REDIS_URL``), checked to answer."""
    return require_redis()


@pytest.fixture(scope="session", autouse=True)
def _private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The embedded default database lives under $XDG_DATA_HOME/g2250-cds: tests (and the servers they start,
    which inherit the environment) keep it in a temporary folder, not in the developer's home."""
    previous = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    yield
    if previous is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = previous


@pytest.fixture(autouse=True)
def _fresh_capability_cache() -> Iterator[None]:
    """The FHIR servers' CapabilityStatements and refused features are remembered per base URL for an hour, in
    the process. Tests start servers on free ports, which the OS hands out again: a later test's server on a port
    an earlier one used would inherit that server's statement. Each test starts with none remembered."""
    from cds_service.fhir.capabilities import CAPABILITIES

    CAPABILITIES.forget()
    yield
    CAPABILITIES.forget()


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    def factory(overrides: dict[str, Any] | None = None) -> Config:
        data: dict[str, Any] = {"database_url": f"sqlite:///{tmp_path / 'test.db'}",
                                "journal": {"dir": str(tmp_path / "journal")},
                                "logging": {"level": "WARNING", "format": "json"}}
        for key, value in (overrides or {}).items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return config_from_mapping(data, "test")

    return factory


@pytest.fixture
def app(make_config: Callable[..., Config]) -> Iterator[Flask]:
    application = create_app(make_config())
    yield application
    application.extensions["g2250_runtime"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirServer]:
    server = external_server()
    if server is None:
        binary = sekmet_binary()
        if binary is None:
            _unavailable("no FHIR test server: set FHIR_BASE_URL or install sekmet-fhir==0.1.1 in .venv-sekmet")
        server = start_sekmet(binary)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def open_fhir() -> Iterator[FhirServer]:
    """A second FHIR server without authentication, loaded with the fixtures (the public sandbox's servers)."""
    if external_server() is not None:
        pytest.skip("open-server tests need SEKMET (FHIR_BASE_URL points elsewhere)")
    binary = sekmet_binary()
    if binary is None:
        _unavailable("no FHIR test server: install sekmet-fhir==0.1.1 in .venv-sekmet")
    server = start_sekmet(binary, open_access=True)  # type: ignore[arg-type]
    try:
        load_fixtures(server.base_url, None)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def loaded_fhir(fhir_server: FhirServer) -> FhirServer:
    """The FHIR server with every bundle of fhir_fixtures/ loaded (PUT with fixed ids: idempotent)."""
    load_fixtures(fhir_server.base_url, fhir_server.token)
    return fhir_server


@pytest.fixture
def fhir_app(make_config: Callable[..., Config], loaded_fhir: FhirServer) -> Callable[..., Flask]:
    """An app allowed to call the loaded FHIR server, with a fixed clock, sending Prefer: handling=strict."""
    apps: list[Flask] = []

    def factory(now: datetime, overrides: dict[str, Any] | None = None) -> Flask:
        config = make_config({"fhir": {"allowed_servers": [loaded_fhir.base_url]}, **(overrides or {})})
        application = create_app(config, clock=lambda: now, fhir_headers=STRICT)
        apps.append(application)
        return application

    yield factory  # type: ignore[misc]
    for application in apps:
        application.extensions["g2250_runtime"].close()


@contextlib.contextmanager
def fresh_postgres_schema(prefix: str = "g2250_test_") -> Iterator[str]:
    """A database URL whose ``search_path`` is a fresh schema of the PostgreSQL test database, dropped afterwards
    (skips, or fails under G2250_REQUIRE_INTEGRATION=1, when PostgreSQL is not reachable)."""
    engine = sa.create_engine(POSTGRES_URL)
    schema = prefix + secrets.token_hex(6)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except sa.exc.OperationalError:
        engine.dispose()
        _unavailable(f"PostgreSQL not reachable at {POSTGRES_URL} (set G2250_TEST_POSTGRES_URL)")
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        engine.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the PostgreSQL test database, dropped afterwards."""
    with fresh_postgres_schema() as url:
        yield url


@pytest.fixture(scope="session")
def fixture_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled fixtures as a FHIR Bulk Data NDJSON export (one file per resource type), written once."""
    from cds_service.audit import sources

    folder = tmp_path_factory.mktemp("export")
    sources.fixtures_to_ndjson(folder)
    return folder
