"""``g2250-cds`` command line (contract.md "Install and run").

serve · evaluate · load-fixtures · check-config. Every failure is one clear line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import requests

from .config import CONFIG_ENV_VAR, Config, ConfigError, load_config, read_config_file, validate_config_data

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(str(exc).splitlines()[0] + _more(exc)) from exc


def _more(exc: ConfigError) -> str:
    extra = len(exc.problems) - 1
    return f" (and {extra} more; run 'g2250-cds check-config')" if extra > 0 else ""


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
             f"({workers or int(config.server['workers'])} workers)"]
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
    from .logs import configure_logging
    from .server import run_gunicorn

    summary = startup_summary(config, args.host, args.port, args.workers)
    print("\n".join(summary), file=sys.stderr, flush=True)
    configure_logging(config.logging["level"], config.logging["format"])
    import logging

    # The same facts as one structured line (pre-formatted: the JSON formatter prints the message as given).
    logging.getLogger("g2250_cds").info(" | ".join(line.strip() for line in summary),
                                        extra={"event": "startup"})
    run_gunicorn(config, args.config, host=args.host, port=args.port, workers=args.workers)
    return EXIT_OK


# -- evaluate ----------------------------------------------------------------------------------------------------
def _read_json_file(path: str, what: str) -> Any:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{path}: {what} not found")
    if p.is_dir():
        raise CliError(f"{path}: is a directory, expected a {what} (JSON file)")
    try:
        return json.loads(p.read_text("utf-8"))
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc


def _parse_now(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise CliError(f"not an ISO 8601 date-time: {value!r}") from exc
    if moment.tzinfo is None:
        raise CliError(f"needs a UTC offset, e.g. 2026-11-30T09:00:00-05:00: {value!r}")
    return moment


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .runtime import Runtime
    from .web.errors import ApiError, operation_outcome

    config = _load(args.config)
    body = _read_json_file(args.request, "request file")
    try:
        now = _parse_now(args.now)
    except CliError as exc:
        raise CliError(f"--now: {exc}") from exc
    service_id = args.service
    if service_id is None:
        hook = body.get("hook") if isinstance(body, dict) else None
        from hooks import SERVICES

        matches = [s.id for s in SERVICES if s.hook == hook]
        if not matches:
            raise CliError(f"{args.request}: 'hook' names no hook this service supports; use --service ID")
        service_id = matches[0]
    runtime = Runtime(config, clock=(lambda: now) if now else None)
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
def fixture_bundles() -> list[tuple[str, dict[str, Any]]]:
    """The transaction Bundles of ``fhir_fixtures/``, in file-name order (shared master data first)."""
    folder = resources.files("fhir_fixtures")
    bundles = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json") and entry.name != "scenarios.json":
            document = json.loads(entry.read_text("utf-8"))
            if isinstance(document, dict) and document.get("resourceType") == "Bundle":
                bundles.append((entry.name, document))
    return bundles


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
            raise CliError(f"--fhir-server {fhir_server}: cannot connect ({type(exc).__name__})") from exc
        for name, bundle in bundles:
            try:
                response = session.post(base, data=json.dumps(bundle), headers=headers, timeout=timeout)
            except requests.RequestException as exc:
                raise CliError(f"--fhir-server {fhir_server}: cannot connect ({type(exc).__name__})") from exc
            if response.status_code in (401, 403):
                raise CliError(f"--fhir-server {fhir_server}: HTTP {response.status_code}, check --token")
            if response.status_code >= 300:
                raise CliError(f"{name}: FHIR server answered HTTP {response.status_code}: "
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


def cmd_load_fixtures(args: argparse.Namespace) -> int:
    url = args.fhir_server
    if url is not None and not url.startswith(("http://", "https://")):
        raise CliError(f"--fhir-server: not an http(s) URL: {url!r}")
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
    print(f"g2250-cds load-fixtures: {message}", file=sys.stderr)
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
        raise CliError(f"--write-requests {folder}: cannot write ({exc.strerror or type(exc).__name__})") from exc
    return len(plan.outcomes)


# -- check-config ------------------------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        data = read_config_file(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILURE
    problems = validate_config_data(data)
    if problems:
        for path, message in problems:
            print(f"{args.file}: {path or '(top level)'}: {message}", file=sys.stderr)
        return EXIT_FAILURE
    config = _load(args.file)
    print(f"{args.file}: OK (auth.required={str(config.auth_required).lower()}, "
          f"{len(config.clients)} client(s), database {config.database_url.split(':', 1)[0]})")
    return EXIT_OK


# -- audit -----------------------------------------------------------------------------------------------------
def cmd_audit(args: argparse.Namespace) -> int:
    from .store import FeedbackStore

    config = _load(args.config)
    try:
        since = _parse_now(args.since) if args.since else None
    except CliError as exc:
        raise CliError(f"--since: {exc}") from exc
    store = FeedbackStore(config.database_url)
    try:
        rows = store.determinations(since=since, encounter=args.encounter, patient=args.patient, limit=args.limit)
    except Exception as exc:  # unreachable database, wrong URL: one line, not a traceback
        raise CliError(f"database_url: cannot read the determination log ({type(exc).__name__})") from exc
    finally:
        store.dispose()
    for row in rows:
        row["recorded_at"] = row["recorded_at"].isoformat() if hasattr(row["recorded_at"], "isoformat") else str(
            row["recorded_at"])
        print(json.dumps(row, ensure_ascii=False))
    return EXIT_OK


# -- entry point -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="g2250-cds",
        description="CDS Hooks service for HCPCS G2250/G2010 store-and-forward remote assessments.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve the CDS Hooks API under gunicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    serve.add_argument("--config", help=f"YAML config file (default: ${CONFIG_ENV_VAR} or embedded defaults)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (default: server.workers)")
    serve.set_defaults(func=cmd_serve)

    evaluate = sub.add_parser("evaluate", help="print the CDS response for one hook request file")
    evaluate.add_argument("request", metavar="REQUEST.json")
    evaluate.add_argument("--config")
    evaluate.add_argument("--service", help="service id (default: the service of the request's hook)")
    evaluate.add_argument("--now", help="evaluation clock, ISO 8601 with offset (default: the current time)")
    evaluate.set_defaults(func=cmd_evaluate)

    load = sub.add_parser("load-fixtures", help="load fhir_fixtures/ into a FHIR R4 server")
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
    load.add_argument("--config", help="config file whose calendar and rules judge the shifted stories")
    load.set_defaults(func=cmd_load_fixtures)

    audit = sub.add_parser("audit", help="print the determination log (JSON lines, newest first)")
    audit.add_argument("--config")
    audit.add_argument("--since", help="ISO 8601 date-time with offset")
    audit.add_argument("--encounter", help="e.g. Encounter/123")
    audit.add_argument("--patient", help="e.g. Patient/456")
    audit.add_argument("--limit", type=int, default=1000)
    audit.set_defaults(func=cmd_audit)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "port", None) is not None and not 0 < args.port < 65536:
        parser.error("--port must be between 1 and 65535")
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"g2250-cds: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
