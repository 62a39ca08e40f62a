"""Shared fixtures: app/client on embedded defaults, the real FHIR server, PostgreSQL.

Integration fixtures skip when their service is missing on a developer machine, but fail when
``G2250_REQUIRE_INTEGRATION=1`` (set by ``tests/run-all.sh`` and so by CI): a green CI run always includes them.
"""

from __future__ import annotations

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

REQUIRE_INTEGRATION = os.environ.get("G2250_REQUIRE_INTEGRATION") == "1"
POSTGRES_URL = os.environ.get("G2250_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
STRICT = {"Prefer": "handling=strict"}


def _unavailable(reason: str) -> None:
    if REQUIRE_INTEGRATION:
        pytest.fail(f"{reason} (G2250_REQUIRE_INTEGRATION=1)")
    pytest.skip(reason)


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


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the PostgreSQL test database, dropped afterwards."""
    engine = sa.create_engine(POSTGRES_URL)
    schema = "g2250_test_" + secrets.token_hex(6)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except sa.exc.OperationalError:
        engine.dispose()
        _unavailable(f"PostgreSQL not reachable at {POSTGRES_URL}")
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        engine.dispose()
