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
    ("fhir: {allowed_servers: [ftp://x]}\n", "fhir.allowed_servers[0]"),
    ("calendar: {timezone: Mars/Olympus}\n", "calendar.timezone"),
    ("calendar: {mode: weekly}\n", "calendar.mode"),
    ("calendar: {holidays: Atlantis}\n", "calendar.holidays"),
    ("calendar: {extra_holidays: [tomorrow]}\n", "calendar.extra_holidays[0]"),
    ("calendar: {working_hours: {start: '17:00', end: '08:00'}}\n", "calendar.working_hours.end"),
    ("calendar: {working_hours: {start: '08:00'}}\n", "calendar.working_hours.end"),
    ("database_url: mysql://x\n", "database_url"),
    ("auth: {required: true}\n", "auth.audience"),
    ("auth: {required: true, audience: 'https://a/b', clients: [{issuer: x}]}\n", "auth.clients[0]"),
    ("auth: {clients: [{jwks_url: 'https://x'}]}\n", "auth.clients[0].issuer"),
    ("calendar: {extra_holidays: [2026-02-30]}\n", "calendar.extra_holidays[0]"),
    ("calendar: {timezone: America/New_Yrok}\n", "calendar.timezone"),
    ("calendar: {holidays: XX}\n", "calendar.holidays"),
    ("calendar: {holidays: US-ZZ}\n", "calendar.holidays"),
    ("auth: {clients: [{issuer: x, jwks_url: 'https://'}]}\n", "auth.clients[0].jwks_url"),
    ("auth: {clients: [{issuer: x, allowed_jku: ['https://h:99999/j']}]}\n", "auth.clients[0].allowed_jku[0]"),
    ("auth: {clients: [{issuer: x, fhir_servers: ['http://a b/fhir']}]}\n", "auth.clients[0].fhir_servers[0]"),
    ("redis_url: redis://h:6379/zero\n", "redis_url"),
    ("database_url: postgresql+nosuchdriver://h/db\n", "database_url"),
    ("server: {workers: '2'}\n", "server.workers"),
    ("deadline_seconds: .nan\n", "deadline_seconds"),
    ("rules: {settings: {nonsense: 1}}\n", "rules.settings.nonsense"),
    ("rules: {settings: {soonest_slot_tolerance_minutes: -5}}\n", "rules.settings.soonest_slot_tolerance_minutes"),
    ("rules: {settings: {prior_service_scope: planet}}\n", "rules.settings.prior_service_scope"),
])
def test_check_config_names_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                        key_path: str) -> None:
    path = _write(tmp_path, text)
    assert main(["check-config", path]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {key_path}:" in err, err
    assert " — " in err  # each problem says how to fix it
    assert "Traceback" not in err


def test_rules_overrides_are_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "rules:\n  settings:\n    prior_service_scope: organization\n    soonest_slot_tolerance_minutes: 30\n"
    assert main(["check-config", _write(tmp_path, text)]) == 0
    config = load_config(str(tmp_path / "config.yaml"))
    assert config.raw["rules"]["settings"]["prior_service_scope"] == "organization"


@pytest.mark.parametrize(("content", "message"), [
    (None, "file not found — check the path"),
    ("", "the file is empty"),
    ("# nothing but a comment\n", "holds no settings"),
    ("- just\n- a list\n", "the top level is a list; a configuration is a mapping"),
    (b"calendar: {timezone: \xff}\n", "not UTF-8 text (byte 0xff on line 1) — save the file as UTF-8"),
    ("a: [unclosed\n", " line 2 column 1: expected ',' or ']'"),
    ("auth:\n\trequired: true\n", " line 2 column 1: found character '\\t' that cannot start any token"),
    ("deadline_seconds: 1\ndeadline_seconds: 2\n", "deadline_seconds: duplicate key (lines 1 and 2"),
    ("a: &a [*a]\n", "refers to itself"),
    ("x: " + "[" * 300 + "]" * 300 + "\n", "nested more than"),
    ("deadline_seconds: " + "9" * 5000 + "\n", "cannot read the number"),
    ("x: !!python/object:os.system ls\n", "remove the tag"),
])
def test_check_config_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes | None,
                                       message: str) -> None:
    path = tmp_path / "config.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, "utf-8")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_check_config_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"{tmp_path}: is a directory — give the path of a YAML file"


def test_unquoted_dates_and_times_are_read_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # YAML 1.1 would make 2026-12-24 a date and 17:00 the number 1020; the loader keeps the text.
    text = "calendar:\n  extra_holidays: [2026-12-24, '2026-12-31']\n  working_hours: {start: 08:00, end: 17:00}\n"
    path = _write(tmp_path, text)
    assert main(["check-config", path]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {path} ")
    config = load_config(path)
    assert config.calendar["extra_holidays"] == ["2026-12-24", "2026-12-31"]
    assert config.calendar["working_hours"] == {"start": "08:00", "end": "17:00"}


def test_unquoted_invalid_date_is_a_message_not_a_traceback(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "calendar:\n  extra_holidays: [2026-02-30]\n")
    assert main(["check-config", path]) == 2
    assert capsys.readouterr().err == (f"{path}: calendar.extra_holidays[0]: 2026-02-30 is not a real date — write a "
                                       "day that exists, as YYYY-MM-DD\n")


def test_check_config_reports_every_problem_sorted_by_key_path(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    text = """
timezone: UTC
deadline_second: 3
server: {workers: 0, treads: 4}
calendar:
  timezone: Mars/Olympus
  holidays: NO
  extra_holidays: [2026-02-30, 2026-12-24, tomorrow]
  working_hours: {start: "17:00", end: "08:00"}
auth:
  required: yes
  clients:
    - {issuer: a, jwks_url: "ftp://x"}
    - {issuer: a, jwks_url: "https://ok.example/jwks", fhir_servers: ["http://"]}
fhir: {allowed_servers: ["http://fhir example/r4"], timeout_seconds: "2"}
database_url: mysql://x
redis_url: "http://redis"
rules: {settings: {prior_service_scope: planet}}
"""
    path = _write(tmp_path, text)
    assert main(["check-config", path]) == 2
    lines = capsys.readouterr().err.splitlines()
    paths = [line.split(": ")[1] for line in lines]
    assert paths == [
        "auth.audience", "auth.clients[0].jwks_url", "auth.clients[1].fhir_servers[0]", "auth.clients[1].issuer",
        "calendar.extra_holidays[0]", "calendar.extra_holidays[2]", "calendar.holidays", "calendar.timezone",
        "calendar.working_hours.end", "database_url", "deadline_second", "fhir.allowed_servers[0]",
        "fhir.timeout_seconds", "redis_url", "rules.settings.prior_service_scope", "server.treads",
        "server.workers", "timezone",
    ], lines
    text = "\n".join(lines)
    assert "deadline_second: unknown key — did you mean deadline_seconds?" in text
    assert "server.treads: unknown key — did you mean threads?" in text
    assert "timezone: unknown key here — it belongs at calendar.timezone" in text
    assert 'calendar.holidays: expected text or null, got the boolean false' in text and '"NO"' in text
    assert "fhir.timeout_seconds: expected a number, got the text 2 — write the number without quotes" in text
    assert "server.workers: 0 is out of range — use a whole number from 1 to 64" in text


def test_config_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("G2250_CDS_CONFIG", _write(tmp_path, "deadline_seconds: 2.5\n"))
    config = load_config()
    assert config.deadline_seconds == 2.5
    assert config.calendar["timezone"] == DEFAULTS["calendar"]["timezone"]  # defaults fill the rest


def test_embedded_defaults_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    config = config_from_mapping(None)
    assert config.auth_required is False
    assert config.database_url.startswith("sqlite")


def _request_file(tmp_path: Path, body: object) -> str:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(body), "utf-8")
    return str(path)


def test_evaluate_prints_the_http_response(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cds_service.app import create_app, runtime_of
    from hooks.gather import PREFETCH_TEMPLATES

    config_path = _write(tmp_path, f"database_url: sqlite:///{tmp_path / 'e.db'}\nlogging: {{level: ERROR}}\n")
    request = {"hook": "patient-view", "hookInstance": "1", "context": {"patientId": "p"},
               "prefetch": dict.fromkeys(PREFETCH_TEMPLATES)}
    assert main(["evaluate", _request_file(tmp_path, request), "--config", config_path]) == 0
    printed = json.loads(capsys.readouterr().out)
    app = create_app(load_config(config_path))
    try:
        over_http = app.test_client().post("/cds-services/g2250-patient-view", json=request).get_json()
    finally:
        runtime_of(app).close()  # its log writer thread would outlive the test (and set the process's gauges)
    assert printed == over_http


def test_evaluate_reports_client_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = _write(tmp_path, f"database_url: sqlite:///{tmp_path / 'e.db'}\nlogging: {{level: ERROR}}\n")
    request = {"hook": "patient-view", "hookInstance": "1", "context": {}}
    assert main(["evaluate", _request_file(tmp_path, request), "--config", config_path]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["resourceType"] == "OperationOutcome"
    assert "HTTP 400" in captured.err and "context.patientId" in captured.err


@pytest.mark.parametrize(("args", "message"), [
    (["evaluate", "/no/such/request.json"], "REQUEST.json /no/such/request.json: not found"),
    (["evaluate", "/"], "REQUEST.json /: is a directory"),
    (["evaluate", "{tmp}/bad.json"], "not valid JSON (line 1"),
    (["evaluate", "{tmp}/nan.json"], "not valid JSON (NaN is not JSON)"),
    (["evaluate", "{tmp}/list.json"], "a hook request is a JSON object, got an array"),
    (["evaluate", "{tmp}/empty.json"], "the file is empty"),
    (["evaluate", "{tmp}/latin1.json"], "not UTF-8 text"),
    (["evaluate", "{tmp}/unknown-hook.json"], "hook order-sign is not one this service answers"),
    (["evaluate", "{tmp}/no-hook.json"], 'no "hook"'),
    (["evaluate", "{tmp}/unknown-hook.json", "--service", "g2250-patient-veiw"],
     "--service: unknown service g2250-patient-veiw — did you mean g2250-patient-view?"),
    (["evaluate", "{tmp}/unknown-hook.json", "--now", "soon"], "--now: not an ISO 8601"),
    (["evaluate", "{tmp}/unknown-hook.json", "--now", "2026-11-30T09:00:00"], "--now: needs a UTC offset"),
    (["evaluate", "{tmp}/unknown-hook.json", "--now", "0001-01-01T00:00:00+00:00"],
     "--now: 0001-01-01T00:00:00+00:00 is out of range"),
    (["evaluate", "{tmp}/patient-view.json", "--config", "/no/such.yaml"], "/no/such.yaml: file not found"),
    (["evaluate", "{tmp}/patient-view.json", "--config", ""], "--config: empty path"),
    (["load-fixtures", "--fhir-server", "not-a-url"], "--fhir-server: not-a-url is not an http(s) URL"),
    (["load-fixtures", "--fhir-server", "http://127.0.0.1:9/fhir", "--token", "Bearer x y"], "--token: not a bearer"),
    (["audit", "--config", "{tmp}/c.yaml", "--since", "yesterday"], "--since: not an ISO 8601 date or date-time"),
    (["audit", "--config", "{tmp}/c.yaml", "--since", "2026-11-18T09:00:00"],
     "--since: a date-time needs a UTC offset"),
    (["audit", "--config", "{tmp}/c.yaml", "--since", "2026-02-30"],
     "--since: not an ISO 8601 date: 2026-02-30 is not a real day"),
    (["audit", "--limit", "0"], "argument --limit: must be a whole number from 1 to 1000000, got 0"),
    (["audit", "--limit", "-5"], "argument --limit: must be a whole number from 1 to 1000000, got -5"),
    (["audit", "--limit", "ten"], "argument --limit: must be a whole number from 1 to 1000000, got ten"),
    (["audit", "--patient", "Encounter/1"], "argument --patient: not a Patient reference: Encounter/1"),
    (["audit", "--encounter", "Encounter/a b"], "argument --encounter: not an Encounter reference: Encounter/a b"),
    (["serve", "--port", "0"], "argument --port: must be a whole number from 1 to 65535, got 0"),
    (["serve", "--port", "99999"], "argument --port: must be a whole number from 1 to 65535, got 99999"),
    (["serve", "--port", "abc"], "argument --port: must be a whole number from 1 to 65535, got abc"),
    (["serve", "--host", ""], "argument --host: must not be empty"),
    (["serve", "--host", "not a host"], "argument --host: not a host name or IP address"),
    (["serve", "--workers", "0"], "argument --workers: must be a whole number from 1 to 64, got 0"),
    (["serve", "--nonsense"], "unrecognized arguments: --nonsense"),
    (["evaluate"], "the following arguments are required: REQUEST.json"),
    ([], "the following arguments are required: COMMAND"),
])
def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                       message: str) -> None:
    (tmp_path / "bad.json").write_text("{oops", "utf-8")
    (tmp_path / "nan.json").write_text('{"hook": NaN}', "utf-8")
    (tmp_path / "list.json").write_text("[]", "utf-8")
    (tmp_path / "empty.json").write_text("", "utf-8")
    (tmp_path / "latin1.json").write_bytes(b'{"hook": "caf\xe9"}')
    (tmp_path / "unknown-hook.json").write_text(json.dumps({"hook": "order-sign"}), "utf-8")
    (tmp_path / "no-hook.json").write_text(json.dumps({"context": {}}), "utf-8")
    (tmp_path / "patient-view.json").write_text(json.dumps({"hook": "patient-view"}), "utf-8")
    (tmp_path / "c.yaml").write_text(f"database_url: sqlite:///{tmp_path / 'a.db'}\n", "utf-8")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert captured.out == ""


def test_a_bad_config_of_any_command_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _write(tmp_path, "calendar: {extra_holidays: [2026-02-30], timezone: Nowhere/City}\nlogging: {level: loud}\n")
    request = _request_file(tmp_path, {"hook": "patient-view"})
    for argv in (["serve", "--config", bad], ["evaluate", request, "--config", bad], ["audit", "--config", bad],
                 ["load-fixtures", "--shift-to", "now", "--dry-run", "--config", bad]):
        assert main(argv) == 2
        lines = capsys.readouterr().err.splitlines()
        assert [line.split(": ")[2] for line in lines] == [
            "calendar.extra_holidays[0]", "calendar.timezone", "logging.level"], lines
        assert all(line.startswith(f"g2250-cds {argv[0]}: {bad}: ") for line in lines)
    monkeypatch.setenv("G2250_CDS_CONFIG", bad)
    assert main(["audit"]) == 2
    assert f"{bad} ($G2250_CDS_CONFIG): calendar.timezone: unknown time zone" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"g2250-cds {version('g2250-cds')}\n"


def test_help_documents_service_limit_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--service ID" in out and "g2250-patient-view" in out and "exit status" in out
    assert main(["audit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--limit N" in out and "--since DATE|ISO" in out


def test_load_fixtures_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["load-fixtures", "--fhir-server", f"http://127.0.0.1:{port}/fhir"]) == 3
    assert "cannot connect" in capsys.readouterr().err


def test_audit_timestamps_carry_their_offset_and_since_takes_a_date(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime

    from cds_service.rules.model import Determination
    from cds_service.store import FeedbackStore, determination_row

    database = f"sqlite:///{tmp_path / 'audit.db'}"
    store = FeedbackStore(database)
    store.create_schema()
    rows = []
    for hour in (3, 12):  # 03:00 UTC is 22:00 the day before in New York; 12:00 UTC is 07:00 the same day
        determination = Determination(status="billable", code="G2250", modifiers=("GP",), criteria=(),
                                      patient="Patient/p1", encounter=f"Encounter/e{hour}")
        rows.append(determination_row(determination, service_id="g2250-encounter-discharge",
                                      hook_instance=f"h{hour}", card_uuid=f"c{hour}",
                                      recorded_at=datetime(2026, 11, 18, hour, tzinfo=UTC)))
    store.insert_determinations(rows)
    store.dispose()
    config = _write(tmp_path, f"database_url: {database}\n")
    assert main(["audit", "--config", config]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["recorded_at"] for row in printed] == ["2026-11-18T12:00:00+00:00", "2026-11-18T03:00:00+00:00"]
    # a date is the start of that day in the practice time zone (America/New_York: 05:00 UTC)
    assert main(["audit", "--config", config, "--since", "2026-11-18"]) == 0
    assert [json.loads(line)["encounter_ref"] for line in capsys.readouterr().out.splitlines()] == ["Encounter/e12"]
    assert main(["audit", "--config", config, "--since", "2026-11-17T21:59:00-05:00", "--patient", "p1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["audit", "--config", config, "--limit", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_default_database_is_in_the_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cds_service.cli import startup_summary

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    config = config_from_mapping(None)
    expected = tmp_path / "data" / "g2250-cds" / "g2250-cds.db"
    assert config.raw["database_url"] == f"sqlite:///{expected}"
    assert config.default_database
    assert not expected.parent.exists()  # created on first use, not when the config is read
    assert config.database_url == f"sqlite:///{expected}" and expected.parent.is_dir()
    from cds_service.journal import default_journal_base

    assert default_journal_base(config.database_url) == expected.parent / "g2250-cds-journal"
    assert f"  database: sqlite {expected} (default location)" in startup_summary(config, "127.0.0.1", 8250)
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_from_mapping(None).raw["database_url"] == (
        f"sqlite:///{tmp_path / 'home' / '.local' / 'share' / 'g2250-cds' / 'g2250-cds.db'}")
    # an explicit database_url is used as written
    explicit = config_from_mapping({"database_url": "sqlite:///here.db"})
    assert explicit.database_url == "sqlite:///here.db" and not explicit.default_database
    assert list(tmp_path.glob("*.db")) == []


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


def test_the_image_keeps_the_default_database_in_its_writable_directory() -> None:
    # The image's user has no home (/nonexistent): XDG_DATA_HOME puts the default SQLite file (an SQLite trial
    # without database_url) in the one directory it may write, the working directory /var/lib/g2250-cds.
    text = (Path(__file__).resolve().parents[1] / "deploy" / "Dockerfile").read_text("utf-8")
    final = text[text.rindex("\nFROM "):]
    assert "XDG_DATA_HOME=/var/lib\n" in final
    assert "WORKDIR /var/lib/g2250-cds\n" in final and "chown 10001:10001 /var/lib/g2250-cds" in final
