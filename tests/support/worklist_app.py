"""The worklist's in-process test app, shared by tests/test_worklist_web.py and tests/test_worklist_auth.py
(registered as a pytest plugin in tests/conftest.py): a fixed, settable clock at ``NOW`` and apps built from the
test config, closed at the end of the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from flask import Flask
from sqlalchemy import event

from cds_service.app import create_app
from cds_service.config import Config

NY = ZoneInfo("America/New_York")
NOW = datetime(2026, 3, 10, 11, 0, tzinfo=NY)  # a Tuesday, 11:00 at the practice


@pytest.fixture
def clock() -> list[datetime]:
    """The apps' clock: ``clock[0] = ...`` moves it."""
    return [NOW]


@pytest.fixture
def make_app(make_config: Callable[..., Config], clock: list[datetime]) -> Iterator[Callable[..., Flask]]:
    """``make_app(overrides)``: an app on the test config with ``overrides`` merged, on the test's clock."""
    apps: list[Flask] = []

    def factory(overrides: dict[str, Any] | None = None) -> Flask:
        application = create_app(make_config(overrides), clock=lambda: clock[0])
        apps.append(application)
        return application

    yield factory
    for application in apps:
        application.extensions["g2250_runtime"].close()


@pytest.fixture
def wl(make_app: Callable[..., Flask]) -> Flask:
    """An app on the embedded defaults (token login)."""
    return make_app()


@contextmanager
def counted_statements(engine: Any) -> Iterator[list[str]]:
    """The SQL statements ``engine`` runs inside the block: a page's cost in queries does not depend on the
    machine, so tests assert it (no query per row) and leave milliseconds to ``bench.worklist``."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)
