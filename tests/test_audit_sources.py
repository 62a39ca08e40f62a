"""Population audit sources (cds_service/audit/sources.py): which files ``--ndjson`` reads, how a missing or
unreadable one fails (SourceError → exit 3), and the bundled fixtures written as a Bulk export. Synthetic data only."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from cds_service.audit import sources
from cds_service.audit.sources import SourceError, fixtures_to_ndjson, resolve_ndjson


def _write(path: Path, lines: list[str], *, compress: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def test_a_directory_contributes_its_ndjson_and_jsonl_files_plain_or_gzip(tmp_path: Path) -> None:
    _write(tmp_path / "Patient.ndjson", ['{"resourceType":"Patient","id":"a"}'])
    _write(tmp_path / "Encounter.ndjson.gz", ['{"resourceType":"Encounter"}'], compress=True)
    _write(tmp_path / "Observation.jsonl", ["{}"])
    _write(tmp_path / "Claim.jsonl.gz", ["{}"], compress=True)
    _write(tmp_path / "notes.txt", ["not a source"])
    _write(tmp_path / ".hidden.ndjson", ["{}"])
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "Deep.ndjson", ["{}"])  # not recursive: Bulk exports are flat
    found = [os.path.basename(f) for f in resolve_ndjson([str(tmp_path)])]
    assert found == ["Claim.jsonl.gz", "Encounter.ndjson.gz", "Observation.jsonl", "Patient.ndjson"]
    assert all(os.path.isabs(f) for f in resolve_ndjson([str(tmp_path)]))


def test_files_are_taken_as_given_and_deduplicated(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", ["{}"])  # any name when named explicitly
    b = _write(tmp_path / "b.ndjson", ["{}"])
    assert resolve_ndjson([str(a), str(b), str(tmp_path / "." / "b.ndjson")]) == [str(a.resolve()), str(b.resolve())]


def test_a_missing_path_is_a_source_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"--ndjson .*nope\.ndjson: not found"):
        resolve_ndjson([str(tmp_path / "nope.ndjson")])


def test_a_directory_without_ndjson_is_a_source_error(tmp_path: Path) -> None:
    _write(tmp_path / "readme.txt", ["x"])
    with pytest.raises(SourceError, match=r"no \*\.ndjson"):
        resolve_ndjson([str(tmp_path)])


def test_no_path_and_an_empty_path_are_source_errors() -> None:
    with pytest.raises(SourceError, match="no path given"):
        resolve_ndjson([])
    with pytest.raises(SourceError, match="empty path"):
        resolve_ndjson(["  "])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_a_source_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.ndjson", ["{}"])
    path.chmod(0)
    with pytest.raises(SourceError, match="cannot read the file"):
        resolve_ndjson([str(path)])


def test_a_gz_name_that_is_not_gzip_is_a_source_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.ndjson.gz", ['{"resourceType":"Patient"}'])
    with pytest.raises(SourceError, match="not gzip-compressed"):
        resolve_ndjson([str(path)])


def test_open_lines_reads_plain_and_gzip_alike(tmp_path: Path) -> None:
    lines = ['{"resourceType":"Patient","id":"a"}', '{"resourceType":"Patient","id":"b"}']
    plain = _write(tmp_path / "p.ndjson", lines)
    packed = _write(tmp_path / "p.ndjson.gz", lines, compress=True)
    assert list(sources.open_lines(plain)) == list(sources.open_lines(packed))
    assert len(list(sources.open_lines(packed))) == 2


@pytest.mark.parametrize("compress", [False, True])
def test_the_fixtures_as_a_bulk_export_one_file_per_type_every_resource_once(tmp_path: Path, compress: bool) -> None:
    files = fixtures_to_ndjson(tmp_path, compress=compress)
    expected: dict[str, int] = {}
    for resource in sources.bundle_resources(sources.fixture_bundles()):
        expected[resource["resourceType"]] = expected.get(resource["resourceType"], 0) + 1
    suffix = ".ndjson.gz" if compress else ".ndjson"
    assert sorted(f.name for f in files) == sorted(f"{t}{suffix}" for t in expected)
    for file in files:
        rtype = file.name.removesuffix(suffix)
        parsed = [json.loads(line) for line in sources.open_lines(file)]
        assert len(parsed) == expected[rtype]
        assert {r["resourceType"] for r in parsed} == {rtype}
    assert "Patient" in expected and "Practitioner" in expected and expected["Patient"] >= 70
    assert resolve_ndjson([str(tmp_path)]) == [str(f.resolve()) for f in files]
