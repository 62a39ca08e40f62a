"""Adversarial tests of the pure rules engine against shared/docs/billing-rules.md (§3 criteria, §4 taxonomy,
§5 payers, §6 defaults) and shared/docs/fhir-profile.md.

Independent of fhir_fixtures/: every scenario is built here from small FHIR R4 dicts, starting from one billable
physical-therapy episode and changing one thing at a time. Each test asserts the targeted criterion *and* that the
other nine stay as they were (``expect``), so a variation that silently breaks another criterion is caught too.

Where the engine disagrees with the spec, the test asserts the spec's answer and is marked
``xfail(strict=True, reason="ENGINE: ...")``.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from cds_service.fhir.parse import add_raw
from cds_service.record import ResourceBag
from cds_service.rules.calendar import BusinessCalendar
from cds_service.rules.engine import assessment_of_encounter, determine, find_assessments
from cds_service.rules.model import Determination
from cds_service.rules.rules_data import load_rules_data
from tests.support.spec import SPEC_CRITERION_IDS

TZ = ZoneInfo("America/New_York")
CAL = BusinessCalendar("America/New_York")
RULES = load_rules_data()

# billing-rules.md §3, in table order (written out here, not taken from the engine).
SPEC_IDS = SPEC_CRITERION_IDS

NUCC = "http://nucc.org/provider-taxonomy"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
LOINC = "http://loinc.org"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
SOPT = "https://nahdo.org/sopt"
HCPCS = "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
CPT = "http://www.ama-assn.org/go/cpt"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"

PT_CODE = "225100000X"
RN_CODE = "163W00000X"
FORBIDDEN = {"95", "93", "GT", "GQ", "FQ", "G0", "CR", "25", "22", "23", "62", "78", "80", "82", "AS", "QK", "QX"}


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=TZ)


# The baseline episode: Wed 18 Nov 2026, photo received 10:00 EST, PT replies 15:30 the same day.
RECEIPT = at(2026, 11, 18, 10)
FOLLOW_UP = at(2026, 11, 18, 15, 30)
DEADLINE = at(2026, 11, 19, 10)  # Wed 10:00 + 24 business hours = Thu 10:00 (hand-computed)
NOW = at(2026, 11, 20, 12)  # after the deadline: a final answer
CONSENT_DATE = at(2026, 3, 2, 10, 15)
VR_CODE = "M25.461"  # category M25
RELATED_CODE = "M25.561"  # same category M25
UNRELATED_CODE = "S93.401A"  # category S93

PATIENT = "Patient/p1"
PT1 = "Practitioner/pt1"
IMAGE = {"contentAttachment": {"contentType": "image/jpeg", "url": "https://portal.example.org/u/knee-1.jpg"}}
TEXT = {"contentString": "My right knee swelled up after the step-ups. Photo attached."}


# --- builders -----------------------------------------------------------------------------------------------------


def iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def ref(key: str) -> dict[str, str]:
    return {"reference": key}


def concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def icd(*codes: str) -> list[dict[str, Any]]:
    return [concept(ICD, c) for c in codes]


def organization(oid: str, name: str) -> dict[str, Any]:
    return {"resourceType": "Organization", "id": oid, "name": name}


def practitioner(pid: str, nucc: str | None, org: str = "Organization/org-main") -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = [{"resourceType": "Practitioner", "id": pid, "name": [{"family": pid}]}]
    if nucc is not None:
        found.append({"resourceType": "PractitionerRole", "id": f"role-{pid}", "active": True,
                      "practitioner": ref(f"Practitioner/{pid}"), "organization": ref(org),
                      "code": [concept(NUCC, nucc)], "specialty": [concept(NUCC, nucc)]})
    return found


def encounter(eid: str, start: Any, *, end: Any = None, cls: str = "AMB", status: str = "finished",
              who: tuple[str, ...] = (PT1,), codes: tuple[str, ...] = (), subject: str = PATIENT,
              org: str = "Organization/org-main") -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Encounter", "id": eid, "status": status, "class": {"system": ACT, "code": cls},
        "subject": ref(subject), "participant": [{"individual": ref(w)} for w in who],
        "serviceProvider": ref(org),
    }
    if start is not None:
        resource["period"] = {"start": iso(start)}
        if end is not None:
            resource["period"]["end"] = iso(end)
    if codes:
        resource["reasonCode"] = icd(*codes)
    return resource


def office_visit(eid: str, start: datetime, *, codes: tuple[str, ...] = ("M17.11",), who: tuple[str, ...] = (PT1,),
                 status: str = "finished", subject: str = PATIENT) -> dict[str, Any]:
    return encounter(eid, start, end=start + timedelta(minutes=45), who=who, codes=codes, status=status,
                     subject=subject)


def patient_message(cid: str = "in", *, received: Any = RECEIPT, sent: Any = RECEIPT - timedelta(seconds=40),
                    sender: str = PATIENT, subject: str = PATIENT, encounter: str | None = "Encounter/vr",
                    payload: tuple[dict[str, Any], ...] = (TEXT, IMAGE), recipient: str | None = PT1,
                    **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Communication", "id": cid, "status": "completed",
                                "subject": ref(subject), "sender": ref(sender), "payload": list(payload)}
    if received is not None:
        resource["received"] = iso(received)
    if sent is not None:
        resource["sent"] = iso(sent)
    if encounter is not None:
        resource["encounter"] = ref(encounter)
    if recipient is not None:
        resource["recipient"] = [ref(recipient)]
    resource.update(extra)
    return resource


def reply(cid: str = "out", *, sent: Any = FOLLOW_UP, sender: str = PT1,
          in_response_to: tuple[str, ...] = ("Communication/in",), encounter: str | None = "Encounter/vr",
          recipient: str = PATIENT) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Communication", "id": cid, "status": "completed", "subject": ref(PATIENT),
        "sender": ref(sender), "recipient": [ref(recipient)], "sent": iso(sent),
        "payload": [{"contentString": "Mild swelling above the kneecap; drop the step-ups for a week and ice it."}],
    }
    if in_response_to:
        resource["inResponseTo"] = [ref(k) for k in in_response_to]
    if encounter is not None:
        resource["encounter"] = ref(encounter)
    return resource


def consent(cid: str = "consent", *, when: Any = CONSENT_DATE, status: str = "active",
            category: tuple[str, str] = (LOINC, "59284-0"), provision: str = "permit",
            patient: str = PATIENT) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Consent", "id": cid, "status": status, "scope": concept(SCOPE, "treatment"),
        "category": [concept(*category)], "patient": ref(patient), "provision": {"type": provision},
        "policy": [{"uri": "http://example.org/policies/virtual-services-consent"}],
    }
    if when is not None:
        resource["dateTime"] = iso(when)
    return resource


def coverage(cid: str = "cov", *, payor: str = "Organization/org-payer-medicare", sopt: str | None = "121",
             start: str | None = "2026-01-01", end: str | None = None, status: str = "active",
             beneficiary: str = PATIENT, **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Coverage", "id": cid, "status": status,
                                "beneficiary": ref(beneficiary), "payor": [ref(payor)]}
    if sopt is not None:
        resource["type"] = concept(SOPT, sopt)
    period = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    if period:
        resource["period"] = period
    resource.update(extra)
    return resource


def appointment(aid: str, start: datetime, *, created: Any, status: str = "booked", codes: tuple[str, ...] = (),
                who: str = PT1, minutes: int = 45, slot: str | None = None,
                patient: str = PATIENT) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Appointment", "id": aid, "status": status, "start": iso(start),
        "end": iso(start + timedelta(minutes=minutes)),
        "participant": [{"actor": ref(patient), "status": "accepted"}, {"actor": ref(who), "status": "accepted"}],
    }
    if created is not None:
        resource["created"] = iso(created)
    if codes:
        resource["reasonCode"] = icd(*codes)
    if slot is not None:
        resource["slot"] = [ref(slot)]
    return resource


def schedule(sid: str = "sch-pt1", actor: str = PT1) -> dict[str, Any]:
    return {"resourceType": "Schedule", "id": sid, "active": True, "actor": [ref(actor)]}


def slot(sid: str, start: datetime, status: str, *, schedule_id: str = "sch-pt1", minutes: int = 45) -> dict[str, Any]:
    return {"resourceType": "Slot", "id": sid, "schedule": ref(f"Schedule/{schedule_id}"), "status": status,
            "start": iso(start), "end": iso(start + timedelta(minutes=minutes))}


def charge(cid: str, code: str, *, system: str = HCPCS, status: str = "billable", context: str | None = None,
           when: Any = None, codes: tuple[str, ...] = (), supporting: tuple[str, ...] = (),
           subject: str = PATIENT) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "ChargeItem", "id": cid, "status": status,
                                "code": concept(system, code), "subject": ref(subject)}
    if context is not None:
        resource["context"] = ref(context)
    if when is not None:
        resource["occurrenceDateTime"] = iso(when)
    if codes:
        resource["reason"] = icd(*codes)
    if supporting:
        resource["supportingInformation"] = [ref(k) for k in supporting]
    return resource


def observation(oid: str = "obs", *, performer: str = PT1, encounter: str | None = "Encounter/vr",
                derived_from: str | None = None, issued: Any = RECEIPT + timedelta(hours=2)) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Observation", "id": oid, "status": "final",
                                "code": {"text": "Interpretation of patient-submitted images"},
                                "subject": ref(PATIENT), "performer": [ref(performer)], "issued": iso(issued),
                                "valueString": "Mild suprapatellar effusion."}
    if encounter is not None:
        resource["encounter"] = ref(encounter)
    if derived_from is not None:
        resource["derivedFrom"] = [ref(derived_from)]
    return resource


class Episode:
    """A patient's record as a bag of FHIR dicts, starting as the billable PT baseline; tests edit it."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Any]] = {}
        self.add(
            {"resourceType": "Patient", "id": "p1", "name": [{"family": "Vance"}], "birthDate": "1951-04-12"},
            organization("org-main", "Riverbend Rehabilitation"),
            organization("org-other", "Lakeside Physical Therapy Group"),
            organization("org-payer-medicare", "Medicare Part B"),
            *practitioner("pt1", PT_CODE),
            *practitioner("pt2", PT_CODE),
            *practitioner("pt-other", PT_CODE, org="Organization/org-other"),
            *practitioner("rn1", RN_CODE),
            office_visit("office-1", at(2026, 10, 21, 10)),
            encounter("vr", at(2026, 11, 18, 15, 10), end=FOLLOW_UP, cls="VR", codes=(VR_CODE,)),
            patient_message(),
            reply(),
            consent(),
            coverage(),
        )

    def add(self, *resources: dict[str, Any]) -> Episode:
        for resource in resources:
            self.resources[f"{resource['resourceType']}/{resource['id']}"] = resource
        return self

    def remove(self, *keys: str) -> Episode:
        for key in keys:
            del self.resources[key]
        return self

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.resources[key]

    def bag(self, *, strict: bool = True) -> ResourceBag:
        bag = ResourceBag()
        add_raw(bag, copy.deepcopy(list(self.resources.values())))
        if strict:
            assert bag.skipped == [], bag.skipped
        return bag

    def determine(self, *, now: datetime = NOW, encounter: str = "Encounter/vr",
                  rules: Any = RULES, strict: bool = True) -> Determination:
        bag = self.bag(strict=strict)
        assessment = assessment_of_encounter(bag, "p1", bag.get(encounter), CAL, rules)
        assert assessment is not None, "the VR encounter must be recognised as a remote assessment"
        return determine(assessment, bag=bag, patient_id="p1", now=now, calendar=CAL, rules=rules)

    def determine_all(self, *, now: datetime = NOW) -> list[Determination]:
        bag = self.bag()
        return [determine(a, bag=bag, patient_id="p1", now=now, calendar=CAL, rules=RULES)
                for a in find_assessments(bag, "p1", CAL, RULES)]


def statuses(d: Determination) -> dict[str, str]:
    return {c.id: c.status for c in d.criteria}


def expect(d: Determination, **changed: str) -> None:
    """All ten criteria ``met`` except those named (``consent_documented="not-met"``)."""
    want = {cid: "met" for cid in SPEC_IDS}
    for name, status in changed.items():
        cid = name.replace("_", "-")
        assert cid in want, cid
        want[cid] = status
    assert statuses(d) == want


def expect_billable_pt(d: Determination) -> None:
    expect(d)
    assert (d.status, d.code, d.modifiers) == ("billable", "G2250", ("GP",))


def without_participants(resource: dict[str, Any]) -> dict[str, Any]:
    resource.pop("participant", None)
    return resource


# --- baseline -----------------------------------------------------------------------------------------------------


def test_baseline_pt_is_billable_g2250_with_gp() -> None:
    d = Episode().determine()
    expect_billable_pt(d)
    assert d.receipt_time == RECEIPT
    assert d.deadline == DEADLINE
    assert d.practitioner == PT1
    assert d.encounter == "Encounter/vr"
    assert d.follow_up == "Communication/out"
    assert d.follow_up_time == FOLLOW_UP
    assert "Communication/in" in d.submissions
    follow_up = d.criterion("follow-up-within-24-business-hours")
    assert "Communication/out" in follow_up.evidence
    assert follow_up.facts["elapsed_business_hours"] == 5.5


def test_baseline_extension_carries_code_modifiers_and_hand_computed_deadline() -> None:
    ext = Episode().determine().to_extension()
    assert ext["status"] == "billable"
    assert ext["code"] == "G2250"
    assert ext["modifiers"] == ["GP"]
    assert ext["deadline"] == "2026-11-19T10:00:00-05:00"
    assert [c["id"] for c in ext["criteria"]] == list(SPEC_IDS)


def test_office_visit_is_not_a_remote_assessment() -> None:
    ep = Episode()
    bag = ep.bag()
    assert assessment_of_encounter(bag, "p1", bag.get("Encounter/office-1"), CAL, RULES) is None


# --- shapes of the same billable episode ---------------------------------------------------------------------------


def test_follow_up_linked_only_by_encounter() -> None:
    ep = Episode().add(reply(in_response_to=()))
    expect_billable_pt(ep.determine())


def test_follow_up_linked_only_by_in_response_to() -> None:
    ep = Episode().add(reply(encounter=None))
    expect_billable_pt(ep.determine())


def test_patient_message_linked_only_through_communication_encounter() -> None:
    # No inResponseTo, and an Encounter without period: nothing but Communication.encounter ties the message in.
    ep = Episode().add(reply(in_response_to=()))
    del ep["Encounter/vr"]["period"]
    d = ep.determine()
    expect_billable_pt(d)
    assert d.receipt_time == RECEIPT


def test_standalone_media_without_communication() -> None:
    media = {"resourceType": "Media", "id": "m1", "status": "completed", "subject": ref(PATIENT),
             "operator": ref(PATIENT), "encounter": ref("Encounter/vr"),
             "createdDateTime": iso(RECEIPT - timedelta(days=2)), "issued": iso(RECEIPT),
             "content": {"contentType": "image/jpeg", "url": "https://portal.example.org/u/m1.jpg"}}
    ep = Episode().remove("Communication/in").add(media, reply(in_response_to=()))
    d = ep.determine()
    expect_billable_pt(d)
    # §3 receipt: Media.issued before Media.createdDateTime (a photo may be taken days before it is sent).
    assert d.receipt_time == RECEIPT
    assert d.deadline == DEADLINE
    assert "Media/m1" in d.criterion("patient-submitted-media").evidence


def test_communication_payload_content_reference_to_media() -> None:
    media = {"resourceType": "Media", "id": "m1", "status": "completed", "subject": ref(PATIENT),
             "createdDateTime": iso(RECEIPT - timedelta(hours=14)),
             "content": {"contentType": "image/png", "url": "https://portal.example.org/u/m1.png"}}
    message = patient_message(payload=(TEXT, {"contentReference": ref("Media/m1")}))
    d = Episode().add(media, message).determine()
    expect_billable_pt(d)
    assert d.receipt_time == RECEIPT  # Communication.received wins over Media.createdDateTime
    assert "Media/m1" in d.criterion("patient-submitted-media").evidence


def test_document_reference_authored_by_patient_with_image() -> None:
    document = {"resourceType": "DocumentReference", "id": "doc1", "status": "current", "subject": ref(PATIENT),
                "author": [ref(PATIENT)], "date": iso(RECEIPT),
                "content": [{"attachment": {"contentType": "image/heic", "url": "https://portal.example.org/d1"}}],
                "context": {"encounter": [ref("Encounter/vr")]}}
    ep = Episode().remove("Communication/in").add(document, reply(in_response_to=()))
    d = ep.determine()
    expect_billable_pt(d)
    assert d.receipt_time == RECEIPT


def test_patient_message_with_only_sent_time() -> None:
    sent = at(2026, 11, 18, 11, 15)
    d = Episode().add(patient_message(received=None, sent=sent)).determine()
    expect_billable_pt(d)
    assert d.receipt_time == sent
    assert d.deadline == at(2026, 11, 19, 11, 15)


@pytest.mark.parametrize("content_type", ["video/mp4", "IMAGE/JPEG", "image/jpeg; name=knee.jpg"])
def test_video_and_loosely_written_image_content_types(content_type: str) -> None:
    attachment = {"contentAttachment": {"contentType": content_type, "url": "https://portal.example.org/u/v"}}
    d = Episode().add(patient_message(payload=(attachment,))).determine()
    expect_billable_pt(d)


def test_encounter_participant_as_practitioner_role() -> None:
    ep = Episode()
    ep["Encounter/vr"]["participant"] = [{"individual": ref("PractitionerRole/role-pt1")}]
    d = ep.determine()
    expect_billable_pt(d)
    assert d.practitioner == PT1


def test_follow_up_sender_as_practitioner_role() -> None:
    d = Episode().add(reply(sender="PractitionerRole/role-pt1")).determine()
    expect_billable_pt(d)


def test_absolute_and_versioned_references() -> None:
    base = "https://ehr.example.org/fhir/"
    ep = Episode()
    ep["Encounter/vr"]["participant"] = [{"individual": ref(base + "Practitioner/pt1/_history/3")}]
    ep.add(patient_message(encounter=base + "Encounter/vr", subject=base + "Patient/p1", sender=base + "Patient/p1"),
           reply(sender=base + "Practitioner/pt1", in_response_to=(base + "Communication/in",)))
    expect_billable_pt(ep.determine())


def test_times_written_in_utc() -> None:
    ep = Episode()
    ep.add(patient_message(received="2026-11-18T15:00:00Z", sent="2026-11-18T14:59:20Z"),
           reply(sent="2026-11-18T20:30:00Z"))
    ep["Encounter/vr"]["period"] = {"start": "2026-11-18T20:10:00Z", "end": "2026-11-18T20:30:00Z"}
    d = ep.determine()
    expect_billable_pt(d)
    assert d.receipt_time == RECEIPT
    assert d.deadline == DEADLINE
    assert d.to_extension()["deadline"] == "2026-11-19T10:00:00-05:00"  # rendered in the practice time zone


def test_utc_receipt_late_friday_local_counts_friday_as_business_day() -> None:
    # 02:00Z on Saturday is Friday 21:00 in New York: 3 h left on Friday, then 21 h on Monday.
    receipt = "2026-11-21T02:00:00Z"
    ep = Episode().add(patient_message(received=receipt, sent=None), reply(sent=at(2026, 11, 23, 20, 59)))
    ep["Encounter/vr"]["period"] = {"start": iso(at(2026, 11, 23, 20, 30))}
    d = ep.determine(now=at(2026, 11, 25, 12))
    assert d.deadline == at(2026, 11, 23, 21)
    expect_billable_pt(d)


def test_dst_change_over_the_weekend() -> None:
    receipt = datetime(2026, 10, 30, 10, tzinfo=TZ)  # Friday, EDT; clocks go back on Sunday 1 Nov
    ep = Episode().add(patient_message(received=receipt, sent=None), reply(sent=at(2026, 11, 2, 9, 30)))
    ep["Encounter/vr"]["period"] = {"start": iso(at(2026, 11, 2, 9))}
    ep["Encounter/office-1"]["period"] = {"start": "2026-09-01T10:00:00-04:00"}
    d = ep.determine(now=at(2026, 11, 4, 12))
    assert d.deadline.isoformat() == "2026-11-02T10:00:00-05:00"
    expect_billable_pt(d)


def test_two_participants_nurse_first_then_pt_bills() -> None:
    # §1/§2.3: the billing practitioner is the one who can bill (PT, G2250); a nurse is clinical staff. fhir-profile
    # "participant.individual = billing Practitioner" + the follow-up "sender billing Practitioner": the PT.
    ep = Episode()
    ep["Encounter/vr"]["participant"] = [
        {"type": [concept(PARTICIPATION, "PART")], "individual": ref("Practitioner/rn1")},
        {"type": [concept(PARTICIPATION, "PPRF")], "individual": ref(PT1)},
    ]
    d = ep.determine()
    expect_billable_pt(d)
    assert d.practitioner == PT1


def test_encounter_without_participant_bills_the_practitioner_the_patient_wrote_to() -> None:
    ep = Episode()
    without_participants(ep["Encounter/vr"])
    d = ep.determine()
    expect_billable_pt(d)
    assert d.practitioner == PT1


def test_icd_codes_without_dot() -> None:
    ep = Episode()
    ep["Encounter/vr"]["reasonCode"] = icd("M25461")
    ep.add(office_visit("office-2", RECEIPT - timedelta(days=3), codes=("M17.11",)))  # unrelated, within 7 days
    expect_billable_pt(ep.determine())


@pytest.mark.parametrize(("vr_code", "prior_code"), [("M545", "M54.50"), ("M54.5", "M5450"), ("m54.5", "M54.59")])
def test_icd_dot_and_no_dot_share_a_category(vr_code: str, prior_code: str) -> None:
    ep = Episode()
    ep["Encounter/vr"]["reasonCode"] = icd(vr_code)
    ep.add(office_visit("office-2", RECEIPT - timedelta(days=3), codes=(prior_code,)))
    d = ep.determine()
    expect(d, no_related_service_prior_7_days="not-met")
    assert "Encounter/office-2" in d.criterion("no-related-service-prior-7-days").evidence


def test_encounter_coded_through_diagnosis_condition() -> None:
    condition = {"resourceType": "Condition", "id": "cond1", "subject": ref(PATIENT), "code": concept(ICD, "M25.461")}
    ep = Episode().add(condition, office_visit("office-2", RECEIPT - timedelta(days=2), codes=(RELATED_CODE,)))
    del ep["Encounter/vr"]["reasonCode"]
    ep["Encounter/vr"]["diagnosis"] = [{"condition": ref("Condition/cond1")}]
    expect(ep.determine(), no_related_service_prior_7_days="not-met")


def test_patient_message_linked_by_part_of_encounter() -> None:
    # §3 patient-submitted-media links: "same Encounter, Communication.inResponseTo/partOf/payload reference".
    # Received Friday 10:00, reviewed Monday 09:00 (71 h later: beyond any timing heuristic), replied Mon 09:30.
    friday = at(2026, 11, 20, 10)
    ep = Episode().add(
        patient_message(received=friday, sent=None, encounter=None, partOf=[ref("Encounter/vr")]),
        reply(sent=at(2026, 11, 23, 9, 30), in_response_to=()),
    )
    ep["Encounter/vr"]["period"] = {"start": iso(at(2026, 11, 23, 9)), "end": iso(at(2026, 11, 23, 9, 30))}
    d = ep.determine(now=at(2026, 11, 25, 12))
    expect_billable_pt(d)
    assert d.receipt_time == friday


def test_standalone_media_linked_by_part_of_encounter() -> None:
    # §3 links: "... or Media.basedOn/partOf". Same weekend timing as above.
    friday = at(2026, 11, 20, 10)
    media = {"resourceType": "Media", "id": "m1", "status": "completed", "subject": ref(PATIENT),
             "operator": ref(PATIENT), "partOf": [ref("Encounter/vr")], "issued": iso(friday),
             "content": {"contentType": "image/jpeg", "url": "https://portal.example.org/u/m1.jpg"}}
    ep = Episode().remove("Communication/in").add(media, reply(sent=at(2026, 11, 23, 9, 30), in_response_to=()))
    ep["Encounter/vr"]["period"] = {"start": iso(at(2026, 11, 23, 9)), "end": iso(at(2026, 11, 23, 9, 30))}
    expect_billable_pt(ep.determine(now=at(2026, 11, 25, 12)))


def test_two_untyped_participants_nurse_first_then_pt_bills() -> None:
    ep = Episode()
    ep["Encounter/vr"]["participant"] = [{"individual": ref("Practitioner/rn1")}, {"individual": ref(PT1)}]
    d = ep.determine()
    expect_billable_pt(d)
    assert d.practitioner == PT1


def test_standalone_media_with_only_created_time() -> None:
    media = {"resourceType": "Media", "id": "m1", "status": "completed", "subject": ref(PATIENT),
             "operator": ref(PATIENT), "encounter": ref("Encounter/vr"), "createdDateTime": iso(RECEIPT),
             "content": {"contentType": "video/quicktime", "url": "https://portal.example.org/u/m1.mov"}}
    d = Episode().remove("Communication/in").add(media, reply(in_response_to=())).determine()
    expect_billable_pt(d)
    assert d.receipt_time == RECEIPT


def test_message_without_times_takes_receipt_from_referenced_media_issued() -> None:
    media = {"resourceType": "Media", "id": "m1", "status": "completed", "subject": ref(PATIENT),
             "issued": iso(RECEIPT), "createdDateTime": iso(RECEIPT - timedelta(days=2)),
             "content": {"contentType": "image/jpeg", "url": "https://portal.example.org/u/m1.jpg"}}
    message = patient_message(received=None, sent=None, payload=({"contentReference": ref("Media/m1")},))
    d = Episode().add(media, message).determine()
    assert d.receipt_time == RECEIPT
    expect_billable_pt(d)


# --- established-patient ------------------------------------------------------------------------------------------


def _only_prior(ep: Episode, visit: dict[str, Any]) -> Episode:
    return ep.remove("Encounter/office-1").add(visit)


def test_new_patient_last_visit_three_years_and_a_day_before_receipt() -> None:
    ep = _only_prior(Episode(), office_visit("old", at(2023, 11, 17, 10)))  # receipt 2026-11-18 10:00 − 3 y − 1 d
    d = ep.determine()
    expect(d, established_patient="not-met")
    assert d.status == "not-billable"
    assert d.code == "G2250"  # §6: the code is present whatever the status


def test_established_last_visit_three_years_less_a_day_before_receipt() -> None:
    ep = _only_prior(Episode(), office_visit("old", at(2023, 11, 19, 10)))
    expect_billable_pt(ep.determine())


def test_no_prior_visit_at_all_is_a_new_patient() -> None:
    d = Episode().remove("Encounter/office-1").determine()
    expect(d, established_patient="not-met")


def test_established_by_colleague_of_same_specialty_in_same_organization() -> None:
    ep = _only_prior(Episode(), office_visit("old", at(2025, 6, 2, 10), who=("Practitioner/pt2",)))
    d = ep.determine()
    expect_billable_pt(d)
    assert "Encounter/old" in d.criterion("established-patient").evidence


def test_colleague_of_same_specialty_in_another_organization_does_not_establish() -> None:
    ep = _only_prior(Episode(), office_visit("old", at(2025, 6, 2, 10), who=("Practitioner/pt-other",)))
    ep["Encounter/old"]["serviceProvider"] = ref("Organization/org-other")
    expect(ep.determine(), established_patient="not-met")


def test_colleague_of_other_specialty_in_same_organization_does_not_establish() -> None:
    ep = _only_prior(Episode(), office_visit("old", at(2025, 6, 2, 10), who=("Practitioner/rn1",)))
    expect(ep.determine(), established_patient="not-met")


def test_cancelled_prior_visit_does_not_establish() -> None:
    ep = _only_prior(Episode(), office_visit("old", at(2025, 6, 2, 10), status="cancelled"))
    expect(ep.determine(), established_patient="not-met")


# --- patient-submitted-media --------------------------------------------------------------------------------------


def test_text_only_message_is_not_media() -> None:
    d = Episode().add(patient_message(payload=(TEXT,))).determine()
    expect(d, patient_submitted_media="not-met")
    assert d.status == "not-billable"


def test_pdf_attachment_is_not_media() -> None:
    pdf = {"contentAttachment": {"contentType": "application/pdf", "url": "https://portal.example.org/u/form.pdf"}}
    expect(Episode().add(patient_message(payload=(TEXT, pdf))).determine(), patient_submitted_media="not-met")


def test_related_person_caregiver_sender_qualifies() -> None:
    caregiver = {"resourceType": "RelatedPerson", "id": "rp1", "patient": ref(PATIENT), "name": [{"family": "Vance"}]}
    d = Episode().add(caregiver, patient_message(sender="RelatedPerson/rp1")).determine()
    expect_billable_pt(d)


def test_no_submission_linked_to_the_encounter() -> None:
    d = Episode().remove("Communication/in").add(reply(in_response_to=())).determine()
    assert d.criterion("patient-submitted-media").status == "not-met"
    assert d.status == "not-billable"


# --- practitioner-interpretation and follow-up-within-24-business-hours ------------------------------------------


def test_follow_up_by_nurse_only_after_deadline() -> None:
    d = Episode().add(reply(sender="Practitioner/rn1")).determine()
    expect(d, practitioner_interpretation="not-met", follow_up_within_24_business_hours="not-met")
    assert (d.status, d.code, d.modifiers) == ("not-billable", "G2250", ("GP",))


def test_follow_up_by_nurse_only_before_deadline_is_pending() -> None:
    d = Episode().add(reply(sender="Practitioner/rn1")).determine(now=FOLLOW_UP + timedelta(minutes=5))
    expect(d, practitioner_interpretation="pending", follow_up_within_24_business_hours="pending")
    assert d.status == "pending"


def test_nurse_answers_first_then_pt_in_time() -> None:
    ep = Episode().add(reply("nurse", sender="Practitioner/rn1", sent=RECEIPT + timedelta(minutes=20)))
    d = ep.determine()
    expect_billable_pt(d)
    assert d.follow_up == "Communication/out"


def test_practitioner_message_before_receipt_is_not_the_follow_up() -> None:
    # "Please send me a photo" at 09:00 is not a follow-up to a photo received at 10:00.
    ep = Episode().add(reply("ask", sent=RECEIPT - timedelta(hours=1), in_response_to=()))
    d = ep.determine()
    expect_billable_pt(d)
    assert d.follow_up == "Communication/out"


def test_unsent_draft_reply_is_not_a_follow_up() -> None:
    draft = reply()
    draft["status"] = "preparation"
    d = Episode().add(draft).determine()
    expect(d, practitioner_interpretation="not-met", follow_up_within_24_business_hours="not-met")


def test_patient_message_entered_in_error_is_not_a_submission() -> None:
    message = patient_message()
    message["status"] = "entered-in-error"
    d = Episode().add(message).determine()
    assert d.criterion("patient-submitted-media").status == "not-met"


def test_follow_up_exactly_at_deadline_is_on_time() -> None:
    d = Episode().add(reply(sent=DEADLINE)).determine(now=DEADLINE + timedelta(days=1))
    expect_billable_pt(d)


def test_follow_up_one_minute_after_deadline_is_late() -> None:
    d = Episode().add(reply(sent=DEADLINE + timedelta(minutes=1))).determine(now=DEADLINE + timedelta(days=1))
    # The PT did reply personally, so the interpretation is theirs; only the timing fails.
    expect(d, follow_up_within_24_business_hours="not-met")
    assert d.status == "not-billable"


@pytest.mark.parametrize(("sent", "status"), [(at(2026, 11, 23, 23, 59), "met"), (at(2026, 11, 24, 0), "met"),
                                              (at(2026, 11, 24, 0, 1), "not-met")])
def test_weekend_receipt_counts_from_monday_midnight(sent: datetime, status: str) -> None:
    saturday = at(2026, 11, 21, 10)
    ep = Episode().add(patient_message(received=saturday, sent=None), reply(sent=sent))
    ep["Encounter/vr"]["period"] = {"start": iso(at(2026, 11, 23, 9))}
    d = ep.determine(now=at(2026, 11, 27, 12))
    assert d.deadline == at(2026, 11, 24, 0)  # Mon 00:00 + 24 h
    expect(d, follow_up_within_24_business_hours=status)


def test_holiday_receipt_counts_from_next_business_day_midnight() -> None:
    thanksgiving = at(2026, 11, 26, 10)
    ep = Episode().add(patient_message(received=thanksgiving, sent=None), reply(sent=at(2026, 11, 27, 23, 30)))
    ep["Encounter/vr"]["period"] = {"start": iso(at(2026, 11, 27, 23))}
    d = ep.determine(now=at(2026, 12, 1, 12))
    assert d.deadline == at(2026, 11, 28, 0)  # Fri 27 Nov 00:00 + 24 h
    expect_billable_pt(d)


def test_holiday_eve_receipt_skips_the_holiday() -> None:
    ep = Episode().add(patient_message(received=at(2026, 11, 25, 15), sent=None), reply(sent=at(2026, 11, 27, 15, 1)))
    ep["Encounter/vr"]["period"] = {"start": iso(at(2026, 11, 27, 14))}
    d = ep.determine(now=at(2026, 12, 1, 12))
    assert d.deadline == at(2026, 11, 27, 15)  # 9 h Wed + 15 h Fri (Thanksgiving skipped)
    expect(d, follow_up_within_24_business_hours="not-met")


def test_pending_before_deadline_without_follow_up() -> None:
    now = at(2026, 11, 18, 14)
    ep = Episode().remove("Communication/out")
    ep["Encounter/vr"]["status"] = "in-progress"
    d = ep.determine(now=now)
    expect(d, practitioner_interpretation="pending", follow_up_within_24_business_hours="pending")
    assert (d.status, d.code, d.modifiers, d.deadline) == ("pending", "G2250", ("GP",), DEADLINE)
    assert d.criterion("follow-up-within-24-business-hours").facts["business_hours_left"] == 20.0


def test_pending_with_interpretation_observation_by_practitioner() -> None:
    ep = Episode().remove("Communication/out").add(observation())
    d = ep.determine(now=at(2026, 11, 18, 14))
    expect(d, follow_up_within_24_business_hours="pending")
    assert d.status == "pending"
    assert "Observation/obs" in d.criterion("practitioner-interpretation").evidence


def test_interpretation_linked_by_derived_from_media() -> None:
    media = {"resourceType": "Media", "id": "m1", "status": "completed", "subject": ref(PATIENT),
             "content": {"contentType": "image/jpeg", "url": "https://portal.example.org/u/m1.jpg"}}
    ep = Episode().remove("Communication/out").add(
        media, patient_message(payload=({"contentReference": ref("Media/m1")},)),
        observation(encounter=None, derived_from="Media/m1"))
    d = ep.determine(now=at(2026, 11, 18, 14))
    expect(d, follow_up_within_24_business_hours="pending")


def test_pending_with_interpretation_by_nurse_stays_pending() -> None:
    ep = Episode().remove("Communication/out").add(observation(performer="Practitioner/rn1"))
    d = ep.determine(now=at(2026, 11, 18, 14))
    expect(d, practitioner_interpretation="pending", follow_up_within_24_business_hours="pending")


def test_no_follow_up_after_deadline_both_not_met() -> None:
    d = Episode().remove("Communication/out").determine(now=DEADLINE + timedelta(minutes=1))
    expect(d, practitioner_interpretation="not-met", follow_up_within_24_business_hours="not-met")
    assert d.status == "not-billable"


def test_interpretation_but_no_follow_up_after_deadline_is_not_billable() -> None:
    # §3 says an interpretation by the practitioner meets practitioner-interpretation; §6 says "after the deadline
    # with no follow-up, both are not-met". Ambiguous for that criterion; only the follow-up and status are asserted.
    d = Episode().remove("Communication/out").add(observation()).determine()
    assert d.criterion("follow-up-within-24-business-hours").status == "not-met"
    assert d.status == "not-billable"


# --- no-related-service-prior-7-days ------------------------------------------------------------------------------


@pytest.mark.parametrize(("hours_before", "status"), [(1, "not-met"), (167, "not-met"), (169, "met")])
def test_related_prior_visit_window(hours_before: int, status: str) -> None:
    visit = office_visit("prior", RECEIPT - timedelta(hours=hours_before), codes=(RELATED_CODE,))
    d = Episode().add(visit).determine()
    expect(d, no_related_service_prior_7_days=status)


def test_related_prior_visit_exactly_168_hours_before_counts() -> None:
    # "in the 7 × 24 h before receipt": the engine includes the boundary instant; a defensible reading.
    visit = office_visit("prior", RECEIPT - timedelta(hours=168), codes=(RELATED_CODE,))
    expect(Episode().add(visit).determine(), no_related_service_prior_7_days="not-met")


def test_uncoded_prior_visit_is_unknown() -> None:
    d = Episode().add(office_visit("prior", RECEIPT - timedelta(days=2), codes=())).determine()
    expect(d, no_related_service_prior_7_days="unknown")
    assert d.status == "needs-review"
    assert d.code == "G2250"


def test_unrelated_coded_prior_visit_is_ignored() -> None:
    d = Episode().add(office_visit("prior", RECEIPT - timedelta(days=2), codes=(UNRELATED_CODE,))).determine()
    expect_billable_pt(d)


def test_related_prior_visit_of_another_practitioner_is_ignored_by_default() -> None:
    visit = office_visit("prior", RECEIPT - timedelta(days=2), codes=(RELATED_CODE,), who=("Practitioner/pt2",))
    expect_billable_pt(Episode().add(visit).determine())


def test_related_prior_visit_of_colleague_counts_with_organization_scope() -> None:
    rules = load_rules_data({"settings": {"prior_service_scope": "organization"}})
    visit = office_visit("prior", RECEIPT - timedelta(days=2), codes=(RELATED_CODE,), who=("Practitioner/pt2",))
    expect(Episode().add(visit).determine(rules=rules), no_related_service_prior_7_days="not-met")


def test_related_prior_procedure_counts() -> None:
    procedure = {"resourceType": "Procedure", "id": "proc1", "status": "completed", "subject": ref(PATIENT),
                 "performedDateTime": iso(RECEIPT - timedelta(days=3)), "performer": [{"actor": ref(PT1)}],
                 "reasonCode": icd(RELATED_CODE)}
    expect(Episode().add(procedure).determine(), no_related_service_prior_7_days="not-met")


def test_related_procedure_only_recorded_by_the_practitioner_is_out_of_scope() -> None:
    # §6 "Prior 7 days": scope practitioner = "services where the billing practitioner is a participant or
    # performer". A colleague performed it; the PT only keyed it in (recorder).
    procedure = {"resourceType": "Procedure", "id": "proc1", "status": "completed", "subject": ref(PATIENT),
                 "performedDateTime": iso(RECEIPT - timedelta(days=3)),
                 "performer": [{"actor": ref("Practitioner/pt2")}], "recorder": ref(PT1),
                 "reasonCode": icd(RELATED_CODE)}
    expect_billable_pt(Episode().add(procedure).determine())


def test_cancelled_related_prior_visit_is_ignored() -> None:
    visit = office_visit("prior", RECEIPT - timedelta(days=2), codes=(RELATED_CODE,), status="cancelled")
    expect_billable_pt(Episode().add(visit).determine())


# --- no-resulting-service -----------------------------------------------------------------------------------------

CREATED = FOLLOW_UP + timedelta(minutes=10)


def test_appointment_within_24_hours_of_follow_up() -> None:
    appt = appointment("a1", at(2026, 11, 19, 9), created=CREATED, codes=(RELATED_CODE,))
    d = Episode().add(appt).determine()
    expect(d, no_resulting_service="not-met")
    assert "Appointment/a1" in d.criterion("no-resulting-service").evidence


def _slots(*extra: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """Schedule of pt1 with busy slots every business day until Mon 23 Nov 09:00 (the booked one)."""
    busy = [slot(f"busy-{i}", start, "busy") for i, start in enumerate(
        [at(2026, 11, 19, 9), at(2026, 11, 19, 14), at(2026, 11, 20, 9), at(2026, 11, 20, 14)])]
    return (schedule(), *busy, slot("booked", at(2026, 11, 23, 9), "busy"), *extra)


def test_soonest_slot_beyond_24_hours_is_resulting() -> None:
    appt = appointment("a1", at(2026, 11, 23, 9), created=CREATED, slot="Slot/booked")
    d = Episode().add(*_slots(), appt).determine(now=at(2026, 11, 23, 12))
    expect(d, no_resulting_service="not-met")


def test_earlier_free_slot_means_not_resulting() -> None:
    appt = appointment("a1", at(2026, 11, 23, 9), created=CREATED, slot="Slot/booked")
    d = Episode().add(*_slots(slot("free-fri", at(2026, 11, 20, 11), "free")), appt).determine(now=at(2026, 11, 23, 12))
    expect_billable_pt(d)


def test_free_slot_only_30_minutes_earlier_is_within_tolerance() -> None:
    appt = appointment("a1", at(2026, 11, 23, 9), created=CREATED, slot="Slot/booked")
    extra = slot("free-early", at(2026, 11, 23, 8, 30), "free", minutes=30)
    d = Episode().add(*_slots(extra), appt).determine(now=at(2026, 11, 23, 12))
    expect(d, no_resulting_service="not-met")


def test_free_slot_before_the_appointment_was_created_does_not_count() -> None:
    appt = appointment("a1", at(2026, 11, 23, 9), created=CREATED, slot="Slot/booked")
    extra = slot("free-past", at(2026, 11, 18, 13), "free")  # before the booking: no longer available
    d = Episode().add(*_slots(extra), appt).determine(now=at(2026, 11, 23, 12))
    expect(d, no_resulting_service="not-met")


def test_schedule_of_practitioner_role_is_the_practitioners_schedule() -> None:
    appt = appointment("a1", at(2026, 11, 23, 9), created=CREATED, slot="Slot/booked")
    ep = Episode().add(*_slots(), appt)
    ep.add(schedule(actor="PractitionerRole/role-pt1"))
    expect(ep.determine(now=at(2026, 11, 23, 12)), no_resulting_service="not-met")


def test_no_slot_data_and_created_within_two_business_days_is_unknown() -> None:
    appt = appointment("a1", at(2026, 11, 30, 9), created=at(2026, 11, 20, 9))
    d = Episode().add(appt).determine(now=at(2026, 11, 23, 12))
    expect(d, no_resulting_service="unknown")
    assert d.status == "needs-review"


def test_no_slot_data_and_created_after_two_business_days_is_ignored() -> None:
    appt = appointment("a1", at(2026, 12, 7, 9), created=at(2026, 11, 23, 10))  # follow-up Wed 15:30 + 2 bd = Fri
    d = Episode().add(appt).determine(now=at(2026, 11, 24, 12))
    expect_billable_pt(d)


def test_cancelled_appointment_is_ignored() -> None:
    appt = appointment("a1", at(2026, 11, 19, 9), created=CREATED, status="cancelled", codes=(RELATED_CODE,))
    expect_billable_pt(Episode().add(appt).determine())


def test_appointment_for_unrelated_coded_reason_is_ignored() -> None:
    appt = appointment("a1", at(2026, 11, 19, 9), created=CREATED, codes=(UNRELATED_CODE,))
    expect_billable_pt(Episode().add(appt).determine())


def test_uncoded_appointment_is_presumed_related() -> None:
    appt = appointment("a1", at(2026, 11, 19, 9), created=CREATED)
    expect(Episode().add(appt).determine(), no_resulting_service="not-met")


def test_proposed_appointment_without_created_is_taken_as_created_now() -> None:
    # §6: "a proposed appointment without created is taken as created now" (appointment-book).
    appt = appointment("a1", at(2026, 11, 19, 9), created=None, status="proposed")
    expect(Episode().add(appt).determine(now=FOLLOW_UP + timedelta(hours=1)), no_resulting_service="not-met")


def test_proposed_appointment_at_the_soonest_slot() -> None:
    appt = appointment("a1", at(2026, 11, 23, 9), created=None, status="proposed")
    ep = Episode().add(*_slots(), appt)
    ep["Slot/booked"]["status"] = "free"  # the slot being booked is still free: it is the appointment's own
    ep["Appointment/a1"]["slot"] = [ref("Slot/booked")]
    expect(ep.determine(now=FOLLOW_UP + timedelta(hours=1)), no_resulting_service="not-met")


def test_appointment_booked_before_receipt_is_not_resulting() -> None:
    appt = appointment("a1", at(2026, 11, 19, 9), created=RECEIPT - timedelta(days=5), codes=(RELATED_CODE,))
    expect_billable_pt(Episode().add(appt).determine())


def test_appointment_with_practitioner_role_actor() -> None:
    appt = appointment("a1", at(2026, 11, 19, 9), created=CREATED, who="PractitionerRole/role-pt1")
    expect(Episode().add(appt).determine(), no_resulting_service="not-met")


@pytest.mark.parametrize(("codes", "status"), [((RELATED_CODE,), "not-met"), ((), "unknown"),
                                               ((UNRELATED_CODE,), "met")])
def test_visit_within_24_hours_after_follow_up(codes: tuple[str, ...], status: str) -> None:
    visit = office_visit("next", at(2026, 11, 19, 11), codes=codes)
    expect(Episode().add(visit).determine(), no_resulting_service=status)


def test_related_visit_more_than_24_hours_after_follow_up_is_not_resulting() -> None:
    visit = office_visit("next", FOLLOW_UP + timedelta(hours=25), codes=(RELATED_CODE,))
    expect_billable_pt(Episode().add(visit).determine(now=at(2026, 11, 23, 12)))


# --- consent-documented -------------------------------------------------------------------------------------------


def test_consent_missing() -> None:
    d = Episode().remove("Consent/consent").determine()
    expect(d, consent_documented="not-met")
    assert d.status == "not-billable"


@pytest.mark.parametrize("change", [
    {"when": at(2025, 10, 18, 10)},  # 13 months before the follow-up
    {"when": FOLLOW_UP + timedelta(minutes=5)},  # dated after the follow-up
    {"provision": "deny"},
    {"status": "inactive"},
    {"status": "entered-in-error"},
    {"category": (LOINC, "64292-6")},  # a release-of-information consent, not 59284-0
], ids=["13-months-old", "after-follow-up", "deny", "inactive", "entered-in-error", "wrong-category"])
def test_consent_not_counting(change: dict[str, Any]) -> None:
    expect(Episode().add(consent(**change)).determine(), consent_documented="not-met")


def test_consent_of_another_patient_does_not_count() -> None:
    expect(Episode().add(consent(patient="Patient/p2")).determine(), consent_documented="not-met")


@pytest.mark.parametrize("when", [at(2026, 11, 18, 9), FOLLOW_UP, at(2025, 12, 1, 9)],
                         ids=["time-of-service", "at-follow-up", "11-months-old"])
def test_consent_counting(when: datetime) -> None:
    expect_billable_pt(Episode().add(consent(when=when)).determine())


def test_consent_with_wrong_scope_does_not_count() -> None:
    ep = Episode()
    ep["Consent/consent"]["scope"] = concept(SCOPE, "research")
    expect(ep.determine(), consent_documented="not-met")


# --- billing-practitioner-eligible (§4) ---------------------------------------------------------------------------

ELIGIBILITY = [
    # NUCC code, criterion status, code, modifiers, overall status
    ("207N00000X", "met", "G2010", (), "billable"),  # dermatology
    ("207Q00000X", "met", "G2010", (), "billable"),  # family medicine
    ("207R00000X", "met", "G2010", (), "billable"),  # internal medicine
    ("208000000X", "met", "G2010", (), "billable"),  # pediatrics
    ("363L00000X", "met", "G2010", (), "billable"),  # nurse practitioner
    ("363A00000X", "met", "G2010", (), "billable"),  # physician assistant
    ("364S00000X", "met", "G2010", (), "billable"),  # clinical nurse specialist
    ("367A00000X", "met", "G2010", (), "billable"),  # certified nurse-midwife
    ("213E00000X", "met", "G2010", (), "billable"),  # podiatrist
    ("152W00000X", "met", "G2010", (), "billable"),  # optometrist
    ("225100000X", "met", "G2250", ("GP",), "billable"),  # physical therapist
    ("2251X0800X", "met", "G2250", ("GP",), "billable"),  # PT, orthopedic
    ("225X00000X", "met", "G2250", ("GO",), "billable"),  # occupational therapist
    ("235Z00000X", "met", "G2250", ("GN",), "billable"),  # speech-language pathologist
    ("103TC0700X", "met", "G2250", (), "billable"),  # clinical psychologist
    ("1041C0700X", "met", "G2250", (), "billable"),  # clinical social worker
    ("231H00000X", "not-met", None, (), "not-billable"),  # audiologist
    ("133V00000X", "unknown", None, (), "needs-review"),  # registered dietitian: verify
    ("106H00000X", "unknown", None, (), "needs-review"),  # marriage and family therapist: verify
    ("101YM0800X", "unknown", None, (), "needs-review"),  # mental health counselor: verify
    # Therapy assistants reviewing and replying alone (§7): no code of their own, and the work is not the
    # supervising therapist's — practitioner-interpretation not-met, so not billable.
    ("225200000X", "unknown", None, (), "not-billable"),  # physical therapy assistant
    ("224Z00000X", "unknown", None, (), "not-billable"),  # occupational therapy assistant
    ("163W00000X", "unknown", None, (), "needs-review"),  # registered nurse: anything else, verify
]


@pytest.mark.parametrize(("nucc", "status", "code", "modifiers", "overall"), ELIGIBILITY,
                         ids=[row[0] for row in ELIGIBILITY])
def test_practitioner_type_decides_code(nucc: str, status: str, code: str | None, modifiers: tuple[str, ...],
                                        overall: str) -> None:
    ep = Episode().add(*practitioner("pt1", nucc))
    d = ep.determine()
    assert d.criterion("billing-practitioner-eligible").status == status
    assert (d.code, d.modifiers, d.status) == (code, modifiers, overall)
    if code is None:
        # No code to check coverage for: the payer criterion cannot be "met" (a silent yes); everything else is,
        # but an assistant's own review (billing-rules.md §7).
        assistant = {"practitioner_interpretation": "not-met"} if nucc[:4] in ("2252", "224Z") else {}
        expect(d, billing_practitioner_eligible=status, payer_covers_code="unknown", **assistant)
        assert "code" not in d.to_extension()
        assert "modifiers" not in d.to_extension()
    else:
        expect(d)
        assert d.to_extension()["code"] == code


@pytest.mark.parametrize("nucc", [row[0] for row in ELIGIBILITY])
def test_modifiers_never_include_telehealth_or_surgical_ones(nucc: str) -> None:
    d = Episode().add(*practitioner("pt1", nucc)).determine()
    assert not set(d.modifiers) & FORBIDDEN
    if not nucc.startswith("224Z"):
        assert "CO" not in d.modifiers  # CO is the OTA modifier, never a catastrophe modifier


def test_e_m_capable_role_wins_over_therapist_role() -> None:
    # §1: a practitioner who can report E/M bills G2010 (an MD also listed as a PT).
    ep = Episode()
    ep["PractitionerRole/role-pt1"]["code"].append(concept(NUCC, "207Q00000X"))
    d = ep.determine()
    assert (d.code, d.modifiers) == ("G2010", ())


def test_inactive_role_is_ignored() -> None:
    ep = Episode()
    ep.add({"resourceType": "PractitionerRole", "id": "role-pt1-old", "active": False,
            "practitioner": ref(PT1), "code": [concept(NUCC, "207Q00000X")]})
    d = ep.determine()
    expect_billable_pt(d)


def test_practitioner_without_any_role_is_verify() -> None:
    d = Episode().remove("PractitionerRole/role-pt1").determine()
    assert d.criterion("billing-practitioner-eligible").status == "unknown"
    assert d.code is None


def test_practitioner_type_from_qualification() -> None:
    # fhir-profile.md, Practitioner type: "PractitionerRole.code/specialty with NUCC taxonomy;
    # Practitioner.qualification"
    ep = Episode().remove("PractitionerRole/role-pt1")
    ep["Practitioner/pt1"]["qualification"] = [{"code": concept(NUCC, PT_CODE)}]
    expect_billable_pt(ep.determine())


# --- payer-covers-code (§5, §6) -----------------------------------------------------------------------------------


def test_medicare_ffs_by_sopt_121() -> None:
    d = Episode().determine()
    assert d.criterion("payer-covers-code").status == "met"
    assert d.payer_profile == "medicare-ffs"


def test_medicare_ffs_by_payer_name_only() -> None:
    ep = Episode().add(organization("org-payer-medicare", "Medicare"), coverage(sopt=None))
    expect_billable_pt(ep.determine())


def test_medicare_ffs_by_payor_display_only() -> None:
    cov = coverage(sopt=None)
    cov["payor"] = [{"display": "MEDICARE PART B"}]
    expect_billable_pt(Episode().add(cov).determine())


@pytest.mark.parametrize("name", ["Humana Medicare Advantage", "Aetna Medicare Advantage"])
def test_medicare_advantage_by_name_is_verify(name: str) -> None:
    ep = Episode().add(organization("org-payer-x", name), coverage(payor="Organization/org-payer-x", sopt=None))
    d = ep.determine()
    expect(d, payer_covers_code="unknown")
    assert d.payer_profile == "medicare-advantage"


@pytest.mark.parametrize(("code", "status"), [("1", "met"), ("12", "met"), ("121", "met"), ("129", "met"),
                                              ("11", "unknown"), ("111", "unknown"), ("119", "unknown"),
                                              ("2", "unknown"), ("511", "unknown")])
def test_sopt_codes_of_section_6(code: str, status: str) -> None:
    ep = Episode().add(organization("org-payer-x", "State Health Plan"),
                       coverage(payor="Organization/org-payer-x", sopt=code))
    expect(ep.determine(), payer_covers_code=status)


def test_sopt_code_on_coverage_class() -> None:
    plan_class = [{"type": concept(SOPT, "121"), "value": "MBI-1EG4-TE5-MK73"}]
    ep = Episode().add(organization("org-payer-x", "CMS"),
                       coverage(payor="Organization/org-payer-x", sopt=None, **{"class": plan_class}))
    expect_billable_pt(ep.determine())


def test_medicare_advantage_by_sopt_is_verify() -> None:
    expect(Episode().add(coverage(sopt="111")).determine(), payer_covers_code="unknown")


def test_aetna_self_insured_by_sopt_522_is_not_covered() -> None:
    ep = Episode().add(organization("org-payer-aetna", "Aetna"),
                       coverage(payor="Organization/org-payer-aetna", sopt="522"))
    d = ep.determine()
    expect(d, payer_covers_code="not-met")
    assert d.status == "not-billable"


def test_aetna_self_insured_marked_on_class_is_not_covered() -> None:
    plan_class = [{"type": concept("http://terminology.hl7.org/CodeSystem/coverage-class", "plan"),
                   "value": "ACME-ASO-01", "name": "ACME Corp self-funded plan"}]
    ep = Episode().add(organization("org-payer-aetna", "Aetna Life Insurance Company"),
                       coverage(payor="Organization/org-payer-aetna", sopt=None, **{"class": plan_class}))
    expect(ep.determine(), payer_covers_code="not-met")


def test_aetna_otherwise_is_verify() -> None:
    ep = Episode().add(organization("org-payer-aetna", "Aetna"),
                       coverage(payor="Organization/org-payer-aetna", sopt="511"))
    expect(ep.determine(), payer_covers_code="unknown")


@pytest.mark.parametrize("name", ["UnitedHealthcare", "UHC Choice Plus", "Cigna", "Anthem Blue Cross", "BCBS of NY"])
def test_commercial_payers_are_verify(name: str) -> None:
    ep = Episode().add(organization("org-payer-x", name), coverage(payor="Organization/org-payer-x", sopt=None))
    expect(ep.determine(), payer_covers_code="unknown")


def test_unknown_payer_is_unknown() -> None:
    ep = Episode().add(organization("org-payer-x", "Acme Health Plan"),
                       coverage(payor="Organization/org-payer-x", sopt=None))
    expect(ep.determine(), payer_covers_code="unknown")


def test_no_coverage_is_unknown() -> None:
    d = Episode().remove("Coverage/cov").determine()
    expect(d, payer_covers_code="unknown")
    assert d.status == "needs-review"


def test_expired_coverage_is_unknown() -> None:
    expect(Episode().add(coverage(start="2025-01-01", end="2025-12-31")).determine(), payer_covers_code="unknown")


def test_cancelled_coverage_is_unknown() -> None:
    expect(Episode().add(coverage(status="cancelled")).determine(), payer_covers_code="unknown")


def test_coverage_of_another_beneficiary_is_unknown() -> None:
    expect(Episode().add(coverage(beneficiary="Patient/p2")).determine(), payer_covers_code="unknown")


def test_coverage_ending_on_the_service_day_is_active() -> None:
    # FHIR R4 Period: "The end value includes any matching date/time", so end 2026-11-18 covers the whole day.
    expect_billable_pt(Episode().add(coverage(end="2026-11-18")).determine())


# --- not-already-billed -------------------------------------------------------------------------------------------


def test_charge_item_for_this_encounter() -> None:
    d = Episode().add(charge("chg", "G2250", context="Encounter/vr", when=FOLLOW_UP)).determine()
    expect(d, not_already_billed="not-met")
    assert d.existing_charges == ("ChargeItem/chg",)


def test_charge_item_for_this_submission_via_supporting_information() -> None:
    d = Episode().add(charge("chg", "G2010", supporting=("Communication/in",))).determine()
    expect(d, not_already_billed="not-met")


def test_charge_item_entered_in_error_is_ignored() -> None:
    chg = charge("chg", "G2250", context="Encounter/vr", when=FOLLOW_UP, status="entered-in-error")
    d = Episode().add(chg).determine()
    expect_billable_pt(d)
    assert d.existing_charges == ()


def test_charge_item_of_another_patient_is_ignored() -> None:
    chg = charge("chg", "G2250", context="Encounter/vr", when=FOLLOW_UP, subject="Patient/p2")
    expect_billable_pt(Episode().add(chg).determine())


@pytest.mark.parametrize(("codes", "status"), [((RELATED_CODE,), "not-met"), ((UNRELATED_CODE,), "met"),
                                               ((), "unknown")])
def test_e_visit_within_7_days(codes: tuple[str, ...], status: str) -> None:
    chg = charge("ev", "99422", system=CPT, when=RECEIPT - timedelta(days=3), codes=codes)
    expect(Episode().add(chg).determine(), not_already_billed=status)


def test_e_visit_coded_through_its_encounter() -> None:
    ev_encounter = encounter("ev-enc", RECEIPT - timedelta(days=3), cls="VR", who=("Practitioner/pt2",),
                             codes=(RELATED_CODE,))
    chg = charge("ev", "98971", system=CPT, when=RECEIPT - timedelta(days=3), context="Encounter/ev-enc")
    expect(Episode().add(ev_encounter, chg).determine(), not_already_billed="not-met")


def test_e_visit_more_than_7_days_before_is_ignored() -> None:
    chg = charge("ev", "99422", system=CPT, when=RECEIPT - timedelta(days=8), codes=(RELATED_CODE,))
    expect_billable_pt(Episode().add(chg).determine())


@pytest.mark.parametrize("link", [{"context": "Encounter/vr"}, {"supporting": ("Communication/out",)}],
                         ids=["context", "supporting-information"])
def test_check_in_code_for_the_follow_up(link: dict[str, Any]) -> None:
    chg = charge("chk", "G2252", when=FOLLOW_UP, **link)
    expect(Episode().add(chg).determine(), not_already_billed="not-met")


def test_claim_item_for_this_encounter() -> None:
    # §3 not-already-billed: "no ChargeItem/Claim item with G2250/G2010 for the same submission";
    # fhir-profile.md "Already billed ... Also accept Claim.item.productOrService".
    claim = {"resourceType": "Claim", "id": "claim1", "status": "active",
             "type": concept("http://terminology.hl7.org/CodeSystem/claim-type", "professional"),
             "use": "claim", "patient": ref(PATIENT), "created": iso(FOLLOW_UP), "provider": ref(PT1),
             "priority": concept("http://terminology.hl7.org/CodeSystem/processpriority", "normal"),
             "insurance": [{"sequence": 1, "focal": True, "coverage": ref("Coverage/cov")}],
             "item": [{"sequence": 1, "productOrService": concept(HCPCS, "G2250"),
                       "modifier": [concept(HCPCS, "GP")], "servicedDate": "2026-11-18",
                       "encounter": [ref("Encounter/vr")]}]}
    expect(Episode().add(claim).determine(), not_already_billed="not-met")


# --- grouping -----------------------------------------------------------------------------------------------------


def test_several_images_over_two_days_are_one_assessment_with_first_receipt() -> None:
    later = patient_message("in-2", received=at(2026, 11, 18, 16), sent=None, encounter=None)
    media = {"resourceType": "Media", "id": "m3", "status": "completed", "subject": ref(PATIENT),
             "operator": ref(PATIENT), "issued": iso(at(2026, 11, 19, 9)),
             "content": {"contentType": "image/jpeg", "url": "https://portal.example.org/u/m3.jpg"}}
    ep = Episode().add(later, media, reply(sent=at(2026, 11, 19, 9, 30)))
    ep["Encounter/vr"]["period"] = {"start": iso(at(2026, 11, 19, 9, 10))}
    everything = ep.determine_all()
    assert len(everything) == 1
    d = ep.determine()
    assert set(d.submissions) >= {"Communication/in", "Communication/in-2", "Media/m3"}
    assert d.receipt_time == RECEIPT
    assert d.deadline == DEADLINE
    expect_billable_pt(d)


def test_reply_after_second_image_but_late_for_the_first_is_late() -> None:
    # The clock runs from the first receipt (§3): a reply on time for a later image is late for the episode.
    later = patient_message("in-2", received=at(2026, 11, 19, 8), sent=None, encounter=None)
    ep = Episode().add(later, reply(sent=at(2026, 11, 19, 10, 30)))
    expect(ep.determine(now=at(2026, 11, 20, 12)), follow_up_within_24_business_hours="not-met")


def test_two_submissions_a_week_apart_are_two_assessments() -> None:
    week = timedelta(days=7)
    ep = Episode().add(
        encounter("vr-2", FOLLOW_UP + week - timedelta(minutes=20), cls="VR", codes=(UNRELATED_CODE,)),
        patient_message("in-2", received=RECEIPT + week, sent=None, encounter="Encounter/vr-2"),
        reply("out-2", sent=FOLLOW_UP + week, in_response_to=("Communication/in-2",), encounter="Encounter/vr-2"),
        charge("chg", "G2250", context="Encounter/vr", when=FOLLOW_UP),  # the first one is already charged
    )
    now = at(2026, 12, 1, 12)
    everything = ep.determine_all(now=now)
    assert [d.receipt_time for d in everything] == [RECEIPT, RECEIPT + week]
    assert [d.status for d in everything] == ["not-billable", "billable"]
    second = ep.determine(encounter="Encounter/vr-2", now=now)
    assert second.follow_up == "Communication/out-2"
    assert second.deadline == at(2026, 11, 27, 10)  # Wed 25 Nov 10:00: 14 h Wed, Thanksgiving skipped, 10 h Fri
    expect_billable_pt(second)


@pytest.mark.parametrize("link", ["encounter", "in-response-to"])
def test_patient_thanks_after_follow_up_does_not_change_the_determination(link: str) -> None:
    before = Episode().determine()
    thanks = patient_message("thanks", received=FOLLOW_UP + timedelta(minutes=20), sent=None,
                             payload=({"contentString": "thanks!"},),
                             encounter="Encounter/vr" if link == "encounter" else None)
    if link == "in-response-to":
        thanks["inResponseTo"] = [ref("Communication/out")]
    after = Episode().add(thanks).determine()
    assert (after.status, after.code, after.modifiers, after.deadline, after.receipt_time, after.follow_up) == (
        before.status, before.code, before.modifiers, before.deadline, before.receipt_time, before.follow_up)
    assert statuses(after) == statuses(before)


# --- determination structure --------------------------------------------------------------------------------------


def _scenarios() -> dict[str, Determination]:
    return {
        "billable": Episode().determine(),
        "pending": Episode().remove("Communication/out").determine(now=at(2026, 11, 18, 14)),
        "not-billable": Episode().remove("Consent/consent").determine(),
        "needs-review": Episode().remove("Coverage/cov").determine(),
        "verify": Episode().add(*practitioner("pt1", "133V00000X")).determine(),
        "no-practitioner": Episode().add(without_participants(Episode()["Encounter/vr"]),
                                         patient_message(recipient=None), reply(sender="Practitioner/x"))
        .determine(),
        "no-submission": Episode().remove("Communication/in").add(reply(in_response_to=())).determine(),
    }


@pytest.mark.parametrize("name", ["billable", "pending", "not-billable", "needs-review", "verify",
                                  "no-practitioner", "no-submission"])
def test_every_determination_lists_the_ten_criteria_in_order(name: str) -> None:
    d = _scenarios()[name]
    assert tuple(c.id for c in d.criteria) == SPEC_IDS
    assert all(c.status in ("met", "not-met", "pending", "unknown") for c in d.criteria)
    assert all(c.detail for c in d.criteria)
    pending = {c.id for c in d.criteria if c.status == "pending"}
    assert pending <= {"practitioner-interpretation", "follow-up-within-24-business-hours"}


def _empty_values(value: Any, path: str = "$") -> list[str]:
    if value is None or value in ("", [], {}):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _empty_values(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _empty_values(v, f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("name", ["billable", "pending", "not-billable", "needs-review", "verify",
                                  "no-practitioner", "no-submission"])
def test_extension_has_no_empty_values(name: str) -> None:
    ext = _scenarios()[name].to_extension()
    assert _empty_values(ext) == []
    assert ext["status"] in ("billable", "not-billable", "pending", "needs-review")
    assert len(ext["criteria"]) == 10


def test_overall_status_rules() -> None:
    scenarios = _scenarios()
    assert scenarios["billable"].status == "billable"
    assert scenarios["pending"].status == "pending"
    assert scenarios["not-billable"].status == "not-billable"
    assert scenarios["needs-review"].status == "needs-review"


# --- robustness ---------------------------------------------------------------------------------------------------


def _other_patients_noise() -> list[dict[str, Any]]:
    """Another patient's whole record, as a server that ignored ?patient= would return it."""
    other = "Patient/p2"
    return [
        {"resourceType": "Patient", "id": "p2", "name": [{"family": "Other"}]},
        office_visit("p2-prior", RECEIPT - timedelta(days=2), codes=(RELATED_CODE,), subject=other),
        office_visit("p2-next", at(2026, 11, 19, 9), codes=(RELATED_CODE,), subject=other),
        encounter("p2-vr", RECEIPT, cls="VR", codes=(RELATED_CODE,), subject=other),
        patient_message("p2-in", received=RECEIPT - timedelta(hours=1), sender=other, subject=other,
                        encounter=None),
        reply("p2-out", sent=RECEIPT, recipient=other, in_response_to=("Communication/p2-in",), encounter=None),
        appointment("p2-appt", at(2026, 11, 19, 9), created=CREATED, patient=other),
        charge("p2-chg", "G2250", context="Encounter/vr", when=FOLLOW_UP, subject=other),
        charge("p2-ev", "99422", system=CPT, when=RECEIPT, codes=(RELATED_CODE,), subject=other),
        consent("p2-consent", provision="deny", when=FOLLOW_UP - timedelta(minutes=5), patient=other),
        organization("org-payer-aetna", "Aetna"),
        coverage("p2-cov", payor="Organization/org-payer-aetna", sopt="522", beneficiary=other, order=1),
    ]


def test_other_patients_resources_do_not_change_the_answer() -> None:
    before = Episode().determine()
    after = Episode().add(*_other_patients_noise()).determine()
    expect_billable_pt(after)
    assert after.receipt_time == before.receipt_time
    assert after.deadline == before.deadline
    assert all(not k.startswith(("Communication/p2", "Media/p2")) for k in after.submissions)


def test_other_patients_resources_make_no_assessment_for_this_patient() -> None:
    ep = Episode().add(*_other_patients_noise())
    assert len(ep.determine_all()) == 1


def test_other_patients_caregiver_photo_does_not_make_a_text_only_message_billable() -> None:
    # This patient sent text only; another patient's caregiver sent a photo an hour later (no encounter link), and
    # the server ignored ?subject=. §3 patient-submitted-media needs media "sent by the patient or a RelatedPerson"
    # (of this patient): not-met.
    caregiver = {"resourceType": "RelatedPerson", "id": "rp-p2", "patient": ref("Patient/p2")}
    noise = patient_message("p2-rp-in", received=RECEIPT + timedelta(hours=1), sent=None,
                            sender="RelatedPerson/rp-p2", subject="Patient/p2", encounter=None)
    ep = Episode().add(caregiver, noise, patient_message(payload=(TEXT,)))
    d = ep.determine()
    assert "Communication/p2-rp-in" not in d.submissions
    expect(d, patient_submitted_media="not-met")


def test_other_patients_caregiver_photo_before_receipt_does_not_move_the_clock() -> None:
    caregiver = {"resourceType": "RelatedPerson", "id": "rp-p2", "patient": ref("Patient/p2")}
    noise = patient_message("p2-rp-in", received=RECEIPT - timedelta(hours=20), sent=None,
                            sender="RelatedPerson/rp-p2", subject="Patient/p2", encounter=None)
    d = Episode().add(caregiver, noise).determine()
    assert d.receipt_time == RECEIPT
    expect_billable_pt(d)


def test_other_practitioners_free_slots_do_not_count() -> None:
    # A Slot search that ignored ?schedule= returns a colleague's free slots: still the soonest of *this* PT.
    appt = appointment("a1", at(2026, 11, 23, 9), created=CREATED, slot="Slot/booked")
    ep = Episode().add(*_slots(), appt, schedule("sch-pt2", "Practitioner/pt2"),
                       slot("pt2-free", at(2026, 11, 19, 11), "free", schedule_id="sch-pt2"))
    expect(ep.determine(now=at(2026, 11, 23, 12)), no_resulting_service="not-met")


def test_malformed_resources_are_skipped_without_crashing() -> None:
    ep = Episode()
    broken_visit = office_visit("broken", RECEIPT - timedelta(days=2), codes=(RELATED_CODE,))
    broken_visit["period"]["start"] = "not-a-date"
    broken_message = patient_message("broken-in", received="yesterday", encounter=None)
    broken_coverage = coverage("broken-cov", start="2026-13-45")
    ep.add(broken_visit, broken_message, broken_coverage, {"resourceType": "Appointment", "id": "broken-appt"})
    bag = ep.bag(strict=False)
    assert {s.reference for s in bag.skipped} >= {"Encounter/broken", "Communication/broken-in"}
    d = ep.determine(strict=False)
    expect_billable_pt(d)


def test_valid_but_sparse_resources_do_not_crash() -> None:
    sparse = [
        {"resourceType": "Encounter", "id": "bare", "status": "finished", "class": {"code": "AMB"},
         "subject": ref(PATIENT)},
        {"resourceType": "Procedure", "id": "bare-proc", "status": "completed", "subject": ref(PATIENT)},
        {"resourceType": "Appointment", "id": "bare-appt", "status": "proposed",
         "participant": [{"actor": ref(PATIENT), "status": "needs-action"}]},
        {"resourceType": "ChargeItem", "id": "bare-chg", "status": "billable", "code": {"text": "misc"},
         "subject": ref(PATIENT)},
        {"resourceType": "Observation", "id": "bare-obs", "status": "final", "code": {"text": "x"}},
        {"resourceType": "Communication", "id": "bare-com", "status": "completed"},
        {"resourceType": "Media", "id": "bare-media", "status": "completed", "content": {"url": "https://x/y"}},
        {"resourceType": "Slot", "id": "bare-slot", "schedule": ref("Schedule/sch-pt1"), "status": "free",
         "start": iso(at(2026, 11, 19, 9)), "end": iso(at(2026, 11, 19, 10))},
        schedule(),
    ]
    d = Episode().add(*sparse).determine()
    expect_billable_pt(d)


def test_consent_without_date_is_unknown() -> None:
    expect(Episode().add(consent(when=None)).determine(), consent_documented="unknown")
