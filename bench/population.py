"""Synthetic FHIR Bulk populations for the population audit benchmark (issue 14 item 6), with known answers.

    .venv/bin/python -m bench.population OUT_DIR --patients 10000 [--seed 14] [--gzip] [--as-of ISO]

Why: the audit must be measured on a health system's export, not on 71 fixture files — most patients with years of
ordinary history and no store-and-forward review at all, a few percent with one — and its classes must be checked
on the same bytes. So the generator writes what a FHIR Bulk Data exporter writes (one NDJSON file per resource type,
``Type.ndjson`` or ``Type.ndjson.gz``), streaming patient by patient (never the population in memory), plus an
``expected.json`` that says, for every patient carrying a review, which fixture scenario it was cloned from and
which verdict and §8 class the audit must find.

What a population holds
-----------------------
* **Shared resources** (``keys.SHARED_TYPES``): the health system's Organizations (a few practices, one Location
  each) and payers (Medicare Part B, Medicare Advantage, Aetna, UnitedHealthcare, Cigna, BCBS), Practitioners of
  several specialties with a PractitionerRole each (NUCC taxonomy) and a Schedule each, and Slots on those
  Schedules around ``as_of``. Their number grows with the square root of the population (a 100k-patient system
  has more clinicians than a 10k one, not ten times as many).
* **Ordinary patients** (most of them): a Patient, one or two Coverages, maybe a Consent, a few Conditions,
  office-visit Encounters over the years with practitioners of several specialties and practices, a vital-signs
  Observation per visit, some Procedures, Appointments, and an office-visit ChargeItem (CPT E/M or therapy codes)
  per visit. No Communication, Media, DocumentReference, review (VR) Encounter or G2250/G2010 anywhere: they are
  not audit candidates and must yield no finding.
* **Cloned episodes** (``submission_rate`` of the patients): one fixture scenario file (``fhir_fixtures/NN-*.json``)
  copied whole — every id renamed to the patient's prefix (``p0000123-…``, the Patient itself ``p0000123``), every
  reference with it, every date moved by whole weeks (``cds_service.fixtures_shift.shift_resource``: weekdays and
  wall-clock times kept) so that its receipts fall in the audited period (``period_days`` before ``as_of``), names
  and contact details replaced by generated codes. The master data the scenario names (``00-practice.json``) comes
  from one of ``clone_practices`` renamed copies (``cp01-pr-pt-1`` …), never from the ordinary patients' master
  data; a scenario that brings its own Slots gets a copy of its own (Slots are shared resources: another clone's
  free slot on the same Schedule could change its verdict).
* **Charges at known rates** on the cloned episodes that carry no G2250/G2010 charge of their own: a billable
  assessment is charged right (``charge_rate``, the code and modifiers of the verdict — ``hooks.cards.charge_item``,
  the ChargeItem the service proposes) or not at all (missed revenue); of the charged ones ``wrong_modifier_rate``
  carry the wrong therapy modifier (GO for GP…: at-risk); a not-billable one is charged anyway at
  ``wrong_charge_rate`` (at-risk).

Known answers
-------------
A scenario's written expectation is its verdict at its own clock; the audit judges at ``as_of``. Each (scenario
file, week shift) is therefore judged once with the rules engine at ``as_of`` (``evaluate_record`` on the shifted
file and the master data, as ``fixtures_shift`` checks a shift) and used only when the verdict equals the written
expectation (status, code, modifiers, deadline, every criterion). Pending scenarios fit only when ``as_of`` falls
before their shifted deadline; DST and Thanksgiving stories only in periods that hold such a week. Scenarios that
fit nowhere in the period are not cloned (``GeneratedPopulation.unplaced`` names them); the appointment-book
scenario (its verdict is about a proposal that is in no record) never is. The audit judges an assessment as if
its own G2250/G2010 charge were absent (billing-rules.md §8), so a scenario whose fixture already charges its
assessment has no written status for the audit: ``status`` is null, and ``class`` is given only where §8 settles
it anyway (a charge whose code differs from the verdict's is at risk).

Everything is deterministic for a seed (per-patient generators seeded from ``(seed, index)``).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

from cds_service.rules.facts import references_in as references  # every reference string of a JSON document

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fhir_fixtures"
MASTER_FILE = "00-practice.json"
EXPECTED_FILE = "expected.json"
DEFAULT_AS_OF = "2027-12-16T08:30:00-05:00"  # a Thursday morning: the period holds DST end, Thanksgiving, and s24's
# pending deadline (Thursday 10:00) is still ahead
HTEST = {"tag": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST",
                  "display": "test health data"}]}
REMOTE_CODES = ("G2250", "G2010")
NO_CLONE = frozenset({"52-appointment-book-bundles.json"})  # appointment-book: the verdict is about a proposal
NUCC = "http://nucc.org/provider-taxonomy"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
SOPT = "https://nahdo.org/sopt"

# (key, NUCC code, display, visit charge codes) — the specialties of the ordinary patients' visits.
SPECIALTIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("fm", "207Q00000X", "Family Medicine Physician", ("99213", "99214")),
    ("im", "207R00000X", "Internal Medicine Physician", ("99213", "99214", "99215")),
    ("np", "363L00000X", "Nurse Practitioner", ("99212", "99213")),
    ("pt", "225100000X", "Physical Therapist", ("97110", "97140", "97161")),
    ("ot", "225X00000X", "Occupational Therapist", ("97530", "97165")),
    ("slp", "235Z00000X", "Speech-Language Pathologist", ("92507",)),
    ("psy", "103T00000X", "Psychologist", ("90834", "90837")),
    ("derm", "207N00000X", "Dermatology Physician", ("99213", "11102")),
    ("card", "207RC0000X", "Cardiovascular Disease Physician", ("99214", "93000")),
    ("orth", "207X00000X", "Orthopaedic Surgery Physician", ("99213", "20610")),
)
CONDITIONS: tuple[tuple[str, str], ...] = (
    ("I10", "Essential (primary) hypertension"), ("E11.9", "Type 2 diabetes mellitus without complications"),
    ("M25.561", "Pain in right knee"), ("M54.50", "Low back pain, unspecified"),
    ("J45.909", "Unspecified asthma, uncomplicated"), ("E78.5", "Hyperlipidemia, unspecified"),
    ("F41.1", "Generalized anxiety disorder"), ("L40.0", "Psoriasis vulgaris"),
    ("M19.041", "Primary osteoarthritis, right hand"), ("R26.81", "Unsteadiness on feet"),
)
PROCEDURES: tuple[tuple[str, str], ...] = (
    ("97110", "Therapeutic exercise"), ("20610", "Arthrocentesis, major joint"), ("11102", "Tangential biopsy of skin"),
    ("93000", "Electrocardiogram, routine"), ("97140", "Manual therapy techniques"),
)
# (id suffix, name, identifier, SOPT code, SOPT display) — matched by the payer profiles (billing-rules.md §6).
PAYERS: tuple[tuple[str, str, str, str, str], ...] = (
    ("medicare", "Medicare Part B", "MEDICARE-PART-B", "121", "Medicare FFS"),
    ("ma", "Medicare Advantage Plan", "MA-PLAN", "111", "Medicare HMO"),
    ("aetna", "Aetna", "AETNA", "511", "Commercial Managed Care - PPO"),
    ("uhc", "UnitedHealthcare", "UHC", "511", "Commercial Managed Care - PPO"),
    ("cigna", "Cigna", "CIGNA", "511", "Commercial Managed Care - PPO"),
    ("bcbs", "Blue Cross Blue Shield", "BCBS", "611", "BC Managed Care - PPO"),
)
TYPE_ORDER = ("Organization", "Location", "Practitioner", "PractitionerRole", "Schedule", "Slot", "Patient",
              "RelatedPerson", "Coverage", "Consent", "Condition", "Encounter", "Observation", "Procedure",
              "Appointment", "Communication", "Media", "DocumentReference", "ChargeItem", "Claim")


# ------------------------------------------------------------------------------------------------- the result


@dataclass
class GeneratedPopulation:
    """What :func:`generate` wrote, and how big it is."""

    out_dir: Path
    patients: int
    seed: int
    as_of: str
    since: str
    until: str
    files: list[Path]
    bytes: int
    resources: dict[str, int]
    shared_resources: int
    clones: int
    cloned_assessments: int
    expected_path: Path
    seconds: float
    by_scenario: dict[str, int] = field(default_factory=dict)
    unplaced: list[str] = field(default_factory=list)  # scenario files that fit nowhere in the period

    @property
    def bytes_per_patient(self) -> float:
        return self.bytes / self.patients if self.patients else 0.0

    def describe(self) -> str:
        total = sum(self.resources.values())
        return (f"{self.patients:,} patients, {self.clones:,} cloned episodes ({self.cloned_assessments:,} "
                f"assessments), {total:,} resources ({self.shared_resources:,} shared), {self.bytes / 1e6:,.1f} MB "
                f"in {len(self.files)} files, {self.bytes_per_patient / 1e3:,.1f} KB/patient, "
                f"generated in {self.seconds:,.1f} s")


def load_expected(out_dir: Path | str) -> dict[str, Any]:
    """``expected.json`` of a generated population."""
    return json.loads((Path(out_dir) / EXPECTED_FILE).read_text("utf-8"))  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------- writing NDJSON


class _Writer:
    """One file per resource type, opened on the first resource of that type; counts resources and bytes."""

    def __init__(self, out_dir: Path, compress: bool) -> None:
        self.out_dir = out_dir
        self.compress = compress
        self.handles: dict[str, IO[str]] = {}
        self.counts: dict[str, int] = {}
        self.dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def path(self, rtype: str) -> Path:
        return self.out_dir / (f"{rtype}.ndjson.gz" if self.compress else f"{rtype}.ndjson")

    def write(self, resource: Mapping[str, Any]) -> None:
        rtype = resource["resourceType"]
        handle = self.handles.get(rtype)
        if handle is None:
            path = self.path(rtype)
            handle = (gzip.open(path, "wt", encoding="utf-8", compresslevel=5) if self.compress  # noqa: SIM115
                      else open(path, "w", encoding="utf-8", buffering=1 << 20))  # noqa: SIM115 — closed in close()
            self.handles[rtype] = handle
        handle.write(self.dumps(resource))
        handle.write("\n")
        self.counts[rtype] = self.counts.get(rtype, 0) + 1

    def close(self) -> list[Path]:
        for handle in self.handles.values():
            handle.close()
        order = {t: n for n, t in enumerate(TYPE_ORDER)}
        return [self.path(t) for t in sorted(self.handles, key=lambda t: (order.get(t, 99), t))]


# ------------------------------------------------------------------------------------------- the rules' context


@dataclass
class _Rules:
    tz: ZoneInfo
    calendar: Any
    rules: Any


def _rules() -> _Rules:
    """The embedded defaults, as ``SettingsSpec(config_path=None)`` gives the audit."""
    from cds_service.config import config_from_mapping
    from cds_service.rules.calendar import BusinessCalendar
    from cds_service.rules.rules_data import load_rules_data

    config = config_from_mapping(None, "embedded defaults")  # as AuditSettings.from_spec(config_path=None)
    calendar = BusinessCalendar.from_config(config.calendar)
    return _Rules(calendar.tz, calendar, load_rules_data(config.raw.get("rules")))


# ------------------------------------------------------------------------------------------------ the fixtures


def _resources(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry") or () if isinstance(e.get("resource"), dict)]


def _key(resource: Mapping[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _remap(node: Any, keys: Mapping[str, str]) -> Any:
    """A copy with every ``reference`` found in ``keys`` replaced (``"Type/old"`` → ``"Type/new"``)."""
    if isinstance(node, dict):
        return {k: (keys.get(v, v) if k == "reference" and isinstance(v, str) else _remap(v, keys))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_remap(v, keys) for v in node]
    return node


@dataclass
class _Scenario:
    """One fixture file: its resources, its scenarios (manifest items) and what the audit can expect of it."""

    file: str
    prefix: str  # "s31-"
    resources: list[dict[str, Any]]
    items: list[dict[str, Any]]
    has_slots: bool
    master_closure: frozenset[str]  # master keys the file needs (dedicated copies)
    own_charge: dict[str, dict[str, Any]]  # item id -> the fixture's G2250/G2010 charge of that assessment


@dataclass
class _Fixtures:
    master: list[dict[str, Any]]
    scenarios: dict[str, _Scenario]


def _is_remote_charge(resource: Mapping[str, Any]) -> bool:
    if resource.get("resourceType") not in ("ChargeItem", "Claim"):
        return False
    text = json.dumps(resource.get("code") or resource.get("item") or {})
    return any(code in text for code in REMOTE_CODES)


def _closure(master: list[dict[str, Any]], resources: list[dict[str, Any]]) -> frozenset[str]:
    """The master keys a file reaches: what it names, the roles and schedules of the practitioners it names, and
    what those name in turn."""
    by_key = {_key(r): r for r in master}
    need = {ref for r in resources for ref in references(r) if ref in by_key}
    while True:
        grown = set(need)
        for key in list(need):
            grown.update(ref for ref in references(by_key[key]) if ref in by_key)
        for key, resource in by_key.items():  # a named practitioner's roles and schedules (not an org's)
            owners = list(references(resource.get("practitioner"))) + list(references(resource.get("actor")))
            if resource["resourceType"] in ("PractitionerRole", "Schedule") and any(ref in need for ref in owners):
                grown.add(key)
        if grown == need:
            return frozenset(need)
        need = grown


def _load_fixtures() -> _Fixtures:
    master = _resources(json.loads((FIXTURES / MASTER_FILE).read_text("utf-8")))
    manifest = json.loads((FIXTURES / "scenarios.json").read_text("utf-8"))
    scenarios: dict[str, _Scenario] = {}
    for path in sorted(FIXTURES.glob("[0-9][0-9]-*.json")):
        if path.name == MASTER_FILE or path.name in NO_CLONE:
            continue
        resources = _resources(json.loads(path.read_text("utf-8")))
        items = [item for item in manifest if item["file"] == path.name]
        if not items:
            continue
        own: dict[str, dict[str, Any]] = {}
        for item in items:
            for charge in resources:
                if _is_remote_charge(charge) and _charge_is_of(charge, item, resources):
                    own[item["id"]] = charge
        scenarios[path.name] = _Scenario(
            file=path.name, prefix=f"s{path.name[:2]}-", resources=resources, items=items,
            has_slots=any(r["resourceType"] == "Slot" for r in resources),
            master_closure=_closure(master, resources), own_charge=own)
    return _Fixtures(master, scenarios)


def _charge_is_of(charge: Mapping[str, Any], item: Mapping[str, Any], resources: list[dict[str, Any]]) -> bool:
    """Whether a fixture charge is linked to the scenario's assessment (context = its review encounter, or a
    supporting reference to a Communication/Media of that encounter) — the audit's "own charge"."""
    encounter = item.get("assessmentEncounter")
    if (charge.get("context") or {}).get("reference") == encounter:
        return True
    linked = {_key(r) for r in resources if r["resourceType"] in ("Communication", "Media", "DocumentReference")
              and encounter in set(references([r.get("encounter"), r.get("context")]))}
    return any(ref in linked for ref in references(charge.get("supportingInformation") or []))


# ----------------------------------------------------------------------------------------------- placement


class _Placer:
    """Chooses a week shift for a scenario file that puts its receipts in the period and keeps its written
    verdict at ``as_of`` — judged once per (file, shift) with the rules engine."""

    def __init__(self, fixtures: _Fixtures, ctx: _Rules, as_of: datetime, since: datetime,
                 horizon: tuple[str, str]) -> None:
        self.fixtures = fixtures
        self.ctx = ctx
        self.as_of = as_of
        self.since = since
        self.master = [_with_horizon(r, horizon) for r in fixtures.master]
        self.verdicts: dict[tuple[str, int], dict[str, Any] | None] = {}  # (file, days) -> {item id: Determination}
        self.candidates: dict[str, list[int]] = {}

    def shifts(self, scenario: _Scenario) -> list[int]:
        """Week shifts (days) putting every receipt in [since, as_of) and every clock at or before as_of."""
        if scenario.file not in self.candidates:
            from cds_service.fixtures_shift import shift_moment

            tz = self.ctx.tz
            receipts = [datetime.fromisoformat(i["receipt"] or i["now"]) for i in scenario.items]
            clocks = [datetime.fromisoformat(i["now"]) for i in scenario.items]
            first = (self.since.astimezone(tz).date() - min(receipts).astimezone(tz).date()).days // 7 - 1
            last = (self.as_of.astimezone(tz).date() - max(clocks).astimezone(tz).date()).days // 7 + 1
            found = []
            for weeks in range(first, last + 1):
                days = 7 * weeks
                if all(shift_moment(r, days, tz) >= self.since for r in receipts) and all(
                        shift_moment(c, days, tz) <= self.as_of for c in clocks):
                    found.append(days)
            self.candidates[scenario.file] = found
        return self.candidates[scenario.file]

    def verdict(self, scenario: _Scenario, days: int) -> dict[str, Any] | None:
        """{item id: Determination} when every scenario of the file keeps its written verdict at ``as_of`` after
        this shift, else None."""
        cached = (scenario.file, days)
        if cached not in self.verdicts:
            self.verdicts[cached] = self._judge(scenario, days)
        return self.verdicts[cached]

    def _judge(self, scenario: _Scenario, days: int) -> dict[str, Any] | None:
        from cds_service.fhir.parse import add_raw
        from cds_service.fixtures_shift import shift_resource, shift_text
        from cds_service.record import ResourceBag
        from cds_service.rules.engine import evaluate_record

        tz = self.ctx.tz
        bag = ResourceBag()
        add_raw(bag, self.master)
        add_raw(bag, [shift_resource(r, days, tz) for r in scenario.resources])
        patient = next(r["id"] for r in scenario.resources if r["resourceType"] == "Patient")
        episodes = evaluate_record(bag, patient, now=self.as_of, calendar=self.ctx.calendar, rules=self.ctx.rules)
        found: dict[str, Any] = {}
        for item in scenario.items:
            expected = item["expected"]
            receipt = datetime.fromisoformat(shift_text(item["receipt"], days, tz)) if item.get("receipt") else None
            chosen = next((e.determination for e in episodes
                           if e.assessment.encounter_key == item.get("assessmentEncounter")), None)
            if chosen is None:
                chosen = next((e.determination for e in episodes
                               if receipt is not None and e.assessment.receipt_time == receipt), None)
            if chosen is None:
                return None
            deadline = expected.get("deadline")
            got = (chosen.status, chosen.code, list(chosen.modifiers) or None,
                   chosen.deadline.isoformat() if chosen.deadline else None,
                   {c.id: c.status for c in chosen.criteria})
            want = (expected["status"], expected.get("code"), expected.get("modifiers"),
                    datetime.fromisoformat(shift_text(deadline, days, tz)).isoformat() if deadline else None,
                    expected["criteria"])
            if got != want:
                return None
            found[item["id"]] = chosen
        return found

    def place(self, scenario: _Scenario, rng: random.Random) -> tuple[int, dict[str, Any]] | None:
        """A random shift among those that keep the verdict; None when there is none."""
        options = list(self.shifts(scenario))
        rng.shuffle(options)
        for days in options:
            verdicts = self.verdict(scenario, days)
            if verdicts is not None:
                return days, verdicts
        return None


def _with_horizon(resource: dict[str, Any], horizon: tuple[str, str]) -> dict[str, Any]:
    """Schedules plan over the audited period (the fixtures' horizon covers their own November–January)."""
    if resource["resourceType"] != "Schedule":
        return resource
    return {**resource, "planningHorizon": {"start": horizon[0], "end": horizon[1]}}


# ------------------------------------------------------------------------------------------------- generation


@dataclass
class _Plan:
    """Everything one generation run shares: the clock, the master data of both worlds, the rates."""

    seed: int
    as_of: datetime
    since: datetime
    ctx: _Rules
    fixtures: _Fixtures
    placer: _Placer
    horizon: tuple[str, str]
    practitioners: list[dict[str, Any]]  # {"id", "spec", "org"} of the ordinary world
    orgs: list[str]
    payers: list[str]
    charge_rate: float
    wrong_charge_rate: float
    wrong_modifier_rate: float
    clone_practices: int
    clone_masters: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    remaining: list[str] = field(default_factory=list)  # scenario files still placeable
    unplaced: list[str] = field(default_factory=list)


def generate(out_dir: Path | str, *, patients: int, seed: int, submission_rate: float = 0.03,
             as_of: datetime | str = DEFAULT_AS_OF, period_days: int = 91, compress: bool = False,
             charge_rate: float = 0.6, wrong_charge_rate: float = 0.15, wrong_modifier_rate: float = 0.1,
             practitioners: int | None = None, clone_practices: int = 4, slots_per_day: int = 2,
             progress: Callable[[int], None] | None = None) -> GeneratedPopulation:
    """Write a synthetic population of ``patients`` into ``out_dir`` (module docstring) and its ``expected.json``.

    ``as_of`` is the audit's clock (an ISO string with offset, or an aware datetime); the audited period is the
    ``period_days`` before it. ``practitioners`` defaults to 20·√(patients/1000), at least 20.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.ndjson"), *out.glob("*.ndjson.gz"), out / EXPECTED_FILE]:
        stale.unlink(missing_ok=True)
    ctx = _rules()
    clock = datetime.fromisoformat(as_of) if isinstance(as_of, str) else as_of
    if clock.tzinfo is None:
        raise ValueError("as_of needs a UTC offset")
    clock = clock.astimezone(ctx.tz)
    since = clock - timedelta(days=period_days)
    horizon = ((since - timedelta(days=60)).isoformat(timespec="seconds"),
               (clock + timedelta(days=60)).isoformat(timespec="seconds"))
    fixtures = _load_fixtures()
    count = practitioners if practitioners is not None else max(20, round(20 * math.sqrt(patients / 1000)))
    writer = _Writer(out, compress)
    plan = _Plan(seed=seed, as_of=clock, since=since, ctx=ctx, fixtures=fixtures,
                 placer=_Placer(fixtures, ctx, clock, since, horizon), horizon=horizon, practitioners=[],
                 orgs=[], payers=[], charge_rate=charge_rate, wrong_charge_rate=wrong_charge_rate,
                 wrong_modifier_rate=wrong_modifier_rate, clone_practices=clone_practices,
                 remaining=sorted(fixtures.scenarios))
    _write_shared(writer, plan, count, slots_per_day)
    shared = sum(writer.counts.values())

    expected_patients: list[dict[str, Any]] = []
    by_scenario: dict[str, int] = {}
    for index in range(patients):
        rng = random.Random(f"{seed}:{index}")
        record = None
        if rng.random() < submission_rate:
            record = _clone(writer, plan, index, rng)
        if record is not None:
            expected_patients.append(record)
            by_scenario[record["file"]] = by_scenario.get(record["file"], 0) + 1
        else:
            _ordinary(writer, plan, index, rng)
        if progress is not None and (index + 1) % 10_000 == 0:
            progress(index + 1)
    for copy_resources in plan.clone_masters.values():
        for resource in copy_resources:
            writer.write(resource)
    shared += sum(len(v) for v in plan.clone_masters.values())
    files = writer.close()

    expected = {
        "generator": "bench.population", "patients": patients, "seed": seed, "submission_rate": submission_rate,
        "as_of": clock.isoformat(timespec="seconds"), "since": since.isoformat(timespec="seconds"),
        "until": clock.isoformat(timespec="seconds"),
        "rates": {"charge": charge_rate, "wrong_charge": wrong_charge_rate, "wrong_modifier": wrong_modifier_rate},
        "unplaced": sorted(plan.unplaced), "cloned": expected_patients,
    }
    expected_path = out / EXPECTED_FILE
    expected_path.write_text(json.dumps(expected, indent=1) + "\n", "utf-8")
    return GeneratedPopulation(
        out_dir=out, patients=patients, seed=seed, as_of=expected["as_of"], since=expected["since"],
        until=expected["until"], files=files, bytes=sum(f.stat().st_size for f in files),
        resources=dict(sorted(writer.counts.items())), shared_resources=shared, clones=len(expected_patients),
        cloned_assessments=sum(len(p["assessments"]) for p in expected_patients), expected_path=expected_path,
        seconds=time.perf_counter() - started, by_scenario=dict(sorted(by_scenario.items())),
        unplaced=sorted(plan.unplaced))


# -------------------------------------------------------------------------------------------- shared resources


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": display}


def _write_shared(writer: _Writer, plan: _Plan, count: int, slots_per_day: int) -> None:
    """The ordinary world's master data: practices, payers, practitioners with roles and schedules, slots."""
    tz = plan.ctx.tz
    rng = random.Random(f"{plan.seed}:shared")
    practices = max(2, round(math.sqrt(count) / 2))
    for n in range(practices):
        org = f"bo-{n:02d}"
        writer.write({"resourceType": "Organization", "id": org, "meta": HTEST, "active": True,
                      "identifier": [{"system": "http://example.org/fhir/sid/org-id", "value": f"BO-{n:02d}"}],
                      "type": [{"coding": [_coding("http://terminology.hl7.org/CodeSystem/organization-type",
                                                   "prov", "Healthcare Provider")]}],
                      "name": f"Practice BO-{n:02d} (synthetic)"})
        writer.write({"resourceType": "Location", "id": f"bloc-{n:02d}", "meta": HTEST, "status": "active",
                      "name": f"Clinic site BO-{n:02d}", "managingOrganization": {"reference": f"Organization/{org}"}})
        plan.orgs.append(org)
    for suffix, name, identifier, _sopt, _display in PAYERS:
        writer.write({"resourceType": "Organization", "id": f"bpay-{suffix}", "meta": HTEST, "active": True,
                      "identifier": [{"system": "http://example.org/fhir/sid/payer-id", "value": identifier}],
                      "type": [{"coding": [_coding("http://terminology.hl7.org/CodeSystem/organization-type",
                                                   "pay", "Payer")]}], "name": name})
        plan.payers.append(f"bpay-{suffix}")
    slot_days = [(plan.as_of - timedelta(days=14)).date() + timedelta(days=n) for n in range(42)]
    slot_days = [d for d in slot_days if d.weekday() < 5]
    for n in range(count):
        _key_name, nucc, display, _codes = SPECIALTIES[n % len(SPECIALTIES)]
        pid, org = f"bpr-{n:04d}", plan.orgs[rng.randrange(len(plan.orgs))]
        writer.write({"resourceType": "Practitioner", "id": pid, "meta": HTEST, "active": True,
                      "identifier": [{"system": "http://example.org/fhir/sid/staff-id", "value": pid.upper()}],
                      "name": [{"use": "official", "family": f"PR-{n:04d}", "given": ["Synthetic"]}]})
        writer.write({"resourceType": "PractitionerRole", "id": f"bprr-{n:04d}", "meta": HTEST, "active": True,
                      "practitioner": {"reference": f"Practitioner/{pid}"},
                      "organization": {"reference": f"Organization/{org}"},
                      "code": [{"coding": [_coding(NUCC, nucc, display)], "text": display}],
                      "specialty": [{"coding": [_coding(NUCC, nucc, display)], "text": display}]})
        writer.write({"resourceType": "Schedule", "id": f"bsch-{n:04d}", "meta": HTEST, "active": True,
                      "serviceType": [{"text": f"{display} appointments"}],
                      "actor": [{"reference": f"Practitioner/{pid}"}],
                      "planningHorizon": {"start": plan.horizon[0], "end": plan.horizon[1]}})
        plan.practitioners.append({"id": pid, "spec": n % len(SPECIALTIES), "org": org})
        slot = 0
        for day in slot_days:
            for k in range(slots_per_day):
                start = datetime(day.year, day.month, day.day, 9 + 2 * k, 0, tzinfo=tz)
                writer.write({"resourceType": "Slot", "id": f"bslot-{n:04d}-{slot:03d}", "meta": HTEST,
                              "schedule": {"reference": f"Schedule/bsch-{n:04d}"},
                              "status": "busy" if rng.random() < 0.6 else "free",
                              "start": start.isoformat(), "end": (start + timedelta(minutes=30)).isoformat()})
                slot += 1


# --------------------------------------------------------------------------------------------- ordinary patients


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _ordinary(writer: _Writer, plan: _Plan, index: int, rng: random.Random) -> None:
    """A patient with years of ordinary care and no remote assessment (not an audit candidate)."""
    tz = plan.ctx.tz
    pid = f"p{index:07d}"
    patient = f"Patient/{pid}"
    born = date(1935, 1, 1) + timedelta(days=rng.randrange(365 * 70))
    writer.write({"resourceType": "Patient", "id": pid, "meta": HTEST, "active": True,
                  "identifier": [{"system": "http://example.org/fhir/sid/mrn", "value": f"SYN-{pid.upper()}"}],
                  "name": [{"use": "official", "family": f"BP-{index:07d}", "given": ["Synthetic"]}],
                  "gender": rng.choice(("female", "male")), "birthDate": born.isoformat()})
    first_visit = plan.as_of - timedelta(days=rng.randrange(365, 365 * 8))
    payer_n = rng.randrange(len(PAYERS))
    coverages = [(first_visit.date() - timedelta(days=30), None, payer_n)]
    if rng.random() < 0.3:  # an older plan that ended when the current one started
        old = rng.randrange(len(PAYERS))
        coverages.insert(0, (first_visit.date() - timedelta(days=900), first_visit.date() - timedelta(days=31), old))
    for n, (start, end, payer) in enumerate(coverages):
        _sfx, _name, _ident, sopt, sopt_display = PAYERS[payer]
        period: dict[str, str] = {"start": start.isoformat()}
        if end is not None:
            period["end"] = end.isoformat()
        writer.write({"resourceType": "Coverage", "id": f"{pid}-cov-{n}", "meta": HTEST,
                      "status": "active" if end is None else "cancelled",
                      "type": {"coding": [_coding(SOPT, sopt, sopt_display)]}, "subscriberId": f"{pid}C{n}",
                      "beneficiary": {"reference": patient}, "period": period,
                      "payor": [{"reference": f"Organization/{plan.payers[payer]}"}]})
    if rng.random() < 0.4:
        writer.write({"resourceType": "Consent", "id": f"{pid}-consent", "meta": HTEST, "status": "active",
                      "scope": {"coding": [_coding("http://terminology.hl7.org/CodeSystem/consentscope", "treatment",
                                                   "Treatment")]},
                      "category": [{"coding": [_coding(LOINC, "59284-0", "Patient Consent")]}],
                      "patient": {"reference": patient}, "dateTime": _iso(first_visit),
                      "provision": {"type": "permit"}})
    problems = rng.sample(CONDITIONS, rng.randint(1, 4))
    for n, (code, display) in enumerate(problems):
        onset = first_visit + timedelta(days=rng.randrange(60))
        writer.write({"resourceType": "Condition", "id": f"{pid}-cond-{n}", "meta": HTEST,
                      "clinicalStatus": {"coding": [_coding(
                          "http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active")]},
                      "verificationStatus": {"coding": [_coding(
                          "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed")]},
                      "category": [{"coding": [_coding("http://terminology.hl7.org/CodeSystem/condition-category",
                                                       "problem-list-item", "Problem List Item")]}],
                      "code": {"coding": [_coding(ICD10, code, display)], "text": display},
                      "subject": {"reference": patient}, "onsetDateTime": _iso(onset), "recordedDate": _iso(onset)})
    span = (plan.as_of - first_visit).days
    visits = sorted(rng.randrange(span) for _ in range(rng.randint(2, 10)))
    for n, offset in enumerate(visits):
        day = (first_visit + timedelta(days=offset)).date()
        while day.weekday() >= 5:
            day -= timedelta(days=1)
        start = datetime(day.year, day.month, day.day, rng.randrange(8, 16), rng.choice((0, 15, 30, 45)), tzinfo=tz)
        end = start + timedelta(minutes=rng.choice((20, 30, 45)))
        doctor = plan.practitioners[rng.randrange(len(plan.practitioners))]
        charge_codes = SPECIALTIES[doctor["spec"]][3]
        code, display = problems[rng.randrange(len(problems))]
        enc = f"{pid}-enc-{n}"
        writer.write({"resourceType": "Encounter", "id": enc, "meta": HTEST, "status": "finished",
                      "class": _coding("http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB", "ambulatory"),
                      "type": [{"text": "Office visit"}], "subject": {"reference": patient},
                      "participant": [{"type": [{"coding": [_coding(
                          "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PPRF",
                          "primary performer")]}], "individual": {"reference": f"Practitioner/{doctor['id']}"}}],
                      "period": {"start": _iso(start), "end": _iso(end)},
                      "reasonCode": [{"coding": [_coding(ICD10, code, display)], "text": display}],
                      "serviceProvider": {"reference": f"Organization/{doctor['org']}"}})
        writer.write({"resourceType": "Observation", "id": f"{pid}-obs-{n}", "meta": HTEST, "status": "final",
                      "category": [{"coding": [_coding("http://terminology.hl7.org/CodeSystem/observation-category",
                                                       "vital-signs", "Vital Signs")]}],
                      "code": {"coding": [_coding(LOINC, "85354-9", "Blood pressure panel")]},
                      "subject": {"reference": patient}, "encounter": {"reference": f"Encounter/{enc}"},
                      "effectiveDateTime": _iso(start + timedelta(minutes=5)),
                      "component": [
                          {"code": {"coding": [_coding(LOINC, "8480-6", "Systolic blood pressure")]},
                           "valueQuantity": {"value": rng.randrange(105, 160), "unit": "mmHg",
                                             "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
                          {"code": {"coding": [_coding(LOINC, "8462-4", "Diastolic blood pressure")]},
                           "valueQuantity": {"value": rng.randrange(60, 100), "unit": "mmHg",
                                             "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]})
        if rng.random() < 0.25:
            pcode, pdisplay = PROCEDURES[rng.randrange(len(PROCEDURES))]
            writer.write({"resourceType": "Procedure", "id": f"{pid}-proc-{n}", "meta": HTEST, "status": "completed",
                          "code": {"coding": [_coding(CPT, pcode, pdisplay)], "text": pdisplay},
                          "subject": {"reference": patient}, "encounter": {"reference": f"Encounter/{enc}"},
                          "performedDateTime": _iso(start + timedelta(minutes=10)),
                          "performer": [{"actor": {"reference": f"Practitioner/{doctor['id']}"}}]})
        charge = charge_codes[rng.randrange(len(charge_codes))]
        writer.write({"resourceType": "ChargeItem", "id": f"{pid}-chg-{n}", "meta": HTEST, "status": "billed",
                      "code": {"coding": [{"system": CPT, "code": charge}]}, "subject": {"reference": patient},
                      "context": {"reference": f"Encounter/{enc}"}, "occurrenceDateTime": _iso(start),
                      "performer": [{"actor": {"reference": f"Practitioner/{doctor['id']}"}}],
                      "performingOrganization": {"reference": f"Organization/{doctor['org']}"},
                      "quantity": {"value": 1}, "enteredDate": _iso(end + timedelta(hours=2)),
                      "reason": [{"coding": [_coding(ICD10, code, display)]}]})
        if rng.random() < 0.35:  # the visit was booked ahead (some were cancelled and rebooked)
            created = start - timedelta(days=rng.randrange(3, 40))
            writer.write({"resourceType": "Appointment", "id": f"{pid}-appt-{n}", "meta": HTEST,
                          "status": "fulfilled" if rng.random() < 0.85 else "cancelled",
                          "serviceType": [{"text": "Office visit"}], "start": _iso(start), "end": _iso(end),
                          "created": _iso(created), "participant": [
                              {"actor": {"reference": patient}, "status": "accepted"},
                              {"actor": {"reference": f"Practitioner/{doctor['id']}"}, "status": "accepted"}]})


# ------------------------------------------------------------------------------------------------ cloned episodes


def _clone_master(plan: _Plan, prefix: str, keys: frozenset[str] | None) -> list[dict[str, Any]]:
    """A renamed copy of the master data (all of it, or the ``keys`` a file needs), names replaced by codes."""
    master = [r for r in plan.placer.master if keys is None or _key(r) in keys]
    mapping = {_key(r): f"{r['resourceType']}/{prefix}{r['id']}" for r in master}
    out = []
    for resource in master:
        copied = _remap(copy.deepcopy(resource), mapping)
        copied["id"] = f"{prefix}{resource['id']}"
        if copied["resourceType"] == "Practitioner":
            copied["name"] = [{"use": "official", "family": f"PR-{copied['id']}", "given": ["Synthetic"]}]
            copied.pop("telecom", None)
            copied["identifier"] = [{"system": "http://example.org/fhir/sid/staff-id", "value": copied["id"].upper()}]
        out.append(copied)
    return out


def _clone(writer: _Writer, plan: _Plan, index: int, rng: random.Random) -> dict[str, Any] | None:
    """Write one cloned scenario as patient ``index``; its expected.json entry, or None if no scenario fits."""
    from cds_service.fixtures_shift import shift_resource, shift_text

    placed = None
    while plan.remaining and placed is None:
        name = plan.remaining[rng.randrange(len(plan.remaining))]
        scenario = plan.fixtures.scenarios[name]
        placed = plan.placer.place(scenario, rng)
        if placed is None:
            plan.remaining.remove(name)
            plan.unplaced.append(name)
    if placed is None:
        return None
    days, verdicts = placed
    tz = plan.ctx.tz
    pid = f"p{index:07d}"

    # master data: a pooled practice copy, or a copy of its own for a file that brings Slots
    if scenario.has_slots:
        master_prefix = f"{pid}-"
        plan.clone_masters[master_prefix] = _clone_master(plan, master_prefix, scenario.master_closure)
    else:
        master_prefix = f"cp{rng.randrange(plan.clone_practices):02d}-"
        if master_prefix not in plan.clone_masters:
            plan.clone_masters[master_prefix] = _clone_master(plan, master_prefix, None)
    mapping = {_key(r): f"{r['resourceType']}/{master_prefix}{r['id']}" for r in plan.placer.master}
    ids: dict[str, str] = {}
    for resource in scenario.resources:
        old = resource["id"]
        rest = old[len(scenario.prefix):] if old.startswith(scenario.prefix) else old
        ids[_key(resource)] = pid if resource["resourceType"] == "Patient" else f"{pid}-{rest}"
        mapping[_key(resource)] = f"{resource['resourceType']}/{ids[_key(resource)]}"

    written: dict[str, int] = {}
    for resource in scenario.resources:
        moved = _remap(shift_resource(resource, days, tz), mapping)
        moved["id"] = ids[_key(resource)]
        _anonymize(moved, pid)
        writer.write(moved)
        written[moved["resourceType"]] = written.get(moved["resourceType"], 0) + 1

    assessments = []
    for number, item in enumerate(scenario.items):
        expected = item["expected"]
        determination = verdicts[item["id"]]
        own = scenario.own_charge.get(item["id"])
        entry: dict[str, Any] = {
            "scenario": item["id"], "assessment_encounter": mapping.get(item["assessmentEncounter"]),
            "receipt": shift_text(item["receipt"], days, tz) if item.get("receipt") else None,
            "written_status": expected["status"], "status": expected["status"], "code": expected.get("code"),
            "modifiers": expected.get("modifiers") or [], "class": None, "charge": None, "charge_kind": None,
        }
        if own is not None:
            # §8: the audit judges as if this charge were absent; the written verdict counted it.
            entry["status"] = None
            entry["charge"] = mapping[_key(own)]
            entry["charge_kind"] = "fixture"
            charged = _charge_code(own)
            entry["class"] = "at-risk-charge" if expected.get("code") and charged != expected.get("code") else None
        else:
            entry["class"], entry["charge_kind"], charge = _decide_charge(plan, rng, determination, mapping, pid,
                                                                          item, number)
            if charge is not None:
                writer.write(charge)
                written["ChargeItem"] = written.get("ChargeItem", 0) + 1
                entry["charge"] = _key(charge)
        assessments.append(entry)
    return {"patient": f"Patient/{pid}", "file": scenario.file, "shift_days": days,
            "master_prefix": master_prefix, "resources": dict(sorted(written.items())), "assessments": assessments}


def _charge_code(charge: Mapping[str, Any]) -> str | None:
    for coding in (charge.get("code") or {}).get("coding") or ():
        if coding.get("code") in REMOTE_CODES:
            return str(coding["code"])
    return None


def _decide_charge(plan: _Plan, rng: random.Random, determination: Any, mapping: Mapping[str, str], pid: str,
                   item: Mapping[str, Any], number: int) -> tuple[str, str, dict[str, Any] | None]:
    """(class, charge kind, ChargeItem or None) at the plan's rates (module docstring)."""
    from hooks.cards import charge_item

    status = determination.status
    if status == "pending":
        return "pending", "none", None
    if status == "needs-review":
        return "needs-review", "none", None
    mapped = replace(
        determination,
        patient=f"Patient/{pid}",
        encounter=mapping.get(determination.encounter or "", determination.encounter),
        practitioner=mapping.get(determination.practitioner or "", determination.practitioner),
        submissions=tuple(mapping.get(s, s) for s in determination.submissions),
        follow_up=mapping.get(determination.follow_up or "", determination.follow_up),
    )  # follow_up_time is the shifted story's already: the verdict was judged on it
    if status == "billable":
        if rng.random() >= plan.charge_rate:
            return "missed-revenue", "none", None
        wrong = _wrong_modifiers(mapped.modifiers)
        if wrong is not None and rng.random() < plan.wrong_modifier_rate:
            charge = charge_item(replace(mapped, modifiers=wrong))
            kind, klass = "wrong-modifier", "at-risk-charge"
        else:
            charge = charge_item(mapped)
            kind, klass = "right", "ok"
    else:  # not-billable
        if rng.random() >= plan.wrong_charge_rate:
            return "ok", "none", None
        charge = charge_item(mapped, code=mapped.code or "G2250")
        kind, klass = "not-billable-charged", "at-risk-charge"
    charge["id"] = f"{pid}-chg-audit-{number}"
    charge["meta"] = HTEST
    if "occurrenceDateTime" not in charge and item.get("receipt"):
        charge["occurrenceDateTime"] = _iso(datetime.fromisoformat(item["receipt"]))
    return klass, kind, charge


def _wrong_modifiers(modifiers: tuple[str, ...]) -> tuple[str, ...] | None:
    """The verdict's modifiers with the therapy discipline swapped (GP→GO, GO→GN, GN→GP): a charge that records
    modifiers and records the wrong one (a charge recording none is not judged to lack one). None when the
    verdict calls for no therapy modifier."""
    swap = {"GP": "GO", "GO": "GN", "GN": "GP"}
    if not any(m in swap for m in modifiers):
        return None
    return tuple(swap.get(m, m) for m in modifiers)


def _anonymize(resource: dict[str, Any], pid: str) -> None:
    """Generated codes instead of the fixtures' invented names and contact details."""
    rtype = resource["resourceType"]
    if rtype in ("Patient", "RelatedPerson", "Practitioner"):
        resource["name"] = [{"use": "official", "family": f"{rtype[:2].upper()}-{resource['id']}",
                             "given": ["Synthetic"]}]
        for element in ("telecom", "address", "contact", "photo"):
            resource.pop(element, None)
    if rtype == "Patient":
        resource["identifier"] = [{"system": "http://example.org/fhir/sid/mrn", "value": f"SYN-{pid.upper()}"}]
    if rtype == "Coverage" and "subscriberId" in resource:
        resource["subscriberId"] = f"{pid}C"


# ------------------------------------------------------------------------------------------------------ the CLI


def main(argv: list[str] | None = None) -> int:
    """Write a population and print its size."""
    parser = argparse.ArgumentParser(prog="python -m bench.population", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--submission-rate", type=float, default=0.03)
    parser.add_argument("--as-of", default=DEFAULT_AS_OF)
    parser.add_argument("--gzip", action="store_true", help="write Type.ndjson.gz")
    args = parser.parse_args(argv)
    population = generate(args.out_dir, patients=args.patients, seed=args.seed,
                          submission_rate=args.submission_rate, as_of=args.as_of, compress=args.gzip,
                          progress=lambda n: print(f"  {n:,} patients", file=sys.stderr))
    print(population.describe())
    if population.unplaced:
        print(f"not placeable in the period: {', '.join(population.unplaced)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
