"""The Spark engine of the population audit (issue 14 "Engines"): on small synthetic NDJSON files, every candidate
patient is evaluated with exactly their resources, non-candidates never are, bad lines are counted per file and
reason, and the result equals the Python reference (and ``run_local`` when it is importable).

One SparkSession for the module (the JVM starts once), bound to loopback only. The per-patient function is a fake
that echoes what it was given, so these tests do not depend on the rules; one test runs the real
``patient.audit_patient`` on the bundled fixtures and is skipped only while that module cannot be imported.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyspark", reason="the spark extra (g2250-cds[spark]) is not installed")

from pyspark import cloudpickle

from cds_service.audit import engine, keys
from cds_service.audit import spark as spark_engine

# The fakes below run in Spark's Python workers, which may not have this directory on their path: ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SPEC = engine.SettingsSpec(config_path=None, as_of="2025-03-31T12:00:00+00:00")
HAS_PATIENT = importlib.util.find_spec("cds_service.audit.patient") is not None
HAS_LOCAL = importlib.util.find_spec("cds_service.audit.local") is not None


# -- the Spark session -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def session():
    """One local[2] session, through the engine's own ``spark_session`` so its loopback settings are what is
    tested; the environment is set first because the JVM reads it at launch."""
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    from pyspark.sql import SparkSession

    assert SparkSession.getActiveSession() is None, "another test left a Spark session running"
    started, created = spark_engine.spark_session("local[2]", workers=2)
    assert created
    started.sparkContext.setLogLevel("ERROR")
    yield started
    started.stop()


def test_session_binds_to_loopback_only(session):
    conf = session.sparkContext.getConf()
    assert conf.get("spark.driver.host") == "127.0.0.1"
    assert conf.get("spark.driver.bindAddress") == "127.0.0.1"
    assert conf.get("spark.ui.enabled") == "false"
    assert os.environ["SPARK_LOCAL_IP"] == "127.0.0.1"
    assert conf.get("spark.pyspark.python") == sys.executable
    assert session.sparkContext.master == "local[2]"


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets process ``pid`` listens on (Linux /proc), as hex ``ADDR:PORT``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1])
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc to list the JVM's sockets")
def test_the_jvm_listens_on_loopback_only(session):
    session.range(4).count()  # the block manager and the RPC endpoint are up
    proc = session.sparkContext._gateway.proc
    addresses = _listening_addresses(proc.pid)
    assert addresses, "the driver listens for its RPC endpoint"
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    assert {address.split(":")[0] for address in addresses} <= loopback, addresses


def test_an_active_session_is_attached_not_replaced(session):
    attached, created = spark_engine.spark_session("local[5]", workers=5)
    assert attached is session and not created


# -- classification: json.loads and keys themselves ----------------------------------------------------------------
@pytest.mark.parametrize(("line", "expected"), [
    ('{"resourceType":"Patient","id":"p1"}', (None, "Patient", "p1", False)),
    ('{"resourceType":"Communication","subject":{"reference":"Patient/p1"}}', (None, "Communication", "p1", True)),
    ('{"resourceType":"Appointment","participant":[{"actor":{"reference":"Location/l"}},'
     '{"actor":{"reference":"Patient/p3"}}]}', (None, "Appointment", "p3", False)),
    ('{"resourceType":"Encounter","class":{"code":"VR"},"subject":{"reference":"Patient/p4"}}',
     (None, "Encounter", "p4", True)),
    ('{"resourceType":"Encounter","class":{"code":"AMB"},"subject":{"reference":"Patient/p4"},"note":"VR"}',
     (None, "Encounter", "p4", False)),
    ('{"resourceType":"Practitioner","id":"d1"}', (None, "Practitioner", None, False)),
    ('{"resourceType":"MedicationRequest","subject":{"reference":"Patient/p1"}}',
     (None, "MedicationRequest", None, False)),
    ('{"resourceType":"Communication"}', (engine.SKIP_NO_PATIENT, "Communication", None, False)),
    ('{"resourceType":"Patient"}', (engine.SKIP_NO_PATIENT, "Patient", None, False)),
    ('{"resourceType":"Communication","subject":{"reference":["Patient/p1"]}}',
     (engine.SKIP_NO_PATIENT, "Communication", None, False)),
    ('{"resourceType":5}', (engine.SKIP_NOT_RESOURCE, None, None, False)),
    ("[1, 2]", (engine.SKIP_NOT_RESOURCE, None, None, False)),
    ('{"resourceType":"Patient","id":"p1"} x', (engine.SKIP_NOT_JSON, None, None, False)),
    ('{"resourceType":"Patient","id":"p1"}{"resourceType":"Patient","id":"p2"}', (engine.SKIP_NOT_JSON, None, None,
                                                                                  False)),
    ('{"resourceType":"Patient","id":"p1","x":NaN}', (None, "Patient", "p1", False)),
    ('{"resourceType":"Patient","id":"p', (engine.SKIP_NOT_JSON, None, None, False)),
    ('{"resourceType":"Patient","id":"p1","name":"\\ud800"}', (engine.SKIP_NOT_JSON, None, None, False)),
    ('{"resourceType":"Patient","id":"p1","name":"\\ud83d\\ude00"}', (None, "Patient", "p1", False)),
    ('{"resourceType":"Claim","patient":{"reference":"Patient/p1"},"note":"\\u00e9"}', (None, "Claim", "p1", True)),
    ('{"resourceType":"Claim","patient":{"reference":"Patient/p1"},"note":"\\u0047\\u0032250"}',
     (None, "Claim", "p1", True)),
    ("\ufeff" + '{"resourceType":"Patient","id":"p1"}', (None, "Patient", "p1", False)),
    ("   ", ("", None, None, False)),
    (None, (spark_engine.SKIP_TOO_LONG, None, None, False)),
])
def test_classify_line_is_python_json_and_keys(line, expected):
    assert spark_engine.classify_line(line) == expected


def test_file_label_is_the_decoded_basename():
    assert spark_engine.file_label("file:///tmp/x/Observation%20data.ndjson") == "Observation data.ndjson"
    assert spark_engine.file_label("hdfs://nn:8020/bulk/Claim.ndjson.gz") == "Claim.ndjson.gz"


# -- synthetic population ------------------------------------------------------------------------------------------
def _res(rtype: str, rid: str | None, **fields: Any) -> str:
    body: dict[str, Any] = {"resourceType": rtype, **({"id": rid} if rid else {}), **fields}
    return json.dumps(body)


def _subject(pid: str) -> dict[str, Any]:
    return {"subject": {"reference": f"Patient/{pid}"}}


def write_population(folder: Path) -> list[str]:
    """Seven files, one gzip, one with a space in its name; p3 has resources but no candidate; p5 exists only
    through a G2010 claim; bad lines of each kind."""
    files: dict[str, list[str]] = {
        "Patient.ndjson": [
            _res("Patient", "p1"), _res("Patient", "p2"), _res("Patient", "p3"), _res("Patient", "p4"),
            "not json {", "[1, 2]", "", '{"resourceType": 5}', _res("Patient", None),
        ],
        "Communication.ndjson.gz": [
            _res("Communication", "c1", **_subject("p1")),
            _res("Communication", "c2", subject={"reference": "https://ehr.example/fhir/Patient/p2/_history/3"}),
            _res("Communication", "c3"),
            '{"resourceType": "Communication", "id": "c4", "subj',
            _res("Communication", "c5", **_subject("p1")) + _res("Communication", "c6", **_subject("p1")),
        ],
        "Appointment.ndjson": [
            _res("Appointment", "a1", participant=[{"actor": {"reference": "Practitioner/d1"}},
                                                   {"actor": {"reference": "Patient/p1"}}]),
            _res("Appointment", "a2", participant=[{"actor": {"reference": "Location/l1"}},
                                                   {"actor": {"reference": "Patient/p3"}}]),
            _res("Appointment", "a3", participant=[{"actor": {"reference": "Location/l1"}}]),
        ],
        "Encounter.ndjson": [
            _res("Encounter", "e1", **{"class": {"code": "AMB"}}, **_subject("p3")),
            _res("Encounter", "e2", **{"class": {"code": "VR"}}, **_subject("p4")),
        ],
        "Claim.ndjson": [
            _res("Claim", "cl1", patient={"reference": "Patient/p3"}, item=[{"productOrService": {"coding": [
                {"code": "99213"}]}}]),
            _res("Claim", "cl2", patient={"reference": "Patient/p5"}, item=[{"productOrService": {"coding": [
                {"code": "G2010"}]}}]),
        ],
        "Observation data.ndjson": [
            _res("Observation", "o1", **_subject("p2")), _res("Observation", "o-bad", **_subject("p2")),
            _res("Observation", "o3", **_subject("p3")),
            _res("MedicationRequest", "m1", **_subject("p1")),
        ],
        "Practitioner.ndjson": [
            _res("Practitioner", "d1"), _res("Practitioner", "d2-bad"),
            _res("PractitionerRole", "r1", practitioner={"reference": "Practitioner/d1"}),
            _res("Organization", "org1"),
        ],
    }
    paths = []
    for name, lines in files.items():
        path = folder / name
        text = "\n".join(lines) + "\n"
        if name.endswith(".gz"):
            path.write_bytes(gzip.compress(text.encode("utf-8")))
        else:
            path.write_text(text, encoding="utf-8")
        paths.append(str(path))
    return sorted(paths)


EXPECTED_EVALUATED = {
    "p1": ["Appointment/a1", "Communication/c1", "Patient/p1"],
    "p2": ["Communication/c2", "Observation/o-bad", "Observation/o1", "Patient/p2"],
    "p4": ["Encounter/e2", "Patient/p4"],
    "p5": ["Claim/cl2"],
}
EXPECTED_SHARED = ["Organization/org1", "Practitioner/d1", "Practitioner/d2-bad", "PractitionerRole/r1"]
FAKE_INVALID = f"{engine.SKIP_INVALID_PREFIX}: fake"
EXPECTED_SKIPPED = [
    {"file": "Appointment.ndjson", "reason": engine.SKIP_NO_PATIENT, "count": 1},
    {"file": "Communication.ndjson.gz", "reason": engine.SKIP_NO_PATIENT, "count": 1},
    {"file": "Communication.ndjson.gz", "reason": engine.SKIP_NOT_JSON, "count": 2},
    {"file": "Observation data.ndjson", "reason": FAKE_INVALID, "count": 1},
    {"file": "Patient.ndjson", "reason": engine.SKIP_NO_PATIENT, "count": 1},
    {"file": "Patient.ndjson", "reason": engine.SKIP_NOT_RESOURCE, "count": 2},
    {"file": "Patient.ndjson", "reason": engine.SKIP_NOT_JSON, "count": 1},
    {"file": "Practitioner.ndjson", "reason": FAKE_INVALID, "count": 1},
]


# -- fakes (run in the workers; they echo what they were given) ----------------------------------------------------
@dataclass
class FakeAudit:
    rows: list[dict[str, Any]]
    skipped: list[tuple[str | None, str]]
    resources: int = 0


@dataclass
class FakeShared:
    refs: list[str]
    skipped: list[tuple[str | None, str]] = field(default_factory=list)


def _ref(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource.get('id')}"


def fake_shared(raw):
    refs = sorted(_ref(r) for r in raw)
    return FakeShared(refs, [(ref, FAKE_INVALID) for ref in refs if ref.endswith("-bad")])


def fake_settings(spec):
    return {"as_of": spec.as_of}


def fake_audit(patient_id, raw, *, shared, settings):
    refs = sorted(_ref(r) for r in raw)
    row = {"patient": f"Patient/{patient_id}", "assessment_id": "a", "evidence": refs, "shared": shared.refs,
           "as_of": settings["as_of"], "pid": os.getpid()}
    return FakeAudit([row], [(ref, FAKE_INVALID) for ref in refs if ref.endswith("-bad")], len(refs))


FAKES = {"audit_fn": fake_audit, "shared_fn": fake_shared, "settings_fn": fake_settings}


def unpid(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fake's rows without the worker's pid: which process judged a patient is allowed to differ."""
    return [{k: v for k, v in row.items() if k != "pid"} for row in rows]


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> list[str]:
    return write_population(tmp_path_factory.mktemp("bulk"))


@pytest.fixture(scope="module")
def faked(session, population) -> engine.EngineResult:
    return spark_engine.run_spark(population, spec=SPEC, workers=2, progress=False, session=session, **FAKES)


def test_every_candidate_patient_gets_exactly_their_resources(faked):
    evaluated = {row["patient"].removeprefix("Patient/"): row["evidence"] for row in faked.rows}
    assert evaluated == EXPECTED_EVALUATED  # p3 (no submission, no VR encounter, no remote code) is never evaluated
    assert [row["patient"] for row in faked.rows] == sorted(row["patient"] for row in faked.rows)


def test_workers_build_settings_and_the_shared_record_from_the_shared_types(faked):
    assert {tuple(row["shared"]) for row in faked.rows} == {tuple(EXPECTED_SHARED)}
    assert {row["as_of"] for row in faked.rows} == {SPEC.as_of}
    assert all(row["pid"] != os.getpid() for row in faked.rows), "evaluated in the driver, not in the workers"


def test_bad_lines_are_counted_per_file_and_reason(faked):
    assert faked.skipped == EXPECTED_SKIPPED


def test_input_counts(faked, population):
    per_file = dict(faked.input)["per_file"]
    assert per_file["Patient.ndjson"] == {"lines": 8, "bytes": Path(population[-2]).stat().st_size, "resources": 5,
                                          "by_type": {"Patient": 5}}
    assert per_file["Communication.ndjson.gz"]["lines"] == 5
    assert per_file["Observation data.ndjson"]["by_type"] == {"MedicationRequest": 1, "Observation": 3}
    assert sorted(per_file) == sorted(Path(p).name for p in population)
    assert {k: v for k, v in faked.input.items() if k != "per_file"} == {
        "files": 7, "bytes": sum(Path(p).stat().st_size for p in population), "lines": 28, "resources": 23,
        "patients": 5, "candidates": 4,
        "by_type": {"Appointment": 3, "Claim": 2, "Communication": 3, "Encounter": 2, "MedicationRequest": 1,
                    "Observation": 3, "Organization": 1, "Patient": 5, "Practitioner": 2, "PractitionerRole": 1},
    }
    assert {"spark_session", "read_classify", "evaluate", "total"} <= set(faked.timings)


def test_a_second_run_in_the_same_workers_does_not_reuse_the_first_runs_shared_record(session, tmp_path):
    only = tmp_path / "Communication.ndjson"
    only.write_text(_res("Communication", "c9", **_subject("p9")) + "\n", encoding="utf-8")
    result = spark_engine.run_spark([str(only)], spec=SPEC, workers=2, progress=False, session=session, **FAKES)
    assert [(row["patient"], row["evidence"], row["shared"]) for row in result.rows] == [
        ("Patient/p9", ["Communication/c9"], [])]
    assert result.skipped == []
    assert result.input["candidates"] == 1


def test_a_directory_contributes_its_ndjson_files(session, population, faked):
    folder = Path(population[0]).parent
    (folder / "notes.txt").write_text("not an export file\n", encoding="utf-8")
    result = spark_engine.run_spark([str(folder)], spec=SPEC, workers=2, progress=False, session=session, **FAKES)
    assert (unpid(result.rows), result.input, result.skipped) == (unpid(faked.rows), faked.input, faked.skipped)


def test_a_missing_input_is_a_clear_error(session, tmp_path):
    from cds_service.audit.sources import SourceError

    with pytest.raises(SourceError, match=r"nowhere\.ndjson: not found"):
        spark_engine.run_spark([str(tmp_path / "nowhere.ndjson")], spec=SPEC, workers=1, progress=False,
                               session=session, **FAKES)


# -- the real per-patient function ---------------------------------------------------------------------------------
def python_reference(files: list[str]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The audit in plain Python, file by file: what any engine must produce with the real functions."""
    from cds_service.audit import patient

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    candidates: set[str] = set()
    shared_raw = []
    for name in files:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rt", encoding="utf-8") as handle:
            for line in handle:
                reason, rtype, pid, candidate = spark_engine.classify_line(line.rstrip("\n"))
                if reason is not None:
                    continue
                resource = json.loads(line)
                if rtype in keys.SHARED_TYPES:
                    shared_raw.append(resource)
                elif pid is not None:
                    groups[pid].append(resource)
                    if candidate:
                        candidates.add(pid)
    settings = patient.AuditSettings.from_spec(SPEC)
    shared = patient.build_shared(shared_raw)
    rows, skipped = [], []
    for pid in sorted(candidates):
        audited = patient.audit_patient(pid, groups[pid], shared=shared, settings=settings)
        rows.extend(audited.rows)
        skipped.extend(audited.skipped)
    rows.sort(key=lambda r: (r["patient"], r["assessment_id"]))
    return rows, skipped


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory) -> list[str]:
    from cds_service.audit import sources

    return sorted(str(p) for p in sources.fixtures_to_ndjson(tmp_path_factory.mktemp("fixtures")))


@pytest.mark.skipif(not HAS_PATIENT, reason="cds_service.audit.patient is not written yet")
def test_real_audit_patient_gives_the_python_reference_rows(session, fixture_files):
    result = spark_engine.run_spark(fixture_files, spec=SPEC, workers=2, progress=False, session=session)
    rows, skipped = python_reference(fixture_files)
    assert rows, "the fixtures hold assessments"
    assert result.rows == rows
    assert sum(e["count"] for e in result.skipped if e["reason"].startswith(engine.SKIP_INVALID_PREFIX)) == len(
        skipped)


def _hostile(i: int, extra: str = "") -> str:
    return f'{{"resourceType":"Communication","id":"h{i}","subject":{{"reference":"Patient/q{i}"}}{extra}}}'


HOSTILE_LINES: dict[str, bytes] = {  # lines where JSON parsers are known to differ; one file each
    "nan.ndjson": _hostile(1, ',"x":NaN').encode(),
    "surrogate.ndjson": _hostile(2, ',"x":"\\ud800"').encode(),
    "trailing.ndjson": (_hostile(3) + " x").encode(),
    "glued.ndjson": (_hostile(4) + _hostile(5)).encode(),
    "crlf.ndjson": (_hostile(6) + "\r").encode(),
    "control.ndjson": _hostile(7, ',"x":"a\x01b"').encode(),
    "whitespace.ndjson": b"\t \t",
    "bigint.ndjson": _hostile(8, ',"x":123456789012345678901234567890').encode(),
    "duplicate-key.ndjson": _hostile(9, ',"id":"h9b"').encode(),
    "escape.ndjson": b'{"resourceType":"Claim","id":"k1","patient":{"reference":"Patient/q10"},"note":"\\u00e9"}',
    "bom.ndjson": b"\xef\xbb\xbf" + _hostile(11).encode(),
    "latin1.ndjson": _hostile(12, ',"x":"\xff"').encode("latin-1"),
}


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("hostile")
    for name, line in HOSTILE_LINES.items():
        (folder / name).write_bytes(line + b"\n")
    return sorted(str(folder / name) for name in HOSTILE_LINES)


@pytest.mark.skipif(not HAS_LOCAL, reason="cds_service.audit.local is not written yet")
@pytest.mark.parametrize("which", ["fixtures", "synthetic", "hostile"])
def test_same_result_as_the_local_engine(session, fixture_files, population, hostile_files, which):
    from cds_service.audit.local import run_local

    files = {"fixtures": fixture_files, "synthetic": population, "hostile": hostile_files}[which]
    fakes = FAKES if which == "hostile" else {}  # the hostile lines are about reading, not about the rules
    ours = spark_engine.run_spark(files, spec=SPEC, workers=2, progress=False, session=session, **fakes)
    theirs = run_local(files, spec=SPEC, workers=2, progress=False, **fakes)
    assert unpid(ours.rows) == unpid(theirs.rows)
    assert ours.input == theirs.input
    assert ours.skipped == theirs.skipped


@pytest.mark.skipif(not HAS_PATIENT, reason="cds_service.audit.patient is not written yet")
def test_main_is_the_population_audit_command_on_the_running_session(session, fixture_files, tmp_path):
    """What ``spark-submit cds_service/audit/spark.py --ndjson … --out …`` runs: the command, attached to the
    submit's (here: the module's) session, which it must leave running."""
    out = tmp_path / "out"
    status = spark_engine.main(["--ndjson", str(Path(fixture_files[0]).parent), "--out", str(out),
                                "--as-of", SPEC.as_of, "--no-progress"])
    assert status == 0
    assert {"findings.csv", "findings.parquet", "summary.json", "report.html"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert "spark_session" in json.dumps(summary)
    assert session.sparkContext._jsc is not None, "the attached session was stopped"
    rows, _ = python_reference(fixture_files)
    assert (out / "findings.csv").read_text(encoding="utf-8").count("\n") >= len(rows)
