"""Synthetic, PHI-free patient records as self-contained CDS Hooks requests, for ``bench/realistic.py``.

    .venv/bin/python -m bench.records OUT_DIR [--sizes 33,20,50,200,lifelong] [--hooks ...]

Each request is one of the four files of ``fhir_fixtures/requests/`` (its store-and-forward episode: s01 for
encounter-discharge and patient-view without ``encounterId``, s24 for encounter-start, s52 for appointment-book)
with every ``sNN-`` id renamed to a new patient's prefix, and a history added to every prefetch key, as the
discovery's templates (``hooks.gather.PREFETCH_TEMPLATES``) would return it: searchset Bundles of the patient's
whole history, with the ``_include``\\ d Organizations. Master data (practitioners, roles, organizations, payers) is
copied from ``fhir_fixtures/00-practice.json`` into the ``practitioners`` / ``practitionerRoles`` keys (keys a
self-contained request may supply, see hooks/gather.py), so a request needs no FHIR server.

Sizes (resources of the patient per history type, the episode's own resources counted in):

``33``        the shape of issue 13: 8 Encounters (office visits with the therapist and colleagues of other
              specialties and another organization), 8 Communications, 6 Media, 4 Appointments, 2 Coverages,
              1 Consent, 2 Procedures (33 patient resources, plus master data)
``20``/``50``/``200``  that many Encounters, Communications, Media, Appointments and Procedures (2 Coverages, 1 Consent)
``lifelong``  a synthetic lifelong chart as public sandboxes serve: 400 Encounters over 40 years, 3,000
              Observations (vital signs at those visits), 120 Communications, 60 Media, 150 Appointments,
              80 Procedures

Appointments come in overlapping pairs (two practitioners, the second starting 15 minutes into the first), and
for appointment-book (the only template whose request carries ``slots``) every historical Appointment has a
busy Slot and an overlapping free Slot on the practitioner's Schedule. History resources carry a generated
narrative (``text.div``), as EHRs send them.

Placement keeps the episode's verdict: history Encounters are at least 10 days before the episode's receipt (the
"7 days prior" window stays empty), Communications, Media and Appointments at least 60 days before it (outside the
38-day episode window and its 14-day margin), Procedures at least 120 days (outside the 90-day global period); the
second Coverage ended years ago. Encounters do fall inside the 3-year established-patient lookback, so the rules
read them. Everything is invented: no names beyond the master data's, ``example.org`` URLs, ``HTEST`` tags.

A record is built once per (hook, size) with the placeholder prefix :data:`PLACEHOLDER`; :func:`instantiate`
turns it into a new patient's request by string replacement (every id of the patient, and the hookInstance),
cheaply enough to do between two timed calls. A template whose patient's own times :func:`mark_own_times` marked
also gets that patient's own times: each moved back by a few minutes (:func:`time_shift`), so that no two patients
share a date string (an EHR's charts do not) while every verdict stays the template's.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fhir_fixtures"
TZ = ZoneInfo("America/New_York")
PLACEHOLDER = "rbzzzzzzzz"  # a new patient's prefix: "rb" + 8 digits (ids stay [a-z0-9-], <= 64 chars)
INSTANCE_PLACEHOLDER = "zzzzzzzzzzzz"  # last group of the hookInstance UUID
TIME_MARK = "~"  # before a time of the patient's own in a template's text (mark_own_times); never on the wire
HTEST = {"tag": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST",
                  "display": "test health data"}]}

# hook -> (request file in fhir_fixtures/requests, scenario id in fhir_fixtures/scenarios.json)
TEMPLATES: dict[str, tuple[str, str]] = {
    "encounter-discharge": ("encounter-discharge.json", "s01-pt-billable"),
    "encounter-start": ("encounter-start.json", "s24-pending-no-follow-up"),
    "patient-view": ("patient-view-no-encounter.json", "s01-pt-billable"),
    "appointment-book": ("appointment-book.json", "s52-appointment-book-bundles"),
}
HOOKS = tuple(TEMPLATES)


@dataclass(frozen=True)
class Size:
    name: str
    encounters: int
    communications: int
    media: int
    appointments: int
    procedures: int
    observations: int = 0
    coverages: int = 2
    years: float = 3.0  # span of the encounter history


SIZES: dict[str, Size] = {
    "33": Size("33", encounters=8, communications=8, media=6, appointments=4, procedures=2),
    "20": Size("20", 20, 20, 20, 20, 20),
    "50": Size("50", 50, 50, 50, 50, 50),
    "200": Size("200", 200, 200, 200, 200, 200),
    "lifelong": Size("lifelong", encounters=400, communications=120, media=60, appointments=150, procedures=80,
                     observations=3000, years=40.0),
}

# Who the patient saw: (practitioner, role, organization). Other specialties, a same-specialty colleague, and a
# physical therapist of another organization.
COLLEAGUES = [
    ("pr-pt-1", "prrole-pt-1", "org-main"), ("pr-ot-1", "prrole-ot-1", "org-main"),
    ("pr-fp-1", "prrole-fp-1", "org-main"), ("pr-pt-other", "prrole-pt-other", "org-other"),
    ("pr-slp-1", "prrole-slp-1", "org-main"), ("pr-derm-1", "prrole-derm-1", "org-main"),
    ("pr-np-1", "prrole-np-1", "org-main"), ("pr-pt-2", "prrole-pt-2", "org-main"),
]
SCHEDULES = {"pr-pt-1": "sch-pt-1", "pr-pt-2": "sch-pt-2", "pr-ot-1": "sch-ot-1", "pr-slp-1": "sch-slp-1",
             "pr-fp-1": "sch-fp-1", "pr-derm-1": "sch-derm-1", "pr-np-1": "sch-np-1"}
REASONS = [("M17.11", "Unilateral primary osteoarthritis, right knee"), ("M54.50", "Low back pain, unspecified"),
           ("M25.561", "Pain in right knee"), ("I10", "Essential (primary) hypertension"),
           ("E11.9", "Type 2 diabetes mellitus without complications"), ("L30.9", "Dermatitis, unspecified"),
           ("R13.10", "Dysphagia, unspecified"), ("M19.041", "Primary osteoarthritis, right hand")]
THERAPY_CPT = [("97110", "Therapeutic exercises"), ("97140", "Manual therapy techniques"),
               ("97530", "Therapeutic activities"), ("97112", "Neuromuscular reeducation")]
VITALS = [("8867-4", "Heart rate", "/min", 60, 95), ("8480-6", "Systolic blood pressure", "mm[Hg]", 105, 150),
          ("8462-4", "Diastolic blood pressure", "mm[Hg]", 60, 95), ("29463-7", "Body weight", "kg", 55, 95),
          ("8310-5", "Body temperature", "Cel", 36, 38), ("9279-1", "Respiratory rate", "/min", 12, 20),
          ("2708-6", "Oxygen saturation", "%", 94, 100)]
ICD = "http://hl7.org/fhir/sid/icd-10-cm"


def _load(path: Path) -> Any:
    return json.loads(path.read_text("utf-8"))


def _master() -> dict[str, dict[str, Any]]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
            for e in _load(FIXTURES / "00-practice.json")["entry"]}


def scenario(scenario_id: str) -> dict[str, Any]:
    for item in _load(FIXTURES / "scenarios.json"):
        if item["id"] == scenario_id:
            return item
    raise KeyError(scenario_id)


def story_now(hook: str) -> str:
    """The scenario clock of a hook's template (``g2250-cds evaluate --now``)."""
    return scenario(TEMPLATES[hook][1])["now"]


def _iso(moment: datetime) -> str:
    return moment.astimezone(TZ).isoformat(timespec="seconds")


def _office_time(rng: random.Random, latest: datetime, earliest: datetime) -> datetime:
    """A weekday between 8:00 and 16:00 local time, in [earliest, latest]."""
    span = (latest - earliest).total_seconds()
    day = (earliest + timedelta(seconds=rng.random() * span)).astimezone(TZ)
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return datetime(day.year, day.month, day.day, rng.randint(8, 15), rng.choice((0, 15, 30, 45)), tzinfo=TZ)


def _spread(n: int, latest: datetime, earliest: datetime, rng: random.Random) -> list[datetime]:
    """``n`` office times spread evenly (with jitter) between ``earliest`` and ``latest``, oldest first."""
    if n <= 0:
        return []
    step = (latest - earliest) / n
    return sorted(_office_time(rng, earliest + step * (i + 1), earliest + step * i) for i in range(n))


def _codeable(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _history(size: Size, p: str, receipt: datetime, with_slots: bool, rng: random.Random,
             ) -> dict[str, list[dict[str, Any]]]:
    """The patient's history (ids ``{p}-h-…``), per prefetch key, older than the episode's windows."""
    pat = {"reference": f"Patient/{p}-pat"}
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in (
        "encounters", "communications", "media", "appointments", "procedures", "observations", "coverages",
        "slots")}
    # Encounters: office visits, 10 days to size.years before receipt.
    enc_times = _spread(size.encounters, receipt - timedelta(days=10), receipt - timedelta(days=365.25 * size.years),
                        rng)
    encounters = []
    for i, start in enumerate(enc_times):
        pr, _role, org = COLLEAGUES[i % len(COLLEAGUES)]
        code, text = REASONS[i % len(REASONS)]
        enc = {"resourceType": "Encounter", "id": f"{p}-h-enc-{i}", "meta": HTEST, "status": "finished",
               "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB",
                         "display": "ambulatory"},
               "type": [{"text": "Office visit"}], "subject": pat,
               "participant": [{"type": [_codeable("http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                                   "PPRF", "primary performer")],
                                "individual": {"reference": f"Practitioner/{pr}"}}],
               "period": {"start": _iso(start), "end": _iso(start + timedelta(minutes=45))},
               "reasonCode": [_codeable(ICD, code, text)], "serviceProvider": {"reference": f"Organization/{org}"}}
        encounters.append(enc)
    out["encounters"] = encounters
    # Observations: vital signs at the visits (lifelong chart).
    for i in range(size.observations):
        enc = encounters[i % len(encounters)] if encounters else None
        when = enc["period"]["start"] if enc else _iso(receipt - timedelta(days=400 + i))
        code, text, unit, lo, hi = VITALS[i % len(VITALS)]
        obs = {"resourceType": "Observation", "id": f"{p}-h-obs-{i}", "meta": HTEST, "status": "final",
               "category": [_codeable("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs",
                                      "Vital Signs")],
               "code": _codeable("http://loinc.org", code, text), "subject": pat, "effectiveDateTime": when,
               "valueQuantity": {"value": round(rng.uniform(lo, hi), 1), "unit": unit,
                                 "system": "http://unitsofmeasure.org", "code": unit}}
        if enc:
            obs["encounter"] = {"reference": f"Encounter/{enc['id']}"}
        out["observations"].append(obs)
    far = receipt - timedelta(days=365.25 * min(size.years, 15.0))
    # Communications: portal message + reply pairs, 60 days or more before receipt.
    com_times = _spread((size.communications + 1) // 2, receipt - timedelta(days=60), far, rng)
    for i, sent in enumerate(com_times):
        pr = COLLEAGUES[i % len(COLLEAGUES)][0]
        cin = {"resourceType": "Communication", "id": f"{p}-h-com-{i}-in", "meta": HTEST, "status": "completed",
               "category": [{"text": "Patient portal message"}], "subject": pat, "sent": _iso(sent),
               "received": _iso(sent + timedelta(seconds=40)), "recipient": [{"reference": f"Practitioner/{pr}"}],
               "sender": pat, "payload": [{"contentString": f"Question about my home program (message {i})."}]}
        cout = {"resourceType": "Communication", "id": f"{p}-h-com-{i}-out", "meta": HTEST, "status": "completed",
                "inResponseTo": [{"reference": f"Communication/{p}-h-com-{i}-in"}],
                "category": [{"text": "Reply to patient"}], "subject": pat,
                "sent": _iso(sent + timedelta(hours=3)), "recipient": [pat],
                "sender": {"reference": f"Practitioner/{pr}"},
                "payload": [{"contentString": "Thanks for the update; keep going with the exercises as planned."}]}
        out["communications"].extend([cin, cout])
    out["communications"] = out["communications"][:size.communications]
    # Media: photos the patient sent long ago.
    for i, made in enumerate(_spread(size.media, receipt - timedelta(days=60), far, rng)):
        out["media"].append({
            "resourceType": "Media", "id": f"{p}-h-media-{i}", "meta": HTEST, "status": "completed",
            "type": _codeable("http://terminology.hl7.org/CodeSystem/media-type", "image", "Image"), "subject": pat,
            "createdDateTime": _iso(made), "issued": _iso(made + timedelta(hours=1)), "operator": pat,
            "content": {"contentType": "image/jpeg", "url": f"https://portal.example.org/uploads/{p}/h-{i}.jpg",
                        "title": f"Photo {i}", "creation": _iso(made)}})
    # Appointments: past, in overlapping pairs; slots (busy, and a free one overlapping) for appointment-book.
    appt_times = _spread((size.appointments + 1) // 2, receipt - timedelta(days=60), far, rng)
    n = 0
    for start in appt_times:
        for k in range(2):
            if n >= size.appointments:
                break
            pr = COLLEAGUES[(n + k) % len(COLLEAGUES)][0]
            if pr not in SCHEDULES:
                pr = "pr-pt-1"
            begin = start + timedelta(minutes=15 * k)
            appt = {"resourceType": "Appointment", "id": f"{p}-h-appt-{n}", "meta": HTEST,
                    "status": "fulfilled" if n % 5 else "cancelled", "serviceType": [{"text": "Office visit"}],
                    "start": _iso(begin), "end": _iso(begin + timedelta(minutes=30)), "minutesDuration": 30,
                    "created": _iso(begin - timedelta(days=14)),
                    "participant": [{"actor": pat, "required": "required", "status": "accepted"},
                                    {"actor": {"reference": f"Practitioner/{pr}"}, "required": "required",
                                     "status": "accepted"}]}
            if with_slots:
                appt["slot"] = [{"reference": f"Slot/{p}-h-slot-{n}-busy"}]
                sch = {"reference": f"Schedule/{SCHEDULES[pr]}"}
                out["slots"].append({"resourceType": "Slot", "id": f"{p}-h-slot-{n}-busy", "meta": HTEST,
                                     "schedule": sch, "status": "busy", "start": appt["start"], "end": appt["end"]})
                out["slots"].append({"resourceType": "Slot", "id": f"{p}-h-slot-{n}-free", "meta": HTEST,
                                     "schedule": sch, "status": "free",
                                     "start": _iso(begin + timedelta(minutes=15)),
                                     "end": _iso(begin + timedelta(minutes=45))})
            out["appointments"].append(appt)
            n += 1
    # Procedures: therapy procedures 120 days or more before receipt (no global surgical period).
    for i, when in enumerate(_spread(size.procedures, receipt - timedelta(days=120), far, rng)):
        code, text = THERAPY_CPT[i % len(THERAPY_CPT)]
        pr = COLLEAGUES[i % 2 * 7][0]
        out["procedures"].append({
            "resourceType": "Procedure", "id": f"{p}-h-proc-{i}", "meta": HTEST, "status": "completed",
            "code": _codeable("http://www.ama-assn.org/go/cpt", code, text), "subject": pat,
            "performedDateTime": _iso(when), "performer": [{"actor": {"reference": f"Practitioner/{pr}"}}],
            "reasonCode": [_codeable(ICD, *REASONS[i % len(REASONS)])]})
    # A second, ended Coverage (a commercial plan before Medicare).
    out["coverages"].append({
        "resourceType": "Coverage", "id": f"{p}-h-cov-old", "meta": HTEST, "status": "active",
        "type": _codeable("https://nahdo.org/sopt", "511", "Commercial Managed Care - PPO"),
        "subscriberId": "SYNOLDCOV", "beneficiary": pat,
        "relationship": _codeable("http://terminology.hl7.org/CodeSystem/subscriber-relationship", "self", "Self"),
        "period": {"start": "2012-01-01", "end": "2016-12-31"},
        "payor": [{"reference": "Organization/org-payer-aetna"}]})
    for resources in out.values():  # EHRs send a generated narrative with each resource
        for r in resources:
            r["text"] = _narrative(r)
    return out


def _narrative(resource: dict[str, Any]) -> dict[str, Any]:
    rows = "".join(f"<tr><td>{k}</td><td>{json.dumps(v)[:120].replace('<', ' ').replace('&', ' ')}</td></tr>"
                   for k, v in resource.items() if k not in ("meta", "resourceType"))
    return {"status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p><b>{resource["resourceType"]}</b> '
                   f'{resource["id"]}</p><table>{rows}</table></div>'}


def _bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r} for r in resources]}


def _count(bundle: dict[str, Any] | None, resource_type: str) -> int:
    if not bundle:
        return 0
    return sum(1 for e in bundle.get("entry") or () if e["resource"]["resourceType"] == resource_type)


def build_template(hook: str, size_name: str, seed: int = 2250) -> dict[str, Any]:
    """The request of ``hook`` for a patient of ``size_name``, ids prefixed with :data:`PLACEHOLDER`."""
    size = SIZES[size_name]
    rng = random.Random(f"{seed}/{hook}/{size_name}")
    file_name, scenario_id = TEMPLATES[hook]
    item = scenario(scenario_id)
    old = scenario_id.split("-", 1)[0]  # "s01"
    text = (FIXTURES / "requests" / file_name).read_text("utf-8")
    text = re.sub(rf"\b{old}-", f"{PLACEHOLDER}-", text).replace(f"/uploads/{old}/", f"/uploads/{PLACEHOLDER}/")
    request = json.loads(text)
    request["hookInstance"] = f"00000000-0000-4000-8000-{INSTANCE_PLACEHOLDER}"
    prefetch = request["prefetch"]
    receipt = datetime.fromisoformat(item["receipt"])
    with_slots = "slots" in prefetch
    # The size counts the episode's own resources in: add only what is missing.
    want = {"encounters": size.encounters - _count(prefetch.get("encounters"), "Encounter"),
            "communications": size.communications - _count(prefetch.get("communications"), "Communication"),
            "media": size.media - _count(prefetch.get("media"), "Media"),
            "appointments": size.appointments - _count(prefetch.get("appointments"), "Appointment"),
            "procedures": size.procedures - _count(prefetch.get("procedures"), "Procedure")}
    scaled = Size(size.name, observations=size.observations, years=size.years,
                  **{k: max(0, v) for k, v in want.items()})
    history = _history(scaled, PLACEHOLDER, receipt, with_slots, rng)
    master = _master()
    for key, resources in history.items():
        if not resources or (key == "slots" and not with_slots):
            continue
        bundle = prefetch.get(key) or _bundle([])
        matches = [e for e in bundle.get("entry") or () if e.get("search", {}).get("mode") != "include"]
        # Keep the template's own entries; history (oldest first) goes before them; _include'd orgs at the end.
        entries = [{"resource": r} for r in resources] + matches
        if key == "encounters":
            have = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in entries}
            for org in ("Organization/org-main", "Organization/org-other"):
                if org not in have:
                    entries.append({"resource": copy.deepcopy(master[org])})
        bundle["entry"] = entries
        bundle["total"] = len(entries)
        prefetch[key] = bundle
    # Master data a FHIR server would have answered in waves 2-3: every practitioner and role the record names.
    named = set(re.findall(r'"Practitioner/([a-z0-9-]+)"', json.dumps(request)))
    roles = [master[f"PractitionerRole/{r}"] for pr, r, _org in COLLEAGUES if pr in named]
    orgs = sorted({r["organization"]["reference"] for r in roles})
    prefetch["practitioners"] = _bundle([master[f"Practitioner/{pr}"] for pr in sorted(named)
                                         if f"Practitioner/{pr}" in master])
    prefetch["practitionerRoles"] = _bundle([*roles, *(master[o] for o in orgs)])
    if with_slots:
        schedules = sorted({SCHEDULES[pr] for pr in named if pr in SCHEDULES})
        prefetch["schedules"] = _bundle([master[f"Schedule/{s}"] for s in schedules])
    return request


def template_text(hook: str, size_name: str, seed: int = 2250) -> str:
    """:func:`build_template` serialised compactly (what goes on the wire, before :func:`instantiate`)."""
    return json.dumps(build_template(hook, size_name, seed), ensure_ascii=False, separators=(",", ":"))


# A dateTime or instant with a time, as these records write them.
_TIME = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)"
_FULL_TIME = re.compile(_TIME)
# One marked by :func:`mark_own_times`, as it stands in compact JSON text.
_MARKED_TIME = re.compile(f'"{TIME_MARK}{_TIME}"')


def _prefetched_resources(request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every resource of the request's prefetch: Bundle entries' and single values."""
    for value in (request.get("prefetch") or {}).values():
        if isinstance(value, dict) and value.get("resourceType") == "Bundle":
            yield from (e["resource"] for e in value.get("entry") or () if isinstance(e.get("resource"), dict))
        elif isinstance(value, dict):
            yield value


def mark_own_times(text: str) -> str:
    """``text`` (a request's JSON) with every dateTime/instant of the patient's own resources (ids with the
    :data:`PLACEHOLDER` prefix) marked, so that :func:`instantiate` moves them per patient. Master data —
    practitioners, roles, organizations, schedules — keeps its times: an EHR sends the same ones in every chart."""
    request = json.loads(text)

    def mark(value: Any) -> None:
        members = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, member in list(members):
            if isinstance(member, str) and _FULL_TIME.fullmatch(member):
                value[key] = TIME_MARK + member
            else:
                mark(member)

    for resource in _prefetched_resources(request):
        if str(resource.get("id", "")).startswith(PLACEHOLDER):
            mark(resource)
    return json.dumps(request, ensure_ascii=False, separators=(",", ":"))


def time_shift(n: int) -> timedelta:
    """How far patient ``n``'s own times lie before the template's: 0 for patient 0 (the body repeated), else 1 to
    599 seconds. Every patient's dates are their own, as in an EHR's traffic — a cache of date strings must not
    answer from the previous patient — while days, business hours and windows stay as the template has them
    (minutes before an office-hours time; the verdicts the benchmark prints check it)."""
    return timedelta(seconds=0 if n == 0 else 1 + (n * 7919) % 599)


def instantiate(text: str, n: int) -> str:
    """Patient number ``n``'s request: every patient id and the hookInstance made unique, and the times
    :func:`mark_own_times` marked moved by :func:`time_shift` (``n``)."""
    text = text.replace(PLACEHOLDER, f"rb{n:08d}").replace(INSTANCE_PLACEHOLDER, f"{n:012d}")
    if f'"{TIME_MARK}' not in text:
        return text
    shift = time_shift(n)

    def moved(match: re.Match[str]) -> str:
        wall, fraction, offset = match.groups()
        moment = datetime.fromisoformat(wall + ("+00:00" if offset == "Z" else offset)) - shift
        return f'"{moment.strftime("%Y-%m-%dT%H:%M:%S")}{fraction or ""}{offset}"'

    return _MARKED_TIME.sub(moved, text)


# Ways another generator of records "of the same kind" may differ from this one (issue 13 asks that held-out
# measurements agree): ``bench.realistic --variant NAME`` writes every request so, to see what each costs.
VARIANTS: dict[str, str] = {
    "newest-first": "every searchset Bundle's matches newest first (as a server sorting by -date answers), "
                    "_include'd resources after them",
    "own-codes": "every diagnosis of the patient's history drawn from 9,000 codes instead of 8, per patient "
                 "(the episode's own kept: its verdict depends on them)",
    "no-narrative": "no generated narrative (text.div) on the patient's resources: about half the bytes",
}


def variant(text: str, name: str, n: int) -> str:
    """Patient ``n``'s request ``text`` (from :func:`instantiate`) rewritten as :data:`VARIANTS` ``[name]`` says;
    the verdicts stay the template's (``tests/test_bench_records.py``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}")
    request = json.loads(text)
    if name == "newest-first":
        for bundle in (request.get("prefetch") or {}).values():
            if isinstance(bundle, dict) and bundle.get("resourceType") == "Bundle":
                entries = bundle.get("entry") or []
                matches = [e for e in entries if e.get("search", {}).get("mode") != "include"]
                bundle["entry"] = matches[::-1] + [e for e in entries if e.get("search", {}).get("mode") == "include"]
    elif name == "own-codes":
        rng = random.Random(f"own-codes/{n}")
        history = f"rb{n:08d}-h-"

        def recode(value: Any) -> None:
            if isinstance(value, dict):
                for coding in value.get("coding") or () if isinstance(value.get("coding"), list) else ():
                    if isinstance(coding, dict) and coding.get("system") == ICD:
                        code = f"{rng.choice('DEFGJKLMNR')}{rng.randint(10, 99)}.{rng.randint(0, 99):02d}"
                        coding["code"], coding["display"] = code, f"Condition {code}"
                        value["text"] = f"Condition {code}"
                for member in value.values():
                    recode(member)
            elif isinstance(value, list):
                for member in value:
                    recode(member)

        for resource in _prefetched_resources(request):
            if str(resource.get("id", "")).startswith(history):
                recode(resource)
    else:  # no-narrative
        for resource in _prefetched_resources(request):
            if str(resource.get("id", "")).startswith(f"rb{n:08d}"):
                resource.pop("text", None)
    return json.dumps(request, ensure_ascii=False, separators=(",", ":"))


def describe(request: dict[str, Any]) -> dict[str, Any]:
    """Resources per prefetch key, the total, and the patient's own resources."""
    per_key = {}
    total = own = 0
    for key, value in (request.get("prefetch") or {}).items():
        if not value:
            continue
        entries = value.get("entry") or [] if value.get("resourceType") == "Bundle" else [{"resource": value}]
        per_key[key] = len(entries)
        total += len(entries)
        own += sum(1 for e in entries if PLACEHOLDER in e["resource"].get("id", "")
                   or e["resource"].get("id", "").startswith("rb"))
    return {"per_key": per_key, "prefetched": total, "patient_resources": own}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.records", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory for <hook>-<size>-<n>.json")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--hooks", default=",".join(HOOKS))
    parser.add_argument("--patients", type=int, default=1, help="requests (distinct patients) per hook and size")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    n = 1
    for size_name in args.sizes.split(","):
        for hook in args.hooks.split(","):
            text = mark_own_times(template_text(hook, size_name))
            for _ in range(args.patients):
                body = instantiate(text, n)
                path = args.out / f"{hook}-{size_name}-{n}.json"
                path.write_text(body, "utf-8")
                info = describe(json.loads(body))
                print(f"{path}  {len(body) / 1024:.0f} KB  {info['prefetched']} prefetched "
                      f"({info['patient_resources']} the patient's)  now {story_now(hook)}")
                n += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
