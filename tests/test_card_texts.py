"""Card wording (billing-rules.md §6 "Card by status", §7 "Honest wording" and "appointment-book").

Determinations are built directly (cds_service/rules/model.py) so each wording rule is checked on its own: the case
phrases of ``facts["case"]``, the status in words beside each symbol, the "not telehealth" note only on cards that
propose billing, and the appointment-book delete offered but never recommended.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from cds_service.rules.model import CRITERION_IDS, CriterionResult, Determination, overall_status
from hooks import services
from hooks.cards import determination_card, texts
from hooks.services import AppointmentBookService, EncounterStartService

NY = ZoneInfo("America/New_York")
NOW = datetime(2026, 11, 18, 15, 40, tzinfo=NY)
RECEIPT = datetime(2026, 11, 17, 9, 0, tzinfo=NY)
DEADLINE = datetime(2026, 11, 18, 9, 0, tzinfo=NY)
REPLIED = datetime(2026, 11, 17, 14, 30, tzinfo=NY)


def telehealth_note() -> str:
    return texts()["notes"]["not_telehealth"]


def make(*results: CriterionResult, code: str | None = "G2250", modifiers: tuple[str, ...] = ("GP",),
         status: str | None = None, charges: tuple[str, ...] = (), replied: bool = True) -> Determination:
    """All ten criteria (met unless given), with the usual episode references."""
    given = {r.id: r for r in results}
    criteria = tuple(given.get(cid) or CriterionResult(cid, "met", f"{cid} is fine.", (f"Basic/{cid}",))
                     for cid in CRITERION_IDS)
    return Determination(
        status=status or overall_status(list(criteria)),  # type: ignore[arg-type]
        criteria=criteria, code=code, modifiers=modifiers, deadline=DEADLINE, receipt_time=RECEIPT,
        patient="Patient/p1", encounter="Encounter/e1", practitioner="Practitioner/pt1",
        submissions=("Media/m1",), follow_up="Communication/reply" if replied else None,
        follow_up_time=REPLIED if replied else None, existing_charges=charges,
    )


def result(criterion_id: str, status: str, case: str | None = None, detail: str | None = None,
           evidence: tuple[str, ...] = ("Encounter/x1",), **facts: Any) -> CriterionResult:
    if case is not None:
        facts["case"] = case
    return CriterionResult(criterion_id, status, detail or f"Detail of {criterion_id} ({case}).",  # type: ignore
                           evidence, facts)


def creates(card: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for s in card.get("suggestions", []) for a in s["actions"] if a["type"] == "create"]


def assert_detail_explains(card: dict[str, Any], determination: Determination) -> None:
    detail = card["detail"]
    for criterion in determination.criteria:
        if criterion.status in ("not-met", "unknown"):
            assert criterion.detail in detail
            for reference in criterion.evidence[:6]:
                assert f"`{reference}`" in detail
    assert len(card["summary"]) < 140


# --- 1. honest billable wording ------------------------------------------------------------------------------------


def test_billable_says_this_service_checks_and_names_what_the_record_cannot_show() -> None:
    card = determination_card(make(), "encounter-discharge", NOW)
    summary, detail = card["summary"], card["detail"]
    assert summary == "Bill G2250 with GP: this photo/video review meets every condition this service checks"
    assert "Medicare condition" not in summary and "Every condition is met" not in detail
    assert "every condition this service checks" in detail
    assert "recorded by the patient (or caregiver) themselves" in detail
    assert "the billing practitioner's own work" in detail
    assert "care management or remote patient monitoring" in detail
    assert "no therapy assistant (PTA/OTA) took part" in detail  # GP: a physical therapist
    (suggestion,) = card["suggestions"]
    assert suggestion["isRecommended"] is True and card["indicator"] == "info"


def test_billable_for_a_non_therapist_does_not_ask_about_assistants() -> None:
    card = determination_card(make(code="G2010", modifiers=()), "encounter-discharge", NOW)
    assert card["summary"].startswith("Bill G2010:")
    assert "recorded by the patient" in card["detail"]
    assert "therapy assistant" not in card["detail"]


# --- 2. status in words beside every symbol ------------------------------------------------------------------------


def test_every_criterion_line_shows_its_status_in_words() -> None:
    determination = make(
        result("established-patient", "not-met", "no-prior-visit", evidence=("Patient/p1",)),
        result("consent-documented", "unknown", detail="No consent found."),
        result("follow-up-within-24-business-hours", "pending"),
    )
    detail = determination_card(determination, "encounter-discharge", NOW)["detail"]
    lines = [line for line in detail.splitlines() if line.startswith("- ") and "**" in line]
    by_label = {texts()["criteria"][cid]: cid for cid in CRITERION_IDS}
    seen = {}
    for line in lines:
        for name, cid in by_label.items():
            if f"**{name}**" in line:
                seen[cid] = line
    assert set(seen) == set(CRITERION_IDS)
    assert "❌ not met" in seen["established-patient"]
    assert "❓ unknown — confirm" in seen["consent-documented"]
    assert "⏳ pending" in seen["follow-up-within-24-business-hours"]
    assert "✅ met" in seen["payer-covers-code"]


def test_encounter_start_lists_early_problems_with_status_words(monkeypatch: pytest.MonkeyPatch) -> None:
    determination = make(result("consent-documented", "unknown", detail="No consent found."),
                         result("follow-up-within-24-business-hours", "pending"),
                         result("practitioner-interpretation", "pending"), replied=False)
    card = _encounter_start_card(monkeypatch, determination)
    assert card["summary"].startswith("Reply by")
    head = card["detail"].partition("All conditions so far:")[0]
    assert "- ❓ unknown — confirm: **Consent documented** — No consent found." in head
    assert telehealth_note() in card["detail"]  # pending: it bills if the reply comes in time


def test_encounter_start_without_billing_prospect_has_no_billing_note(monkeypatch: pytest.MonkeyPatch) -> None:
    determination = make(result("consent-documented", "not-met", detail="Consent denied."), replied=False)
    card = _encounter_start_card(monkeypatch, determination)
    assert determination.status == "not-billable"
    assert telehealth_note() not in card["detail"]


def _encounter_start_card(monkeypatch: pytest.MonkeyPatch, determination: Determination) -> dict[str, Any]:
    """EncounterStartService.cards with the rules step replaced by the given determination."""
    monkeypatch.setattr(services, "_encounter_determination", lambda *args, **kwargs: determination)
    (card,) = EncounterStartService().cards(None, None, NOW, None)  # type: ignore[arg-type]
    return card


# --- 3. reasons that say what the data says ------------------------------------------------------------------------

NOT_MET_CASES = [
    ("established-patient", "no-prior-visit", "the patient has no visit in the last 3 years (new patient)"),
    ("established-patient", "other-specialty", "seen only by another specialty (new to this specialty)"),
    ("established-patient", "other-organization", "seen only at another organization"),
    ("established-patient", "colleague-unknown", "not known to be of this practice and specialty"),
    ("practitioner-interpretation", "no-reply", "no reply or interpretation is recorded"),
    ("practitioner-interpretation", "reply-by-other",
     "someone else replied; the billing practitioner's own review is not recorded"),
    ("practitioner-interpretation", "assistant-only", "only a therapy assistant reviewed it"),
    ("follow-up-within-24-business-hours", "late", "after the 24-business-hour deadline"),
    ("follow-up-within-24-business-hours", "no-reply", "no reply to the patient is recorded"),
    ("follow-up-within-24-business-hours", "reply-by-other", "someone other than the billing practitioner"),
    ("not-already-billed", "same-submission", "this submission is already charged"),
    ("not-already-billed", "e-visit", "the same problem is already billed as an e-visit within 7 days"),
    ("not-already-billed", "check-in", "the reply itself was billed as a separate check-in"),
    ("no-related-service-prior-7-days", "related-visit", "a visit for the same problem within 7 days"),
    ("billing-practitioner-eligible", "not-eligible", "this practitioner type cannot bill"),
    ("billing-practitioner-eligible", "assistant-own-name", "a therapy assistant cannot bill in their own name"),
]


@pytest.mark.parametrize(("criterion_id", "case", "phrase"), NOT_MET_CASES)
def test_not_billable_summary_says_what_the_data_says(criterion_id: str, case: str, phrase: str) -> None:
    determination = make(result(criterion_id, "not-met", case))
    card = determination_card(determination, "encounter-discharge", NOW)
    assert card["summary"].startswith("Do not bill G2250 with GP: "), card["summary"]
    assert phrase in card["summary"], card["summary"]
    assert card["indicator"] == "warning" and not creates(card) and card["overrideReasons"]
    assert_detail_explains(card, determination)


UNKNOWN_CASES = [
    ("established-patient", "colleague-unknown", "was the earlier visit's practitioner of this practice"),
    ("not-already-billed", "care-management",
     "was this review's time counted toward care management or remote monitoring?"),
    ("not-already-billed", "e-visit-uncoded", "e-visit for another problem"),
    ("not-already-billed", "wrong-code", "the other code"),
    ("no-related-service-prior-7-days", "uncoded", "was the visit in the prior 7 days for another problem?"),
    ("no-related-service-prior-7-days", "global-period", "is this review part of a post-operative global period?"),
    ("billing-practitioner-eligible", "verify", "may this practitioner's type bill the code?"),
    ("billing-practitioner-eligible", "assistant-participation", "more than 10 %"),
    ("billing-practitioner-eligible", "rhc-fqhc", "RHC/FQHC"),
]


@pytest.mark.parametrize(("criterion_id", "case", "phrase"), UNKNOWN_CASES)
def test_needs_review_summary_asks_the_case_question(criterion_id: str, case: str, phrase: str) -> None:
    determination = make(result(criterion_id, "unknown", case))
    assert determination.status == "needs-review"
    card = determination_card(determination, "encounter-discharge", NOW)
    assert card["summary"].startswith("Confirm before billing G2250 with GP: "), card["summary"]
    assert phrase in card["summary"], card["summary"]
    assert card["indicator"] == "warning"
    assert all(s["isRecommended"] is False for s in card["suggestions"])
    assert_detail_explains(card, determination)


def test_every_listed_case_has_its_own_phrase() -> None:
    reasons, questions = texts()["reasons"], texts()["questions"]
    for criterion_id, case, _ in NOT_MET_CASES + UNKNOWN_CASES:
        key = f"{criterion_id}:{case}"
        assert key in reasons and key in questions, key
        assert reasons[key] != reasons[criterion_id], key
    for key in (*reasons, *questions):
        if ":" in key:
            assert key.split(":")[0] in (*CRITERION_IDS, "*"), key


def test_unknown_case_falls_back_to_the_plain_phrase() -> None:
    not_met = make(result("consent-documented", "not-met", "some-new-case"))
    assert determination_card(not_met, "encounter-discharge", NOW)["summary"] == (
        f"Do not bill G2250 with GP: {texts()['reasons']['consent-documented']}")
    unknown = make(result("payer-covers-code", "unknown", "some-new-case"))
    assert determination_card(unknown, "encounter-discharge", NOW)["summary"] == (
        f"Confirm before billing G2250 with GP: {texts()['questions']['payer-covers-code']}")
    no_case = make(result("established-patient", "not-met"))
    assert texts()["reasons"]["established-patient"] in determination_card(no_case, "x", NOW)["summary"]


def test_generic_cases_apply_to_every_criterion() -> None:
    for criterion_id in ("established-patient", "follow-up-within-24-business-hours", "not-already-billed"):
        card = determination_card(make(result(criterion_id, "unknown", "no-receipt")), "x", NOW)
        assert card["summary"].endswith(texts()["questions"]["*:no-receipt"])
    card = determination_card(make(result("consent-documented", "not-met", "incomplete-record")), "x", NOW)
    assert card["summary"].endswith(texts()["reasons"]["*:incomplete-record"])


def test_all_summaries_stay_under_140_characters() -> None:
    keys = {*texts()["reasons"], *texts()["questions"]}
    cases = []
    for key in keys:
        if ":" in key:
            owner, case = key.split(":")
            cases += [(owner, case)] if owner != "*" else [(cid, case) for cid in CRITERION_IDS]
    for criterion_id, case in cases:
        for status in ("not-met", "unknown"):
            determination = make(result(criterion_id, status, case), modifiers=("CQ", "GP"))
            summary = determination_card(determination, "encounter-discharge", NOW)["summary"]
            assert len(summary) < 140, summary
            assert not summary.endswith("…"), summary  # the phrases fit without truncation


# --- 4. the telehealth/coinsurance note only where billing is proposed ---------------------------------------------


def test_telehealth_note_placement() -> None:
    billable = determination_card(make(), "encounter-discharge", NOW)
    pending = determination_card(make(result("follow-up-within-24-business-hours", "pending"),
                                      result("practitioner-interpretation", "pending"), replied=False), "pv", NOW)
    review = determination_card(make(result("consent-documented", "unknown")), "encounter-discharge", NOW)
    review_no_code = determination_card(make(result("billing-practitioner-eligible", "unknown", "verify"),
                                             code=None, modifiers=()), "encounter-discharge", NOW)
    not_billable = determination_card(make(result("consent-documented", "not-met")), "encounter-discharge", NOW)
    assert pending["summary"].startswith("Reply to the patient")
    assert creates(review) and not creates(review_no_code)
    for card in (billable, pending, review):
        assert telehealth_note() in card["detail"], card["summary"]
    for card in (review_no_code, not_billable):
        assert telehealth_note() not in card["detail"], card["summary"]
        assert not creates(card)


def test_use_other_code_card_has_no_billing_note_and_creates_nothing() -> None:
    wrong = CriterionResult("not-already-billed", "not-met", "A G2250 charge was entered, but this practitioner "
                            "bills G2010.", ("ChargeItem/c1",), {"wrong_code": "G2250", "case": "wrong-code"})
    card = determination_card(make(wrong, code="G2010", modifiers=()), "encounter-discharge", NOW)
    assert card["summary"].startswith("Use G2010, not G2250")
    assert telehealth_note() not in card["detail"]
    assert not creates(card)
    assert [a["resourceId"] for s in card["suggestions"] for a in s["actions"]] == ["ChargeItem/c1"]


# --- 5. appointment-book: delete offered, never recommended ----------------------------------------------------------


def _bundled(charges: tuple[str, ...]) -> Determination:
    return make(result("no-resulting-service", "not-met", "resulting-appointment",
                       detail="The proposed appointment starts within 24 h of the reply.",
                       evidence=("Appointment/new",)), charges=charges)


def test_appointment_book_delete_is_offered_not_recommended() -> None:
    determination = _bundled(("ChargeItem/c1",))
    card = AppointmentBookService()._bundling_card(determination, ["Appointment/new"], None, NOW)  # type: ignore
    assert card["summary"].startswith("This visit would include the photo review of 17 Nov")
    assert card["indicator"] == "warning"
    (suggestion,) = card["suggestions"]
    assert suggestion["isRecommended"] is False
    assert [(a["type"], a["resourceId"]) for a in suggestion["actions"]] == [("delete", "ChargeItem/c1")]
    assert "once the visit takes place" in card["detail"]
    assert "may still be cancelled" in card["detail"]
    assert telehealth_note() not in card["detail"]
    assert not creates(card)
    assert_detail_explains(card, determination)


def test_appointment_book_without_charge_has_no_suggestion_and_no_note() -> None:
    card = AppointmentBookService()._bundling_card(_bundled(()), ["Appointment/new"], None, NOW)  # type: ignore
    assert "suggestions" not in card and "selectionBehavior" not in card
    assert telehealth_note() not in card["detail"]
    assert "once the visit takes place" not in card["detail"]


# --- 6. needs-review offers, never recommends; CQ/CO explained ----------------------------------------------------


@pytest.mark.parametrize("modifier", ["CQ", "CO"])
def test_assistant_modifier_is_explained(modifier: str) -> None:
    therapy = "GP" if modifier == "CQ" else "GO"
    determination = make(result("billing-practitioner-eligible", "unknown", "assistant-participation"),
                         modifiers=(modifier, therapy))
    card = determination_card(determination, "encounter-discharge", NOW)
    detail = card["detail"]
    assert card["summary"].startswith(f"Confirm before billing G2250 with {modifier}, {therapy}:")
    assert "paid at 85 %" in detail
    assert "Drop the modifier only when the assistant's part was 10 % or less" in detail
    (suggestion,) = card["suggestions"]
    assert suggestion["isRecommended"] is False
    assert suggestion["actions"][0]["type"] == "create"


def test_needs_review_forced_by_the_rules_with_every_criterion_met_still_asks() -> None:
    """CQ/CO or RHC/FQHC may set needs-review with nothing unknown: the summary still names the point."""
    met_with_case = CriterionResult("billing-practitioner-eligible", "met", "Physical therapist; a PTA took part.",
                                    ("Practitioner/pta",), {"case": "assistant-participation"})
    card = determination_card(make(met_with_case, modifiers=("CQ", "GP"), status="needs-review"), "x", NOW)
    assert "more than 10 %" in card["summary"]
    plain = determination_card(make(status="needs-review"), "x", NOW)
    assert plain["summary"].startswith("Confirm before billing G2250 with GP: ")


def test_rhc_fqhc_detail_names_their_own_rules() -> None:
    determination = make(result("billing-practitioner-eligible", "unknown", "rhc-fqhc"))
    card = determination_card(determination, "encounter-discharge", NOW)
    assert "RHCs and FQHCs bill" in card["detail"]
    assert card["indicator"] == "warning" and determination.status == "needs-review"


def test_not_billable_never_creates_a_charge_even_with_unknowns() -> None:
    determination = make(result("consent-documented", "not-met", detail="Consent denied."),
                         result("payer-covers-code", "unknown"))
    card = determination_card(determination, "encounter-discharge", NOW)
    assert card["summary"].startswith("Do not bill")
    assert not creates(card)
    assert "paid at 85 %" not in card["detail"]
