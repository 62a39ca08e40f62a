"""Service configuration: YAML file → validated, defaulted, immutable settings.

The keys are those of the external contract (``contract.md`` "Config file"); the JSON Schema shipped in
``cds_service/schemas/config.schema.json`` is the single definition of what is allowed. Unknown keys are
errors: a misspelt ``deadline_second`` must never silently fall back to a default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .mappings import deep_merge

CONFIG_ENV_VAR = "G2250_CDS_CONFIG"

# Embedded defaults: a developer's machine. Authentication is off (the server logs a loud warning) and only a
# FHIR server on the loopback interface may be called. The shipped production config (deploy/) turns auth on.
DEFAULTS: dict[str, Any] = {
    "auth": {
        "required": False,
        "audience": None,  # one URL or a list (each spelling callers use: localhost and 127.0.0.1 differ)
        "clock_skew_seconds": 30,
        "clients": [],
    },
    "fhir": {
        "allowed_servers": ["http://127.0.0.1:8090/fhir", "http://localhost:8090/fhir"],
        "timeout_seconds": 2.0,
        "max_pages": 10,
        "max_entries": 2000,
        "page_size": 100,
        "max_workers": 8,
        "batch": "auto",
    },
    "deadline_seconds": 4.0,
    "calendar": {
        "timezone": "America/New_York",
        "holidays": "US",
        "extra_holidays": [],
        "mode": "business-days",
        "working_hours": {"start": "08:00", "end": "17:00"},
    },
    "database_url": "sqlite:///g2250-cds.db",
    "redis_url": None,
    # The determination journal (cds_service/journal.py): rows are written here before a hook call is answered.
    "journal": {
        "dir": None,  # default: g2250-cds-journal/ beside the SQLite file, else in the working directory
        "max_bytes": 67_108_864,  # pending bytes, all workers; past it hook calls with determinations get 503
        "fsync": "interval",  # write before each answer, fdatasync every fsync_interval_seconds; or "always"
        "fsync_interval_seconds": 0.05,
    },
    "server": {
        "max_body_bytes": 1_048_576,
        "cors_allowed_origins": ["*"],
        "workers": 2,
        "threads": 4,
    },
    "logging": {"level": "INFO", "format": "json"},
}


class ConfigError(ValueError):
    """A configuration problem; ``problems`` lists ``(key.path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        lines = [f"{source}: {path or '(top level)'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


@cache
def config_schema() -> dict[str, Any]:
    text = resources.files("cds_service").joinpath("schemas/config.schema.json").read_text("utf-8")
    return json.loads(text)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        if extra:
            parts.append(extra[0])
    if error.validator == "required" and error.message.startswith("'"):
        parts.append(error.message.split("'")[1])
    return ".".join(parts)


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return "unknown key (not in the configuration schema)"
    if error.validator == "required":
        return "required key is missing"
    return error.message


def validate_config_data(data: Any) -> list[tuple[str, str]]:
    """Every problem of a raw (not yet defaulted) config document, as ``(key.path, message)``."""
    if data is None:
        return []
    if not isinstance(data, dict):
        return [("", "the configuration must be a mapping of keys to values")]
    validator = jsonschema.Draft202012Validator(config_schema())
    problems = [
        (_key_path(err), _message(err))
        for err in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    ]
    problems.extend(_semantic_problems(deep_merge(DEFAULTS, data)))
    return problems


def _semantic_problems(merged: dict[str, Any]) -> list[tuple[str, str]]:
    """Checks a JSON Schema cannot express: the calendar is built once to prove it works, auth is coherent."""
    from .rules.calendar import BusinessCalendar, CalendarConfigError

    problems: list[tuple[str, str]] = []
    calendar = merged.get("calendar")
    if isinstance(calendar, dict):
        try:
            BusinessCalendar.from_config(calendar)
        except CalendarConfigError as exc:
            message = str(exc)
            if exc.key_path and message.startswith(f"{exc.key_path}: "):
                message = message[len(exc.key_path) + 2:]
            problems.append((exc.key_path or "calendar", message))
        except (TypeError, ValueError) as exc:
            problems.append(("calendar", str(exc)))
    rules = merged.get("rules")
    if isinstance(rules, dict):
        from .rules.rules_data import RulesDataError, load_rules_data

        try:
            load_rules_data(rules)
        except RulesDataError as exc:
            problems.append((exc.key_path or "rules", exc.message))
    auth = merged.get("auth", {})
    if isinstance(auth, dict) and auth.get("required") is True:
        if not auth.get("audience"):
            problems.append(("auth.audience", "required when auth.required is true (the JWT aud must match it)"))
        audience = auth.get("audience")
        if isinstance(audience, list):
            for i, url in enumerate(audience):
                if url in audience[:i]:
                    problems.append((f"auth.audience.{i}", "duplicate audience"))
        issuers = [c.get("issuer") for c in auth.get("clients") or [] if isinstance(c, dict)]
        for i, issuer in enumerate(issuers):
            if issuer in issuers[:i]:
                problems.append((f"auth.clients.{i}.issuer", "duplicate issuer (each issuer is listed once)"))
        for i, client in enumerate(auth.get("clients") or []):
            has_keys = isinstance(client, dict) and (
                client.get("jwks_url") or client.get("jwks") or client.get("allowed_jku"))
            if isinstance(client, dict) and not has_keys:
                problems.append((f"auth.clients.{i}", "needs jwks_url, jwks or allowed_jku to verify tokens"))
    return problems


@dataclass(frozen=True)
class ClientConfig:
    issuer: str
    jwks_url: str | None = None
    jwks: dict[str, Any] | None = None
    allowed_jku: tuple[str, ...] = ()
    fhir_servers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """Validated settings. ``raw`` keeps the defaulted document for components that read it whole."""

    raw: dict[str, Any] = field(repr=False)
    source: str = "embedded defaults"

    @property
    def auth_required(self) -> bool:
        return bool(self.raw["auth"]["required"])

    @property
    def audience(self) -> str | None:
        """The first configured audience (``auth.audience`` may be one URL or a list)."""
        audiences = self.audiences
        return audiences[0] if audiences else None

    @property
    def audiences(self) -> tuple[str, ...]:
        """Every accepted base audience: the URLs by which callers reach ``/cds-services`` (cds-hooks.md "Trusting
        CDS clients": ``aud`` is this endpoint's URL exactly as configured)."""
        value = self.raw["auth"].get("audience")
        if not value:
            return ()
        return (value,) if isinstance(value, str) else tuple(value)

    @property
    def clients(self) -> tuple[ClientConfig, ...]:
        return tuple(
            ClientConfig(
                issuer=c["issuer"],
                jwks_url=c.get("jwks_url"),
                jwks=c.get("jwks"),
                allowed_jku=tuple(c.get("allowed_jku") or ()),
                fhir_servers=tuple(c.get("fhir_servers") or ()),
            )
            for c in self.raw["auth"].get("clients") or ()
        )

    @property
    def fhir(self) -> dict[str, Any]:
        return self.raw["fhir"]

    @property
    def deadline_seconds(self) -> float:
        return float(self.raw["deadline_seconds"])

    @property
    def calendar(self) -> dict[str, Any]:
        return self.raw["calendar"]

    @property
    def database_url(self) -> str:
        return self.raw["database_url"]

    @property
    def redis_url(self) -> str | None:
        return self.raw.get("redis_url")

    @property
    def journal(self) -> dict[str, Any]:
        return self.raw["journal"]

    @property
    def server(self) -> dict[str, Any]:
        return self.raw["server"]

    @property
    def logging(self) -> dict[str, Any]:
        return self.raw["logging"]


def config_from_mapping(data: dict[str, Any] | None, source: str = "config") -> Config:
    """Validate a raw mapping and apply the embedded defaults; raises :class:`ConfigError`."""
    problems = validate_config_data(data)
    if problems:
        raise ConfigError(problems, source)
    return Config(raw=deep_merge(DEFAULTS, data or {}), source=source)


def read_config_file(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML (or JSON) file; problems become :class:`ConfigError` with a readable message."""
    p = Path(path)
    if not p.exists():
        raise ConfigError([("", "file not found")], str(p))
    if p.is_dir():
        raise ConfigError([("", "is a directory, expected a YAML file")], str(p))
    try:
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"cannot read: {exc}")], str(p)) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([("", f"not valid YAML{where}")], str(p)) from exc


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config from ``path``, else from ``$G2250_CDS_CONFIG``, else the embedded defaults."""
    chosen = path or os.environ.get(CONFIG_ENV_VAR)
    if not chosen:
        return config_from_mapping(None, "embedded defaults")
    return config_from_mapping(read_config_file(chosen), str(chosen))
