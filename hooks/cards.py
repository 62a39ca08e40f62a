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


def _criterion_line(result: CriterionResult) -> str:
    mark = {"met": "✅", "not-met": "❌", "pending": "⏳", "unknown": "❓"}[result.status]
    line = f"- {mark} **{label(result.id)}** — {result.detail}"
    if result.evidence and result.status != "met":
        line += " _(" + ", ".join(f"`{e}`" for e in result.evidence[:6]) + ")_"
    return line


def detail_markdown(determination: Determination, lead: str) -> str:
    """Open problems first (what to fix), then what is fine; the evidence a coder needs without another screen."""
    order = {"not-met": 0, "unknown": 1, "pending": 2, "met": 3}
    rows = sorted(determination.criteria, key=lambda r: order[r.status])
    parts = [lead, ""]
    parts += [_criterion_line(r) for r in rows]
    facts = []
    if determination.receipt_time is not None:
        facts.append(f"Received {fmt_time(determination.receipt_time)}")
    if determination.deadline is not None:
        facts.append(f"reply due {fmt_time(determination.deadline)} (24 business hours)")
    if determination.follow_up_time is not None:
        facts.append(f"replied {fmt_time(determination.follow_up_time)}")
    if facts:
        parts += ["", "; ".join(facts) + "."]
    if determination.code:
        parts += ["", texts()["notes"]["not_telehealth"]]
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
    return {
        "label": f"Add charge {phrase}",
        "uuid": stable_uuid("suggestion", kind, determination.encounter, *determination.submissions,
                            determination.code),
        "isRecommended": recommended,
        "actions": [{
            "type": "create",
            "description": f"Create a {phrase} charge for this remote assessment",
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
    return texts()["reasons"][results[0].id] if results else ""


def determination_card(determination: Determination, kind: str, now: datetime) -> dict[str, Any]:
    """The card of billing-rules.md §6 "Card by status" (encounter-discharge, and patient-view's open items)."""
    phrase = code_phrase(determination)
    status = determination.status
    if status == "billable":
        card = make_card(kind, determination, f"Bill {phrase}: this photo/video review meets every Medicare condition",
                     "info", detail_markdown(determination, f"**{phrase} may be billed.** Every condition is met."))
        card["suggestions"] = [_create_suggestion(determination, kind, True, now)]
        card["selectionBehavior"] = "at-most-one"
        return card
    if status == "pending":
        left = next((r.facts.get("business_hours_left") for r in determination.criteria
                     if r.id == "follow-up-within-24-business-hours"), None)
        left_text = f" ({left:g} business h left)" if isinstance(left, int | float) else ""
        summary = f"Reply to the patient's photos by {fmt_time(determination.deadline)}{left_text} to bill {phrase}"
        if determination.code is None:
            summary = f"Reply to the patient's photos by {fmt_time(determination.deadline)}{left_text}"
        card = make_card(kind, determination, summary, "info",
                     detail_markdown(determination, "**Awaiting your review and reply.** Reply personally within "
                                     "24 business hours of receipt."))
        return card
    if status == "needs-review":
        open_items = determination.unknown()
        summary = f"Confirm before billing {phrase}: {texts()['questions'][open_items[0].id]}"
        card = make_card(kind, determination, summary, "warning",
                     detail_markdown(determination, "**Confirm these points before billing:**"))
        if determination.code:
            card["suggestions"] = [_create_suggestion(determination, kind, False, now)]
            card["selectionBehavior"] = "at-most-one"
        card["overrideReasons"] = _override_reasons(determination)
        return card
    failing = determination.failing()
    replacement = _replacement_card(determination, kind)
    if replacement is not None:
        return replacement
    summary = f"Do not bill {phrase}: {first_reason(failing)}"
    card = make_card(kind, determination, summary, "warning",
                 detail_markdown(determination, f"**{phrase} may not be billed separately.**"))
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
    phrase = code_phrase(determination)
    charges = [k for k in failing[0].evidence if k.startswith("ChargeItem/")]
    summary = f"Use {determination.code}, not {wrong}: this practitioner's type bills {determination.code}"
    card = make_card(kind, determination, summary, "warning",
                     detail_markdown(determination, f"**Replace the {wrong} charge with {phrase}.** "
                                     f"{failing[0].detail}"))
    # While a wrong-code charge exists the assessment is not billable, and a not-billable card never creates a
    # G2250/G2010 charge (billing-rules.md §6): the suggestion removes the wrong charge; the next evaluation then
    # proposes the right one.
    if charges:
        card["suggestions"] = [{
            "label": f"Remove the {wrong} charge, then bill {phrase}",
            "uuid": stable_uuid("suggestion", kind, "replace", *charges, determination.code),
            "isRecommended": True,
            "actions": [{"type": "delete", "description": f"Delete the {wrong} charge ({c}); this practitioner "
                         f"bills {determination.code}", "resourceId": c} for c in charges],
        }]
        card["selectionBehavior"] = "at-most-one"
    card["overrideReasons"] = _override_reasons(determination)
    return card
