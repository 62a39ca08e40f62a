"""Service configuration: YAML file → validated, defaulted, immutable settings.

The keys are those of the external contract (``contract.md`` "Config file"); the JSON Schema shipped in
``cds_service/schemas/config.schema.json`` (with the ``rules:`` overrides' schema of
:func:`cds_service.rules.rules_data.rules_schema_for_config` embedded) is the single definition of what is
allowed. Unknown keys are errors: a misspelt ``deadline_second`` must never silently fall back to a default.

Every problem of a file is reported in one pass, sorted by key path, each as ``key.path: problem — fix``
(:class:`ConfigError`). The YAML is read by :class:`ConfigLoader`, a ``SafeLoader`` that keeps what YAML 1.1
would silently turn into other types as the text written: unquoted dates (``2026-12-24``) and base-60 numbers
(``17:00``) stay strings, mapping keys are the text written (``on:`` is not ``True``). Duplicate keys, aliases that
expand to huge or recursive documents, nesting deeper than a configuration needs, files larger than 1 MiB, not
UTF-8 or empty are reported, never a traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .mappings import deep_merge

CONFIG_ENV_VAR = "G2250_CDS_CONFIG"

#: The SQLite file used when the config names no ``database_url``: in the user's data directory (XDG Base
#: Directory: ``$XDG_DATA_HOME/g2250-cds/``, else ``~/.local/share/g2250-cds/``), never the working directory.
DEFAULT_DATABASE_FILE = "g2250-cds.db"
DATA_DIR_NAME = "g2250-cds"

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
    # None: sqlite:///<data dir>/g2250-cds.db (default_database_url(), resolved when the config is built).
    "database_url": None,
    "redis_url": None,
    # The determination journal (cds_service/journal.py): rows are written here before a hook call is answered.
    "journal": {
        "dir": None,  # default: g2250-cds-journal/ beside the SQLite file, else in the working directory
        "max_bytes": 67_108_864,  # pending bytes, all workers; past it hook calls with determinations get 503
        "fsync": "interval",  # write before each answer, fdatasync every fsync_interval_seconds; or "always"
        "fsync_interval_seconds": 0.05,
        "writer": "auto",  # database writes in a child process under serve (logwriter.py), a thread elsewhere
    },
    "server": {
        "max_body_bytes": 1_048_576,
        "cors_allowed_origins": ["*"],
        "workers": 2,
        "threads": 4,
    },
    "logging": {"level": "INFO", "format": "json"},
    # The billing worklist (cds_service/worklist/): on by default, served to the machine's own user only (a one-time
    # login token printed at start); production signs in with OIDC.
    "worklist": {
        "enabled": True,
        "login": "token",
        "oidc": {
            "scopes": ["openid", "profile", "email"],
            "roles_claim": "roles",
            "coder_roles": ["coder"],
            "viewer_roles": ["viewer"],
            "verify_tls": True,
        },
        "session_secret_file": None,  # None: a random key kept in a 0600 file in the data directory
        "session_minutes": 480,
        "cookie_secure": "auto",
        "page_size": 50,
    },
}

#: Reading limits: a configuration is a few kilobytes, a few levels deep.
MAX_CONFIG_BYTES = 1_048_576
MAX_DEPTH = 32
MAX_VALUES = 100_000


# ---------------------------------------------------------------------------------------------------------------
# Default database location
# ---------------------------------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/g2250-cds`` (an absolute XDG_DATA_HOME only, as the XDG spec says), else
    ``~/.local/share/g2250-cds``; the working directory only when no home directory is known."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / DATA_DIR_NAME
    try:
        return Path.home() / ".local" / "share" / DATA_DIR_NAME
    except RuntimeError:  # no HOME and no password entry (some containers)
        return Path.cwd()


def default_database_url() -> str:
    """The embedded default ``database_url``: an absolute SQLite file in :func:`default_data_dir`."""
    return f"sqlite:///{default_data_dir() / DEFAULT_DATABASE_FILE}"


def sqlite_file(database_url: str) -> Path | None:
    """The file of an SQLite URL (absolute), ``None`` for another database or an in-memory SQLite."""
    from sqlalchemy.engine import make_url

    try:
        url = make_url(database_url)
    except Exception:  # validated elsewhere; here only "is it a file?"
        return None
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:" or (
            url.database.startswith("file:") and "mode=memory" in url.database):
        return None
    return Path(url.database).resolve()


def ensure_database_directory(database_url: str) -> Path | None:
    """Create the directory of an SQLite file (first use of the default location); returns the file, or ``None``
    for another database. Raises ``OSError`` when the directory cannot be created."""
    path = sqlite_file(database_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------------
PathPart = str | int
KeyPath = tuple[PathPart, ...]


def format_path(parts: KeyPath) -> str:
    """``("calendar", "extra_holidays", 0)`` → ``calendar.extra_holidays[0]``."""
    text = ""
    for part in parts:
        name = str(part)
        if not isinstance(part, int) and (not name.isprintable() or not name or len(name) > 80):
            name = json.dumps(name[:80], ensure_ascii=False)  # a key with a newline stays on one line
        text += f"[{part}]" if isinstance(part, int) else (f".{name}" if text else name)
    return text


_PATH_PART = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")


def parse_path(text: str) -> KeyPath:
    """The inverse of :func:`format_path` (also reads ``a.0.b``, the older spelling)."""
    parts: list[PathPart] = []
    for index, name in _PATH_PART.findall(text or ""):
        if index:
            parts.append(int(index))
        elif name.isdigit():
            parts.append(int(name))
        else:
            parts.append(name)
    return tuple(parts)


def _sort_key(parts: KeyPath) -> tuple[tuple[int, int, str], ...]:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in parts)


class ConfigError(ValueError):
    """A configuration problem; ``problems`` lists ``(key.path, message)`` pairs (``""``: the file as a whole)."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """One line per problem: ``SOURCE: key.path: problem — fix`` (``SOURCE line L column C: …`` for YAML)."""
        return [format_problem(self.source, path, message) for path, message in self.problems]


def format_problem(source: str, path: str, message: str) -> str:
    if path:
        return f"{source}: {path}: {message}"
    if message.startswith("line "):
        return f"{source} {message}"
    return f"{source}: {message}"


def sorted_problems(problems: list[tuple[KeyPath, str]]) -> list[tuple[str, str]]:
    """Distinct problems, sorted by key path (file-level problems first), paths formatted."""
    seen: set[tuple[KeyPath, str]] = set()
    unique: list[tuple[KeyPath, str]] = []
    for item in problems:
        if item not in seen:
            seen.add(item)
            unique.append(item)
    unique.sort(key=lambda item: _sort_key(item[0]))
    return [(format_path(path), message) for path, message in unique]


def _shown(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it, short and on one line."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False) if (not value or value != value.strip() or any(
            c in value for c in "\n\r\t\"'") or not value.isprintable()) else value
    elif isinstance(value, (int, float)):
        big = isinstance(value, int) and abs(value) >= 10**30
        text = f"a {len(str(abs(value)))}-digit number" if big else repr(value)
    elif isinstance(value, dict):
        text = "a mapping"
    elif isinstance(value, list):
        text = "a list"
    elif isinstance(value, bytes):
        text = "binary data"
    else:
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _yaml_type(value: Any) -> str:
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return f"the boolean {_shown(value)}"
    if isinstance(value, int):
        return f"the number {_shown(value)}"
    if isinstance(value, float):
        return f"the number {_shown(value)}"
    if isinstance(value, str):
        return f"the text {_shown(value)}"
    if isinstance(value, (dict, Mapping)):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, bytes):
        return "binary data (!!binary)"
    if isinstance(value, (set, frozenset)):
        return "a set (!!set)"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------------------------
# Reading YAML
# ---------------------------------------------------------------------------------------------------------------
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class ConfigLoader(yaml.SafeLoader):
    """``SafeLoader`` for configuration files: unquoted dates and base-60 numbers stay the text written (YAML 1.1
    turns ``2026-12-24`` into a date and ``17:00`` into 1020), mapping keys are always the key's text, an integer
    too long to read is a marked error rather than a ``ValueError``."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:  # type: ignore[override]
        if not isinstance(node, MappingNode):
            raise yaml.constructor.ConstructorError(None, None, f"expected a mapping, found {node.id}",
                                                    node.start_mark)
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be plain text, not a list or a mapping", key_node.start_mark)
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping

    def construct_text(self, node: Node) -> str:
        return str(self.construct_scalar(node))  # type: ignore[arg-type]

    def construct_number(self, node: Node) -> Any:
        text = str(self.construct_scalar(node))  # type: ignore[arg-type]
        if ":" in text:  # YAML 1.1 base 60 (17:00 → 1020): keep the text, as YAML 1.2 does
            return text
        try:
            if node.tag.endswith(":int"):
                return self.construct_yaml_int(node)  # type: ignore[arg-type]
            return self.construct_yaml_float(node)  # type: ignore[arg-type]
        except (ValueError, OverflowError) as exc:
            reason = "too many digits" if "digits" in str(exc) else str(exc)
            raise yaml.constructor.ConstructorError(None, None, f"cannot read the number {text[:20]}… ({reason})"
                                                    if len(text) > 20 else f"cannot read the number {text} ({reason})",
                                                    node.start_mark) from exc


ConfigLoader.add_constructor(_TIMESTAMP, ConfigLoader.construct_text)
ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_number)
ConfigLoader.add_constructor("tag:yaml.org,2002:float", ConfigLoader.construct_number)

_YAML_HINTS = (
    ("'\\t'", "indent with spaces, not tabs"),
    ("mapping values are not allowed", "quote a value that contains \": \", or check the indentation"),
    ("could not find expected ':'", "a key needs a colon and a space after it (key: value)"),
    ("found undefined alias", "define the anchor (&name) before its alias (*name)"),
    ("could not determine a constructor", "remove the tag: configuration values are plain text, numbers, "
                                          "true/false, lists and mappings"),
    ("found unhashable key", "a key must be plain text"),
    ("a key must be plain text", "write the key as plain text"),
    ("expected <block end>", "check the indentation: every key of a mapping starts in the same column"),
    ("while scanning a quoted scalar", "close the quote"),
    ("expected ',' or ']'", "close the list with ]"),
    ("expected ',' or '}'", "close the mapping with }"),
    ("cannot read the number", "write a shorter number, or quote it if it is text"),
    ("special characters are not allowed", "remove the control character"),
)


def _yaml_problem(exc: yaml.YAMLError, text: str = "") -> str:
    """``line L column C: problem — fix`` for a YAML syntax error."""
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position] if isinstance(exc.position, int) else ""
        line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        return (f"line {line} column {column}: control character U+{code:04X} is not allowed — remove it "
                "(a configuration file is printable UTF-8 text)")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    message = problem
    if context and context != problem:
        where = f" at line {context_mark.line + 1}" if context_mark else ""
        message = f"{problem} ({context}{where})"
    hint = next((fix for needle, fix in _YAML_HINTS if needle in message), "check the YAML syntax there")
    place = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
    return f"{place}{message} — {hint}"


class _TooBig(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _inspect(root: Node) -> list[tuple[KeyPath, str]]:
    """Walk the composed YAML graph before building values from it: duplicate keys (non-fatal, reported), and
    (fatal, raised as :class:`_TooBig`) recursive aliases, nesting deeper than :data:`MAX_DEPTH` and documents
    that expand to more than :data:`MAX_VALUES` values (alias bombs)."""
    problems: list[tuple[KeyPath, str]] = []
    sizes: dict[int, int] = {}
    active: set[int] = set()
    merge_tag = "tag:yaml.org,2002:merge"

    def children(node: Node, path: KeyPath) -> Iterator[tuple[Node, KeyPath]]:
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                yield item, (*path, i)
        elif isinstance(node, MappingNode):
            first_line: dict[str, tuple[int, int]] = {}
            for key_node, value_node in node.value:
                if key_node.tag == merge_tag:
                    yield value_node, path
                    continue
                key = key_node.value if isinstance(key_node, ScalarNode) else "?"
                mark = key_node.start_mark
                if isinstance(key_node, ScalarNode) and key in first_line:
                    line, column = first_line[key]
                    where = (f"lines {line} and {mark.line + 1}" if line != mark.line + 1
                             else f"line {line}, columns {column} and {mark.column + 1}")
                    problems.append(((*path, key), f"duplicate key ({where}; YAML keeps only the last) — write "
                                                   "each key once"))
                else:
                    first_line.setdefault(key, (mark.line + 1, mark.column + 1))
                yield value_node, (*path, key)

    def size(node: Node, path: KeyPath, depth: int) -> int:
        ident = id(node)
        if ident in sizes:
            return sizes[ident]
        if ident in active:
            raise _TooBig(f"{format_path(path) or 'the document'}: refers to itself (a recursive alias) — "
                          "write the value out")
        if depth > MAX_DEPTH:
            shown = format_path(path[:4]) + ("…" if len(path) > 4 else "")
            raise _TooBig(f"{shown}: nested more than {MAX_DEPTH} levels deep — a configuration is a "
                          "few levels deep; check the indentation")
        active.add(ident)
        total = 1 + sum(size(child, child_path, depth + 1) for child, child_path in children(node, path))
        active.discard(ident)
        sizes[ident] = total
        if total > MAX_VALUES:
            raise _TooBig(f"the document expands to more than {MAX_VALUES} values (aliases of aliases?) — write "
                          "the values out")
        return total

    size(root, (), 0)
    return problems


@dataclass
class ParsedConfig:
    """A config file as read: ``data`` (``None`` when it could not be read), and every problem found reading it
    (``(key path, message)``; an empty path for the file as a whole)."""

    data: Any
    problems: list[tuple[KeyPath, str]]
    readable: bool


def parse_config_text(text: str) -> ParsedConfig:
    """YAML text → data, with reading problems (syntax, duplicates, size) rather than exceptions."""
    try:
        loader = ConfigLoader(text)
    except yaml.YAMLError as exc:  # a control character (the reader checks the whole text first)
        return ParsedConfig(None, [((), _yaml_problem(exc, text))], False)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            return ParsedConfig(None, [((), f"nested more than {MAX_DEPTH} levels deep — a configuration is a few "
                                             "levels deep; check the brackets")], False)
        except yaml.YAMLError as exc:
            return ParsedConfig(None, [((), _yaml_problem(exc, text))], False)
        if node is None:
            return ParsedConfig(None, [((), "holds no settings (empty, or only comments) — write at least one "
                                             "key, e.g. deadline_seconds: 4.0, or {} for the embedded defaults")],
                                False)
        try:
            problems = _inspect(node)
        except _TooBig as exc:
            return ParsedConfig(None, [((), exc.message)], False)
        except RecursionError:
            return ParsedConfig(None, [((), "nested too deeply — check the indentation")], False)
        try:
            data = loader.construct_document(node)
        except yaml.YAMLError as exc:
            return ParsedConfig(None, [((), _yaml_problem(exc, text))], False)
        except (RecursionError, ValueError, TypeError, OverflowError) as exc:
            return ParsedConfig(None, [((), f"cannot read a value ({type(exc).__name__}: {exc}) — check the YAML "
                                             "near the tagged or unusual values")], False)
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        problems.append(((), f"the top level is {_yaml_type(data)}; a configuration is a mapping of keys to values "
                             "— write key: value lines (e.g. deadline_seconds: 4.0)"))
        return ParsedConfig(data, problems, False)
    return ParsedConfig(data, problems, True)


def parse_config_file(path: str | os.PathLike[str]) -> ParsedConfig:
    """Read and parse a config file; unreadable files, directories, not UTF-8 and the like are problems."""
    p = Path(path)
    try:
        if not p.exists():
            return ParsedConfig(None, [((), "file not found — check the path")], False)
        if p.is_dir():
            return ParsedConfig(None, [((), "is a directory — give the path of a YAML file")], False)
        with p.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return ParsedConfig(None, [((), f"cannot read the file ({reason}) — check its permissions")], False)
    except ValueError as exc:  # e.g. an embedded NUL in the path
        return ParsedConfig(None, [((), f"not a usable path ({exc})")], False)
    if len(raw) > MAX_CONFIG_BYTES:
        return ParsedConfig(None, [((), f"larger than {MAX_CONFIG_BYTES // 1024} KiB — is this the configuration "
                                         "file?")], False)
    if not raw.strip():
        return ParsedConfig(None, [((), "the file is empty — write at least one key, e.g. deadline_seconds: 4.0, "
                                         "or {} for the embedded defaults")], False)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return ParsedConfig(None, [((), f"not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}) — save the "
                                         "file as UTF-8")], False)
    return parse_config_text(text)


def read_config_file(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML (or JSON) file; any reading problem (syntax, duplicate keys, …) raises :class:`ConfigError`."""
    parsed = parse_config_file(path)
    if parsed.problems:
        raise ConfigError(sorted_problems(parsed.problems), str(path))
    return parsed.data


# ---------------------------------------------------------------------------------------------------------------
# Schema problems, each with its fix
# ---------------------------------------------------------------------------------------------------------------
@cache
def config_schema() -> dict[str, Any]:
    """The config schema, with the ``rules:`` overrides' schema (rules_data) embedded under ``properties.rules``."""
    from .rules.rules_data import rules_schema_for_config

    schema = json.loads(resources.files("cds_service").joinpath("schemas/config.schema.json").read_text("utf-8"))
    described = schema["properties"]["rules"].get("description")
    schema["properties"]["rules"] = rules_schema_for_config()
    if described:
        schema["properties"]["rules"]["description"] = described
    return schema


@cache
def _validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.Draft202012Validator
    return cls(config_schema(), format_checker=cls.FORMAT_CHECKER)


@cache
def _known_keys() -> dict[str, tuple[str, ...]]:
    """Every key name the schema knows outside ``rules:`` → the key paths where it belongs."""
    found: dict[str, list[str]] = {}

    def walk(schema: Mapping[str, Any], prefix: str) -> None:
        for name, sub in (schema.get("properties") or {}).items():
            path = f"{prefix}.{name}" if prefix else name
            found.setdefault(name, []).append(path)
            if isinstance(sub, Mapping) and name != "rules":
                walk(sub, path)
                items = sub.get("items")
                if isinstance(items, Mapping):
                    walk(items, f"{path}[]")

    walk(config_schema(), "")
    return {name: tuple(paths) for name, paths in found.items()}


_TYPE_NAMES = {"string": "text", "integer": "a whole number", "number": "a number", "boolean": "true or false",
               "array": "a list", "object": "a mapping", "null": "null"}


def _shape(path: KeyPath) -> str:
    """A key path with list indices blanked: ``auth.clients[].fhir_servers[]``."""
    return format_path(tuple(-1 if isinstance(p, int) else p for p in path)).replace("[-1]", "[]")


_URL_EXAMPLES = {
    "fhir.allowed_servers[]": "https://fhir.example.org/r4",
    "auth.clients[].jwks_url": "https://ehr.example.org/.well-known/jwks.json",
    "auth.clients[].allowed_jku[]": "https://ehr.example.org/.well-known/jwks.json",
    "auth.clients[].fhir_servers[]": "https://fhir.example.org/r4",
    "auth.audience": "https://cds.example.org/cds-services",
    "auth.audience[]": "https://cds.example.org/cds-services",
    "worklist.oidc.issuer": "https://login.example.org/realms/billing",
    "worklist.oidc.redirect_uri": "https://cds.example.org/worklist/auth/callback",
}


def _pattern_message(path: KeyPath, value: Any, fallback: str) -> str:
    shape = _shape(path)
    shown = _shown(value)
    if shape in _URL_EXAMPLES:
        return f"{shown} is not an http(s) URL — write the full URL, e.g. {_URL_EXAMPLES[shape]}"
    if shape == "database_url":
        return (f"{shown} is not a supported database URL — write sqlite:////absolute/path/g2250-cds.db or "
                "postgresql+psycopg://user@host:5432/dbname")
    if shape == "redis_url":
        return f"{shown} is not a Redis URL — write redis://host:6379/0 (rediss:// for TLS), or null for none"
    if shape == "calendar.holidays":
        return (f"{shown} is not a country code — write an ISO 3166 code such as US, or US-CA with a subdivision; "
                "null for no public holidays")
    if shape == "calendar.extra_holidays[]":
        return f'{shown} is not a date — write YYYY-MM-DD, e.g. "2026-12-24"'
    if shape in ("calendar.working_hours.start", "calendar.working_hours.end"):
        end = " (24:00 for midnight)" if shape.endswith("end") else ""
        return f'{shown} is not a time — write "HH:MM" on the 24-hour clock{end}, quoted, e.g. "17:00"'
    if shape == "server.cors_allowed_origins[]":
        return (f'{shown} is not an origin — write "*" or scheme://host[:port] exactly as the browser sends it, '
                "without path or trailing slash (e.g. https://sandbox.cds-hooks.org)")
    return f"{fallback} — see the configuration reference (README, 'Configuration')"


def _type_hint(expected: list[str], value: Any) -> str:
    if "string" in expected and isinstance(value, bool):
        return (" (YAML reads unquoted yes/no/on/off/true/false as booleans) — quote it if you meant the text, "
                'e.g. "NO"')
    if "string" in expected and isinstance(value, (int, float)):
        return f' — quote it if you meant the text: "{value}"'
    if "array" in expected and not isinstance(value, (dict, list)):
        return f" — write a list, e.g. [{_shown(value)}]"
    if "object" in expected:
        return " — write the keys indented under it (key: value), or {} for none"
    if "integer" in expected and isinstance(value, float):
        return " — write a whole number"
    if ("number" in expected or "integer" in expected) and isinstance(value, str):
        return " — write the number without quotes"
    if "boolean" in expected:
        return " — write true or false"
    if "string" in expected:
        return " — write it as text (quoted if in doubt)"
    return ""


def _range_text(schema: Mapping[str, Any]) -> str:
    whole = schema.get("type") == "integer"
    low = schema.get("minimum")
    above = schema.get("exclusiveMinimum")
    high = schema.get("maximum")
    kind = "a whole number" if whole else "a number"
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}"
    if above is not None and high is not None:
        return f"{kind} greater than {above}, at most {high}"
    if low is not None:
        return f"{kind} of at least {low}"
    if above is not None:
        return f"{kind} greater than {above}"
    if high is not None:
        return f"{kind} of at most {high}"
    return kind


def _unknown_key(path: KeyPath, key: str, allowed: list[str]) -> str:
    lowered = {name.lower(): name for name in allowed}
    close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.6)
    if close:
        return f"unknown key — did you mean {lowered[close[0]]}?"
    if not path or path[0] != "rules":
        elsewhere = [p for p in _known_keys().get(key, ()) if p.rsplit(".", 1)[0] != format_path(path)]
        if elsewhere:
            return f"unknown key here — it belongs at {' or '.join(elsewhere)}"
    names = sorted(allowed)
    listed = ", ".join(names[:14]) + (", …" if len(names) > 14 else "")
    return f"unknown key — remove it (allowed here: {listed})" if names else "unknown key — remove it"


# Lower ranks explain better; at one key path only the best-ranked problems are kept.
_RANK = {"type": 0, "additionalProperties": 1, "required": 1, "enum": 2, "const": 2, "pattern": 3, "format": 4}


def _explain(error: jsonschema.ValidationError) -> list[tuple[int, KeyPath, str]]:
    path: KeyPath = tuple(error.absolute_path)
    kind = str(error.validator)
    value = error.instance
    rank = _RANK.get(kind, 5)
    if kind == "additionalProperties" and isinstance(value, Mapping):
        allowed = list(error.schema.get("properties", {}))
        return [(rank, (*path, str(key)), _unknown_key(path, str(key), allowed))
                for key in value if key not in allowed]
    if kind == "required" and isinstance(value, Mapping):
        where = format_path(path) or "the top level"
        return [(rank, (*path, name), f"required key is missing — add {name}: under {where}")
                for name in error.validator_value if name not in value]
    if kind == "type":
        expected = [error.validator_value] if isinstance(error.validator_value, str) else list(error.validator_value)
        names = " or ".join(_TYPE_NAMES.get(t, t) for t in expected)
        return [(rank, path, f"expected {names}, got {_yaml_type(value)}{_type_hint(expected, value)}")]
    if kind in ("enum", "const"):
        options = list(error.validator_value) if kind == "enum" else [error.validator_value]
        shown = ", ".join(_shown(o) for o in options)
        guess = ""
        if isinstance(value, str):
            text = {str(o).lower(): str(o) for o in options}
            close = difflib.get_close_matches(value.lower(), list(text), n=1, cutoff=0.6)
            guess = f" (did you mean {text[close[0]]}?)" if close else ""
        what = "one of" if len(options) > 1 else ""
        return [(rank, path, f"{_shown(value)} is not allowed here{guess} — write {what} {shown}".replace("  ", " "))]
    if kind == "pattern":
        return [(rank, path, _pattern_message(path, value, f"{_shown(value)} does not have the expected form "
                                                           f"({error.validator_value})"))]
    if kind == "format":
        if error.validator_value == "date":
            return [(rank, path, f"{_shown(value)} is not a real date — write a day that exists, as YYYY-MM-DD")]
        return [(rank, path, _pattern_message(path, value, f"{_shown(value)} is not a valid {error.validator_value}"))]
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return [(rank, path, f"{_shown(value)} is out of range — use {_range_text(error.schema)}")]
    if kind == "minLength":
        return [(rank, path, "must not be empty — write a value, or remove the key for the default")]
    if kind == "maxLength":
        return [(rank, path, f"is longer than {error.validator_value} characters — shorten it")]
    if kind == "minItems":
        return [(rank, path, f"needs at least {error.validator_value} item(s) — add them, or remove the key")]
    if kind == "maxItems":
        return [(rank, path, f"has more than {error.validator_value} item(s) — remove some")]
    if kind == "uniqueItems":
        return [(rank, path, "lists the same item twice — write each once")]
    if kind in ("oneOf", "anyOf"):
        return _explain_alternatives(error)
    return [(rank, path, f"{error.message} — see the configuration reference (README, 'Configuration')")]


def _explain_alternatives(error: jsonschema.ValidationError) -> list[tuple[int, KeyPath, str]]:
    """``oneOf``/``anyOf``: the errors of the branch whose type fits the value, else a type problem."""
    path: KeyPath = tuple(error.absolute_path)
    checker = jsonschema.Draft202012Validator.TYPE_CHECKER
    fitting: list[int] = []
    expected: list[str] = []
    for i, branch in enumerate(error.validator_value):
        kinds = branch.get("type") if isinstance(branch, Mapping) else None
        kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
        expected.extend(k for k in kinds if k not in expected)
        if not kinds or any(checker.is_type(error.instance, k) for k in kinds):
            fitting.append(i)
    if fitting:
        branch_errors = [e for e in error.context or () if e.relative_schema_path
                         and e.relative_schema_path[0] == fitting[0]]
        if branch_errors:
            return [item for sub in branch_errors for item in _explain(sub)]
        if not error.context:  # valid under several branches of a oneOf
            return [(5, path, "matches more than one allowed form — see the configuration reference")]
    names = " or ".join(_TYPE_NAMES.get(t, t) for t in expected) or "another form"
    return [(0, path, f"expected {names}, got {_yaml_type(error.instance)}{_type_hint(expected, error.instance)}")]


def _schema_problems(data: Mapping[str, Any]) -> list[tuple[KeyPath, str]]:
    explained: list[tuple[int, KeyPath, str]] = []
    for error in _validator().iter_errors(data):
        explained.extend(_explain(error))
    best: dict[KeyPath, int] = {}
    for rank, path, _ in explained:
        best[path] = min(rank, best.get(path, rank))
    return [(path, message) for rank, path, message in explained if rank == best[path]]


# ---------------------------------------------------------------------------------------------------------------
# Semantic problems: what a JSON Schema cannot say
# ---------------------------------------------------------------------------------------------------------------
def url_problem(value: str, schemes: tuple[str, ...] = ("http", "https"), example: str = "") -> str | None:
    """Why ``value`` is not a usable URL of one of ``schemes``, or ``None``."""
    fix = f" — write the full URL, e.g. {example}" if example else " — write the full URL"
    if any(c.isspace() for c in value) or not value.isprintable():
        return f"{_shown(value)} contains spaces or control characters{fix}"
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        return f"{_shown(value)} is not a valid URL ({exc}){fix}"
    try:
        port = parts.port
    except ValueError:
        return f"{_shown(value)}: the port is not a number from 1 to 65535{fix}"
    if parts.scheme.lower() not in schemes:
        kind = "an http(s)" if schemes == ("http", "https") else "a " + " or ".join(schemes)
        return f"{_shown(value)} is not {kind} URL{fix}"
    if not parts.hostname:
        return f"{_shown(value)} names no host{fix}"
    if port == 0:
        return f"{_shown(value)}: port 0 is not a port — use a port from 1 to 65535"
    return None


def _walk(value: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    yield path, value
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk(item, (*path, str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, (*path, i))


def _calendar_problems(calendar: Mapping[str, Any], clean: Callable[[KeyPath], bool]) -> list[tuple[KeyPath, str]]:
    problems: list[tuple[KeyPath, str]] = []
    timezone = calendar.get("timezone")
    if isinstance(timezone, str) and clean(("calendar", "timezone")):
        problem = _timezone_problem(timezone)
        if problem:
            problems.append((("calendar", "timezone"), problem))
    holidays_key = calendar.get("holidays")
    if isinstance(holidays_key, str) and holidays_key.strip() and clean(("calendar", "holidays")):
        problem = _holidays_problem(holidays_key.strip())
        if problem:
            problems.append((("calendar", "holidays"), problem))
    extra = calendar.get("extra_holidays")
    if isinstance(extra, list):
        for i, item in enumerate(extra):
            if isinstance(item, str) and clean(("calendar", "extra_holidays", i)):
                try:
                    date.fromisoformat(item)
                except ValueError:
                    problems.append((("calendar", "extra_holidays", i),
                                     f"{_shown(item)} is not a real date — write a day that exists, as YYYY-MM-DD"))
    hours = calendar.get("working_hours")
    if isinstance(hours, Mapping) and clean(("calendar", "working_hours")):
        start, end = hours.get("start"), hours.get("end")
        if isinstance(start, str) and isinstance(end, str) and end != "24:00" and end <= start:
            problems.append((("calendar", "working_hours", "end"),
                             f"{end} is not after start {start} — opening hours end later the same day "
                             '(write "24:00" for midnight; hours across midnight are not supported)'))
    if not problems and clean(("calendar",)):
        from .rules.calendar import BusinessCalendar, CalendarConfigError

        try:
            BusinessCalendar.from_config(calendar)
        except CalendarConfigError as exc:
            message = str(exc)
            if exc.key_path and message.startswith(f"{exc.key_path}: "):
                message = message[len(exc.key_path) + 2:]
            problems.append((parse_path(exc.key_path or "calendar"), f"{message} — fix the calendar settings"))
        except (TypeError, ValueError) as exc:
            problems.append((("calendar",), f"{exc} — fix the calendar settings"))
    return problems


@cache
def _timezones() -> frozenset[str]:
    import zoneinfo

    return frozenset(zoneinfo.available_timezones())


def _timezone_problem(name: str) -> str | None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
        return None
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass
    zones = {zone.lower(): zone for zone in _timezones()}
    close = difflib.get_close_matches(name.lower(), list(zones), n=1, cutoff=0.6)
    if close:
        return f"unknown time zone {_shown(name)} — did you mean {zones[close[0]]}?"
    return f"unknown time zone {_shown(name)} — write an IANA name such as America/New_York or Europe/Berlin"


def _holidays_problem(key: str) -> str | None:
    import holidays

    supported: dict[str, list[str]] = holidays.list_supported_countries()
    country, _, subdivision = key.upper().partition("-")
    if country not in supported:
        return (f"no public-holiday calendar for country {_shown(country)} — write an ISO 3166 code the holidays "
                "package knows (e.g. US, CA, GB, DE), or null for no public holidays")
    if subdivision and subdivision not in {s.upper() for s in supported[country]}:
        known = sorted(supported[country])
        listed = ", ".join(known[:12]) + (", …" if len(known) > 12 else "")
        return (f"{country} has no subdivision {_shown(subdivision)} — write {country} alone or one of "
                f"{country}-{{{listed}}}" if known else
                f"{country} has no subdivisions — write {country} alone")
    return None


def _database_problem(url: str) -> str | None:
    from sqlalchemy.engine import make_url

    example = "sqlite:////absolute/path/g2250-cds.db or postgresql+psycopg://user@host:5432/dbname"
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except Exception as exc:  # ArgumentError, NoSuchModuleError, ValueError (port)
        return f"{_shown(url)} is not a usable database URL ({type(exc).__name__}) — write {example}"
    if parsed.get_backend_name() == "postgresql" and parsed.port is not None and not 0 < parsed.port < 65536:
        return f"port {parsed.port} is not a port — use a port from 1 to 65535"
    return None


def _redis_problem(url: str) -> str | None:
    problem = url_problem(url, ("redis", "rediss"), "redis://127.0.0.1:6379/0")
    if problem:
        return problem
    db = urlsplit(url).path.strip("/")
    if db and not db.isdigit():
        return f"database {_shown(db)} is not a number — write redis://host:6379/0 (the database number last)"
    return None


def _auth_problems(auth: Mapping[str, Any], clean: Callable[[KeyPath], bool]) -> list[tuple[KeyPath, str]]:
    problems: list[tuple[KeyPath, str]] = []
    audience = auth.get("audience")
    audiences = [audience] if isinstance(audience, str) else (audience if isinstance(audience, list) else [])
    for i, url in enumerate(audiences):
        path: KeyPath = ("auth", "audience") if isinstance(audience, str) else ("auth", "audience", i)
        if isinstance(url, str) and clean(path):
            problem = url_problem(url, example=_URL_EXAMPLES["auth.audience"])
            if problem:
                problems.append((path, problem))
            elif url in audiences[:i]:
                problems.append((path, "duplicate audience — list each URL once"))
    clients = auth.get("clients")
    clients = clients if isinstance(clients, list) else []
    issuers: list[Any] = []
    for i, client in enumerate(clients):
        if not isinstance(client, Mapping):
            continue
        base: KeyPath = ("auth", "clients", i)
        issuer = client.get("issuer")
        if isinstance(issuer, str) and issuer in issuers and clean((*base, "issuer")):
            problems.append(((*base, "issuer"), f"duplicate issuer {_shown(issuer)} — list each issuer once "
                                                "(its keys and FHIR servers together)"))
        issuers.append(issuer)
        jwks_url = client.get("jwks_url")
        if isinstance(jwks_url, str) and clean((*base, "jwks_url")):
            problem = url_problem(jwks_url, example=_URL_EXAMPLES["auth.clients[].jwks_url"])
            if problem:
                problems.append(((*base, "jwks_url"), problem))
        for key in ("allowed_jku", "fhir_servers"):
            urls = client.get(key)
            for j, url in enumerate(urls if isinstance(urls, list) else []):
                if isinstance(url, str) and clean((*base, key, j)):
                    problem = url_problem(url, example=_URL_EXAMPLES[f"auth.clients[].{key}[]"])
                    if problem:
                        problems.append(((*base, key, j), problem))
        if auth.get("required") is True and clean(base) and not (
                client.get("jwks_url") or client.get("jwks") or client.get("allowed_jku")):
            problems.append((base, "no keys to verify this client's tokens — add jwks_url, jwks (pinned keys) or "
                                   "allowed_jku"))
    if auth.get("required") is True and not audience and clean(("auth", "audience")):
        problems.append((("auth", "audience"), "required when auth.required is true (the JWT aud must match it) — "
                                               "add audience: https://cds.example.org/cds-services, the URL "
                                               "callers reach /cds-services by"))
    return problems


_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _worklist_problems(worklist: Mapping[str, Any], clean: Callable[[KeyPath], bool]) -> list[tuple[KeyPath, str]]:
    """``login: oidc`` needs an issuer and a client id; the issuer is https (OpenID Connect Discovery 1.0 §4: the
    issuer is an https URL), plain http only on the loopback interface (a test provider on the developer's
    machine)."""
    problems: list[tuple[KeyPath, str]] = []
    oidc = worklist.get("oidc")
    oidc = oidc if isinstance(oidc, Mapping) else {}
    for key, example in (("issuer", "https://login.example.org/realms/billing"),
                         ("redirect_uri", "https://cds.example.org/worklist/auth/callback")):
        url = oidc.get(key)
        path: KeyPath = ("worklist", "oidc", key)
        if not isinstance(url, str) or not clean(path):
            continue
        problem = url_problem(url, example=example)
        if problem is None and urlsplit(url).scheme.lower() == "http" and (
                (urlsplit(url).hostname or "").lower() not in _LOOPBACK_HOSTS):
            problem = (f"{_shown(url)} is plain http on a host other than the loopback interface — use https "
                       f"(http only for localhost or 127.0.0.1), e.g. {example}")
        if problem:
            problems.append((path, problem))
    if worklist.get("login") == "oidc":
        for key, hint in (("issuer", "the provider's issuer URL, e.g. https://login.example.org/realms/billing"),
                          ("client_id", "the client id registered at the provider")):
            path = ("worklist", "oidc", key)
            if not oidc.get(key) and clean(path):
                problems.append((path, f"required when worklist.login is oidc — add {key}: {hint}"))
    return problems


def _semantic_problems(data: Mapping[str, Any], flagged: set[KeyPath]) -> list[tuple[KeyPath, str]]:
    """Checks a JSON Schema cannot express, on the keys the schema found nothing wrong with."""

    def clean(path: KeyPath) -> bool:
        return not any(p[:len(path)] == path or path[:len(p)] == p for p in flagged)

    merged = deep_merge(DEFAULTS, data)
    problems: list[tuple[KeyPath, str]] = []
    for path, value in _walk(data):
        if isinstance(value, float) and not math.isfinite(value) and clean(path):
            problems.append((path, f"{_shown(value)} is not a finite number — write a number"))
    checks: list[tuple[KeyPath, Callable[[], list[tuple[KeyPath, str]]]]] = []
    calendar = merged.get("calendar")
    if isinstance(calendar, Mapping):
        checks.append((("calendar",), lambda: _calendar_problems(calendar, clean)))
    auth = merged.get("auth")
    if isinstance(auth, Mapping):
        checks.append((("auth",), lambda: _auth_problems(auth, clean)))

    def fhir_servers() -> list[tuple[KeyPath, str]]:
        found: list[tuple[KeyPath, str]] = []
        servers = merged.get("fhir", {}).get("allowed_servers") if isinstance(merged.get("fhir"), Mapping) else None
        for i, url in enumerate(servers if isinstance(servers, list) else []):
            if isinstance(url, str) and clean(("fhir", "allowed_servers", i)):
                problem = url_problem(url, example=_URL_EXAMPLES["fhir.allowed_servers[]"])
                if problem:
                    found.append((("fhir", "allowed_servers", i), problem))
        return found

    checks.append((("fhir",), fhir_servers))
    worklist = merged.get("worklist")
    if isinstance(worklist, Mapping):
        checks.append((("worklist",), lambda: _worklist_problems(worklist, clean)))

    def stores() -> list[tuple[KeyPath, str]]:
        found: list[tuple[KeyPath, str]] = []
        database_url = data.get("database_url")
        if isinstance(database_url, str) and clean(("database_url",)):
            problem = _database_problem(database_url)
            if problem:
                found.append((("database_url",), problem))
        redis_url = data.get("redis_url")
        if isinstance(redis_url, str) and clean(("redis_url",)):
            problem = _redis_problem(redis_url)
            if problem:
                found.append((("redis_url",), problem))
        return found

    checks.append((("database_url",), stores))

    rules = data.get("rules")
    if isinstance(rules, Mapping) and rules and clean(("rules",)):
        def rules_check() -> list[tuple[KeyPath, str]]:
            from .rules.rules_data import RulesDataError, load_rules_data

            try:
                load_rules_data(rules)
            except RulesDataError as exc:
                return [(parse_path(exc.key_path or "rules"), f"{exc.message} — fix this override under rules:")]
            return []

        checks.append((("rules",), rules_check))
    for where, check in checks:
        try:
            problems.extend(check())
        except Exception as exc:  # a check that cannot run on odd input is still a problem report
            problems.append((where, f"cannot be checked ({type(exc).__name__}: {exc}) — fix the values above"))
    return problems


def _problems_of(data: Any) -> list[tuple[KeyPath, str]]:
    if data is None:
        return []
    if not isinstance(data, dict):
        return [((), f"the top level is {_yaml_type(data)}; a configuration is a mapping of keys to values — write "
                     "key: value lines (e.g. deadline_seconds: 4.0)")]
    try:
        problems = _schema_problems(data)
    except RecursionError:
        return [((), f"nested more than {MAX_DEPTH} levels deep — check the indentation")]
    problems.extend(_semantic_problems(data, {path for path, _ in problems}))
    return problems


def validate_config_data(data: Any) -> list[tuple[str, str]]:
    """Every problem of a raw (not yet defaulted) config document, as ``(key.path, message)`` sorted by key path.

    Messages read ``problem — fix``. ``None`` (no document) is the embedded defaults: no problem."""
    return sorted_problems(_problems_of(data))

# ---------------------------------------------------------------------------------------------------------------
# The validated settings
# ---------------------------------------------------------------------------------------------------------------
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
    #: True when ``database_url`` is the embedded default location (its directory is created on first use).
    default_database: bool = False

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
        """The database; the embedded default is ``sqlite:///<data dir>/g2250-cds.db``, whose directory is
        created here, on first use (:func:`default_database_url`)."""
        url = self.raw["database_url"]
        if self.default_database:
            with contextlib.suppress(OSError):  # the store's own error names the file; serve checks it first
                ensure_database_directory(url)
        return url

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

    @property
    def audit(self) -> dict[str, Any]:
        """The population audit's optional section with its defaults: ``workers`` (None: the CPU count) and
        ``bulk`` (the ``--bulk-export`` client; empty without SMART Backend Services). Not in ``DEFAULTS``: a config
        without it reads exactly as before."""
        section = self.raw.get("audit") or {}
        bulk = {"types": None, "poll_max_seconds": 3600.0, "verify_tls": True, **(section.get("bulk") or {})}
        return {"workers": section.get("workers"), "bulk": bulk}

    @property
    def worklist(self) -> dict[str, Any]:
        """The billing worklist's settings, defaulted (``DEFAULTS["worklist"]``)."""
        return self.raw["worklist"]




def config_from_mapping(data: dict[str, Any] | None, source: str = "config") -> Config:
    """Validate a raw mapping and apply the embedded defaults; raises :class:`ConfigError` (every problem)."""
    problems = validate_config_data(data)
    if problems:
        raise ConfigError(problems, source)
    raw = deep_merge(DEFAULTS, data or {})
    default_database = raw.get("database_url") is None
    if default_database:
        raw["database_url"] = default_database_url()
    return Config(raw=raw, source=source, default_database=default_database)


def check_config_file(path: str | os.PathLike[str]) -> tuple[Any, list[tuple[str, str]]]:
    """Every problem of a config file — reading it and validating it — in one pass, sorted by key path: the
    data read (``None`` when unreadable) and ``(key.path, message)`` pairs (``""``: the file as a whole)."""
    parsed = parse_config_file(path)
    problems = list(parsed.problems)
    if parsed.readable:
        problems.extend(_problems_of(parsed.data))
    return parsed.data, sorted_problems(problems)


def config_source(path: str | os.PathLike[str] | None = None) -> tuple[str | None, str]:
    """The config file to read (``path``, else ``$G2250_CDS_CONFIG``, else ``None``: the embedded defaults) and
    how to name it in messages."""
    if path:
        return str(path), str(path)
    from_env = os.environ.get(CONFIG_ENV_VAR)
    if from_env:
        return from_env, f"{from_env} (${CONFIG_ENV_VAR})"
    return None, "embedded defaults"


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config from ``path``, else from ``$G2250_CDS_CONFIG``, else the embedded defaults; raises
    :class:`ConfigError` listing every problem of the file."""
    chosen, label = config_source(path)
    if chosen is None:
        return config_from_mapping(None, "embedded defaults")
    data, problems = check_config_file(chosen)
    if problems:
        raise ConfigError(problems, label)
    return config_from_mapping(data, chosen)
