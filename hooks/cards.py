"""Determinations → CDS Hooks cards (cds-hooks.md "Response rules", contract.md "Cards", billing-rules.md §6).

A clinician reads the summary in two seconds (< 140 characters, no criterion ids); a coder reads the detail
(Markdown: every failing or open criterion with its evidence) and acts on the suggestion. Card and suggestion uuids
are stable for the same assessment and verdict, so feedback on a card refers to something that stays put.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any

from cds_service.rules.model import HCPCS_SYSTEM, CriterionResult, Determination

EXTENSION_KEY = "g2250-cds.determination"
DETERMINATION_KEY = "_determination"
MODIFIER_EXTENSION_URL = "https://g2250-cds.example.org/fhir/StructureDefinition/claim-modifier"
OVERRIDE_SYSTEM = "https://g2250-cds.example.org/fhir/CodeSystem/override-reason"
_UUID_NAMESPACE = uuid.UUID("6f1c2a8e-4d1b-5b7e-9a57-0c2d52500000")
_NAMESPACE_BYTES = _UUID_NAMESPACE.bytes


@cache
def texts() -> dict[str, Any]:
    """Card texts, labels, links and override reasons: data billing staff may edit (style.md)."""
    return json.loads(resources.files("hooks").joinpath("card_texts.json").read_text("utf-8"))


def stable_uuid(*parts: str | None) -> str:
    """``uuid5(_UUID_NAMESPACE, "a|b|c")`` as text (RFC 4122 §4.3), written out without the UUID object: the same
    value for the same parts on every call and every release, a few microseconds cheaper per card."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + "|".join(p or "" for p in parts).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _source() -> dict[str, Any]:
    return dict(texts()["source"])


def _links(determination: Determination) -> list[dict[str, Any]]:
    links = [dict(link, type="absolute") for link in texts()["links"]]
    payer = determination.payer_profile
    if payer and payer in texts()["payer_links"]:
        links.append(dict(texts()["payer_links"][payer], type="absolute"))
    return links


def fmt_time(moment: datetime | None) -> str:
    if moment is None:
        return "unknown"
    return f"{moment:%a %d %b %H:%M} {moment.tzname() or ''}".strip()


def label(criterion_id: str) -> str:
    return texts()["criteria"][criterion_id]


def status_words(status: str) -> str:
    """The status in words beside its symbol ("❌ not met"): EHRs render Markdown without emoji fonts."""
    return texts()["status_words"][status]


def case_of(result: CriterionResult) -> str | None:
    case = result.facts.get("case")
    return case if isinstance(case, str) and case else None


def _phrase(section: str, result: CriterionResult) -> str:
    """The ``reasons``/``questions`` phrase for what the data says: ``"{id}:{case}"`` first, then a case common to
    several criteria (``"*:{case}"``, e.g. no receipt time), then the plain id."""
    table = texts()[section]
    case = case_of(result)
    if case is not None:
        for key in (f"{result.id}:{case}", f"*:{case}"):
            if key in table:
                return table[key]
    return table[result.id]


def reason(result: CriterionResult) -> str:
    """Why a ``not-met`` criterion stops billing, in the clinician's words."""
    return _phrase("reasons", result)


def question(result: CriterionResult) -> str:
    """What to confirm for an ``unknown`` criterion, in the clinician's words."""
    return _phrase("questions", result)


def criterion_line(result: CriterionResult, *, with_evidence: bool = True) -> str:
    mark = status_words(result.status)
    line = f"- {mark}: **{label(result.id)}** — {result.detail}"
    if with_evidence and result.evidence and result.status != "met":
        line += " _(" + ", ".join(f"`{e}`" for e in result.evidence[:6]) + ")_"
    return line


def _has_case(determination: Determination, case: str) -> bool:
    return any(case_of(r) == case for r in determination.criteria)


def is_therapist(determination: Determination) -> bool:
    return any(m in texts()["therapy_modifiers"] for m in determination.modifiers)


def unverifiable_markdown(determination: Determination) -> list[str]:
    """What the record cannot show (billing-rules.md §7 "Honest wording"), for a card that proposes a charge."""
    notes = texts()["notes"]
    items = list(notes["unverifiable_items"])
    assisted = any(m in texts()["assistant_modifiers"] for m in determination.modifiers)
    if is_therapist(determination) and not assisted:
        items += notes["unverifiable_therapist_items"]
    return [notes["unverifiable"], "", *(f"- {item}" for item in items)]


def _notes_markdown(determination: Determination, billing_note: bool) -> list[str]:
    notes = texts()["notes"]
    parts: list[str] = []
    if _has_case(determination, "rhc-fqhc"):
        parts += ["", notes["rhc_fqhc"]]
    if billing_note:
        for modifier in determination.modifiers:
            if modifier in texts()["assistant_modifiers"]:
                parts += ["", notes["assistant_modifier"].format(modifier=modifier)]
        parts += ["", notes["not_telehealth"]]
    return parts


def detail_markdown(determination: Determination, lead: str, *, billing_note: bool = False,
                    unverifiable: bool = False) -> str:
    """Open problems first (what to fix), then what is fine; the evidence a coder needs without another screen.

    ``billing_note`` adds the "not telehealth; coinsurance applies" note and, with CQ/CO, the 85 % note: only on
    cards that propose billing (billable, needs-review offering the charge, pending; never "do not bill" nor the
    appointment-book warning). ``unverifiable`` lists what the record cannot show (§7 "Honest wording")."""
    order = {"not-met": 0, "unknown": 1, "pending": 2, "met": 3}
    rows = sorted(determination.criteria, key=lambda r: order[r.status])
    parts = [lead, ""]
    parts += [criterion_line(r) for r in rows]
    facts = []
    if determination.receipt_time is not None:
        facts.append(f"Received {fmt_time(determination.receipt_time)}")
    if determination.deadline is not None:
        facts.append(f"reply due {fmt_time(determination.deadline)} (24 business hours)")
    if determination.follow_up_time is not None:
        facts.append(f"replied {fmt_time(determination.follow_up_time)}")
    if facts:
        parts += ["", "; ".join(facts) + "."]
    if unverifiable:
        parts += ["", *unverifiable_markdown(determination)]
    parts += _notes_markdown(determination, billing_note and determination.code is not None)
    return "\n".join(parts)


def code_phrase(determination: Determination) -> str:
    code = determination.code or "G2250/G2010"
    if determination.modifiers:
        return f"{code} with {', '.join(determination.modifiers)}"
    return code


def charge_item(determination: Determination, code: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The R4 ChargeItem of contract.md ("Cards") and billing-rules.md §6 "ChargeItem proposed"."""
    code = code or determination.code
    assert code is not None
    resource: dict[str, Any] = {
        "resourceType": "ChargeItem",
        "status": "billable",
        "code": {"coding": [{"system": HCPCS_SYSTEM, "code": code, "display": texts()["codes"][code]}]},
        "subject": {"reference": determination.patient},
    }
    if determination.modifiers:
        resource["extension"] = [
            {"url": MODIFIER_EXTENSION_URL, "valueCoding": {"system": HCPCS_SYSTEM, "code": m}}
            for m in determination.modifiers
        ]
    if determination.encounter:
        resource["context"] = {"reference": determination.encounter}
    occurrence = determination.follow_up_time or now
    if occurrence is not None:
        resource["occurrenceDateTime"] = occurrence.isoformat(timespec="seconds")
    if determination.practitioner:
        resource["performer"] = [{"actor": {"reference": determination.practitioner}}]
    resource["quantity"] = {"value": 1}
    if now is not None:
        resource["enteredDate"] = now.isoformat(timespec="seconds")
    supporting = [*determination.submissions, *([determination.follow_up] if determination.follow_up else [])]
    if supporting:
        resource["supportingInformation"] = [{"reference": key} for key in supporting]
    note = f"{code}" + (f" with modifier(s) {', '.join(determination.modifiers)}" if determination.modifiers else "")
    resource["note"] = [{"text": f"{note}. Proposed by g2250-cds; remote assessment of patient-submitted images."}]
    return resource


def _create_suggestion(determination: Determination, kind: str, recommended: bool,
                       now: datetime | None) -> dict[str, Any]:
    phrase = code_phrase(determination)
    words = texts()["suggestions"]
    return {
        "label": words["create_label"].format(code=phrase),
        "uuid": stable_uuid("suggestion", kind, determination.encounter, *determination.submissions,
                            determination.code),
        "isRecommended": recommended,
        "actions": [{
            "type": "create",
            "description": words["create_action"].format(code=phrase),
            "resource": charge_item(determination, now=now),
        }],
    }


def _override_reasons(determination: Determination) -> list[dict[str, Any]]:
    wanted: list[str] = []
    for result in determination.criteria:
        if result.status in ("not-met", "unknown"):
            wanted.extend(texts()["override_reasons_by_criterion"].get(result.id, []))
    wanted.append("other")
    catalogue = texts()["override_reasons"]
    return [{"system": OVERRIDE_SYSTEM, "code": code, "display": catalogue[code]} for code in dict.fromkeys(wanted)]


def _summary(text: str) -> str:
    return text if len(text) < 140 else text[:136].rstrip() + "…"


def make_card(kind: str, determination: Determination, summary: str, indicator: str, detail: str,
          *, key: str | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {
        "uuid": stable_uuid("card", kind, key or determination.encounter, *determination.submissions,
                            determination.status, determination.code),
        "summary": _summary(summary),
        "indicator": indicator,
        "detail": detail,
        "source": _source(),
        "links": _links(determination),
        "extension": {EXTENSION_KEY: determination.to_extension()},
        # Popped by HookService.handle before the response leaves: feeds the determination log.
        DETERMINATION_KEY: determination,
    }
    return card


def first_reason(results: list[CriterionResult]) -> str:
    return reason(results[0]) if results else ""


def _needs_review_question(determination: Determination) -> str:
    """The first open point: an ``unknown`` criterion, else (a status the rules set to needs-review with every
    criterion met, e.g. CQ/CO or RHC/FQHC) the criterion whose case says why, else a generic pointer."""
    open_items = determination.unknown()
    if open_items:
        return question(open_items[0])
    cased = [r for r in determination.criteria if case_of(r) is not None
             and f"{r.id}:{case_of(r)}" in texts()["questions"]]
    if cased:
        return question(cased[0])
    return texts()["questions"]["_needs_review"]


def determination_card(determination: Determination, kind: str, now: datetime) -> dict[str, Any]:
    """The card of billing-rules.md §6 "Card by status" (encounter-discharge, and patient-view's open items).

    Billing staff edit the words in card_texts.json ("summaries", "leads", "notes"); the "not telehealth" note
    goes only on cards that propose billing (§7: never on a "do not bill" card)."""
    phrase = code_phrase(determination)
    status = determination.status
    summaries, leads = texts()["summaries"], texts()["leads"]
    if status == "billable":
        card = make_card(kind, determination, summaries["billable"].format(code=phrase), "info",
                         detail_markdown(determination, leads["billable"].format(code=phrase), billing_note=True,
                                         unverifiable=True))
        card["suggestions"] = [_create_suggestion(determination, kind, True, now)]
        card["selectionBehavior"] = "at-most-one"
        return card
    if status == "pending":
        left = next((r.facts.get("business_hours_left") for r in determination.criteria
                     if r.id == "follow-up-within-24-business-hours"), None)
        left_text = summaries["pending_left"].format(hours=f"{left:g}") if isinstance(left, int | float) else ""
        template = summaries["pending"] if determination.code else summaries["pending_no_code"]
        summary = template.format(deadline=fmt_time(determination.deadline), left=left_text, code=phrase)
        return make_card(kind, determination, summary, "info",
                         detail_markdown(determination, leads["pending"], billing_note=True))
    if status == "needs-review":
        offers_charge = determination.code is not None
        summary = summaries["needs_review"].format(code=phrase, question=_needs_review_question(determination))
        card = make_card(kind, determination, summary, "warning",
                         detail_markdown(determination, leads["needs_review"], billing_note=offers_charge,
                                         unverifiable=offers_charge))
        if offers_charge:
            # Offered, never recommended: the open points are the clinician's to confirm (§6).
            card["suggestions"] = [_create_suggestion(determination, kind, False, now)]
            card["selectionBehavior"] = "at-most-one"
        card["overrideReasons"] = _override_reasons(determination)
        return card
    failing = determination.failing()
    replacement = _replacement_card(determination, kind)
    if replacement is not None:
        return replacement
    # Not billable: no create suggestion for G2250/G2010 and no "bill it" note (§6, §7).
    summary = summaries["not_billable"].format(code=phrase, reason=first_reason(failing))
    card = make_card(kind, determination, summary, "warning",
                     detail_markdown(determination, leads["not_billable"].format(code=phrase)))
    card["overrideReasons"] = _override_reasons(determination)
    return card


def _replacement_card(determination: Determination, kind: str) -> dict[str, Any] | None:
    """The wrong code was charged (G2250 for an E/M-capable practitioner, or the reverse) and everything else is
    met: warn "use G2010" and offer to replace the charge (billing-rules.md §1)."""
    failing = determination.failing()
    if len(failing) != 1 or failing[0].id != "not-already-billed" or "wrong_code" not in failing[0].facts:
        return None
    if any(r.status != "met" for r in determination.criteria if r.id != "not-already-billed"):
        return None
    wrong = failing[0].facts["wrong_code"]
    if isinstance(wrong, list | tuple):
        wrong = "/".join(str(w) for w in wrong)
    phrase = code_phrase(determination)
    words = texts()["suggestions"]
    charges = [k for k in failing[0].evidence if k.startswith("ChargeItem/")]
    summary = texts()["summaries"]["replace"].format(code=determination.code, wrong=wrong)
    card = make_card(kind, determination, summary, "warning",
                     detail_markdown(determination, texts()["leads"]["replace"].format(
                         code=phrase, wrong=wrong, detail=failing[0].detail)))
    # While a wrong-code charge exists the assessment is not billable, and a not-billable card never creates a
    # G2250/G2010 charge (billing-rules.md §6): the suggestion removes the wrong charge; the next evaluation then
    # proposes the right one.
    if charges:
        card["suggestions"] = [{
            "label": words["replace_label"].format(code=phrase, wrong=wrong),
            "uuid": stable_uuid("suggestion", kind, "replace", *charges, determination.code),
            "isRecommended": True,
            "actions": [{"type": "delete", "description": words["replace_action"].format(
                code=determination.code, wrong=wrong, charge=c), "resourceId": c} for c in charges],
        }]
        card["selectionBehavior"] = "at-most-one"
    card["overrideReasons"] = _override_reasons(determination)
    return card
