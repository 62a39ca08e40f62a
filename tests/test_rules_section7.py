"""billing-rules.md §7 in the pure rules: elapsed windows across daylight-saving changes, therapy assistants (CQ/CO),
the global surgical period, care management / remote monitoring, RHC/FQHC, and the ``facts["case"]`` every
non-met criterion carries so cards can word each situation exactly.

Scenarios start from the billable physical-therapy baseline of tests/test_rules_engine.py and change one thing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cds_service.rules.model import Determination
from cds_service.rules.rules_data import RulesDataError, load_rules_data
from tests.test_rules_engine import (
    CPT,
    FOLLOW_UP,
    NOW,
    NUCC,
    PARTICIPATION,
    PATIENT,
    PT1,
    RECEIPT,
    RELATED_CODE,
    UNRELATED_CODE,
    Episode,
    appointment,
    at,
    charge,
    concept,
    consent,
    coverage,
    expect,
    icd,
    iso,
    observation,
    office_visit,
    patient_message,
    practitioner,
    ref,
    reply,
)

CASE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def utc_shift(moment: datetime, hours: float) -> datetime:
    """``moment`` moved by elapsed hours (UTC arithmetic), as a UTC datetime."""
    return moment.astimezone(UTC) + timedelta(hours=hours)


def case_of(d: Determination, criterion_id: str) -> str | None:
    return d.criterion(criterion_id).facts.get("case")


def assert_cases(d: Determination) -> None:
    """§7 "Honest wording": every non-met result names its situation in kebab case."""
    for result in d.criteria:
        if result.status != "met":
            case = result.facts.get("case")
            assert isinstance(case, str) and CASE.match(case), (result.id, result.status, case)


def moved(receipt: datetime, follow_up: datetime, *, office: datetime) -> Episode:
    """The baseline episode moved to another week (receipt, follow-up, review encounter, last office visit)."""
    ep = Episode().add(patient_message(received=receipt, sent=utc_shift(receipt, -0.01)), reply(sent=follow_up))
    ep["Encounter/vr"]["period"] = {"start": iso(utc_shift(follow_up, -0.25)), "end": iso(follow_up)}
    ep["Encounter/office-1"]["period"] = {"start": iso(office), "end": iso(office + timedelta(minutes=45))}
    return ep


# --- 1. elapsed windows are elapsed time ------------------------------------------------------------------------

SPRING_RECEIPT = at(2026, 3, 11, 10)  # Wed, EDT; clocks went forward Sun 8 Mar inside the 7 days before
AUTUMN_RECEIPT = at(2026, 11, 4, 10)  # Wed, EST; clocks went back Sun 1 Nov inside the 7 days before


@pytest.mark.parametrize("receipt", [SPRING_RECEIPT, AUTUMN_RECEIPT], ids=["spring", "autumn"])
@pytest.mark.parametrize(("hours_before", "status"), [(167.5, "not-met"), (168.5, "met")])
def test_prior_7_days_is_168_elapsed_hours_across_dst(receipt: datetime, hours_before: float, status: str) -> None:
    follow_up = receipt + timedelta(hours=5, minutes=30)  # same day, no transition in between
    ep = moved(receipt, follow_up, office=at(2026, 1, 15, 10))
    ep.add(office_visit("prior", utc_shift(receipt, -hours_before), codes=(RELATED_CODE,)))
    d = ep.determine(now=receipt + timedelta(days=3))
    expect(d, no_related_service_prior_7_days=status)
    if status == "not-met":
        assert case_of(d, "no-related-service-prior-7-days") == "related-visit"
        assert "Encounter/prior" in d.criterion("no-related-service-prior-7-days").evidence


# Receipt Fri 10:00, reply Sat 12:00 (on time: 14 business hours on Friday); the clocks change on the Sunday, inside
# the 24 h after the reply. Spring: 24 h after = Sun 13:00 EDT (the wall clock would say 12:00); autumn: Sun 11:00
# EST (the wall clock would say 12:00).
DST_WEEKENDS = {
    "spring": (at(2026, 3, 6, 10), at(2026, 3, 7, 12)),
    "autumn": (at(2026, 10, 30, 10), at(2026, 10, 31, 12)),
}


@pytest.mark.parametrize("season", sorted(DST_WEEKENDS))
@pytest.mark.parametrize(("hours_after", "status"), [(23.5, "not-met"), (24.5, "met")])
def test_resulting_visit_within_24_elapsed_hours_of_follow_up_across_dst(season: str, hours_after: float,
                                                                         status: str) -> None:
    receipt, follow_up = DST_WEEKENDS[season]
    ep = moved(receipt, follow_up, office=at(2026, 1, 15, 10))
    ep.add(office_visit("next", utc_shift(follow_up, hours_after), codes=(RELATED_CODE,)))
    d = ep.determine(now=receipt + timedelta(days=7))
    expect(d, no_resulting_service=status)
    if status == "not-met":
        assert case_of(d, "no-resulting-service") == "visit"


def test_appointment_30_minutes_inside_24_elapsed_hours_in_spring() -> None:
    receipt, follow_up = DST_WEEKENDS["spring"]
    ep = moved(receipt, follow_up, office=at(2026, 1, 15, 10))
    start = utc_shift(follow_up, 23.5)  # Sun 12:30 EDT: after the wall-clock 12:00, inside the 24 elapsed hours
    ep.add(appointment("a1", start, created=utc_shift(follow_up, 0.2), codes=(RELATED_CODE,)))
    d = ep.determine(now=receipt + timedelta(days=7))
    expect(d, no_resulting_service="not-met")
    assert case_of(d, "no-resulting-service") == "appointment-within-24h"


@pytest.mark.parametrize(("hours_before", "status"), [(167.5, "not-met"), (168.5, "met")])
def test_e_visit_7_day_window_is_elapsed_time(hours_before: float, status: str) -> None:
    ep = moved(SPRING_RECEIPT, SPRING_RECEIPT + timedelta(hours=5), office=at(2026, 1, 15, 10))
    ep.add(charge("ev", "99422", system=CPT, when=utc_shift(SPRING_RECEIPT, -hours_before), codes=(RELATED_CODE,)))
    d = ep.determine(now=SPRING_RECEIPT + timedelta(days=3))
    expect(d, not_already_billed=status)
    if status == "not-met":
        assert case_of(d, "not-already-billed") == "e-visit"


def test_detail_text_keeps_local_times() -> None:
    ep = moved(SPRING_RECEIPT, SPRING_RECEIPT + timedelta(hours=5), office=at(2026, 1, 15, 10))
    ep.add(office_visit("prior", utc_shift(SPRING_RECEIPT, -167.5), codes=(RELATED_CODE,)))
    detail = ep.determine(now=SPRING_RECEIPT + timedelta(days=3)).criterion("no-related-service-prior-7-days").detail
    assert "04 Mar 09:30" in detail  # 167.5 h before Wed 11 Mar 10:00 EDT is Wed 4 Mar 09:30 EST


# --- 2. therapy assistants ------------------------------------------------------------------------------------------

PTA_CODE = "225200000X"
OTA_CODE = "224Z00000X"
OT_CODE = "225X00000X"
PTA = "Practitioner/pta1"


def with_assistant(ep: Episode, code: str = PTA_CODE) -> Episode:
    ep.add(*practitioner("pta1", code))
    ep["Encounter/vr"]["participant"] = [
        {"type": [concept(PARTICIPATION, "PPRF")], "individual": ref(PT1)},
        {"type": [concept(PARTICIPATION, "PART")], "individual": ref(PTA)},
    ]
    return ep


@pytest.mark.parametrize("code", [PTA_CODE, OTA_CODE])
def test_assistant_as_billing_practitioner_is_not_met(code: str) -> None:
    d = Episode().add(*practitioner("pt1", code)).determine()
    interpretation = d.criterion("practitioner-interpretation")
    assert interpretation.status == "not-met"
    assert interpretation.facts["case"] == "assistant-only"
    assert "supervising therapist must interpret" in interpretation.detail
    assert case_of(d, "billing-practitioner-eligible") == "assistant-own-name"
    assert (d.status, d.code, d.modifiers) == ("not-billable", None, ())
    assert_cases(d)


def test_only_the_assistant_replied_after_the_deadline() -> None:
    ep = with_assistant(Episode()).remove("Communication/out").add(reply("pta-out", sender=PTA))
    d = ep.determine()
    assert d.practitioner == PT1
    expect(d, practitioner_interpretation="not-met", follow_up_within_24_business_hours="not-met",
           billing_practitioner_eligible="unknown")
    assert case_of(d, "practitioner-interpretation") == "assistant-only"
    assert case_of(d, "follow-up-within-24-business-hours") == "reply-by-other"
    assert d.status == "not-billable"


def test_only_the_assistant_interpreted_before_the_deadline_is_still_pending() -> None:
    ep = with_assistant(Episode()).remove("Communication/out").add(observation(performer=PTA))
    d = ep.determine(now=FOLLOW_UP)
    assert d.criterion("practitioner-interpretation").status == "pending"
    assert case_of(d, "practitioner-interpretation") == "awaiting"


def test_therapist_with_assistant_participant_adds_cq_and_needs_review() -> None:
    d = with_assistant(Episode()).determine()
    expect(d, billing_practitioner_eligible="unknown")
    assert (d.status, d.code, d.modifiers) == ("needs-review", "G2250", ("GP", "CQ"))
    eligible = d.criterion("billing-practitioner-eligible")
    assert eligible.facts["case"] == "assistant-participation"
    assert "85 %" in eligible.detail and "10 %" in eligible.detail
    assert PTA in eligible.evidence
    assert d.to_extension()["modifiers"] == ["GP", "CQ"]


def test_occupational_therapist_with_assistant_reply_adds_co() -> None:
    ep = Episode().add(*practitioner("pt1", OT_CODE), *practitioner("pta1", OTA_CODE))
    ep.add(reply("ota-note", sender=PTA, sent=FOLLOW_UP - timedelta(minutes=30)))
    d = ep.determine()
    assert (d.status, d.code, d.modifiers) == ("needs-review", "G2250", ("GO", "CO"))
    assert case_of(d, "billing-practitioner-eligible") == "assistant-participation"
    assert d.criterion("practitioner-interpretation").status == "met"


def test_assistant_authored_interpretation_adds_cq() -> None:
    ep = Episode().add(*practitioner("pta1", PTA_CODE), observation(performer=PTA))
    d = ep.determine()
    assert d.modifiers == ("GP", "CQ")
    assert "Observation/obs" in d.criterion("billing-practitioner-eligible").evidence


def test_nurse_participant_adds_no_assistant_modifier() -> None:
    ep = Episode()
    ep["Encounter/vr"]["participant"].append({"individual": ref("Practitioner/rn1")})
    d = ep.determine()
    assert (d.status, d.modifiers) == ("billable", ("GP",))


@pytest.mark.parametrize("modifier", ["CQ", "CO"])
def test_forbidden_modifiers_cannot_remove_assistant_modifiers(modifier: str) -> None:
    with pytest.raises(RulesDataError) as caught:
        load_rules_data({"settings": {"forbidden_modifiers": ["95", modifier]}})
    assert caught.value.key_path == "rules.settings.forbidden_modifiers[1]"


# --- 3. global surgical period --------------------------------------------------------------------------------------


def surgery(pid: str = "surg", *, days_before: float = 30, cpt: str = "27447", codes: tuple[str, ...] = (RELATED_CODE,),
            performer: str = PT1, status: str = "completed") -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Procedure", "id": pid, "status": status, "subject": ref(PATIENT),
        "code": concept(CPT, cpt), "performedDateTime": iso(utc_shift(RECEIPT, -24 * days_before)),
        "performer": [{"actor": ref(performer)}],
    }
    if codes:
        resource["reasonCode"] = icd(*codes)
    return resource


def test_related_surgery_30_days_before_asks_about_the_global_period() -> None:
    d = Episode().add(surgery()).determine()
    expect(d, no_related_service_prior_7_days="unknown")
    result = d.criterion("no-related-service-prior-7-days")
    assert result.facts["case"] == "global-period"
    assert "is this review part of a post-operative global period?" in result.detail
    assert "Procedure/surg" in result.evidence
    assert d.status == "needs-review"


def test_related_surgery_through_reason_reference_condition() -> None:
    condition = {"resourceType": "Condition", "id": "knee", "subject": ref(PATIENT), "code": icd(RELATED_CODE)[0]}
    procedure = surgery(codes=())
    procedure["reasonReference"] = [ref("Condition/knee")]
    d = Episode().add(condition, procedure).determine()
    assert case_of(d, "no-related-service-prior-7-days") == "global-period"


@pytest.mark.parametrize("change", [
    {"days_before": 95},  # beyond the 90-day look-back
    {"codes": (UNRELATED_CODE,)},  # another problem
    {"cpt": "97110"},  # therapeutic exercise: not in the surgery range
    {"cpt": "10003"},  # just below the range
    {"performer": "Practitioner/pt2"},  # a colleague, scope practitioner
    {"status": "not-done"},
])
def test_surgery_that_does_not_open_a_global_period(change: dict[str, Any]) -> None:
    expect(Episode().add(surgery(**change)).determine())


def test_colleague_surgery_counts_with_organization_scope() -> None:
    rules = load_rules_data({"settings": {"prior_service_scope": "organization"}})
    d = Episode().add(surgery(performer="Practitioner/pt2")).determine(rules=rules)
    assert case_of(d, "no-related-service-prior-7-days") == "global-period"


@pytest.mark.parametrize(("global_days", "days_before", "status"), [
    (10, 9, "unknown"), (10, 11, "met"), (0, 8, "met"), (90, 89, "unknown"),
])
def test_global_days_table(global_days: int, days_before: float, status: str) -> None:
    rules = load_rules_data({"settings": {"global_days_by_cpt": {"27447": global_days}}})
    d = Episode().add(surgery(days_before=days_before)).determine(rules=rules)
    expect(d, no_related_service_prior_7_days=status)


def test_look_back_is_a_setting() -> None:
    rules = load_rules_data({"settings": {"global_period_lookback_days": 20}})
    expect(Episode().add(surgery(days_before=30)).determine(rules=rules))


def test_related_surgery_inside_7_days_is_simply_related() -> None:
    d = Episode().add(surgery(days_before=3)).determine()
    assert case_of(d, "no-related-service-prior-7-days") == "related-visit"


# --- 4. care management / remote monitoring -------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["99490", "99491", "99439", "99487", "99489", "99424", "99427", "99457", "99458",
                                  "99091"])
def test_care_management_or_monitoring_in_the_same_month(code: str) -> None:
    d = Episode().add(charge("ccm", code, system=CPT, when=at(2026, 11, 30, 23))).determine()
    expect(d, not_already_billed="unknown")
    result = d.criterion("not-already-billed")
    assert result.facts["case"] == "care-management"
    assert "was this review's time counted toward" in result.detail
    assert "ChargeItem/ccm" in result.evidence


@pytest.mark.parametrize("change", [
    {"when": at(2026, 10, 31, 23, 30)},  # previous month in New York (already November in UTC: 03:30Z)
    {"when": at(2026, 12, 1, 0, 5)},
    {"status": "entered-in-error"},
    {"subject": "Patient/other"},
])
def test_care_management_that_does_not_count(change: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"when": at(2026, 11, 2, 9), **change}
    expect(Episode().add(charge("ccm", "99490", system=CPT, **arguments)).determine())


def test_care_management_in_the_follow_up_month_counts() -> None:
    receipt, follow_up = at(2026, 11, 30, 10), at(2026, 12, 1, 9)
    ep = moved(receipt, follow_up, office=at(2026, 10, 1, 10))
    ep.add(charge("rpm", "99457", system=CPT, when=at(2026, 12, 15, 9)))
    d = ep.determine(now=at(2026, 12, 4, 12))
    assert case_of(d, "not-already-billed") == "care-management"


def test_remote_monitoring_claim_line_in_the_same_month() -> None:
    claim = {"resourceType": "Claim", "id": "clm", "status": "active", "use": "claim", "patient": ref(PATIENT),
             "created": "2026-11-25", "type": concept("http://terminology.hl7.org/CodeSystem/claim-type",
                                                        "professional"),
             "provider": ref("Organization/org-main"), "priority": {"coding": [{"code": "normal"}]},
             "insurance": [{"sequence": 1, "focal": True, "coverage": ref("Coverage/cov")}],
             "item": [{"sequence": 1, "productOrService": concept(CPT, "99458"), "servicedDate": "2026-11-10"}]}
    d = Episode().add(claim).determine()
    assert case_of(d, "not-already-billed") == "care-management"
    claim["status"] = "cancelled"
    expect(Episode().add(claim).determine())


# --- 5. RHC / FQHC ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["261QR1300X", "261QF0400X"])
def test_rural_health_clinic_or_fqhc_by_type_needs_review(code: str) -> None:
    ep = Episode()
    ep["Organization/org-main"]["type"] = [concept(NUCC, code)]
    d = ep.determine()
    expect(d, billing_practitioner_eligible="unknown")
    result = d.criterion("billing-practitioner-eligible")
    assert result.facts["case"] == "rhc-fqhc"
    assert "G0071" in result.detail and "no verified rule" in result.detail
    assert (d.status, d.code) == ("needs-review", "G2250")


@pytest.mark.parametrize("marker", ["Organization/org-main", "http://example.org/npi|1234567890"])
def test_rhc_fqhc_marked_in_the_settings(marker: str) -> None:
    ep = Episode()
    ep["Organization/org-main"]["identifier"] = [{"system": "http://example.org/npi", "value": "1234567890"}]
    rules = load_rules_data({"settings": {"rhc_fqhc_organizations": [marker]}})
    d = ep.determine(rules=rules)
    assert case_of(d, "billing-practitioner-eligible") == "rhc-fqhc"
    assert d.status == "needs-review"


def test_rhc_from_the_practitioner_role_when_the_encounter_names_no_provider() -> None:
    ep = Episode()
    del ep["Encounter/vr"]["serviceProvider"]
    ep["Organization/org-main"]["type"] = [concept(NUCC, "261QR1300X")]
    assert case_of(ep.determine(), "billing-practitioner-eligible") == "rhc-fqhc"


def test_billing_organization_not_in_the_record_is_not_flagged() -> None:
    expect(Episode().remove("Organization/org-main").determine())


def test_other_organization_types_are_not_flagged() -> None:
    ep = Episode()
    ep["Organization/org-main"]["type"] = [concept(NUCC, "261QP2000X")]  # physical therapy clinic
    expect(ep.determine())


# --- 6. cases --------------------------------------------------------------------------------------------------------


def _only_prior(ep: Episode, visit: dict[str, Any]) -> Episode:
    return ep.remove("Encounter/office-1").add(visit)


def test_established_patient_cases_say_what_the_record_shows() -> None:
    d = Episode().remove("Encounter/office-1").determine()
    assert case_of(d, "established-patient") == "no-prior-visit"

    d = _only_prior(Episode(), office_visit("old", at(2025, 6, 2, 10), who=("Practitioner/rn1",))).determine()
    result = d.criterion("established-patient")
    assert (result.status, result.facts["case"]) == ("not-met", "other-specialty")
    assert "another specialty" in result.detail and "No finished visit" not in result.detail

    ep = _only_prior(Episode(), office_visit("old", at(2025, 6, 2, 10), who=("Practitioner/pt-other",)))
    d = ep.determine()
    assert case_of(d, "established-patient") == "other-organization"
    assert "another organization" in d.criterion("established-patient").detail

    # Both: the most specific (a same-specialty practitioner, of another organization) wins.
    ep.add(office_visit("old-rn", at(2025, 7, 2, 10), who=("Practitioner/rn1",)))
    assert case_of(ep.determine(), "established-patient") == "other-organization"


def test_established_patient_colleague_unknown() -> None:
    ep = _only_prior(Episode(), office_visit("old", at(2025, 6, 2, 10), who=("Practitioner/stranger",)))
    ep.add({"resourceType": "Practitioner", "id": "stranger"})
    assert case_of(ep.determine(), "established-patient") == "colleague-unknown"


def test_interpretation_and_follow_up_cases() -> None:
    no_reply = Episode().remove("Communication/out").determine()
    assert case_of(no_reply, "practitioner-interpretation") == "no-reply"
    assert case_of(no_reply, "follow-up-within-24-business-hours") == "no-reply"

    nurse = Episode().add(reply(sender="Practitioner/rn1")).determine()
    assert case_of(nurse, "practitioner-interpretation") == "reply-by-other"
    assert case_of(nurse, "follow-up-within-24-business-hours") == "reply-by-other"

    waiting = Episode().remove("Communication/out").determine(now=RECEIPT + timedelta(hours=1))
    assert case_of(waiting, "practitioner-interpretation") == "awaiting"
    assert case_of(waiting, "follow-up-within-24-business-hours") == "awaiting"

    late = Episode().add(reply(sent=at(2026, 11, 19, 10, 1))).determine()
    assert case_of(late, "follow-up-within-24-business-hours") == "late"


def _variants() -> dict[str, Episode]:
    return {
        "text-only": Episode().add(patient_message(payload=({"contentString": "it hurts"},))),
        "uncoded-prior": Episode().add(office_visit("prior", RECEIPT - timedelta(days=2), codes=())),
        "related-prior": Episode().add(office_visit("prior", RECEIPT - timedelta(days=2), codes=(RELATED_CODE,))),
        "appointment": Episode().add(appointment("a1", at(2026, 11, 19, 9), created=FOLLOW_UP + timedelta(minutes=5),
                                                 codes=(RELATED_CODE,))),
        "possibly": Episode().add(appointment("a1", at(2026, 12, 3, 9), created=FOLLOW_UP + timedelta(minutes=5))),
        "no-consent": Episode().remove("Consent/consent"),
        "old-consent": Episode().add(consent(when=at(2025, 10, 1, 10))),
        "denied": Episode().add(consent(provision="deny")),
        "no-coverage": Episode().remove("Coverage/cov"),
        "aetna": Episode().add({"resourceType": "Organization", "id": "org-payer-medicare", "name": "Aetna"},
                               coverage(sopt=None)),
        "charged": Episode().add(charge("chg", "G2250", context="Encounter/vr")),
        "wrong-code": Episode().add(charge("chg", "G2010", context="Encounter/vr")),
        "check-in": Episode().add(charge("chk", "G2252", context="Encounter/vr")),
        "e-visit-uncoded": Episode().add(charge("ev", "99422", system=CPT, when=RECEIPT - timedelta(days=2))),
        "audiologist": Episode().add(*practitioner("pt1", "231H00000X")),
        "dietitian": Episode().add(*practitioner("pt1", "133V00000X")),
    }


EXPECTED_CASES = {
    "text-only": ("patient-submitted-media", "text-only"),
    "uncoded-prior": ("no-related-service-prior-7-days", "uncoded"),
    "related-prior": ("no-related-service-prior-7-days", "related-visit"),
    "appointment": ("no-resulting-service", "appointment-within-24h"),
    "possibly": ("no-resulting-service", "possibly-resulting"),
    "no-consent": ("consent-documented", "missing"),
    "old-consent": ("consent-documented", "expired"),
    "denied": ("consent-documented", "denied"),
    "no-coverage": ("payer-covers-code", "no-coverage"),
    "aetna": ("payer-covers-code", "verify"),
    "charged": ("not-already-billed", "same-submission"),
    "wrong-code": ("not-already-billed", "wrong-code"),
    "check-in": ("not-already-billed", "check-in"),
    "e-visit-uncoded": ("not-already-billed", "e-visit-uncoded"),
    "audiologist": ("billing-practitioner-eligible", "not-eligible"),
    "dietitian": ("billing-practitioner-eligible", "verify"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CASES))
def test_named_cases(name: str) -> None:
    d = _variants()[name].determine()
    criterion, case = EXPECTED_CASES[name]
    assert case_of(d, criterion) == case, d.criterion(criterion)
    assert_cases(d)
    if name == "wrong-code":
        assert d.criterion("not-already-billed").facts["wrong_code"] == "G2010"


def test_aetna_self_insured_is_not_covered_case() -> None:
    ep = Episode().add({"resourceType": "Organization", "id": "org-payer-medicare", "name": "Aetna"},
                       coverage(sopt="522"))
    assert case_of(ep.determine(), "payer-covers-code") == "not-covered"


def test_met_results_carry_no_case() -> None:
    d = Episode().determine()
    assert d.status == "billable"
    assert all("case" not in c.facts for c in d.criteria)


def test_incomplete_record_names_its_case() -> None:
    from cds_service.rules.engine import assessment_of_encounter, determine
    from tests.test_rules_engine import CAL, RULES

    bag = Episode().bag()
    assessment = assessment_of_encounter(bag, "p1", bag.get("Encounter/vr"), CAL, RULES)
    assert assessment is not None
    d = determine(assessment, bag=bag, patient_id="p1", now=NOW, calendar=CAL, rules=RULES,
                  truncated=frozenset({"consents"}))
    assert case_of(d, "consent-documented") == "incomplete-record"
    assert_cases(d)
