"""The synthetic FHIR fixtures in ``fhir_fixtures/`` are loadable, consistent and self-describing.

Checks, without network: every fixture file is an R4 transaction Bundle of resources that parse with
``fhir.resources.R4B``, written as client-assigned ``PUT Type/id`` entries with globally unique ids; every relative
reference resolves inside the fixtures; and ``scenarios.json`` names existing files, patients, encounters and
practitioners, lists all ten criterion ids of ``billing-rules.md`` §3, and states an overall status and follow-up
deadline that agree with §3/§6 (status derived from the criteria; deadline = receipt + 24 business hours).
"""

from __future__ import annotations

import json
import re
from datetime import date, datetime, time, timedelta
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import holidays
import pytest
from fhir.resources.R4B import get_fhir_model_class

from cds_service.rules.facts import references_in
from tests.support.spec import SPEC_CRITERION_IDS

FIXTURES = Path(__file__).resolve().parents[1] / "fhir_fixtures"
BUNDLE_NAME = re.compile(r"^\d\d-[a-z0-9-]+\.json$")
RESOURCE_ID = re.compile(r"^[a-z0-9-]{1,64}$")
RELATIVE_REFERENCE = re.compile(r"^([A-Z][A-Za-z]+)/([a-z0-9-]{1,64})$")
PRACTICE_TZ = ZoneInfo("America/New_York")

CRITERIA = SPEC_CRITERION_IDS
CRITERION_VALUES = {"met", "not-met", "pending", "unknown"}
STATUSES = {"billable", "not-billable", "pending", "needs-review"}
HOOKS = {"patient-view", "encounter-start", "encounter-discharge", "appointment-book"}
MODIFIERS = {"G2250": {"GP", "GO", "GN", "CQ", "CO"}, "G2010": set()}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _bundle_files() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.json") if BUNDLE_NAME.match(p.name))


@cache
def _bundles() -> dict[str, dict]:
    return {p.name: _read_json(p) for p in _bundle_files()}


@cache
def _scenarios() -> list[dict]:
    return _read_json(FIXTURES / "scenarios.json")


def _proposed_appointments() -> list[dict]:
    out = []
    for scenario in _scenarios():
        appointments = scenario.get("context", {}).get("appointments")
        if appointments:
            out.extend(entry["resource"] for entry in appointments.get("entry", []))
    return out


@cache
def _resources_by_key() -> dict[str, tuple[str, dict]]:
    """'Type/id' -> (file name, resource) over every fixture file."""
    index: dict[str, tuple[str, dict]] = {}
    for name, bundle in _bundles().items():
        for entry in bundle.get("entry", []):
            resource = entry["resource"]
            index[f"{resource['resourceType']}/{resource['id']}"] = (name, resource)
    return index


def _is_business_day(day: date, us_holidays: holidays.HolidayBase) -> bool:
    return day.weekday() < 5 and day not in us_holidays


def _follow_up_deadline(receipt: datetime) -> datetime:
    """billing-rules.md §3/§6, business-days mode: receipt + 24 h counted only on business days (local time).

    A receipt on a weekend or holiday starts counting at 00:00 of the next business day; the deadline is the
    instant the 24th business hour is used up (end of a business day, not the start of the next one).
    """
    us_holidays = holidays.US(years=range(receipt.year - 1, receipt.year + 2))
    current = receipt.astimezone(PRACTICE_TZ)
    remaining = timedelta(hours=24)
    while True:
        next_midnight = datetime.combine(current.date() + timedelta(days=1), time(0), PRACTICE_TZ)
        if _is_business_day(current.date(), us_holidays):
            available = next_midnight - current
            if remaining <= available:
                return current + remaining
            remaining -= available
        current = next_midnight


def _overall_status(criteria: dict[str, str]) -> str:
    values = set(criteria.values())
    if "not-met" in values:
        return "not-billable"
    if "pending" in values:
        return "pending"
    if "unknown" in values:
        return "needs-review"
    return "billable"


def _aware(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, f"timestamp without offset: {value}"
    return parsed


# ---------------------------------------------------------------------------------------------- bundles


def test_fixture_files_exist():
    names = [p.name for p in _bundle_files()]
    assert "00-practice.json" in names
    assert len(names) >= 22
    assert (FIXTURES / "scenarios.json").is_file()
    assert (FIXTURES / "README.md").is_file()


@pytest.mark.parametrize("path", _bundle_files(), ids=lambda p: p.name)
def test_bundle_is_transaction_of_valid_put_entries(path: Path):
    bundle = _read_json(path)
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
    assert bundle["entry"], "empty bundle"
    for entry in bundle["entry"]:
        resource = entry["resource"]
        rtype, rid = resource["resourceType"], resource.get("id", "")
        assert RESOURCE_ID.match(rid), f"bad id {rid!r}"
        assert entry["request"] == {"method": "PUT", "url": f"{rtype}/{rid}"}
        assert not str(entry.get("fullUrl", "")).startswith("urn:uuid:")
        get_fhir_model_class(rtype).model_validate(resource)


def test_ids_unique_across_files():
    seen: dict[str, str] = {}
    for name, bundle in _bundles().items():
        for entry in bundle["entry"]:
            key = f"{entry['resource']['resourceType']}/{entry['resource']['id']}"
            assert key not in seen, f"{key} in both {seen.get(key)} and {name}"
            seen[key] = name
    for appointment in _proposed_appointments():
        key = f"Appointment/{appointment['id']}"
        assert key not in seen, f"proposed {key} also stored in {seen.get(key)}"
        seen[key] = "scenarios.json"


def test_every_reference_resolves():
    known = {key: resource["resourceType"] for key, (_, resource) in _resources_by_key().items()}
    known |= {f"Appointment/{a['id']}": "Appointment" for a in _proposed_appointments()}
    holders = [(name, entry["resource"]) for name, b in _bundles().items() for entry in b["entry"]]
    holders += [("scenarios.json", a) for a in _proposed_appointments()]
    problems = []
    for name, resource in holders:
        for reference in references_in(resource):
            if not RELATIVE_REFERENCE.match(reference):
                problems.append(f"{name} {resource['id']}: not a relative Type/id reference: {reference}")
            elif reference not in known:
                problems.append(f"{name} {resource['id']}: unresolved {reference}")
    assert not problems, "\n".join(problems)


def test_master_data_shared_resources():
    practice = {
        f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in _bundles()["00-practice.json"]["entry"]
    }
    for key in ("Organization/org-main", "Organization/org-other", "Organization/org-payer-medicare"):
        assert key in practice
    roles = [r for _, r in _resources_by_key().values() if r["resourceType"] == "PractitionerRole"]
    for role in roles:
        for field in ("code", "specialty"):
            codings = [c for cc in role[field] for c in cc["coding"]]
            assert any(c["system"] == "http://nucc.org/provider-taxonomy" and c.get("display") for c in codings)
    pts = [
        r
        for r in roles
        if r["code"][0]["coding"][0]["code"] == "225100000X"
        and r["organization"]["reference"] == "Organization/org-main"
    ]
    assert len(pts) >= 2, "two PTs in org-main are needed for the same-specialty colleague case"


# ---------------------------------------------------------------------------------------------- scenarios.json


def test_scenario_ids_unique_and_well_formed():
    ids = [s["id"] for s in _scenarios()]
    assert len(ids) == len(set(ids))
    assert all(RESOURCE_ID.match(i) for i in ids)


@pytest.mark.parametrize("scenario", _scenarios(), ids=lambda s: s["id"])
def test_scenario_entry_is_consistent(scenario: dict):
    assert BUNDLE_NAME.match(scenario["file"]) and scenario["file"] != "00-practice.json"
    assert scenario["file"] in _bundles(), f"missing file {scenario['file']}"
    in_file = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in _bundles()[scenario["file"]]["entry"]}
    assert scenario["hook"] in HOOKS
    now = _aware(scenario["now"])

    context = scenario["context"]
    assert f"Patient/{context['patientId']}" in in_file
    if "encounterId" in context:
        assert f"Encounter/{context['encounterId']}" in in_file
    # encounterId is optional for patient-view (the CDS Hooks sandbox and Oracle Health never send one) and
    # appointment-book; the encounter hooks require it.
    assert scenario["hook"] in ("appointment-book", "patient-view") or "encounterId" in context
    assert context["userId"] in _resources_by_key(), context["userId"]
    assert context["userId"].startswith("Practitioner/")
    if scenario["hook"] == "appointment-book":
        appointments = context["appointments"]
        assert appointments["resourceType"] == "Bundle"
        get_fhir_model_class("Bundle").model_validate(appointments)
        assert all(
            e["resource"]["resourceType"] == "Appointment" and e["resource"]["status"] == "proposed"
            for e in appointments["entry"]
        )

    assessment = scenario["assessmentEncounter"]
    assert assessment in in_file
    encounter = _resources_by_key()[assessment][1]
    assert encounter["class"]["code"] == "VR"
    assert encounter["subject"]["reference"] == f"Patient/{context['patientId']}"

    expected = scenario["expected"]
    assert expected["status"] in STATUSES
    criteria = expected["criteria"]
    assert set(criteria) == set(CRITERIA), set(CRITERIA) ^ set(criteria)
    assert set(criteria.values()) <= CRITERION_VALUES
    assert expected["status"] == _overall_status(criteria)
    pending = {c for c, v in criteria.items() if v == "pending"}
    assert pending <= {"follow-up-within-24-business-hours", "practitioner-interpretation"}

    # §6: the code is present whenever one applies — always for an eligible practitioner, and also when §7 leaves
    # eligibility open for a practitioner who has a code (an assistant took part, an RHC/FQHC bills); modifiers
    # only with a code.
    if criteria["billing-practitioner-eligible"] == "met":
        assert "code" in expected
    if "code" in expected:
        assert expected["code"] in MODIFIERS
        assert set(expected.get("modifiers", [])) <= MODIFIERS[expected["code"]]
        assert expected.get("modifiers") != []
    else:
        assert criteria["billing-practitioner-eligible"] != "met" and "modifiers" not in expected

    receipt = _aware(scenario["receipt"])
    deadline = _aware(expected["deadline"])
    assert deadline == _follow_up_deadline(receipt), (expected["deadline"], _follow_up_deadline(receipt))
    assert receipt <= now
    if expected["status"] == "pending":
        assert now < deadline
