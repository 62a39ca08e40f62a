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
def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from .server import run_gunicorn

    if not config.auth_required and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: authentication is off and the service listens on {args.host}", file=sys.stderr)
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


def load_fixtures(fhir_server: str, token: str | None = None, *, timeout: float = 30.0) -> int:
    """POST every fixture Bundle to ``fhir_server``; returns the number of resources written."""
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    base = fhir_server.rstrip("/")
    bundles = fixture_bundles()
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
    if not url.startswith(("http://", "https://")):
        raise CliError(f"--fhir-server: not an http(s) URL: {url!r}")
    count = load_fixtures(url, args.token)
    print(f"loaded {count} resources from {len(fixture_bundles())} bundles into {url}")
    return EXIT_OK


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
    serve.add_argument("--port", type=int, default=8080)
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
    load.add_argument("--fhir-server", required=True, metavar="URL")
    load.add_argument("--token", help="bearer token for the FHIR server")
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
