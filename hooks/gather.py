"""What a hook reads, and in which order: the data plan of fhir-profile.md, as prefetch keys and fallback queries.

Every piece of data has one prefetch key (the discovery document offers the template) and one fallback query.
Fallback queries are patient-scoped and bounded by date on the server side so their cost stays flat as a record
grows (fhir-profile.md "Queries"); prefetch templates cannot carry dates in CDS Hooks 2.0, so whatever arrives by
either path is filtered again by the rules, which look only at their own windows. A server that ignores a search
parameter therefore cannot change the answer.

Waves (each wave's queries run concurrently):
1. what the context alone names: the encounter, consents, coverages (with payers), the user's roles, and the
   patient's episode data in a window anchored on *now*;
2. what depends on wave 1: the billing practitioners' roles and schedules, payer organizations not included, and
   — when the encounter starts before the now-anchored window — the episode data anchored on the encounter;
3. free Slots between a candidate appointment's creation and its start, and roles of colleagues who saw the
   patient (same specialty, same organization counts for ``established-patient``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from cds_service.fhir.parse import ResourceBag
from cds_service.fhir.source import DataSource, Fetched, Query

# Windows (billing-rules.md): 3-year lookback for established patient, 7 days prior for related services,
# 30 days of open submissions for patient-view. The episode window adds margin for a photo taken days before it
# was sent and a review opened days after.
EPISODE_LOOKBACK = timedelta(days=38)
ESTABLISHED_LOOKBACK = timedelta(days=3 * 366 + 38)
# Wave 1 cannot know the encounter's date; its window reaches this much further back so that a review closed
# within two weeks of its start needs no second round of episode queries.
ENCOUNTER_AGE_MARGIN = timedelta(days=14)
MAX_IDS_PER_QUERY = 50

# Prefetch templates (CDS Hooks 2.0: root-level context tokens and user tokens only, no date arithmetic).
PREFETCH_TEMPLATES: dict[str, str] = {
    "encounter": "Encounter/{{context.encounterId}}",
    "consents": "Consent?patient={{context.patientId}}",
    "coverages": "Coverage?beneficiary=Patient/{{context.patientId}}&status=active&_include=Coverage:payor",
    "userRoles": "PractitionerRole?practitioner={{userPractitionerId}}",
    "encounters": "Encounter?patient={{context.patientId}}",
    "communications": "Communication?subject=Patient/{{context.patientId}}",
    "media": "Media?subject=Patient/{{context.patientId}}",
    "documents": "DocumentReference?subject=Patient/{{context.patientId}}",
    "procedures": "Procedure?patient={{context.patientId}}",
    "appointments": "Appointment?patient={{context.patientId}}",
    "observations": "Observation?subject=Patient/{{context.patientId}}",
    "reports": "DiagnosticReport?subject=Patient/{{context.patientId}}",
    "impressions": "ClinicalImpression?subject=Patient/{{context.patientId}}",
    "chargeItems": "ChargeItem?patient={{context.patientId}}",
}


def prefetch_for(keys: Iterable[str]) -> dict[str, str]:
    return {key: PREFETCH_TEMPLATES[key] for key in keys}


def fhir_instant(moment: datetime) -> str:
    """A search date value; ``+`` of an offset must be percent-encoded in a query string."""
    return quote(moment.isoformat(timespec="seconds"), safe="")


def _id_of(reference: str | None, resource_type: str) -> str | None:
    if not reference:
        return None
    parts = reference.split("/")
    if len(parts) >= 2 and parts[-2] == resource_type:
        return parts[-1]
    return None


@dataclass
class EpisodeData:
    """Everything gathered for one hook call, parsed; what the rules and cards consume."""

    bag: ResourceBag
    patient_id: str
    encounter: Any | None = None
    window_start: datetime | None = None
    origins: dict[str, str] = field(default_factory=dict)
    truncated: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)

    def record(self, fetched: dict[str, Fetched]) -> None:
        for key, item in fetched.items():
            self.origins[key] = item.origin
            if item.truncated:
                self.truncated.append(key)
            if item.origin == "unavailable" and item.note:
                self.unavailable[key] = item.note
            self.bag.add_raw(item.resources)


def _episode_queries(patient_id: str, since: datetime, tag: str) -> list[Query]:
    p = quote(patient_id, safe="")
    lo = fhir_instant(since)
    established_lo = fhir_instant(since - (ESTABLISHED_LOOKBACK - EPISODE_LOOKBACK))
    return [
        Query("encounters", f"Encounter?patient={p}&date=ge{established_lo}", name=f"encounters{tag}"),
        # A patient's message may carry only `received`, a follow-up only `sent`: ask for both windows.
        Query("communications", f"Communication?subject=Patient/{p}&sent=ge{lo}", name=f"communications:sent{tag}"),
        Query("communications", f"Communication?subject=Patient/{p}&received=ge{lo}",
              name=f"communications:received{tag}"),
        Query("media", f"Media?subject=Patient/{p}&created=ge{lo}", name=f"media{tag}"),
        Query("documents", f"DocumentReference?subject=Patient/{p}&date=ge{lo}", name=f"documents{tag}"),
        Query("procedures", f"Procedure?patient={p}&date=ge{lo}", name=f"procedures{tag}"),
        Query("appointments", f"Appointment?patient={p}&date=ge{lo}", name=f"appointments{tag}"),
        Query("observations", f"Observation?subject=Patient/{p}&date=ge{lo}", name=f"observations{tag}"),
        Query("reports", f"DiagnosticReport?subject=Patient/{p}&date=ge{lo}", name=f"reports{tag}"),
        # Optional: some servers (SEKMET 0.1.1) define no ClinicalImpression search parameters at all.
        Query("impressions", f"ClinicalImpression?subject=Patient/{p}&date=ge{lo}", required=False,
              name=f"impressions{tag}"),
        Query("chargeItems", f"ChargeItem?patient={p}&entered-date=ge{lo}", name=f"chargeItems:entered{tag}"),
        Query("chargeItems", f"ChargeItem?patient={p}&occurrence=ge{lo}", name=f"chargeItems:occurrence{tag}"),
    ]


def gather_episode(
    source: DataSource,
    *,
    patient_id: str,
    now: datetime,
    encounter_id: str | None = None,
    user_practitioner_id: str | None = None,
    proposed: Iterable[dict[str, Any]] = (),
) -> EpisodeData:
    """Fetch (or take from prefetch) everything the rules of billing-rules.md §3 read for this patient."""
    data = EpisodeData(bag=ResourceBag(), patient_id=patient_id)
    p = quote(patient_id, safe="")
    window_start = now - EPISODE_LOOKBACK - (ENCOUNTER_AGE_MARGIN if encounter_id else timedelta(0))

    wave1 = [
        Query("consents", f"Consent?patient={p}"),
        Query("coverages", f"Coverage?beneficiary=Patient/{p}&status=active&_include=Coverage:payor"),
        *_episode_queries(patient_id, window_start, ""),
    ]
    if encounter_id:
        wave1.append(Query("encounter", f"Encounter/{quote(encounter_id, safe='')}"))
    if user_practitioner_id:
        wave1.append(Query("userRoles", f"PractitionerRole?practitioner={quote(user_practitioner_id, safe='')}"))
    fetched = source.fetch(wave1)
    data.record(fetched)
    # appointment-book: the proposed appointments are not on the server yet; they take part from here on.
    data.bag.add_raw(proposed)
    if encounter_id:
        data.encounter = data.bag.get(f"Encounter/{encounter_id}")

    # Wave 2: an older encounter moves the window back; practitioners named by the episode; payers not included.
    wave2: list[Query] = []
    anchor = _encounter_anchor(data.encounter)
    if anchor is not None and anchor - EPISODE_LOOKBACK < window_start:
        window_start = anchor - EPISODE_LOOKBACK
        # Prefetched keys already hold the whole (undated) result: only re-query what was fetched by date.
        prefetched = {v.key for v in fetched.values() if v.origin.startswith("prefetch")}
        wave2.extend(q for q in _episode_queries(patient_id, window_start, "@encounter") if q.key not in prefetched)
    data.window_start = window_start
    practitioner_ids = sorted(_episode_practitioners(data) - _practitioners_with_roles(data.bag))
    for chunk_no, chunk in enumerate(_chunks(practitioner_ids)):
        ids = ",".join(quote(i, safe="") for i in chunk)
        wave2.append(Query(f"practitionerRoles@{chunk_no}", f"PractitionerRole?practitioner={ids}", required=True))
    for chunk_no, chunk in enumerate(_chunks(sorted(_episode_practitioners(data)))):
        actors = ",".join("Practitioner/" + quote(i, safe="") for i in chunk)
        wave2.append(Query(f"schedules@{chunk_no}", f"Schedule?actor={actors}", required=False))
    conditions = sorted(_missing_conditions(data.bag))
    for chunk_no, chunk in enumerate(_chunks(conditions)):
        ids = ",".join(quote(i, safe="") for i in chunk)
        wave2.append(Query(f"conditions@{chunk_no}", f"Condition?_id={ids}", required=False))
    payers = sorted(_missing_payers(data.bag))
    for chunk_no, chunk in enumerate(_chunks(payers)):
        wave2.append(Query(f"payers@{chunk_no}", f"Organization?_id={','.join(chunk)}", required=True))
    if wave2:
        data.record(source.fetch(wave2))

    # Wave 3: free slots around candidate appointments; roles of colleagues who saw the patient.
    wave3: list[Query] = []
    schedules = [s.id for s in data.bag.of_type("Schedule") if s.id]
    appointments = [a for a in data.bag.of_type("Appointment") if a.start is not None]
    if schedules and appointments:
        lo = min((a.created if a.created else a.start) for a in appointments)
        lo_dt = lo if isinstance(lo, datetime) else datetime.combine(lo, datetime.min.time(), tzinfo=now.tzinfo)
        hi = max(a.start for a in appointments)
        ids = ",".join("Schedule/" + quote(s, safe="") for s in schedules[:MAX_IDS_PER_QUERY])
        # All statuses, not only free: "is there Slot data at all" decides between a verdict and `unknown`
        # (billing-rules.md §6 "without Slot data").
        wave3.append(Query(
            "slots",
            f"Slot?schedule={ids}&start=ge{fhir_instant(lo_dt)}&start=le{fhir_instant(hi)}",
            required=False,
        ))
    colleagues = sorted(_encounter_practitioners(data.bag) - _practitioners_with_roles(data.bag))
    for chunk_no, chunk in enumerate(_chunks(colleagues)):
        ids = ",".join(quote(i, safe="") for i in chunk)
        wave3.append(Query(f"colleagueRoles@{chunk_no}", f"PractitionerRole?practitioner={ids}", required=False))
    if wave3:
        data.record(source.fetch(wave3))
    return data


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i:i + MAX_IDS_PER_QUERY] for i in range(0, len(items), MAX_IDS_PER_QUERY)]


def _encounter_anchor(encounter: Any | None) -> datetime | None:
    if encounter is None or encounter.period is None:
        return None
    return encounter.period.start or encounter.period.end


def practitioner_id(reference: str | None, bag: ResourceBag) -> str | None:
    """The Practitioner id behind a Practitioner or (resolvable) PractitionerRole reference."""
    if (pid := _id_of(reference, "Practitioner")) is not None:
        return pid
    role = bag.get(reference) if _id_of(reference, "PractitionerRole") else None
    if role is not None and role.practitioner is not None:
        return _id_of(role.practitioner.reference, "Practitioner")
    return None


def _participant_refs(encounter: Any) -> list[str]:
    return [
        p.individual.reference
        for p in encounter.participant or ()
        if p.individual is not None and p.individual.reference
    ]


def _episode_practitioners(data: EpisodeData) -> set[str]:
    """Practitioners who may bill: the review encounter's participants and recipients of patient messages."""
    ids: set[str] = set()
    encounters = [data.encounter] if data.encounter is not None else [
        e for e in data.bag.of_type("Encounter") if e.class_fhir is not None and e.class_fhir.code == "VR"
    ]
    for encounter in encounters:
        for ref in _participant_refs(encounter):
            if (pid := practitioner_id(ref, data.bag)) is not None:
                ids.add(pid)
    for comm in data.bag.of_type("Communication"):
        for recipient in comm.recipient or ():
            if (pid := _id_of(recipient.reference, "Practitioner")) is not None:
                ids.add(pid)
    return ids


def _encounter_practitioners(bag: ResourceBag) -> set[str]:
    ids: set[str] = set()
    for encounter in bag.of_type("Encounter"):
        for ref in _participant_refs(encounter):
            if (pid := _id_of(ref, "Practitioner")) is not None:
                ids.add(pid)
    return ids


def _practitioners_with_roles(bag: ResourceBag) -> set[str]:
    return {
        pid
        for role in bag.of_type("PractitionerRole")
        if role.practitioner is not None and (pid := _id_of(role.practitioner.reference, "Practitioner"))
    }


def _missing_conditions(bag: ResourceBag) -> set[str]:
    """Conditions that code a diagnosis by reference (Encounter.diagnosis, reasonReference) but were not fetched."""
    refs: list[str | None] = []
    for encounter in bag.of_type("Encounter"):
        refs.extend(d.condition.reference for d in encounter.diagnosis or () if d.condition is not None)
        refs.extend(r.reference for r in encounter.reasonReference or ())
    for resource_type in ("Procedure", "Appointment"):
        for resource in bag.of_type(resource_type):
            refs.extend(r.reference for r in resource.reasonReference or ())
    return {cid for ref in refs if (cid := _id_of(ref, "Condition")) and bag.get(f"Condition/{cid}") is None}


def _missing_payers(bag: ResourceBag) -> set[str]:
    missing: set[str] = set()
    for coverage in bag.of_type("Coverage"):
        for payor in coverage.payor or ():
            oid = _id_of(payor.reference, "Organization")
            if oid and bag.get(f"Organization/{oid}") is None:
                missing.add(oid)
    return missing
