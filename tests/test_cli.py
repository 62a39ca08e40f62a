"""The g2250-cds command line: check-config, evaluate, load-fixtures error paths, serve under gunicorn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from cds_service.cli import main
from cds_service.config import DEFAULTS, config_from_mapping, load_config
from tests.support.fhir_server import free_port

GOOD = """
auth:
  required: true
  audience: https://cds.example.org/cds-services
  clients:
    - issuer: https://sandbox.cds-hooks.org
      jwks_url: https://sandbox.cds-hooks.org/.well-known/jwks.json
      allowed_jku: []
      fhir_servers: [https://fhir.example.org/r4]
fhir:
  allowed_servers: [http://127.0.0.1:8090/fhir]
  timeout_seconds: 2.0
deadline_seconds: 4.0
calendar:
  timezone: America/New_York
  holidays: US
  extra_holidays: ["2026-12-24"]
  mode: business-days
  working_hours: {start: "08:00", end: "17:00"}
database_url: sqlite:///g2250-cds.db
"""


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return str(path)


def test_check_config_accepts_the_contract_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", _write(tmp_path, GOOD)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "key_path"), [
    ("deadline_second: 3\n", "deadline_second"),
    ("auth: {required: maybe}\n", "auth.required"),
    ("fhir: {timeout_seconds: -1}\n", "fhir.timeout_seconds"),
    ("fhir: {allowed_servers: [ftp://x]}\n", "fhir.allowed_servers.0"),
    ("calendar: {timezone: Mars/Olympus}\n", "calendar.timezone"),
    ("calendar: {mode: weekly}\n", "calendar.mode"),
    ("calendar: {holidays: Atlantis}\n", "calendar.holidays"),
    ("calendar: {extra_holidays: [tomorrow]}\n", "calendar.extra_holidays.0"),
    ("calendar: {working_hours: {start: '17:00', end: '08:00'}}\n", "calendar.working_hours.end"),
    ("calendar: {working_hours: {start: '08:00'}}\n", "calendar.working_hours.end"),
    ("database_url: mysql://x\n", "database_url"),
    ("auth: {required: true}\n", "auth.audience"),
    ("auth: {required: true, audience: 'https://a/b', clients: [{issuer: x}]}\n", "auth.clients.0"),
    ("auth: {clients: [{jwks_url: 'https://x'}]}\n", "auth.clients.0.issuer"),
    ("- just\n- a list\n", "(top level)"),
    ("rules: {settings: {soonest_slot_tolerance_minutes: -5}}\n", "rules.settings.soonest_slot_tolerance_minutes"),
    ("rules: {settings: {prior_service_scope: planet}}\n", "rules.settings.prior_service_scope"),
])
def test_check_config_names_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                        key_path: str) -> None:
    path = _write(tmp_path, text)
    assert main(["check-config", path]) == 1
    err = capsys.readouterr().err
    assert f"{path}: {key_path}:" in err, err


def test_rules_overrides_are_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "rules:\n  settings:\n    prior_service_scope: organization\n    soonest_slot_tolerance_minutes: 30\n"
    assert main(["check-config", _write(tmp_path, text)]) == 0
    config = load_config(str(tmp_path / "config.yaml"))
    assert config.raw["rules"]["settings"]["prior_service_scope"] == "organization"


def test_check_config_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 1
    assert "file not found" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path)]) == 1
    assert "directory" in capsys.readouterr().err
    assert main(["check-config", _write(tmp_path, "a: [unclosed\n")]) == 1
    assert "not valid YAML at line" in capsys.readouterr().err


def test_config_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("G2250_CDS_CONFIG", _write(tmp_path, "deadline_seconds: 2.5\n"))
    config = load_config()
    assert config.deadline_seconds == 2.5
    assert config.calendar["timezone"] == DEFAULTS["calendar"]["timezone"]  # defaults fill the rest


def test_embedded_defaults_are_valid() -> None:
    config = config_from_mapping(None)
    assert config.auth_required is False
    assert config.database_url.startswith("sqlite")


def _request_file(tmp_path: Path, body: object) -> str:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(body), "utf-8")
    return str(path)


def test_evaluate_prints_the_http_response(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cds_service.app import create_app
    from hooks.gather import PREFETCH_TEMPLATES

    config_path = _write(tmp_path, f"database_url: sqlite:///{tmp_path / 'e.db'}\nlogging: {{level: ERROR}}\n")
    request = {"hook": "patient-view", "hookInstance": "1", "context": {"patientId": "p"},
               "prefetch": dict.fromkeys(PREFETCH_TEMPLATES)}
    assert main(["evaluate", _request_file(tmp_path, request), "--config", config_path]) == 0
    printed = json.loads(capsys.readouterr().out)
    app = create_app(load_config(config_path))
    over_http = app.test_client().post("/cds-services/g2250-patient-view", json=request).get_json()
    assert printed == over_http


def test_evaluate_reports_client_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = _write(tmp_path, f"database_url: sqlite:///{tmp_path / 'e.db'}\nlogging: {{level: ERROR}}\n")
    request = {"hook": "patient-view", "hookInstance": "1", "context": {}}
    assert main(["evaluate", _request_file(tmp_path, request), "--config", config_path]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["resourceType"] == "OperationOutcome"
    assert "HTTP 400" in captured.err and "context.patientId" in captured.err


@pytest.mark.parametrize(("args", "message"), [
    (["evaluate", "/no/such/request.json"], "request file not found"),
    (["evaluate", "/"], "is a directory"),
    (["evaluate", "{tmp}/bad.json"], "not valid JSON (line 1"),
    (["evaluate", "{tmp}/unknown-hook.json"], "'hook' names no hook"),
    (["evaluate", "{tmp}/unknown-hook.json", "--now", "soon"], "--now: not an ISO 8601"),
    (["evaluate", "{tmp}/unknown-hook.json", "--config", "/no/such.yaml"], "/no/such.yaml: (top level): file"),
    (["load-fixtures", "--fhir-server", "not-a-url"], "--fhir-server: not an http(s) URL"),
])
def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                       message: str) -> None:
    (tmp_path / "bad.json").write_text("{oops", "utf-8")
    (tmp_path / "unknown-hook.json").write_text(json.dumps({"hook": "order-sign"}), "utf-8")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1


def test_load_fixtures_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["load-fixtures", "--fhir-server", f"http://127.0.0.1:{port}/fhir"]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_serve_runs_gunicorn_not_the_debug_server(tmp_path: Path) -> None:
    port = free_port()
    config_path = _write(tmp_path, f"database_url: sqlite:///{tmp_path / 's.db'}\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cds_service.cli", "serve", "--port", str(port), "--config", config_path,
         "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    try:
        body = None
        for _ in range(100):
            try:
                response = requests.get(f"http://127.0.0.1:{port}/cds-services", timeout=1)
                body = response.json()
                server_header = response.headers.get("Server", "")
                break
            except requests.RequestException:
                time.sleep(0.1)
        assert body is not None, "server did not start"
        assert len(body["services"]) == 4
        assert "gunicorn" in server_header.lower()
        assert "werkzeug" not in server_header.lower()
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, output
    assert "AUTHENTICATION IS OFF" in output  # the loud warning of auth.required: false


@pytest.mark.parametrize("name", ["config.production.yaml", "config.sandbox.yaml"])
def test_shipped_configs_are_valid(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parents[1] / "deploy" / name
    assert main(["check-config", str(path)]) == 0
    config = load_config(str(path))
    assert config.auth_required is True  # both shipped configs authenticate their callers
    if name == "config.production.yaml":
        assert "sandbox.cds-hooks.org" not in path.read_text("utf-8")  # the sandbox's public key never in production
