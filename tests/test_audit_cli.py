"""``g2250-cds population-audit`` through the command line (contract.md ``population-audit``): exit 0 when the run
completed, 2 for a usage or config error (the message names the option or key), 3 when the source failed (the
message names the file or server) — always one line, never a traceback. Synthetic data only."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest

from cds_service.audit import run
from cds_service.cli import main

needs_patient = pytest.mark.skipif(importlib.util.find_spec("cds_service.audit.patient") is None,
                                   reason="cds_service.audit.patient is not written yet")


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("G2250_CDS_CONFIG", raising=False)



def _audit(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["population-audit", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_clean_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_bad_as_of_is_a_usage_error_naming_the_option(tmp_path: Path, fixture_export: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _audit(capsys, "--ndjson", str(fixture_export), "--out", str(tmp_path / "o"),
                            "--as-of", "next tuesday")
    assert code == 2 and out == ""
    assert "--as-of" in _one_clean_line(err) and "next tuesday" in err
    code, _, err = _audit(capsys, "--ndjson", str(fixture_export), "--out", str(tmp_path / "o"),
                          "--as-of", "2026-12-01T10:00:00")  # no offset: which moment?
    assert code == 2 and "--as-of: needs a time and a UTC offset" in err


def test_an_unknown_config_key_is_a_usage_error_naming_it(tmp_path: Path, fixture_export: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("audit:\n  workers: 2\n  bulk:\n    client_id: a\n    privat_key_file: k.pem\n")
    code, out, err = _audit(capsys, "--ndjson", str(fixture_export), "--out", str(tmp_path / "o"),
                            "--config", str(config))
    assert code == 2 and out == ""
    assert "audit.bulk.privat_key_file: unknown key" in _one_clean_line(err)


def test_a_missing_ndjson_path_is_a_source_failure_naming_it(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-export"
    code, out, err = _audit(capsys, "--ndjson", str(missing), "--out", str(tmp_path / "o"),
                            "--as-of", "2026-12-01T12:00:00Z")
    assert code == 3 and out == ""
    assert str(missing) in _one_clean_line(err) and "not found" in err


def test_a_failing_bulk_export_is_a_source_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "c.yaml"
    config.write_text("audit:\n  bulk:\n    poll_max_seconds: 1\n")
    code, out, err = _audit(capsys, "--bulk-export", f"http://127.0.0.1:{port}/fhir", "--out", str(tmp_path / "o"),
                            "--config", str(config), "--as-of", "2026-12-01T12:00:00Z")
    assert code == 3 and out == ""
    assert f"--bulk-export http://127.0.0.1:{port}/fhir" in _one_clean_line(err)


@pytest.mark.parametrize(("args", "expected"), [
    (["--spark-master", "local[2]"], "--spark-master: only with --engine spark"),
    (["--group", "g1"], "--group: only with --bulk-export"),
    (["--since", "2026-12-02", "--until", "2026-12-01"], "is not before --until"),
    (["--since", "2026-02-30"], "--since: '2026-02-30' is not a real day"),
    (["--until", "yesterday"], "--until: not an ISO 8601 date or date-time"),
])
def test_usage_errors_name_the_option(tmp_path: Path, fixture_export: Path, capsys: pytest.CaptureFixture[str],
                                      args: list[str], expected: str) -> None:
    code, _, err = _audit(capsys, "--ndjson", str(fixture_export), "--out", str(tmp_path / "o"), *args)
    assert code == 2
    assert expected in _one_clean_line(err)


def test_argparse_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _audit(capsys, "--out", str(tmp_path))  # no source
    assert code == 2 and "--ndjson" in err
    code, _, err = _audit(capsys, "--ndjson", "x", "--bulk-export", "http://h/fhir", "--out", str(tmp_path))
    assert code == 2 and "not allowed with" in err
    code, _, err = _audit(capsys, "--ndjson", "x", "--out", str(tmp_path), "--workers", "0")
    assert code == 2 and "--workers" in err


def test_an_out_path_that_is_a_file_is_a_usage_error(tmp_path: Path, fixture_export: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "taken"
    out.write_text("x")
    code, _, err = _audit(capsys, "--ndjson", str(fixture_export), "--out", str(out))
    assert code == 2 and "--out" in _one_clean_line(err) and "not a directory" in err


def test_the_spark_engine_without_pyspark_is_a_usage_error(tmp_path: Path, fixture_export: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyspark" else real(name, *a))
    code, _, err = _audit(capsys, "--ndjson", str(fixture_export), "--out", str(tmp_path / "o"), "--engine", "spark")
    assert code == 2 and "pip install 'g2250-cds[spark]'" in _one_clean_line(err)
    assert not (tmp_path / "o").exists()  # nothing was done


def test_as_of_defaults_to_now_in_utc() -> None:
    from datetime import UTC, datetime

    assert run.parse_as_of(None, now=datetime(2026, 12, 1, 17, 0, tzinfo=UTC)) == "2026-12-01T17:00:00Z"
    assert run.parse_as_of(" 2026-12-01T12:00:00-05:00 ") == "2026-12-01T12:00:00-05:00"


@needs_patient
def test_the_bundled_fixtures_end_to_end(tmp_path: Path, fixture_export: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "audit"
    code, stdout, err = _audit(capsys, "--ndjson", str(fixture_export), "--out", str(out),
                               "--as-of", "2026-12-31T17:00:00-05:00", "--workers", "2")
    assert code == 0, err
    assert "Traceback" not in err
    assert {p.name for p in out.iterdir()} >= {"findings.parquet", "findings.csv", "summary.json", "report.html"}
    assert not (out / ".audit-work").exists()
    with (out / "findings.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == len(rows) > 0
    assert stdout.startswith(f"population-audit: {len(rows)} findings from ")
    for cls in ("missed-revenue", "at-risk-charge", "pending", "needs-review", "ok"):
        count = sum(1 for r in rows if r["class"] == cls)
        assert f"  {cls}: {count}" in stdout
    first = next(r for r in rows if r["patient"] == "Patient/s01-pat")
    assert first["status"] == "billable" and first["code"] == "G2250" and first["modifiers"] == "GP"
    assert first["class"] == "missed-revenue"  # billable, and the fixture holds no charge for it
    assert "s01" not in err  # no patient in anything the command says on stderr


def test_the_audit_config_section_is_optional_and_defaulted(tmp_path: Path) -> None:
    from cds_service.config import config_from_mapping, load_config

    bare = config_from_mapping(None)
    assert bare.audit == {"workers": None, "bulk": {"types": None, "poll_max_seconds": 3600.0, "verify_tls": True}}
    path = tmp_path / "c.yaml"
    path.write_text("audit:\n  workers: 3\n  bulk:\n    client_id: audit-client\n    private_key_file: k.pem\n"
                    "    algorithm: ES384\n    types: [Patient, Encounter]\n    poll_max_seconds: 60\n")
    loaded = load_config(str(path))
    assert loaded.audit["workers"] == 3
    assert loaded.audit["bulk"]["types"] == ["Patient", "Encounter"] and loaded.audit["bulk"]["verify_tls"] is True
    assert "audit" not in bare.raw  # a config without the section reads exactly as before


def test_a_configured_client_without_its_key_file_is_a_usage_error(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("audit:\n  bulk:\n    client_id: audit-client\n    private_key_file: missing.pem\n")
    code, _, err = _audit(capsys, "--bulk-export", "http://127.0.0.1:9/fhir", "--out", str(tmp_path / "o"),
                          "--config", str(config))
    assert code == 2 and "audit.bulk.private_key_file: no such file" in _one_clean_line(err)


def test_spark_engine_from_the_command_line_gives_the_local_rows(tmp_path: Path) -> None:
    """The door a user takes: the installed command, a PATH without the venv (Spark's Python workers must still
    run the venv's interpreter), loopback only — the same findings as the local engine."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    pytest.importorskip("pyspark")
    from cds_service.audit.sources import fixtures_to_ndjson

    source = tmp_path / "in"
    fixtures_to_ndjson(source)
    binary = str(Path(sys.executable).with_name("g2250-cds"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK")}
    env.update({"PATH": "/usr/bin:/bin", "SPARK_LOCAL_IP": "127.0.0.1", "G2250_CDS_CONFIG": ""})
    found = {}
    for engine in ("local", "spark"):
        out = tmp_path / engine
        done = subprocess.run([binary, "population-audit", "--ndjson", str(source), "--out", str(out), "--engine",
                               engine, "--workers", "2", "--as-of", "2026-12-01T12:00:00Z", "--no-progress"],
                              env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        found[engine] = pq.read_table(out / "findings.parquet").to_pylist()
    assert found["local"] and found["spark"] == found["local"]
