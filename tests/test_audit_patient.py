"""The population audit's per-patient core (billing-rules.md §8): ``cds_service.audit.patient.audit_patient``.

Every fixture scenario is audited at its own clock and must get exactly the verdict the hooks give and the
scenario's hand-written expectation (status, code, modifiers, deadline, all ten criteria) — except where the
assessment's own G2250/G2010 charge exists: the audit judges it as if that charge were absent (§8), and the class
is asserted by hand. Then hand-built variations of the fixtures pin each class, the OIG screens, the money, timely
filing and the receipt window. Synthetic data only (fhir_fixtures/ and changes to it).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from datetime import date, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from cds_service.audit import engine, findings, keys
from cds_service.audit.patient import (
    MODIFIER_EXTENSION_URL,
    AuditSettings,
    AuditSettingsError,
    SharedRecord,
    audit_patient,
    build_shared,
)
from cds_service.fhir.parse import add_raw
from cds_service.rules.engine import evaluate_record
from cds_service.rules.model import CRITERION_IDS, HCPCS_SYSTEM
from cds_service.rules.rules_data import load_rules_data

CPT = "http://www.ama-assn.org/go/cpt"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"


# --------------------------------------------------------------------------------------------------------- fixtures
def _fixture(name: str) -> Any:
    return json.loads(resources.files("fhir_fixtures").joinpath(name).read_text("utf-8"))


@cache
def scenarios() -> tuple[dict[str, Any], ...]:
    return tuple(_fixture("scenarios.json"))


@cache
def _file_resources(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(e["resource"] for e in _fixture(name)["entry"] if isinstance(e.get("resource"), dict))


@cache
def shared() -> SharedRecord:
    """The shared resources of every fixture file (master data, and each file's roles, schedules, slots), as a
    Bulk export of the whole server would hold them."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name in ["00-practice.json", *sorted({s["file"] for s in scenarios()})]:
        for resource in _file_resources(name):
            if resource["resourceType"] in keys.SHARED_TYPES:
                found[(resource["resourceType"], resource["id"])] = resource
    return build_shared(found.values())


@cache
def base_settings() -> AuditSettings:
    return AuditSettings.from_spec(engine.SettingsSpec(config_path=None, as_of="2026-12-01T00:00:00-05:00"))


def settings_at(moment: str | datetime, **changes: Any) -> AuditSettings:
    as_of = datetime.fromisoformat(moment) if isinstance(moment, str) else moment
    return dataclasses.replace(base_settings(), as_of=as_of, **changes)


def scenario(scenario_id: str) -> dict[str, Any]:
    return next(s for s in scenarios() if s["id"] == scenario_id)


def patient_resources(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The scenario patient's own resources (deep copies: tests change them); appointment-book adds its proposal
    to the record, as the hook does."""
    own = [copy.deepcopy(r) for r in _file_resources(item["file"]) if r["resourceType"] not in keys.SHARED_TYPES]
    if item["hook"] == "appointment-book":
        own += [copy.deepcopy(e["resource"]) for e in item["context"]["appointments"]["entry"]]
    return own


def audit(item: dict[str, Any], extra: list[dict[str, Any]] = (), *, at: str | None = None,
          **changes: Any) -> list[dict[str, Any]]:
    result = audit_patient(item["context"]["patientId"], [*patient_resources(item), *extra], shared=shared(),
                           settings=settings_at(at or item["now"], **changes))
    return result.rows


def expected_id(item: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The scenario's assessment among the rows: by its review encounter, else by its receipt."""
    encounter = item.get("assessmentEncounter")
    if encounter:
        wanted = _sha([*_submissions_of(item, encounter), encounter])
        found = [r for r in rows if r["assessment_id"] == wanted]
        if found:
            return found[0]
    receipt = datetime.fromisoformat(item["receipt"]) if item.get("receipt") else None
    found = [r for r in rows if receipt is not None and r["received"]
             and datetime.fromisoformat(r["received"]) == receipt]
    assert len(found) == 1, f"{item['id']}: the scenario's assessment is not among the rows"
    return found[0]


def _submissions_of(item: dict[str, Any], encounter: str) -> list[str]:
    bag = shared().patient_bag()
    add_raw(bag, patient_resources(item))
    episodes = evaluate_record(bag, item["context"]["patientId"], now=datetime.fromisoformat(item["now"]),
                               calendar=base_settings().calendar, rules=base_settings().rules)
    return next((list(e.determination.submissions) for e in episodes if e.determination.encounter == encounter), [])


def _sha(references: list[str | None]) -> str:
    """The contract's assessment id, computed here independently: sha256 of the sorted references, 16 hex."""
    text = "\n".join(sorted({r for r in references if r}))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def criteria_of(row: dict[str, Any]) -> dict[str, str]:
    statuses = dict.fromkeys(CRITERION_IDS, "met")
    for failed in row["failed_criteria"]:
        criterion, status = failed.split(":")
        statuses[criterion] = status
    return statuses


def charge_item(patient: str, cid: str, code: str = "G2250", *, context: str | None = None,
                supporting: tuple[str, ...] = (), modifiers: tuple[str, ...] | None = None,
                status: str = "billable", when: str = "2026-12-01T12:00:00-05:00",
                system: str = HCPCS_SYSTEM) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ChargeItem", "id": cid, "status": status,
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"}, "occurrenceDateTime": when,
    }
    if context:
        resource["context"] = {"reference": context}
    if supporting:
        resource["supportingInformation"] = [{"reference": s} for s in supporting]
    if modifiers is not None:
        resource["extension"] = [{"url": MODIFIER_EXTENSION_URL, "valueCoding": {"system": HCPCS_SYSTEM, "code": m}}
                                 for m in modifiers]
    return resource


def claim(patient: str, cid: str, encounter: str, *, code: str = "G2250", modifiers: tuple[str, ...] = ("GP",),
          pos: str = "11", served: str = "2026-11-18", status: str = "active") -> dict[str, Any]:
    return {
        "resourceType": "Claim", "id": cid, "status": status,
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "claim", "patient": {"reference": f"Patient/{patient}"}, "created": "2026-11-20",
        "provider": {"reference": "Organization/org-main"}, "priority": {"coding": [{"code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"reference": f"Coverage/{patient[:-4]}-cov"}}],
        "item": [{
            "sequence": 1,
            "productOrService": {"coding": [{"system": HCPCS_SYSTEM, "code": code}]},
            "modifier": [{"coding": [{"system": HCPCS_SYSTEM, "code": m}]} for m in modifiers],
            "locationCodeableConcept": {"coding": [{
                "system": "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set",
                "code": pos}]},
            "servicedDate": served,
            "encounter": [{"reference": encounter}],
        }],
    }


RATES = load_rules_data().rates


# ----------------------------------------------------------------------------------- every scenario, hooks' verdict
# Scenarios whose assessment has its own G2250/G2010 charge: the hooks say not-already-billed not-met; the audit
# sets that charge aside (§8) and the charge decides the class, asserted here by hand.
OWN_CHARGE = {
    "s48-already-billed-same-submission": ("billable", "ok"),  # G2250-GP by the PT, charged once: billed right
    "s52-appointment-book-bundles": ("not-billable", "at-risk-charge"),  # bundled into the proposed visit
    "s53-derm-wrong-code-g2250-charged": ("billable", "at-risk-charge"),  # dermatologist bills G2010, not G2250
    "s68-second-submission-same-problem": None,  # the charged one is the first assessment, not the scenario's
}


@pytest.mark.parametrize("scenario_id", [s["id"] for s in scenarios()])
def test_every_scenario_gets_the_hooks_verdict(scenario_id: str) -> None:
    item = scenario(scenario_id)
    now = datetime.fromisoformat(item["now"])
    patient_id = item["context"]["patientId"]
    result = audit_patient(patient_id, patient_resources(item), shared=shared(), settings=settings_at(now))
    assert result.skipped == [] and result.resources == len(patient_resources(item))
    for row in result.rows:
        assert tuple(row) == findings.COLUMN_NAMES and row["patient"] == f"Patient/{patient_id}"
    bag = shared().patient_bag()
    add_raw(bag, patient_resources(item))
    hooks = {_sha([*e.determination.submissions, e.determination.encounter]): e.determination
             for e in evaluate_record(bag, patient_id, now=now, calendar=base_settings().calendar,
                                      rules=base_settings().rules)}
    assert sorted(hooks) == sorted(r["assessment_id"] for r in result.rows)  # no orphan charge in the fixtures
    for row in result.rows:
        hook = hooks[row["assessment_id"]]
        hook_criteria = {c.id: c.status for c in hook.criteria}
        if row["charge_refs"]:  # judged as if its own charge were absent: only not-already-billed may differ
            case = hook.criterion("not-already-billed").facts.get("case")
            assert hook_criteria["not-already-billed"] == "not-met" and case in ("same-submission", "wrong-code")
            assert sorted(row["charge_refs"]) == sorted(hook.existing_charges)
            assert {k: v for k, v in criteria_of(row).items() if k != "not-already-billed"} == {
                k: v for k, v in hook_criteria.items() if k != "not-already-billed"}
        else:
            assert (row["status"], row["code"], row["modifiers"], criteria_of(row)) == (
                hook.status, hook.code, list(hook.modifiers), hook_criteria), row["assessment_id"]
        assert row["deadline"] == (hook.deadline.isoformat(timespec="seconds") if hook.deadline else None)
        assert row["practitioner"] == hook.practitioner and row["payer_profile"] == hook.payer_profile
    # The scenario's own written expectation.
    row = expected_id(item, result.rows)
    expected = item["expected"]
    if scenario_id in OWN_CHARGE and row["charge_refs"]:
        status, klass = OWN_CHARGE[scenario_id]  # type: ignore[misc]
        assert (row["status"], row["class"]) == (status, klass)
        assert criteria_of(row)["not-already-billed"] == "met"
        return
    got = (row["status"], row["code"], row["modifiers"] or None, row["deadline"], criteria_of(row))
    assert got == (expected["status"], expected.get("code"), expected.get("modifiers"),
                   expected.get("deadline"), expected["criteria"])
    wanted_class = {"billable": "missed-revenue", "pending": "pending", "needs-review": "needs-review",
                    "not-billable": "ok"}[row["status"]]
    assert row["class"] == wanted_class
    assert row["estimated_amount"] == (RATES.amount(row["code"]) if wanted_class == "missed-revenue" else None)


def test_the_hooks_default_still_counts_the_own_charge() -> None:
    """The audit's option changes nothing for the hooks: by default the own charge makes not-already-billed fail."""
    item = scenario("s48-already-billed-same-submission")
    bag = shared().patient_bag()
    add_raw(bag, patient_resources(item))
    kwargs = {"now": datetime.fromisoformat(item["now"]), "calendar": base_settings().calendar,
              "rules": base_settings().rules}
    default = evaluate_record(bag, "s48-pat", **kwargs)[0].determination
    ignored = evaluate_record(bag, "s48-pat", own_charges="ignore", **kwargs)[0].determination
    assert default.status == "not-billable" and default.criterion("not-already-billed").facts["case"] == (
        "same-submission")
    assert ignored.status == "billable"
    assert ignored.criterion("not-already-billed").facts["own_charges"] == ("ChargeItem/s48-chg-g2250",)
    assert "own_charges" not in default.criterion("not-already-billed").facts


# ------------------------------------------------------------------------------------------------------- classes
def test_missed_revenue_names_the_code_and_the_rate() -> None:
    [row] = audit(scenario("s01-pt-billable"))
    assert (row["class"], row["status"], row["code"], row["modifiers"]) == ("missed-revenue", "billable", "G2250",
                                                                             ["GP"])
    assert row["estimated_amount"] == RATES.amount("G2250") > 0
    assert row["billed_code"] is None and row["charge_refs"] == [] and row["oig_screens"] == []
    assert row["month"] == "2026-11" and row["received"] == "2026-11-18T10:00:00-05:00"
    assert row["organization"] == "Organization/org-main"
    assert row["assessment_id"] == _sha(["Communication/s01-com-in", "Encounter/s01-enc-vr"])
    assert "G2250-GP" in row["reason"]


def test_wrong_code_charged_is_at_risk_at_the_billed_codes_rate() -> None:
    [row] = audit(scenario("s53-derm-wrong-code-g2250-charged"))
    assert (row["class"], row["code"], row["billed_code"]) == ("at-risk-charge", "G2010", "G2250")
    assert row["charge_refs"] == ["ChargeItem/s53-charge-wrong-g2250"]
    assert row["estimated_amount"] == RATES.amount("G2250")
    assert "G2010" in row["reason"] and "G2250" in row["reason"]


def test_billed_as_the_verdict_says_is_ok() -> None:
    [row] = audit(scenario("s48-already-billed-same-submission"))
    assert (row["class"], row["billed_code"], row["billed_modifiers"]) == ("ok", "G2250", ["GP"])
    assert row["estimated_amount"] is None


def test_a_second_charge_is_a_duplicate() -> None:
    item = scenario("s48-already-billed-same-submission")
    second = charge_item("s48-pat", "s48-chg-again", context="Encounter/s48-enc-vr", modifiers=("GP",),
                         when="2026-12-10T09:00:00-05:00")
    [row] = audit(item, [second])
    assert row["class"] == "at-risk-charge" and "duplicate" in row["reason"]
    assert sorted(row["charge_refs"]) == ["ChargeItem/s48-chg-again", "ChargeItem/s48-chg-g2250"]
    assert row["estimated_amount"] == RATES.amount("G2250")  # one charge too many


def test_void_charges_do_not_count() -> None:
    item = scenario("s01-pt-billable")
    void = charge_item("s01-pat", "s01-chg-void", context="Encounter/s01-enc-vr", status="entered-in-error")
    [row] = audit(item, [void])
    assert row["class"] == "missed-revenue" and row["charge_refs"] == []


@pytest.mark.parametrize(("change", "klass", "words"), [
    ({}, "ok", "Billed as the verdict says"),
    ({"modifiers": ()}, "at-risk-charge", "lacks modifier GP"),
    ({"modifiers": ("GP", "95")}, "at-risk-charge", "95"),
    ({"pos": "02"}, "at-risk-charge", "telehealth place of service 02"),
    ({"code": "G2010"}, "at-risk-charge", "bills G2010"),
    ({"status": "cancelled"}, "missed-revenue", "could be billed"),
])
def test_claim_lines_are_compared_with_the_verdict(change: dict[str, Any], klass: str, words: str) -> None:
    line = claim("s01-pat", "s01-claim", "Encounter/s01-enc-vr", **change)
    [row] = audit(scenario("s01-pt-billable"), [line])
    assert row["class"] == klass and words in row["reason"], row["reason"]
    if klass == "at-risk-charge":
        assert row["charge_refs"] == ["Claim/s01-claim"]
        assert row["estimated_amount"] == RATES.amount(change.get("code", "G2250"))


def test_charge_item_and_its_claim_line_are_one_charge() -> None:
    item = scenario("s01-pt-billable")
    extra = [charge_item("s01-pat", "s01-chg", context="Encounter/s01-enc-vr", modifiers=("GP",)),
             claim("s01-pat", "s01-claim", "Encounter/s01-enc-vr")]
    [row] = audit(item, extra)
    assert row["class"] == "ok" and row["charge_refs"] == ["ChargeItem/s01-chg", "Claim/s01-claim"]


def test_pending_before_the_deadline_is_outside_the_money() -> None:
    [row] = audit(scenario("s24-pending-no-follow-up"))
    assert (row["status"], row["class"], row["estimated_amount"]) == ("pending", "pending", None)
    assert row["deadline_missed_hours"] is None


def test_pending_past_its_deadline_is_not_billable_and_ok_unless_charged() -> None:
    """The decision: at as_of after the deadline with no reply, the rules say follow-up not-met (no reply) —
    not billable; nothing billed → ok; billed → at-risk."""
    item = scenario("s24-pending-no-follow-up")
    later = "2026-12-14T16:00:00-05:00"
    [row] = audit(item, at=later)
    assert (row["status"], row["class"]) == ("not-billable", "ok")
    assert "follow-up-within-24-business-hours:not-met" in row["failed_criteria"]
    assert row["deadline_missed_hours"] is not None and row["deadline_missed_hours"] > 0
    charged = charge_item("s24-pat", "s24-chg", context="Encounter/s24-enc-vr", modifiers=("GP",))
    [row] = audit(item, [charged], at=later)
    assert row["class"] == "at-risk-charge" and "not billable" in row["reason"]


def test_pending_past_its_deadline_with_an_unreadable_message_needs_review() -> None:
    item = scenario("s24-pending-no-follow-up")
    broken = {"resourceType": "Communication", "id": "s24-com-broken", "status": 12345,
              "subject": {"reference": "Patient/s24-pat"}, "sent": "not a date"}
    result = audit_patient("s24-pat", [*patient_resources(item), broken], shared=shared(),
                           settings=settings_at("2026-12-14T16:00:00-05:00"))
    [row] = result.rows
    assert (row["status"], row["class"]) == ("not-billable", "needs-review")
    [(reference, reason)] = result.skipped
    assert reference == "Communication/s24-com-broken"
    assert reason.startswith(engine.SKIP_INVALID_PREFIX + ": ") and "12345" not in reason and "not a date" not in reason


def test_needs_review_when_the_rules_cannot_decide() -> None:
    [row] = audit(scenario("s29-uncoded-visit-prior-7-days"))
    assert (row["status"], row["class"]) == ("needs-review", "needs-review")
    assert row["failed_criteria"] == ["no-related-service-prior-7-days:unknown"]
    assert any(e.startswith("no-related-service-prior-7-days=Encounter/") for e in row["evidence"])


def test_a_charge_no_assessment_claims_is_at_risk() -> None:
    patient = {"resourceType": "Patient", "id": "orphan-pat"}
    lone = charge_item("orphan-pat", "orphan-chg", "G2010", modifiers=(), when="2026-11-03T10:00:00-05:00")
    result = audit_patient("orphan-pat", [patient, lone], shared=shared(), settings=settings_at("2026-12-01"))
    [row] = result.rows
    assert (row["class"], row["status"], row["code"], row["billed_code"]) == ("at-risk-charge", None, None, "G2010")
    assert row["charge_refs"] == ["ChargeItem/orphan-chg"] and row["month"] == "2026-11"
    assert "no assessment" in row["reason"] and "names no review encounter" in row["reason"]
    assert row["estimated_amount"] == RATES.amount("G2010")
    assert row["assessment_id"] == _sha(["ChargeItem/orphan-chg#0"])


def test_a_charge_on_an_office_visit_is_an_orphan_beside_the_missed_review() -> None:
    item = scenario("s01-pt-billable")
    elsewhere = charge_item("s01-pat", "s01-chg-office", context="Encounter/s01-enc-office-2", modifiers=("GP",))
    rows = audit(item, [elsewhere])
    assert [r["class"] for r in rows] == ["missed-revenue", "at-risk-charge"]
    assert "Encounter/s01-enc-office-2" in rows[1]["reason"]


# ---------------------------------------------------------------------------------------------------- OIG screens
def test_oig_screen_em_visit_in_the_7_days_before() -> None:
    item = scenario("s27-related-visit-prior-7-days")
    [uncharged] = audit(item)
    assert uncharged["oig_screens"] == []  # nothing was paid: not an OIG finding
    charged = charge_item("s27-pat", "s27-chg", context="Encounter/s27-enc-vr", modifiers=("GP",))
    [row] = audit(item, [charged])
    assert row["class"] == "at-risk-charge"
    assert row["oig_screens"] == [findings.OIG_EM_WINDOW]


def test_oig_screen_em_visit_the_day_after() -> None:
    item = scenario("s58-dst-resulting-visit-23h")
    charged = charge_item("s58-pat", "s58-chg", context="Encounter/s58-enc-vr", modifiers=("GP",))
    [row] = audit(item, [charged])
    assert "no-resulting-service:not-met" in row["failed_criteria"]
    assert row["oig_screens"] == [findings.OIG_EM_WINDOW]


def test_oig_screen_e_visit_same_diagnosis() -> None:
    item = scenario("s49-evisit-same-problem")
    charged = charge_item("s49-pat", "s49-chg", "G2010", context="Encounter/s49-enc-vr", modifiers=())
    [row] = audit(item, [charged])
    assert row["class"] == "at-risk-charge" and row["oig_screens"] == [findings.OIG_E_VISIT]


def test_oig_screen_modifier_on_the_code_or_the_related_visit() -> None:
    item = scenario("s27-related-visit-prior-7-days")
    visit = charge_item("s27-pat", "s27-chg-em", "99213", system=CPT, context="Encounter/s27-enc-office-2",
                        modifiers=("25",))
    charged = charge_item("s27-pat", "s27-chg", context="Encounter/s27-enc-vr", modifiers=("GP",))
    [row] = audit(item, [visit, charged])
    assert "Encounter/s27-enc-office-2" in " ".join(row["evidence"])
    assert row["oig_screens"] == [findings.OIG_EM_WINDOW, findings.OIG_MODIFIERS]
    on_code = claim("s01-pat", "s01-claim", "Encounter/s01-enc-vr", modifiers=("GP", "GT"))
    [row] = audit(scenario("s01-pt-billable"), [on_code])
    assert row["oig_screens"] == [findings.OIG_MODIFIERS] and row["class"] == "at-risk-charge"


def test_oig_screen_ids_are_described() -> None:
    assert set(findings.OIG_SCREENS) == {"oig-em-within-7-days-after-or-1-day-before", "oig-e-visit-within-7-days",
                                         "oig-modifier-25-95-gt"}
    assert all(len(text) > 40 for text in findings.OIG_SCREENS.values())


# ------------------------------------------------------------------------------------------- timely filing, window
def test_timely_filing_is_twelve_months_after_the_date_of_service() -> None:
    item = scenario("s01-pt-billable")
    [row] = audit(item)
    assert (row["timely_filing_deadline"], row["past_timely_filing"]) == ("2027-11-18", False)
    [row] = audit(item, at="2027-11-18T23:00:00-05:00")
    assert row["past_timely_filing"] is False
    [row] = audit(item, at="2027-11-19T00:30:00-05:00")
    assert row["past_timely_filing"] is True
    billed_later = claim("s01-pat", "s01-claim", "Encounter/s01-enc-vr", served="2026-11-20", pos="02")
    [row] = audit(item, [billed_later])
    assert row["timely_filing_deadline"] == "2027-11-20"  # the claim's date of service


def test_timely_filing_deadline_in_a_leap_year() -> None:
    assert findings.timely_filing_deadline(date(2024, 2, 29)) == date(2025, 2, 28)
    assert findings.timely_filing_deadline(date(2026, 12, 31)) == date(2027, 12, 31)


def test_receipt_window() -> None:
    item = scenario("s51-two-submissions-first")  # two assessments: received 7 Dec and 10 Dec 2026
    tz = base_settings().calendar.tz
    both = audit(item)
    assert [r["received"][:10] for r in both] == ["2026-12-07", "2026-12-10"]
    since = datetime(2026, 12, 8, tzinfo=tz)
    assert [r["received"][:10] for r in audit(item, since=since)] == ["2026-12-10"]
    assert [r["received"][:10] for r in audit(item, until=since)] == ["2026-12-07"]
    exact = datetime.fromisoformat("2026-12-10T10:00:00-05:00")
    assert [r["received"][:10] for r in audit(item, until=exact)] == ["2026-12-07"]  # until is exclusive
    assert [r["received"][:10] for r in audit(item, since=exact)] == ["2026-12-10"]  # since is inclusive
    first_charged = charge_item("s51-pat", "s51-chg-1", "G2010", context="Encounter/s51-enc-vr-1", modifiers=())
    [row] = audit(item, [first_charged], since=since)  # its assessment is outside the window: no orphan row
    assert row["received"][:10] == "2026-12-10" and row["charge_refs"] == []
    lone = charge_item("orphan-pat", "orphan-chg", when="2026-11-03T10:00:00-05:00")
    window = settings_at("2026-12-01", since=datetime(2026, 11, 4, tzinfo=tz))
    assert audit_patient("orphan-pat", [lone], shared=shared(), settings=window).rows == []


# ------------------------------------------------------------------------------------------------------ settings
def test_settings_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "audit.yaml"
    config.write_text("auth:\n  required: false\ncalendar:\n  timezone: America/Chicago\n  holidays: US\n"
                      "rules:\n  rates:\n    - code: G2250\n      amount: 20.5\n      currency: USD\n"
                      "      setting: non-facility\n      source: test table\n      as_of: '2026-01-01'\n",
                      encoding="utf-8")
    spec = engine.SettingsSpec(config_path=str(config), as_of="2026-12-01T09:00:00Z", since="2026-11-01",
                               until="2026-12-01")
    settings = AuditSettings.from_spec(spec)
    assert settings.calendar.tz.key == "America/Chicago"
    assert settings.rules.rates.amount("G2250") == 20.5 and settings.rules.rates.amount("G2010") == RATES.amount(
        "G2010")
    assert settings.as_of == datetime.fromisoformat("2026-12-01T09:00:00+00:00")
    assert settings.since == datetime(2026, 11, 1, tzinfo=settings.calendar.tz)
    with pytest.raises(AuditSettingsError, match="--as-of"):
        AuditSettings.from_spec(engine.SettingsSpec(config_path=None, as_of="yesterday"))


def test_the_rates_table_has_its_source_and_date() -> None:
    for code in ("G2250", "G2010"):
        rate = RATES.rate(code)
        assert rate is not None and rate.amount > 0 and rate.source and rate.as_of.year >= 2025
        assert rate.setting == "non-facility" and rate.currency == "USD"


def test_the_shared_bag_is_not_changed_by_a_patient() -> None:
    record = shared()
    before = {rtype: len(models) for rtype, models in record.bag.by_type.items()}
    audit(scenario("s01-pt-billable"))
    assert {rtype: len(models) for rtype, models in record.bag.by_type.items()} == before
    assert "Patient" not in record.bag.by_type


def test_invalid_shared_resources_are_reported_in_the_engines_words() -> None:
    record = build_shared([{"resourceType": "Practitioner", "id": "pr-bad", "active": "sometimes"},
                           {"resourceType": "Organization", "id": "org-ok"}])
    assert record.resources == 2 and list(record.bag.by_type) == ["Organization"]
    [(reference, reason)] = record.skipped
    assert reference == "Practitioner/pr-bad" and reason.startswith(engine.SKIP_INVALID_PREFIX + ": ")
    assert "sometimes" not in reason and "active" in reason
    assert record.patient_bag().skipped == []
