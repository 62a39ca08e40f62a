"""The ``local`` population-audit engine (cds_service/audit/local.py): DuckDB classifies and groups NDJSON lines by
patient, a process pool judges only the candidate patients. The per-patient function is a fake here (module-level,
so the worker processes can import it) that records what it was given in the rows it returns; the end-to-end test
at the bottom uses the real ``patient.audit_patient``. Synthetic data only."""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import io
import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

from cds_service.audit import engine, keys, local, outputs, sources
from cds_service.audit.engine import SettingsSpec

SPEC = SettingsSpec(config_path=None, as_of="2026-12-01T12:00:00-05:00")


# -- the fake per-patient function (runs in the worker processes) ---------------------------------------------------
def fake_settings(spec: SettingsSpec) -> dict[str, Any]:
    return {"as_of": spec.as_of}


def fake_shared(raw: Any) -> Any:
    resources = list(raw)
    refs = sorted(f"{r['resourceType']}/{r.get('id')}" for r in resources)
    skipped = [(ref, "invalid-resource: fake") for ref in refs if ref.endswith("/broken-role")]
    return SimpleNamespace(refs=refs, skipped=skipped)


def fake_audit(patient_id: str, raw: Any, *, shared: Any, settings: Any) -> Any:
    """One row per call: the patient and every resource it was given (so a test sees the grouping), the shared
    record and the clock (so a test sees the initializer ran)."""
    resources = list(raw)
    refs = sorted(f"{r['resourceType']}/{r.get('id')}" for r in resources)
    row = {"patient": f"Patient/{patient_id}", "assessment_id": "a1", "evidence": refs,
           "charge_refs": shared.refs, "reason": settings["as_of"], "class": "ok"}
    skipped = [(ref, "invalid-resource: fake") for ref in refs if ref.endswith("/broken")]
    if any(r.get("id") == "explode" for r in resources):
        raise RuntimeError("a bug in the per-patient function")
    return SimpleNamespace(rows=[row], skipped=skipped, resources=len(resources))


def _run(files: list[Path] | list[str], workers: int = 1, **kwargs: Any) -> engine.EngineResult:
    return local.run_local([str(f) for f in files], spec=SPEC, workers=workers, audit_fn=fake_audit,
                           shared_fn=fake_shared, settings_fn=fake_settings, **kwargs)


def _line(resource: dict[str, Any]) -> str:
    return json.dumps(resource, separators=(",", ":"))


def _write(path: Path, lines: list[str], compress: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _by_patient(result: engine.EngineResult) -> dict[str, dict[str, Any]]:
    return {row["patient"]: row for row in result.rows}


# -- a small population ------------------------------------------------------------------------------------------
def population(folder: Path, *, compress: bool = False) -> list[Path]:
    """p1: a submission (Communication) and a review encounter, an Appointment naming the patient second;
    p2: only background (not a candidate); p3: a G2250 ChargeItem; p4: a Claim with an absolute reference naming
    G2010; p5: a 99213 ChargeItem (not a candidate); p6: only an Appointment. Shared: practitioners and a role."""
    def ref(pid: str) -> dict[str, str]:
        return {"reference": f"Patient/{pid}"}

    data = {
        "Patient": [{"resourceType": "Patient", "id": p} for p in ("p1", "p2", "p3", "p4", "p5", "p6")],
        "Encounter": [
            {"resourceType": "Encounter", "id": "e1", "class": {"code": "VR"}, "subject": ref("p1")},
            {"resourceType": "Encounter", "id": "e2", "class": {"code": "AMB"}, "subject": ref("p2")},
            {"resourceType": "Encounter", "id": "e5", "class": {"code": "AMB"}, "subject": ref("p5")},
        ],
        "Communication": [{"resourceType": "Communication", "id": "c1", "subject": ref("p1")}],
        "Observation": [{"resourceType": "Observation", "id": f"o{p}", "subject": ref(p)} for p in ("p1", "p2")],
        "Appointment": [
            {"resourceType": "Appointment", "id": "a1", "participant": [
                {"actor": {"reference": "Practitioner/pr1"}}, {"actor": ref("p1")}]},
            {"resourceType": "Appointment", "id": "a6", "participant": [{"actor": ref("p6")}]},
        ],
        "ChargeItem": [
            {"resourceType": "ChargeItem", "id": "ch3", "subject": ref("p3"), "code": {"coding": [{"code": "G2250"}]}},
            {"resourceType": "ChargeItem", "id": "ch5", "subject": ref("p5"), "code": {"coding": [{"code": "99213"}]}},
        ],
        "Claim": [{"resourceType": "Claim", "id": "cl4", "patient": {"reference": "https://x.example/fhir/Patient/p4"},
                   "item": [{"productOrService": {"coding": [{"code": "G2010"}]}}]}],
        "Practitioner": [{"resourceType": "Practitioner", "id": "pr1"}, {"resourceType": "Practitioner", "id": "pr2"}],
        "PractitionerRole": [{"resourceType": "PractitionerRole", "id": "role1"}],
        "MedicationRequest": [{"resourceType": "MedicationRequest", "id": "m1", "subject": ref("p1")}],
    }
    suffix = ".ndjson.gz" if compress else ".ndjson"
    return [_write(folder / f"{rtype}{suffix}", [_line(r) for r in items], compress)
            for rtype, items in sorted(data.items())]


def test_only_candidate_patients_are_judged_each_with_all_its_resources(tmp_path: Path) -> None:
    result = _run(population(tmp_path))
    rows = _by_patient(result)
    assert sorted(rows) == ["Patient/p1", "Patient/p3", "Patient/p4"]  # p2, p5, p6: nothing to judge
    assert rows["Patient/p1"]["evidence"] == ["Appointment/a1", "Communication/c1", "Encounter/e1", "Observation/op1",
                                              "Patient/p1"]  # not MedicationRequest: the rules do not read it
    assert rows["Patient/p3"]["evidence"] == ["ChargeItem/ch3", "Patient/p3"]
    assert rows["Patient/p4"]["evidence"] == ["Claim/cl4", "Patient/p4"]
    # every worker built the shared record (practitioners, roles) and the settings once, from the spec
    assert all(row["charge_refs"] == ["Practitioner/pr1", "Practitioner/pr2", "PractitionerRole/role1"]
               for row in result.rows)
    assert all(row["reason"] == SPEC.as_of for row in result.rows)
    assert result.input["patients"] == 6 and result.input["candidates"] == 3
    assert result.input["resources"] == result.input["lines"] == 21
    assert result.input["by_type"]["Patient"] == 6 and result.input["by_type"]["MedicationRequest"] == 1
    assert result.skipped == []
    assert set(result.timings) >= {"start", "scan", "evaluate", "total"}


def test_gzip_files_give_the_same_result(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "gz").mkdir()
    plain = _run(population(tmp_path / "plain"))
    packed = _run(population(tmp_path / "gz", compress=True))
    assert plain.rows == packed.rows
    assert plain.input["lines"] == packed.input["lines"]


def test_bad_lines_are_counted_per_file_with_the_reason_and_skipped(tmp_path: Path) -> None:
    good = population(tmp_path)
    bad = _write(tmp_path / "Communication-2.ndjson", [
        '{"resourceType": "Communication", "id": "half',                   # broken JSON
        "[1, 2, 3]",                                                        # a JSON array
        '{"id": "x", "subject": {"reference": "Patient/p1"}}',              # no resourceType
        '{"resourceType": 7, "id": "y"}',                                   # resourceType not a string
        '{"resourceType": "Communication", "id": "c9"}',                    # a submission with no subject
        '{"resourceType": "Communication", "id": "c8", "subject": {"reference": "Group/g1"}}',  # not a patient
        "   ",                                                               # blank: not a line
        '{"resourceType": "Patient"}',                                      # a Patient with no id
        '{"resourceType": "Communication", "id": "c2", "subject": {"reference": "Patient/p2"}}',  # good: p2 now
    ])
    raw = _write(tmp_path / "Binary.ndjson", ["placeholder"])
    raw.write_bytes(b'{"resourceType":"Observation","id":"\xff\xfe"}\n{"a":1}\x01junk\n'
                    b'{"resourceType":"Basic","id":"b1"}\n')
    result = _run([*good, bad, raw])
    skipped = {(s["file"], s["reason"]): s["count"] for s in result.skipped}
    assert skipped == {
        ("Communication-2.ndjson", engine.SKIP_NOT_JSON): 1,
        ("Communication-2.ndjson", engine.SKIP_NOT_RESOURCE): 3,
        ("Communication-2.ndjson", engine.SKIP_NO_PATIENT): 3,
        ("Binary.ndjson", engine.SKIP_NOT_JSON): 2,  # not UTF-8; a raw control character
    }
    per_file = result.input["per_file"]
    assert per_file["Communication-2.ndjson"]["lines"] == 8 and per_file["Binary.ndjson"]["lines"] == 3
    assert per_file["Communication-2.ndjson"]["by_type"] == {"Communication": 3, "Patient": 1}
    assert result.input["by_type"]["Basic"] == 1
    assert sorted(_by_patient(result)) == ["Patient/p1", "Patient/p2", "Patient/p3", "Patient/p4"]  # p2: c2


def test_a_byte_order_mark_and_crlf_line_ends_are_not_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "Patient.ndjson"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(_line({"resourceType": "Patient", "id": f"b{i}"}).encode()
                                                  for i in range(3)) + b"\r\n\r\n")
    result = _run([path])
    assert result.skipped == [] and result.input["by_type"] == {"Patient": 3} and result.input["lines"] == 3


def test_the_progress_bar_draws_only_on_a_terminal_or_when_forced() -> None:
    from cds_service.audit.progress import Progress

    ticks = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    stream = io.StringIO()
    bar = Progress(4, unit="patients", stream=stream, force=True, clock=lambda: next(ticks))
    bar.update(2)
    bar.update(2)
    bar.close()
    text = stream.getvalue()
    assert "2/4 patients" in text and "4/4 patients" in text and "100.0%" in text and text.endswith("\n")
    assert "ETA" in text and "patients/s" in text
    quiet = io.StringIO()  # not a terminal
    silent = Progress(4, stream=quiet)
    silent.update(4)
    silent.close()
    assert quiet.getvalue() == ""


def test_invalid_resources_reported_by_the_patient_function_are_counted_under_their_file(tmp_path: Path) -> None:
    files = population(tmp_path)
    files.append(_write(tmp_path / "Procedure.ndjson", [_line(
        {"resourceType": "Procedure", "id": "broken", "subject": {"reference": "Patient/p1"}})]))
    files.append(_write(tmp_path / "Role-2.ndjson", [_line({"resourceType": "PractitionerRole", "id": "broken-role"})]))
    files.append(_write(tmp_path / "Media.ndjson", [_line(
        {"resourceType": "Media", "id": "explode", "subject": {"reference": "Patient/p9"}})]))
    result = _run(files, workers=2)
    skipped = {(s["file"], s["reason"]): s["count"] for s in result.skipped}
    assert skipped == {
        ("Procedure.ndjson", "invalid-resource: fake"): 1,
        ("Role-2.ndjson", "invalid-resource: fake"): 1,  # a shared resource: once, not once per worker
        ("-", "audit-error: RuntimeError"): 1,          # a patient the function failed on: counted, run goes on
    }
    assert "Patient/p9" not in _by_patient(result) and "Patient/p1" in _by_patient(result)


def test_one_and_two_workers_give_identical_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "PART_BYTES", 256)  # many partitions in flight
    lines = []
    for i in range(40):
        pid = f"q{i:03d}"
        lines.append(_line({"resourceType": "Patient", "id": pid}))
        lines.append(_line({"resourceType": "Encounter", "id": f"e{i}", "subject": {"reference": f"Patient/{pid}"},
                            "class": {"code": "VR" if i % 3 else "AMB"}}))
    files = [_write(tmp_path / "mixed.ndjson", lines)]
    one = _run(files, workers=1)
    two = _run(files, workers=2)
    assert one.rows == two.rows and len(one.rows) == 26
    assert one.input == two.input and one.skipped == two.skipped
    assert [r["patient"] for r in one.rows] == sorted(r["patient"] for r in one.rows)


def test_the_sql_groups_and_marks_candidates_as_keys_does(tmp_path: Path) -> None:
    """The SQL is generated from keys; on awkward references and escapes it must name the same patient as
    ``keys.patient_of`` and never miss a ``keys.marks_candidate`` patient."""
    resources = [
        {"resourceType": "Patient", "id": "k1"},
        {"resourceType": "Encounter", "id": "x1", "subject": {"reference": "Patient/k2/_history/3"}},
        {"resourceType": "Observation", "id": "x2", "subject": {"reference": "https://h.example/r4/Patient/k3/"}},
        {"resourceType": "Coverage", "id": "x3", "beneficiary": {"reference": "Patient/k4"}},
        {"resourceType": "Consent", "id": "x4", "patient": {"reference": "Patient/k5"}},
        {"resourceType": "Encounter", "id": "x5", "class": {"code": "VR"}, "subject": {"reference": "Patient/k6"}},
        {"resourceType": "Encounter", "id": "x6", "class": {"code": "VRX"}, "subject": {"reference": "Patient/k7"}},
        {"resourceType": "ChargeItem", "id": "x7", "subject": {"reference": "Patient/k8"},
         "code": {"text": "G2250"}},
        {"resourceType": "Appointment", "id": "x8", "participant": [
            {"actor": {"reference": "Location/l1"}}, {"actor": {"reference": 5}},
            {"actor": {"reference": "Patient/k9"}}]},
        {"resourceType": "Media", "id": "x9", "subject": {"reference": "Patient/k10"}},
        {"resourceType": "Encounter", "id": "x10", "subject": {"reference": 12}},           # not a string
        {"resourceType": "Condition", "id": "x11", "subject": {"reference": "Patient/"}},   # no id
        {"resourceType": "DocumentReference", "id": "x12", "subject": {"reference": "Group/k11"}},
    ]
    lines = [_line(r) for r in resources]
    # a Claim whose code hides behind a JSON escape: still a candidate (superset)
    lines.append('{"resourceType":"Claim","id":"x13","patient":{"reference":"Patient/k12"},'
                 '"item":[{"productOrService":{"text":"G\\u00322250"}}]}')
    path = _write(tmp_path / "edge.ndjson", lines)
    result = _run([path])
    parsed = [json.loads(line) for line in lines]
    expected_patients = {keys.patient_of(r) for r in parsed} - {None}
    expected_candidates = {keys.patient_of(r) for r in parsed if keys.marks_candidate(r)} - {None}
    judged = {row["patient"].removeprefix("Patient/") for row in result.rows}
    assert result.input["patients"] == len(expected_patients)
    assert expected_candidates <= judged
    assert judged == {"k6", "k8", "k10", "k12"}  # k12: the superset's escape rule
    no_patient = {(s["file"], s["reason"]): s["count"] for s in result.skipped}
    assert no_patient == {("edge.ndjson", engine.SKIP_NO_PATIENT): 3}
    assert inspect.signature(keys.marks_candidate).parameters["remote_codes"].default == local.REMOTE_CODES


def test_nothing_to_judge_starts_no_pool_and_an_empty_source_is_empty(tmp_path: Path) -> None:
    path = _write(tmp_path / "Patient.ndjson", [_line({"resourceType": "Patient", "id": "z"})])
    result = _run([path])
    assert result.rows == [] and result.input["patients"] == 1 and result.input["candidates"] == 0
    empty = _run([])
    assert empty.rows == [] and empty.input["files"] == 0


def test_a_broken_gzip_stream_is_a_source_error_without_content(tmp_path: Path) -> None:
    data = gzip.compress(("\n".join(_line({"resourceType": "Patient", "id": f"secret{i}"}) for i in range(2000))
                          ).encode())
    path = tmp_path / "Patient.ndjson.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(sources.SourceError) as caught:
        _run([path])
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)


def test_the_work_directory_is_removed(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    files = population(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    _run(files, work_dir=out)
    assert list(out.iterdir()) == []


def test_a_partition_file_is_judged_patient_by_patient_in_line_order(tmp_path: Path) -> None:
    """A worker reads a partition file written in any order, sorts it by patient, file and line, keeps each
    patient whole, and deletes the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "part.parquet"
    rows = [("b", "x", "B"), ("a", "y", "A3"), ("a", "x", "A2"), ("c", "x", "C"), ("a", "x", "A1")]
    pq.write_table(pa.table({name: [r[i] for r in rows] for i, name in enumerate(("patient", "file", "line"))}),
                   path)
    seen: list[Any] = []
    with mock.patch.object(local, "_run_chunk", lambda shared, chunk: seen.append((shared, chunk)) or "done"):
        assert local._run_part("shared.tsv", str(path)) == "done"
    assert seen == [("shared.tsv", [("a", [("x", "A1"), ("x", "A2"), ("y", "A3")]), ("b", [("x", "B")]),
                                    ("c", [("x", "C")])])]
    assert not path.exists()


def test_many_partitions_give_the_rows_of_few(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The partition count follows the candidates' bytes: a tiny ``PART_BYTES`` cuts the same population into
    many partitions (some empty), with the same rows, counts and skips as the default."""
    (tmp_path / "in").mkdir()
    files = population(tmp_path / "in")
    few = _run(files, workers=2)
    monkeypatch.setattr(local, "PART_BYTES", 512)
    many = _run(files, workers=2)
    assert many.rows == few.rows and many.rows
    assert many.input == few.input and many.skipped == few.skipped


def test_files_are_read_largest_first_and_the_order_given_changes_nothing(tmp_path: Path) -> None:
    """DuckDB reads the largest file first (its reader leaves a thread idle when a large file comes last); the
    rows, counts and skips do not depend on the order the files are given in — not even when one resource is in
    two files (the patient's lines are parsed in file-name order whatever the reading order)."""
    (tmp_path / "in").mkdir()
    files = population(tmp_path / "in")
    again = {"resourceType": "Encounter", "id": "e1", "class": {"code": "VR"}, "subject": {"reference": "Patient/p1"},
             "note": "x" * 200}  # e1 again, in a larger file
    big = _write(tmp_path / "in" / "zz-big.ndjson", [_line(again)] + ["not json"] * 3)
    files.append(big)
    order = local.read_order([str(f) for f in files])
    sizes = [os.path.getsize(f) for f in order]
    assert order[0] == str(big) and sizes == sorted(sizes, reverse=True)
    assert local.read_order(["/nowhere/b.ndjson", str(big), "/nowhere/a.ndjson"])[1:] == [
        "/nowhere/a.ndjson", "/nowhere/b.ndjson"]  # unreadable: last, by name (DuckDB then names the problem)
    forward, backward = _run(files), _run(list(reversed(files)))
    assert forward.rows == backward.rows and forward.input == backward.input and forward.skipped == backward.skipped
    assert ("zz-big.ndjson", engine.SKIP_NOT_JSON) in {(s["file"], s["reason"]) for s in forward.skipped}


def test_outputs_are_readable_back(tmp_path: Path) -> None:
    import csv

    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    result = _run(population(tmp_path / "in"))
    for row in result.rows:
        row.update({"estimated_amount": 12.5, "past_timely_filing": False, "modifiers": ["GP", "95"]})
    written, summary = outputs.write_outputs(tmp_path / "out", result, as_of=SPEC.as_of, since=None, until=None,
                                             engine="local", rates_source=None)
    assert {p.name for p in written.values()} >= {"findings.parquet", "findings.csv", "summary.json"}
    table = pq.read_table(written["findings.parquet"])
    assert table.schema == outputs.arrow_schema()
    back = table.to_pylist()
    assert [r["patient"] for r in back] == [r["patient"] for r in result.rows]
    assert back[0]["evidence"] == result.rows[0]["evidence"] and back[0]["modifiers"] == ["GP", "95"]
    assert back[0]["estimated_amount"] == 12.5 and back[0]["code"] is None
    with written["findings.csv"].open(encoding="utf-8", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert list(csv_rows[0]) == list(outputs.findings.COLUMN_NAMES)
    assert csv_rows[0]["evidence"] == "; ".join(result.rows[0]["evidence"])
    assert csv_rows[0]["past_timely_filing"] == "false" and csv_rows[0]["code"] == ""
    assert json.loads(written["summary.json"].read_text())["rows"] == len(result.rows) == summary["rows"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_minimal_summary_counts_per_class() -> None:
    result = engine.EngineResult(rows=[], skipped=[{"file": "a", "reason": "not-json", "count": 2},
                                                   {"file": "b", "reason": "not-json", "count": 1}])
    rows = [{"class": "missed-revenue", "estimated_amount": 10.0}, {"class": "missed-revenue", "estimated_amount": 5.5},
            {"class": "ok", "estimated_amount": None}]
    summary = outputs.minimal_summary(rows, result, engine="local")
    assert summary["classes"]["missed-revenue"] == {"count": 2, "amount": 15.5}
    assert summary["classes"]["ok"]["count"] == 1 and summary["skipped"]["by_reason"] == {"not-json": 3}


def test_bare_read_parse_counts_the_same_lines(tmp_path: Path) -> None:
    files = population(tmp_path)
    files.append(_write(tmp_path / "x.ndjson.gz", ["{}", "not json", " "], compress=True))
    floor = local.bare_read_parse([str(f) for f in files])
    assert floor["lines"] == 23 and floor["parsed"] == 22 and floor["not_json"] == 1
    assert floor["bytes"] == sum(os.path.getsize(f) for f in files) and floor["seconds"] >= 0


# -- end to end over the bundled fixtures, with the real per-patient function -------------------------------------
needs_patient = pytest.mark.skipif(importlib.util.find_spec("cds_service.audit.patient") is None,
                                   reason="cds_service.audit.patient is not written yet")


@needs_patient
def test_the_fixtures_end_to_end_equal_a_plain_python_grouping(tmp_path: Path) -> None:
    """Every fixture patient judged by the engine exactly as calling ``audit_patient`` on that patient's resources
    (grouped in Python with ``keys.patient_of``) judges it: the engine adds and loses nothing."""
    from cds_service.audit import patient

    files = sources.fixtures_to_ndjson(tmp_path / "export")
    result = local.run_local([str(f) for f in files], spec=SPEC, workers=2)
    resources = list(sources.bundle_resources(sources.fixture_bundles()))
    shared = patient.build_shared(r for r in resources if r["resourceType"] in keys.SHARED_TYPES)
    settings = patient.AuditSettings.from_spec(SPEC)
    groups: dict[str, list[dict[str, Any]]] = {}
    for resource in resources:
        pid = keys.patient_of(resource)
        if pid is not None:
            groups.setdefault(pid, []).append(resource)
    expected: list[dict[str, Any]] = []
    for pid in sorted(groups):
        if any(keys.marks_candidate(r) for r in groups[pid]):
            expected.extend(patient.audit_patient(pid, groups[pid], shared=shared, settings=settings).rows)
    expected.sort(key=lambda r: (r.get("patient") or "", r.get("assessment_id") or ""))
    assert result.rows == expected
    assert result.rows, "the fixtures hold assessments"
    assert Counter(r["class"] for r in result.rows).keys() <= set(outputs.findings.CLASSES)
    assert result.skipped == [] and result.input["candidates"] <= result.input["patients"]
    by_patient = {r["patient"] for r in result.rows}
    assert "Patient/s01-pat" in by_patient
