"""``g2250-cds`` command line (contract.md "Install and run").

serve · evaluate · load-fixtures · check-config · audit. Every failure is a clear message on stderr naming the
argument or config key and the fix — never a traceback — and an exit status:

* 0 — done;
* 1 — ``evaluate``: the service answered the request with an error (its OperationOutcome is printed, as HTTP would);
* 2 — a usage error: a bad argument, request file or configuration (every problem of a config file is listed);
  nothing was done;
* 3 — a server the command needs failed or refused: the FHIR server (load-fixtures) or the database;
* 70 — a bug (an unexpected exception): one line, to report; ``G2250_CDS_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, tzinfo
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import requests

from .audit.sources import fixture_bundles  # the bundled fixtures, also the audit's quick example
from .config import (
    CONFIG_ENV_VAR,
    Config,
    ConfigError,
    check_config_file,
    config_from_mapping,
    ensure_database_directory,
    format_problem,
    load_config,
    sqlite_file,
    url_problem,
)

EXIT_OK = 0
EXIT_FAILURE = 1  # evaluate: the service answered with an error status
EXIT_USAGE = 2  # a bad argument, request file or configuration
EXIT_UNAVAILABLE = 3  # the FHIR server or the database failed or refused
EXIT_INTERNAL = 70  # a bug (EX_SOFTWARE)

#: Largest request file ``evaluate`` reads (a hook request with generous prefetch is well under this).
MAX_REQUEST_BYTES = 64 * 1024 * 1024
#: Evaluation clocks and ``--since`` outside these years are refused (the rules reach years back and weeks ahead).
FIRST_YEAR, LAST_YEAR = 1900, 2999


class CliError(Exception):
    """A user-facing failure: printed as one line, with ``code`` as the exit status (1 unless a subclass says)."""

    code = EXIT_FAILURE

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(CliError):
    """A bad argument, request file or configuration: exit status 2."""

    code = EXIT_USAGE


class UnavailableError(CliError):
    """The FHIR server or the database failed or refused: exit status 3."""

    code = EXIT_UNAVAILABLE


class ConfigProblems(UsageError):
    """Every problem of the config file, one line each (exit status 2)."""

    def __init__(self, error: ConfigError) -> None:
        super().__init__("\n".join(error.lines()))
        self.lines = error.lines()


def _arg(value: str) -> str:
    """An argument value as shown in a message: as typed when plain, else quoted with escapes (one line)."""
    plain = value and value == value.strip() and value.isprintable() and "'" not in value
    return value if plain else repr(value)


def _load(path: str | None) -> Config:
    if path is not None and not path.strip():
        raise UsageError("--config: empty path — give a YAML file, or leave --config out for "
                         f"${CONFIG_ENV_VAR} or the embedded defaults")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise ConfigProblems(exc) from exc


def describe_database(config: Config) -> str:
    """The database for the operator, without secrets: an SQLite file's path, else the URL's scheme."""
    url = config.raw["database_url"]
    path = sqlite_file(url)
    if path is not None:
        return f"sqlite {path}" + (" (default location)" if config.default_database else "")
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme == "sqlite":
        return "sqlite in memory (this process only)"
    return scheme


def _prepare_database(config: Config) -> None:
    """Create the default database directory now, with a clear message when it cannot be."""
    if not config.default_database:
        return
    try:
        ensure_database_directory(config.raw["database_url"])
    except OSError as exc:
        folder = (sqlite_file(config.raw["database_url"]) or Path(".")).parent
        raise UnavailableError(f"cannot create the database directory {folder} ({exc.strerror or exc}) — set "
                               "XDG_DATA_HOME, or database_url in a config file") from exc


# -- argument types ---------------------------------------------------------------------------------------------
def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = text.strip()
        if not re.fullmatch(r"[+]?[0-9]{1,9}", value) or not low <= int(value) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {_arg(text)}")
        return int(value)

    parse.__name__ = "number"
    return parse


_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _host(text: str) -> str:
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    if not value:
        raise argparse.ArgumentTypeError("must not be empty — e.g. 127.0.0.1 (this machine only) or 0.0.0.0 "
                                         "(every interface)")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if _HOSTNAME.fullmatch(value):
        return value
    raise argparse.ArgumentTypeError(f"not a host name or IP address: {_arg(text)} — e.g. 127.0.0.1 or 0.0.0.0")


_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _reference(resource: str) -> Callable[[str], str]:
    """``Patient/123`` (or the bare id ``123``) → ``Patient/123``; anything else is refused."""
    article = "an" if resource[:1] in "AEIOU" else "a"

    def parse(text: str) -> str:
        value = text.strip()
        kind, slash, ident = value.rpartition("/") if "/" in value else (resource, "/", value)
        if kind == resource and slash and _FHIR_ID.fullmatch(ident):
            return f"{resource}/{ident}"
        raise argparse.ArgumentTypeError(
            f"not {article} {resource} reference: {_arg(text)} — write {resource}/ID (ID: 1-64 letters, digits, "
            f"'-' or '.'), as in the log's {resource.lower()}_ref")

    parse.__name__ = "reference"
    return parse


def _in_years(moment: datetime, option: str, value: str) -> datetime:
    if not FIRST_YEAR <= moment.year <= LAST_YEAR:
        raise UsageError(f"{option}: {_arg(value)} is out of range — choose a moment in the years "
                         f"{FIRST_YEAR}–{LAST_YEAR}")
    return moment


def _parse_now(value: str | None) -> datetime | None:
    """An ISO 8601 date-time with a UTC offset (``evaluate --now``)."""
    if value is None:
        return None
    text = value.strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"--now: not an ISO 8601 date-time: {_arg(value)} — write e.g. "
                         "2026-11-30T09:00:00-05:00") from exc
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise UsageError(f"--now: needs a UTC offset: {_arg(value)} — write e.g. 2026-11-30T09:00:00-05:00 "
                         "(or Z for UTC)")
    return _in_years(moment, "--now", value)


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _parse_since(value: str, zone: tzinfo) -> datetime:
    """``audit --since``: an ISO date (the start of that day in the practice time zone) or an ISO date-time with
    a UTC offset."""
    text = value.strip()
    example = "write 2026-11-18 (from the start of that day, practice time zone) or 2026-11-18T09:00:00-05:00"
    if _ISO_DATE.fullmatch(text):
        try:
            day = date.fromisoformat(text)
        except ValueError as exc:
            raise UsageError(f"--since: not an ISO 8601 date: {_arg(value)} is not a real day — {example}") from exc
        return _in_years(datetime.combine(day, time(0), tzinfo=zone), "--since", value)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"--since: not an ISO 8601 date or date-time: {_arg(value)} — {example}") from exc
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise UsageError(f"--since: a date-time needs a UTC offset: {_arg(value)} — {example}")
    return _in_years(moment, "--since", value)


# -- serve -------------------------------------------------------------------------------------------------------
#: Default port of ``serve``. Not 8080 (HAPI FHIR's and the CDS Hooks sandbox's dev server's usual port), not 8090
#: (SEKMET / the compose HAPI in the defaults), not 3000/5000/8000 (other common dev servers). "8250" for G2250.
DEFAULT_PORT = 8250
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def listen_url(host: str, port: int) -> str:
    """The exact base URL ``serve`` listens on: ``http://HOST:PORT/cds-services`` (IPv6 hosts in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/cds-services"


def _replay_store(config: Config) -> str:
    if config.redis_url:
        return "redis"
    from .replay import is_in_memory_sqlite

    if is_in_memory_sqlite(config.database_url):
        return "memory (in-memory SQLite: this process only)"
    return f"database ({config.database_url.split(':', 1)[0].split('+', 1)[0]})"


def startup_summary(config: Config, host: str, port: int, workers: int | None = None) -> list[str]:
    """What ``serve`` is about to do, for the operator: listen address, auth mode, audience(s), CORS origins, FHIR
    servers per client, the jti replay store. Issuers, URLs and key ids only — never a secret, token or password
    (the database and Redis URLs are reduced to their scheme)."""
    lines = [f"g2250-cds serve: listening on {listen_url(host, port)} "
             f"({workers or int(config.server['workers'])} workers)",
             f"  database: {describe_database(config)}"]
    if config.auth_required:
        lines.append("  auth: required (JWT ES384/RS384 on every /cds-services call; a bad token is a bare 401)")
        lines.append("  audience (JWT aud, exactly as callers type the URL): " + ", ".join(config.audiences))
        for client in config.clients:
            keys: list[str] = []
            if client.jwks is not None:
                kids = [str(k.get("kid")) for k in client.jwks.get("keys", []) if isinstance(k, dict)]
                keys.append("pinned kid " + ", ".join(kids))
            if client.jwks_url:
                keys.append(f"jwks_url {client.jwks_url}")
            if client.allowed_jku:
                fetched = " (answered by the pinned keys, never fetched)" if client.jwks is not None else ""
                keys.append("jku " + ", ".join(client.allowed_jku) + fetched)
            servers = ", ".join(client.fhir_servers) or "none"
            lines.append(f"  client {client.issuer}: keys {'; '.join(keys) or 'none'}; FHIR servers {servers}")
        lines.append(f"  jti replay cache: {_replay_store(config)}")
    else:
        lines.append("  auth: OFF (auth.required: false) — any caller can invoke this service")
        lines.append("  FHIR servers: " + (", ".join(config.fhir["allowed_servers"]) or "none"))
    lines.append("  CORS origins: " + (", ".join(config.server["cors_allowed_origins"]) or "none"))
    lines.extend(f"  warning: {w}" for w in _startup_warnings(config, host, port))
    return lines


def _startup_warnings(config: Config, host: str, port: int) -> list[str]:
    from urllib.parse import urlsplit

    warnings: list[str] = []
    if not config.auth_required and host not in _LOOPBACK:
        warnings.append(f"authentication is off and the service listens on {host}")
    if config.auth_required and host in (*_LOOPBACK, "0.0.0.0"):
        # A local demo (the sandbox on this machine): every audience names this machine but none this port, so
        # every token is refused. Behind a proxy (a public audience) the ports differ legitimately.
        local: list[int] = []
        for audience in config.audiences:
            parts = urlsplit(audience)
            if parts.hostname not in _LOOPBACK:
                return warnings
            local.append(parts.port or (443 if parts.scheme == "https" else 80))
        if local and port not in local:
            warnings.append(f"no auth.audience names port {port}: tokens minted for {listen_url(host, port)} "
                            "will be refused (401)")
    return warnings


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    _prepare_database(config)
    from .logs import configure_logging
    from .server import run_gunicorn

    summary = startup_summary(config, args.host, args.port, args.workers)
    print("\n".join(summary), file=sys.stderr, flush=True)
    configure_logging(config.logging["level"], config.logging["format"])
    import logging

    # The same facts as one structured line (pre-formatted: the JSON formatter prints the message as given).
    logging.getLogger("g2250_cds").info(" | ".join(line.strip() for line in summary),
                                        extra={"event": "startup"})
    from sqlalchemy.exc import SQLAlchemyError

    if config.worklist["enabled"] and config.worklist["login"] == "token":
        # The embedded default's login, as Jupyter does it: a one-time token, printed here on the terminal only
        # (never in the structured log), valid 15 minutes, answered to loopback clients only.
        from .worklist.auth import issue_login_token, login_url

        try:
            token = issue_login_token(config)
        except SQLAlchemyError as exc:
            raise UnavailableError(f"database_url: cannot store the worklist's login token ({type(exc).__name__}) — "
                                   f"check that it is reachable and writable ({describe_database(config)})") from exc
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "") else ("::1" if args.host == "::" else args.host)
        base = f"http://[{shown}]:{args.port}" if ":" in shown else f"http://{shown}:{args.port}"
        print(f"  worklist:  open {login_url(base, token)}\n"
              "             (one-time sign-in link, valid 15 minutes, from this machine only; `serve` again for a "
              "new one)", file=sys.stderr, flush=True)

    try:
        run_gunicorn(config, args.config, host=args.host, port=args.port, workers=args.workers)
    except SQLAlchemyError as exc:  # the tables are created before the workers start
        raise UnavailableError(f"database_url: cannot prepare the database ({type(exc).__name__}) — check that "
                               f"it is reachable and writable ({describe_database(config)})") from exc
    return EXIT_OK


# -- evaluate ----------------------------------------------------------------------------------------------------
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _read_json_file(path: str, what: str) -> Any:
    """A JSON document from ``path``, strictly (UTF-8, no NaN/Infinity); every failure a :class:`UsageError`
    naming ``what`` (the argument) and the path."""
    shown = f"{what} {_arg(path)}"
    if not path.strip():
        raise UsageError(f"{what}: empty path — give the path of a JSON file")
    p = Path(path)
    try:
        if not p.exists():
            raise UsageError(f"{shown}: not found — check the path")
        if p.is_dir():
            raise UsageError(f"{shown}: is a directory — give the path of a JSON file")
        with p.open("rb") as handle:
            raw = handle.read(MAX_REQUEST_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{shown}: cannot read the file ({exc.strerror or type(exc).__name__}) — check its "
                         "permissions") from exc
    except ValueError as exc:  # an embedded NUL
        raise UsageError(f"{shown}: not a usable path ({exc})") from exc
    if len(raw) > MAX_REQUEST_BYTES:
        raise UsageError(f"{shown}: larger than {MAX_REQUEST_BYTES // 1024 // 1024} MiB — is this a hook request?")
    if not raw.strip():
        raise UsageError(f"{shown}: the file is empty — it must hold a JSON object")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{shown}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}) — save it "
                         "as UTF-8") from exc
    try:
        document = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{shown}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}) — fix the "
                         "JSON there") from exc
    except ValueError as exc:  # NaN/Infinity, integers longer than Python reads
        reason = "a number with too many digits" if "digits" in str(exc) else str(exc)
        raise UsageError(f"{shown}: not valid JSON ({reason}) — fix the JSON") from exc
    except RecursionError as exc:
        raise UsageError(f"{shown}: not valid JSON (nested too deeply) — is this a hook request?") from exc
    try:
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{shown}: holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff) — fix the "
                         "string") from exc
    return document


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "true/false", int: "a number",
               float: "a number", type(None): "null"}


def _service_for(args: argparse.Namespace, body: dict[str, Any]) -> str:
    from hooks import SERVICES

    ids = [s.id for s in SERVICES]
    hooks = [s.hook for s in SERVICES]
    if args.service is not None:
        if args.service in ids:
            return str(args.service)
        import difflib

        close = difflib.get_close_matches(args.service, ids, n=1, cutoff=0.6)
        guess = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"--service: unknown service {_arg(args.service)} — {guess}one of {', '.join(ids)}")
    hook = body.get("hook")
    where = f"REQUEST.json {_arg(args.request)}"
    if not isinstance(hook, str) or not hook:
        raise UsageError(f"{where}: no \"hook\" — a CDS Hooks request names its hook ({', '.join(hooks)}); or give "
                         "--service ID")
    matches = [s.id for s in SERVICES if s.hook == hook]
    if not matches:
        raise UsageError(f"{where}: hook {_arg(hook)} is not one this service answers — one of {', '.join(hooks)}; "
                         "or give --service ID")
    return matches[0]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .runtime import Runtime
    from .web.errors import ApiError, operation_outcome

    now = _parse_now(args.now)
    body = _read_json_file(args.request, "REQUEST.json")
    if not isinstance(body, dict):
        raise UsageError(f"REQUEST.json {_arg(args.request)}: a hook request is a JSON object, got "
                         f"{_JSON_KINDS.get(type(body), 'another value')} — see fhir_fixtures/requests/ for examples")
    service_id = _service_for(args, body)
    config = _load(args.config)
    _prepare_database(config)
    from sqlalchemy.exc import SQLAlchemyError

    try:
        runtime = Runtime(config, clock=(lambda: now) if now else None)
    except (SQLAlchemyError, OSError) as exc:
        raise UnavailableError(f"database_url: cannot open the database or its journal ({type(exc).__name__}) — "
                               f"check {describe_database(config)}") from exc
    try:
        response = runtime.invoke(service_id, body)
        status = 200
    except ApiError as exc:
        response = operation_outcome(exc.status, exc.diagnostics, exc.expression, exc.code)
        status = exc.status
    finally:
        runtime.close()
    print(json.dumps(response, indent=2, ensure_ascii=False))
    if status != 200:
        print(f"error: HTTP {status} — {response['issue'][0].get('diagnostics', '')}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


# -- load-fixtures -----------------------------------------------------------------------------------------------
def load_fixtures(fhir_server: str, token: str | None = None, *, timeout: float = 30.0,
                  bundles: list[tuple[str, dict[str, Any]]] | None = None) -> int:
    """POST every fixture Bundle (or the given ones, e.g. shifted) to ``fhir_server``; returns the number of
    resources written."""
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    base = fhir_server.rstrip("/")
    bundles = fixture_bundles() if bundles is None else bundles
    if not bundles:
        raise CliError("no fixture bundles found in the fhir_fixtures package")
    written = 0
    with requests.Session() as session:
        session.trust_env = False
        try:
            session.get(f"{base}/metadata", headers=headers, timeout=timeout)
        except requests.RequestException as exc:
            raise UnavailableError(f"--fhir-server {fhir_server}: cannot connect ({type(exc).__name__}) — check "
                                   "that the FHIR server is running at that URL") from exc
        for name, bundle in bundles:
            try:
                response = session.post(base, data=json.dumps(bundle), headers=headers, timeout=timeout)
            except requests.RequestException as exc:
                raise UnavailableError(f"--fhir-server {fhir_server}: cannot connect ({type(exc).__name__}) — "
                                       "check that the FHIR server is running at that URL") from exc
            if response.status_code in (401, 403):
                raise UnavailableError(f"--fhir-server {fhir_server}: HTTP {response.status_code} — check --token")
            if response.status_code >= 300:
                raise UnavailableError(f"{name}: FHIR server answered HTTP {response.status_code}: "
                                       f"{_outcome_text(response)}")
            written += len(bundle.get("entry") or ())
    return written


def _outcome_text(response: requests.Response) -> str:
    try:
        body = response.json()
        issues = body.get("issue") or []
        return "; ".join(str(i.get("diagnostics", i.get("code", ""))) for i in issues)[:300] or "no detail"
    except ValueError:
        return "no detail"


_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token


def cmd_load_fixtures(args: argparse.Namespace) -> int:
    url = args.fhir_server
    if url is not None:
        problem = url_problem(url, example="http://127.0.0.1:8090/fhir")
        if problem:
            return _usage(f"--fhir-server: {problem}")
    if args.token is not None and not _TOKEN.fullmatch(args.token):
        return _usage("--token: not a bearer token (letters, digits and -._~+/ only, as RFC 6750 says) — give the "
                      "token itself, without 'Bearer '")
    if args.write_requests is not None and not args.write_requests.strip():
        return _usage("--write-requests: empty path — give a directory")
    if args.shift_to is None:
        for option, given in (("--write-requests", args.write_requests), ("--dry-run", args.dry_run),
                              ("--strategy", args.strategy)):
            if given:
                return _usage(f"{option} needs --shift-to DATE|now")
        if url is None:
            return _usage("--fhir-server URL is required")
        count = load_fixtures(url, args.token)
        print(f"loaded {count} resources from {len(fixture_bundles())} bundles into {url}")
        return EXIT_OK
    if url is None and not args.dry_run:
        return _usage("--fhir-server URL is required (or --dry-run to only print and write the shifted stories)")
    from . import fixtures_shift
    from .rules.calendar import BusinessCalendar
    from .rules.rules_data import load_rules_data

    config = _load(args.config)
    calendar = BusinessCalendar.from_config(config.calendar)
    try:
        target = fixtures_shift.parse_target(args.shift_to, calendar.tz, fixtures_shift.wall_clock)
    except fixtures_shift.ShiftError as exc:
        return _usage(f"--shift-to: {exc}")
    scenarios = json.loads(resources.files("fhir_fixtures").joinpath("scenarios.json").read_text("utf-8"))
    plan = fixtures_shift.plan_shift(fixture_bundles(), scenarios, target, calendar=calendar,
                                     rules=load_rules_data(config.raw.get("rules")),
                                     strategy=args.strategy or "keep-verdict")
    print(plan.summary())
    for outcome in plan.outcomes:
        print("  " + outcome.line())
    if args.write_requests:
        written = _write_requests(Path(args.write_requests), plan, url)
        print(f"wrote {written} hook requests and scenarios.json (shifted) to {args.write_requests}")
    if url is not None and not args.dry_run:
        count = load_fixtures(url, args.token, bundles=plan.bundles())
        print(f"loaded {count} resources from {len(plan.files)} bundles (shifted) into {url}")
    return EXIT_OK


def _usage(message: str) -> int:
    """A usage error of load-fixtures: one line, exit status 2 (as argparse's own)."""
    _say(f"g2250-cds load-fixtures: {message}")
    return EXIT_USAGE


def _write_requests(folder: Path, plan: Any, fhir_server: str | None) -> int:
    """One hook request per shifted scenario (``<id>.json``, ready to POST to /cds-services/<service>) and the
    shifted manifest with each scenario's verdict at the target (``scenarios.json``)."""
    from . import fixtures_shift

    try:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = []
        for outcome in plan.outcomes:
            request = fixtures_shift.hook_request(outcome.item, fhir_server)
            (folder / f"{outcome.id}.json").write_text(json.dumps(request, indent=2, ensure_ascii=False) + "\n",
                                                       "utf-8")
            manifest.append({**outcome.item, "atTarget": {
                "target": plan.target.isoformat(timespec="seconds"), "verdictKept": outcome.kept,
                "status": outcome.got_status, **({"reason": outcome.reason} if outcome.reason else {})}})
        (folder / "scenarios.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", "utf-8")
    except OSError as exc:
        raise UsageError(f"--write-requests {_arg(str(folder))}: cannot write ({exc.strerror or type(exc).__name__}) "
                         "— choose a writable directory") from exc
    return len(plan.outcomes)


# -- check-config ------------------------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    """Every problem of FILE in one pass (reading, schema, meaning), sorted by key path; exit 2 if any."""
    data, problems = check_config_file(args.file)
    if problems:
        for path, message in problems:
            _say(format_problem(args.file, path, message))
        return EXIT_USAGE
    config = config_from_mapping(data, args.file)
    _say(f"OK: {args.file} (auth.required={str(config.auth_required).lower()}, {len(config.clients)} client(s), "
         f"database {describe_database(config)})", sys.stdout)
    return EXIT_OK


# -- audit -----------------------------------------------------------------------------------------------------
def _open_store(config: Config) -> Any:
    """The configured database, its tables made; a database that cannot be opened is exit 3, naming the key."""
    from sqlalchemy.exc import SQLAlchemyError

    from .store import FeedbackStore

    _prepare_database(config)
    try:
        return FeedbackStore(config.database_url)
    except (SQLAlchemyError, OSError) as exc:
        raise UnavailableError(f"database_url: cannot open the database ({type(exc).__name__}) — check "
                               f"{describe_database(config)}") from exc


def cmd_audit(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from .rules.calendar import BusinessCalendar

    config = _load(args.config)
    since = None
    if args.since is not None:
        since = _parse_since(args.since, BusinessCalendar.from_config(config.calendar).tz).astimezone(UTC)
    store = _open_store(config)
    try:
        rows = store.determinations(since=since, encounter=args.encounter, patient=args.patient, limit=args.limit)
    except (SQLAlchemyError, OSError) as exc:  # unreachable database, wrong URL: one line, not a traceback
        raise UnavailableError(f"database_url: cannot read the determination log ({type(exc).__name__}) — check "
                               f"that the database is reachable ({describe_database(config)})") from exc
    finally:
        store.dispose()
    for row in rows:
        row["recorded_at"] = _utc_text(row["recorded_at"])
        print(json.dumps(row, ensure_ascii=False, default=str))
    return EXIT_OK


def _utc_text(value: Any) -> str:
    """A log timestamp with its UTC offset: the log records UTC; SQLite returns it without the offset."""
    if isinstance(value, datetime):
        moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return moment.isoformat()
    return str(value)


# -- population-audit --------------------------------------------------------------------------------------------
def cmd_population_audit(args: argparse.Namespace) -> int:
    """billing-rules.md §8 over a population (cds_service/audit/run.py): findings.parquet / .csv, summary.json and
    report.html in --out; a short result on stdout. Exit 0 done, 2 a bad option or config, 3 the source failed."""
    from .audit.run import AuditOptions, AuditUsageError, outcome_lines, run_population_audit
    from .audit.sources import SourceError
    from .config import config_source

    config = _load(args.config)
    chosen, _ = config_source(args.config)
    options = AuditOptions(
        out=args.out, ndjson=args.ndjson, bulk_export=args.bulk_export, group=args.group,
        export_level=args.export_level, since=args.since, until=args.until, as_of=args.as_of,
        config_path=os.path.abspath(chosen) if chosen else None, engine=args.engine,
        spark_master=args.spark_master, workers=args.workers, progress=not args.no_progress)
    try:
        outcome = run_population_audit(options, config)
    except AuditUsageError as exc:
        raise UsageError(str(exc)) from exc
    except SourceError as exc:
        raise UnavailableError(str(exc)) from exc
    for line in outcome_lines(outcome):
        _say(line, sys.stdout)
    if args.publish:
        as_of = _iso_moment(str(outcome.summary["run"]["as_of"]))
        count = _publish(config, outcome.result.rows, run_id=f"population-audit {as_of.isoformat()}", as_of=as_of)
        _say(f"population-audit: published {count} row(s) to the worklist ({describe_database(config)})",
             sys.stdout)
    return EXIT_OK


# -- publish-findings ----------------------------------------------------------------------------------------------
def _iso_moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)


def _publish(config: Config, rows: Any, *, run_id: str, as_of: datetime) -> int:
    """Findings rows into the billing worklist of the configured database (cds_service/worklist/publish.py)."""
    from sqlalchemy.exc import SQLAlchemyError

    from .worklist.publish import PublishError, publish_findings

    store = _open_store(config)
    try:
        return publish_findings(store, rows, run_id=run_id, as_of=as_of)
    except PublishError as exc:
        raise UsageError(str(exc)) from exc
    except (SQLAlchemyError, OSError) as exc:
        raise UnavailableError(f"database_url: cannot write the worklist ({type(exc).__name__}) — check that the "
                               f"database is reachable ({describe_database(config)})") from exc
    finally:
        store.dispose()


def cmd_publish_findings(args: argparse.Namespace) -> int:
    """An earlier population-audit run's findings.parquet into the billing worklist. The run's time (the rows'
    evaluation time, which decides whether they replace what the worklist holds) is --as-of, else the run's
    summary.json beside the file, else the file's modification time."""
    from .audit.run import AuditUsageError, parse_as_of
    from .worklist.publish import PublishError, read_findings_parquet

    config = _load(args.config)
    as_of = None
    if args.as_of is not None:
        try:
            as_of = _iso_moment(parse_as_of(args.as_of))
        except AuditUsageError as exc:
            raise UsageError(str(exc)) from exc
    try:
        rows, run_as_of = read_findings_parquet(args.findings)
    except PublishError as exc:
        raise UsageError(str(exc)) from exc
    path = Path(args.findings)
    if as_of is None:
        as_of = run_as_of
    if as_of is None:
        target = path / "findings.parquet" if path.is_dir() else path
        as_of = datetime.fromtimestamp(target.stat().st_mtime, UTC)
    count = _publish(config, rows, run_id=f"{path.resolve().name} {as_of.isoformat()}", as_of=as_of)
    _say(f"publish-findings: published {count} row(s) of {len(rows)} to the worklist ({describe_database(config)})",
         sys.stdout)
    return EXIT_OK


# -- dev-token -------------------------------------------------------------------------------------------------
def cmd_dev_token(args: argparse.Namespace) -> int:
    """A test key pair and a signed client JWT (for testing; never in production): token on stdout, the files,
    claims and the config snippet to trust the key on stderr (cds_service/devtoken.py)."""
    from .devtoken import DevTokenError, make_dev_token, report

    try:
        result = make_dev_token(issuer=args.issuer, audience=args.audience, kid=args.kid, algorithm=args.alg,
                                key_dir=args.key_dir, lifetime=args.lifetime)
    except DevTokenError as exc:
        raise CliError(str(exc)) from exc
    if not args.quiet:
        print(report(result), file=sys.stderr, flush=True)
    print(result.token, flush=True)
    return EXIT_OK


# -- entry point -------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the argument (argparse prints the whole usage first), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def package_version() -> str:
    """The installed distribution's version (importlib.metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("g2250-cds")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


_EXIT_STATUS = """exit status: 0 done; 1 evaluate: the service answered with an error (printed); 2 a bad argument,
request file or config (every problem listed); 3 the FHIR server or the database failed or refused."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="g2250-cds",
        description="CDS Hooks service for HCPCS G2250/G2010 store-and-forward remote assessments.",
        epilog=_EXIT_STATUS,
    )
    parser.add_argument("--version", action="version", version=f"g2250-cds {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"YAML config file (default: ${CONFIG_ENV_VAR}, else the embedded defaults)"

    serve = sub.add_parser("serve", help="serve the CDS Hooks API under gunicorn", epilog=_EXIT_STATUS)
    serve.add_argument("--host", type=_host, default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    serve.add_argument("--port", type=_int_between(1, 65535), default=DEFAULT_PORT,
                       help=f"1-65535 (default {DEFAULT_PORT})")
    serve.add_argument("--config", metavar="FILE", help=config_help)
    serve.add_argument("--workers", type=_int_between(1, 64), help="gunicorn worker processes, 1-64 "
                                                                    "(default: server.workers)")
    serve.set_defaults(func=cmd_serve)

    evaluate = sub.add_parser("evaluate", help="print the CDS response for one hook request file",
                              epilog=_EXIT_STATUS)
    evaluate.add_argument("request", metavar="REQUEST.json", help="a CDS Hooks request (JSON object)")
    evaluate.add_argument("--config", metavar="FILE", help=config_help)
    evaluate.add_argument("--service", metavar="ID",
                          help="service id to call, e.g. g2250-patient-view (default: the service of the request's "
                               "hook; see GET /cds-services)")
    evaluate.add_argument("--now", metavar="ISO", help="evaluation clock, ISO 8601 with offset, e.g. "
                                                       "2026-11-18T15:40:00-05:00 (default: the current time)")
    evaluate.set_defaults(func=cmd_evaluate)

    load = sub.add_parser("load-fixtures", help="load fhir_fixtures/ into a FHIR R4 server", epilog=_EXIT_STATUS)
    load.add_argument("--fhir-server", metavar="URL", help="FHIR R4 base URL (required unless --dry-run)")
    load.add_argument("--token", help="bearer token for the FHIR server")
    load.add_argument("--shift-to", metavar="DATE|now",
                      help="move every story to just before this moment: now, YYYY-MM-DD (the end of that day) "
                           "or an ISO date-time with offset; whole weeks, so weekdays and business days are kept")
    load.add_argument("--strategy", choices=("keep-verdict", "nearest"),
                      help="keep-verdict (default): per scenario, the latest whole-week shift that keeps its "
                           "verdict; nearest: always the latest week at or before the target")
    load.add_argument("--write-requests", metavar="DIR",
                      help="also write one shifted hook request per scenario and the shifted scenarios.json")
    load.add_argument("--dry-run", action="store_true", help="with --shift-to: print and write, load nothing")
    load.add_argument("--config", metavar="FILE", help="config file whose calendar and rules judge the shifted stories")
    load.set_defaults(func=cmd_load_fixtures)

    audit = sub.add_parser("audit", help="print the determination log (JSON lines, newest first)",
                           epilog=_EXIT_STATUS)
    audit.add_argument("--config", metavar="FILE", help=config_help)
    audit.add_argument("--since", metavar="DATE|ISO",
                       help="only determinations from then on: YYYY-MM-DD (from the start of that day in the "
                            "practice time zone, calendar.timezone) or an ISO 8601 date-time with offset")
    audit.add_argument("--encounter", type=_reference("Encounter"), metavar="REF", help="e.g. Encounter/123")
    audit.add_argument("--patient", type=_reference("Patient"), metavar="REF", help="e.g. Patient/456")
    audit.add_argument("--limit", type=_int_between(1, 1_000_000), default=1000, metavar="N",
                       help="at most N determinations, the newest (1-1000000, default 1000)")
    audit.set_defaults(func=cmd_audit)

    check = sub.add_parser("check-config", help="validate a config file: every problem, by key path",
                           epilog="exit status: 0 valid (prints OK: FILE); 2 problems (one line each on stderr)")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    population = sub.add_parser(
        "population-audit", help="judge every store-and-forward assessment of a population (billing-rules.md §8)",
        epilog="exit status: 0 the run completed (bad input lines are counted and skipped); 2 a bad argument or "
               "config; 3 the source failed (a missing or unreadable file, a failed export).")
    population.add_argument("--out", required=True, metavar="DIR",
                            help="directory for findings.parquet, findings.csv, summary.json and report.html")
    source = population.add_mutually_exclusive_group(required=True)
    source.add_argument("--ndjson", nargs="+", metavar="DIR_OR_FILES",
                        help="NDJSON files (plain or .gz) or directories of them, as a Bulk Data export writes")
    source.add_argument("--bulk-export", metavar="FHIR_BASE",
                        help="run a FHIR Bulk Data $export of this server (SMART Backend Services: audit.bulk in "
                             "the config) into DIR/export/ and audit it")
    population.add_argument("--group", metavar="ID", help="with --bulk-export: export Group/ID")
    population.add_argument("--export-level", choices=("system", "patient", "group"),
                            help="with --bulk-export: [base]/$export (system, the default), [base]/Patient/$export "
                                 "or [base]/Group/ID/$export (group, the default with --group)")
    population.add_argument("--since", metavar="DATE|ISO",
                            help="only assessments received from then on: YYYY-MM-DD (start of that day, practice "
                                 "time zone) or an ISO 8601 date-time with offset")
    population.add_argument("--until", metavar="DATE|ISO", help="only assessments received before then (as --since)")
    population.add_argument("--as-of", metavar="ISO",
                            help="judge as at this moment, ISO 8601 with offset, e.g. 2026-12-31T17:00:00-05:00 "
                                 "(default: now)")
    population.add_argument("--config", metavar="FILE", help=config_help)
    population.add_argument("--engine", choices=("local", "spark"), default="local",
                            help="local (default: DuckDB and a process pool) or spark (pip install "
                                 "'g2250-cds[spark]')")
    population.add_argument("--spark-master", metavar="URL",
                            help="with --engine spark: the master, e.g. local[4] or spark://host:7077")
    population.add_argument("--workers", type=_int_between(1, 256), metavar="N",
                            help="worker processes, 1-256 (default: audit.workers, else the CPU count)")
    population.add_argument("--no-progress", action="store_true", help="no progress bar (it shows on a terminal only)")
    population.add_argument("--publish", action="store_true",
                            help="also publish the findings into the billing worklist (config database_url)")
    population.set_defaults(func=cmd_population_audit)

    publish = sub.add_parser(
        "publish-findings", help="publish an earlier population-audit run's findings into the billing worklist",
        epilog="exit status: 0 published; 2 a bad argument, config or findings file; 3 the database failed")
    publish.add_argument("findings", metavar="DIR_OR_PARQUET",
                         help="findings.parquet, or the population-audit --out directory holding it")
    publish.add_argument("--config", metavar="FILE", help=config_help)
    publish.add_argument("--as-of", metavar="ISO",
                         help="the run's time, ISO 8601 with offset (default: the run's summary.json, else the "
                              "file's modification time); a row replaces a worklist row judged earlier only")
    publish.set_defaults(func=cmd_publish_findings)

    dev = sub.add_parser("dev-token", help="test key pair + signed client JWT (for testing; never in production)")
    dev.add_argument("--issuer", required=True, help="the JWT iss: the client's issuer in auth.clients")
    dev.add_argument("--audience", required=True, metavar="URL",
                     help="the JWT aud: the service's URL as callers use it, e.g. http://127.0.0.1:8250/cds-services")
    dev.add_argument("--kid", default="dev-key-1", help="key id; names the key files (default dev-key-1)")
    dev.add_argument("--alg", choices=("ES384", "RS384"),
                     help="for a new key: ES384 (default) or RS384; an existing key keeps its own")
    dev.add_argument("--key-dir", default="dev-keys", metavar="DIR",
                     help="where KID.pem (private, 0600) and KID.jwks.json (public) live (default dev-keys)")
    dev.add_argument("--lifetime", type=int, default=300, metavar="SECONDS", help="1-300 (default 300)")
    dev.add_argument("-q", "--quiet", action="store_true", help="print the token only")
    dev.set_defaults(func=cmd_dev_token)
    return parser


def _say(text: str, stream: Any = None) -> None:
    """One message (to stderr unless told), printable whatever the stream's encoding (paths may hold undecodable
    bytes)."""
    stream = stream or sys.stderr
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        safe = text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:
        safe = text.encode("ascii", "backslashreplace").decode("ascii")
    print(safe, file=stream, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2), already printed
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    try:
        return int(args.func(args))
    except ConfigProblems as exc:
        for line in exc.lines:
            _say(f"g2250-cds {args.command}: {line}")
        return exc.code
    except CliError as exc:
        for line in str(exc).splitlines() or [""]:
            _say(f"g2250-cds {args.command}: {line}")
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `g2250-cds audit | head`: the reader left; nothing more to say
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_FAILURE
    except Exception as exc:
        if os.environ.get("G2250_CDS_TRACEBACK"):
            raise
        detail = " ".join(str(exc).split())[:200]
        _say(f"g2250-cds {args.command}: internal error ({type(exc).__name__}: {detail}) — this is a bug; please "
             "report it with the command line (G2250_CDS_TRACEBACK=1 shows the traceback)")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
