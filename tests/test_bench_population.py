"""The benchmark's synthetic populations (bench/population.py) are what they claim: deterministic for a seed,
closed under reference, valid FHIR, and their cloned episodes carry the verdicts expected.json promises — so the
audit benchmark's correctness check compares the engines with a truth, not with themselves."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.population import FIXTURES, MASTER_FILE, GeneratedPopulation, generate, load_expected, references
from cds_service.audit.keys import SHARED_TYPES, patient_of

PATIENTS = 60
RATE = 0.35  # enough cloned episodes in a small population to meet most scenario kinds


def _lines(population: GeneratedPopulation) -> Iterator[dict[str, Any]]:
    for path in population.files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> GeneratedPopulation:
    return generate(tmp_path_factory.mktemp("pop-a"), patients=PATIENTS, seed=7, submission_rate=RATE)


@pytest.fixture(scope="module")
def resources(population: GeneratedPopulation) -> list[dict[str, Any]]:
    return list(_lines(population))


def test_same_seed_same_bytes_other_seed_other_bytes(population: GeneratedPopulation, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", patients=PATIENTS, seed=7, submission_rate=RATE)
    other = generate(tmp_path / "other", patients=PATIENTS, seed=8, submission_rate=RATE)
    assert [p.name for p in again.files] == [p.name for p in population.files]
    for mine, theirs in zip(population.files, again.files, strict=True):
        assert mine.read_bytes() == theirs.read_bytes(), mine.name
    assert again.expected_path.read_bytes() == population.expected_path.read_bytes()
    assert any((other.out_dir / p.name).exists() and (other.out_dir / p.name).read_bytes() != p.read_bytes()
               for p in population.files if p.name.startswith(("Patient", "Encounter")))


def test_counts_sizes_and_candidates(population: GeneratedPopulation, resources: list[dict[str, Any]]) -> None:
    by_type = Counter(r["resourceType"] for r in resources)
    assert dict(by_type) == population.resources
    assert by_type["Patient"] == PATIENTS
    assert population.bytes == sum(p.stat().st_size for p in population.files)
    assert 2_000 < population.bytes_per_patient < 60_000
    expected = load_expected(population.out_dir)
    assert population.clones == len(expected["cloned"]) > PATIENTS * RATE / 2
    cloned = {p["patient"] for p in expected["cloned"]}
    # Only cloned patients hold what makes an audit candidate: no ordinary patient has a finding to give.
    for resource in resources:
        text = json.dumps(resource)
        if resource["resourceType"] in ("Communication", "Media", "DocumentReference") or '"VR"' in text or (
                resource["resourceType"] == "ChargeItem" and re.search(r"G2250|G2010", text)):
            assert f"Patient/{patient_of(resource)}" in cloned, resource["id"]


def test_every_reference_resolves(resources: list[dict[str, Any]]) -> None:
    keys = {f"{r['resourceType']}/{r['id']}" for r in resources}
    assert len(keys) == len(resources), "duplicate Type/id"
    dangling = sorted({ref for r in resources for ref in references(r) if ref not in keys})
    assert dangling == []


def test_no_fixture_identity_left(resources: list[dict[str, Any]]) -> None:
    """Fresh ids for every cloned resource and reference; no fixture name, MRN or master id survives."""
    master = json.loads((FIXTURES / MASTER_FILE).read_text("utf-8"))
    master_keys = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in master["entry"]}
    for resource in resources:
        assert not re.match(r"s\d\d-", resource["id"]), resource["id"]
        for ref in references(resource):
            assert ref not in master_keys and not re.search(r"/s\d\d-", ref), ref
        if resource["resourceType"] in ("Patient", "Practitioner", "RelatedPerson"):
            assert resource["name"][0]["given"] == ["Synthetic"]
            assert "telecom" not in resource and "address" not in resource


def test_lines_are_valid_fhir(resources: list[dict[str, Any]]) -> None:
    from cds_service.fhir.parse import parse_resource

    problems = []
    for resource in resources:
        model, dropped, skipped = parse_resource(resource)
        if model is None or skipped is not None or dropped:
            problems.append((resource["resourceType"], resource["id"], skipped, dropped))
    assert problems == []


def test_cloned_episodes_keep_their_scenarios_structure(population: GeneratedPopulation,
                                                        resources: list[dict[str, Any]]) -> None:
    """A cloned patient holds exactly its scenario file's resources (by type), plus the charge the generator
    added; a file with Slots also brings its own copy of the master data it needs, under the same prefix."""
    master = json.loads((FIXTURES / MASTER_FILE).read_text("utf-8"))
    master_ids = {e["resource"]["id"] for e in master["entry"]}
    by_prefix: dict[str, Counter[str]] = {}
    for resource in resources:
        match = re.match(r"(p\d{7})(?:-(.*))?$", resource["id"])
        if match and match.group(2) not in master_ids:
            by_prefix.setdefault(match.group(1), Counter())[resource["resourceType"]] += 1
    expected = load_expected(population.out_dir)
    assert expected["cloned"]
    for record in expected["cloned"]:
        pid = record["patient"].removeprefix("Patient/")
        bundle = json.loads((FIXTURES / record["file"]).read_text("utf-8"))
        want = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
        want["ChargeItem"] += sum(1 for a in record["assessments"] if a["charge_kind"] not in ("none", "fixture"))
        assert by_prefix[pid] == +want, (record["file"], dict(by_prefix[pid]), dict(want))
        assert record["resources"] == dict(sorted((+want).items()))


def test_charges_follow_the_rates(population: GeneratedPopulation, resources: list[dict[str, Any]]) -> None:
    expected = load_expected(population.out_dir)
    by_key = {f"{r['resourceType']}/{r['id']}": r for r in resources}
    kinds = Counter()
    for record in expected["cloned"]:
        for assessment in record["assessments"]:
            kinds[assessment["charge_kind"]] += 1
            klass, status = assessment["class"], assessment["status"]
            if assessment["charge_kind"] == "right":
                charge = by_key[assessment["charge"]]
                assert charge["code"]["coding"][0]["code"] == assessment["code"]
                assert [e["valueCoding"]["code"] for e in charge.get("extension", ())] == assessment["modifiers"]
                assert charge["context"]["reference"] == assessment["assessment_encounter"]
                assert (status, klass) == ("billable", "ok")
            elif assessment["charge_kind"] == "none":
                assert assessment["charge"] is None
                assert klass == {"billable": "missed-revenue", "not-billable": "ok", "pending": "pending",
                                 "needs-review": "needs-review"}[status]
            elif assessment["charge_kind"] in ("not-billable-charged", "wrong-modifier"):
                assert klass == "at-risk-charge" and assessment["charge"] in by_key
    assert kinds["right"] and kinds["none"]


def test_cloned_verdicts_hold_on_the_generated_record(population: GeneratedPopulation,
                                                      resources: list[dict[str, Any]]) -> None:
    """The renamed, shifted, anonymized clone gets its written verdict from the rules at as_of (the charges the
    generator added set aside, as the audit sets its own charge aside)."""
    from datetime import datetime

    from cds_service.config import config_from_mapping
    from cds_service.fhir.parse import add_raw
    from cds_service.record import ResourceBag
    from cds_service.rules.calendar import BusinessCalendar
    from cds_service.rules.engine import evaluate_record
    from cds_service.rules.rules_data import load_rules_data

    config = config_from_mapping(None, "embedded defaults")
    calendar = BusinessCalendar.from_config(config.calendar)
    rules = load_rules_data(config.raw.get("rules"))
    expected = load_expected(population.out_dir)
    as_of = datetime.fromisoformat(expected["as_of"])
    shared = [r for r in resources if r["resourceType"] in SHARED_TYPES]
    added = {a["charge"] for p in expected["cloned"] for a in p["assessments"]
             if a["charge_kind"] not in ("none", "fixture")}
    checked = 0
    for record in expected["cloned"]:
        pid = record["patient"].removeprefix("Patient/")
        own = [r for r in resources if patient_of(r) == pid and f"{r['resourceType']}/{r['id']}" not in added]
        bag = ResourceBag()
        add_raw(bag, shared)
        add_raw(bag, own)
        episodes = evaluate_record(bag, pid, now=as_of, calendar=calendar, rules=rules)
        for assessment in record["assessments"]:
            if assessment["status"] is None:
                continue
            found = [e.determination for e in episodes
                     if e.assessment.encounter_key == assessment["assessment_encounter"]]
            assert found, (record["file"], assessment["scenario"])
            got = found[0]
            assert (got.status, got.code, list(got.modifiers)) == (
                assessment["status"], assessment["code"], assessment["modifiers"]), assessment["scenario"]
            checked += 1
    assert checked >= population.clones


def test_audit_patient_gives_the_expected_class(population: GeneratedPopulation,
                                                resources: list[dict[str, Any]]) -> None:
    patient_module = pytest.importorskip("cds_service.audit.patient",
                                         reason="cds_service.audit.patient is not written yet")
    from cds_service.audit.engine import SettingsSpec

    expected = load_expected(population.out_dir)
    settings = patient_module.AuditSettings.from_spec(SettingsSpec(
        config_path=None, as_of=expected["as_of"], since=expected["since"], until=expected["until"]))
    shared = patient_module.build_shared([r for r in resources if r["resourceType"] in SHARED_TYPES])
    wrong = []
    for record in expected["cloned"]:
        pid = record["patient"].removeprefix("Patient/")
        raw = [r for r in resources if patient_of(r) == pid]
        rows = patient_module.audit_patient(pid, raw, shared=shared, settings=settings).rows
        for assessment in record["assessments"]:
            row = next((r for r in rows if r["received"] and assessment["receipt"]
                        and datetime_equal(r["received"], assessment["receipt"])), None)
            got = (row["status"], row["class"]) if row else None
            want = (assessment["status"], assessment["class"])
            if got is None or any(w is not None and g != w for g, w in zip(got, want, strict=True)):
                wrong.append((record["file"], assessment["scenario"], want, got))
    assert wrong == []


def datetime_equal(left: str, right: str) -> bool:
    from datetime import datetime

    return datetime.fromisoformat(left) == datetime.fromisoformat(right)


def test_gzip_output_is_the_same_population(population: GeneratedPopulation, tmp_path: Path) -> None:
    import gzip

    zipped = generate(tmp_path / "gz", patients=PATIENTS, seed=7, submission_rate=RATE, compress=True)
    assert all(p.name.endswith(".ndjson.gz") for p in zipped.files)
    for plain, packed in zip(population.files, zipped.files, strict=True):
        assert gzip.decompress(packed.read_bytes()) == plain.read_bytes(), plain.name


def test_the_audit_benchmark_takes_the_median_run_and_the_worst_memory() -> None:
    from bench.audit import _median_run

    runs = [{"seconds": 12.0, "peak_tree_rss_mb": 400}, {"seconds": 10.0, "peak_tree_rss_mb": 520},
            {"error": "exit 1"}, {"seconds": 11.0, "peak_tree_rss_mb": 410}]
    chosen = _median_run(runs)
    assert chosen["seconds"] == 11.0 and chosen["seconds_all_runs"] == [12.0, 10.0, 11.0]
    assert chosen["peak_tree_rss_mb"] == 520
    assert _median_run([{"error": "x"}]) == {"error": "x"}


def test_the_audit_benchmark_counts_the_memory_of_child_processes() -> None:
    import subprocess
    import sys
    import time

    from bench.audit import TreeRss

    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        tree = TreeRss(os.getpid(), rescan=0.0)
        alone = TreeRss(child.pid, rescan=0.0)
        deadline = time.monotonic() + 20
        while alone.kb() < 60 << 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alone.kb() >= 60 << 10  # the child's 64 MB
        assert tree.kb() >= alone.kb() + (10 << 10)  # this process and its child
    finally:
        child.kill()
        child.wait()
