"""consent-documented — billing-rules.md §2.7, §3 and §6 "Consent".

CMS: the patient's consent (verbal acceptable) documented in the record, obtainable at the time of service and by
auxiliary staff; common practice accepts one consent per 12 months for all communication technology-based
services. Met: an active Consent of the patient, scope treatment, with an accepted category (LOINC 59284-0 by
default) or policy, dated no later than the follow-up and no earlier than 12 months before it, not a denial.
The 12 months are calendar months; dates are compared as instants.

Cases (``facts["case"]``, §7 "Honest wording"): not-met ``missing`` (none on file), ``expired``, ``denied``,
``inactive``, ``wrong-kind`` (not a consent to communication-technology services), ``after-service`` — the reason
of the most recent consent on file; unknown ``undated``.
"""

from __future__ import annotations

from typing import Any

from ..context import AssessmentContext
from ..facts import as_datetime, before, codings, key_of, months_before, ref_of, utc
from ..model import CriterionResult

ID = "consent-documented"


def _accepted(consent: Any, ctx: AssessmentContext) -> bool:
    settings = ctx.rules.settings.consent
    scope = settings.scope
    if not any(c.system == scope.system and c.code == scope.code for c in codings(consent.scope)):
        return False
    categories = {(c.system, c.code) for c in codings(consent.category)}
    if any((a.system, a.code) in categories for a in settings.accepted_categories):
        return True
    uris = {p.uri for p in consent.policy or () if p.uri}
    rules = {(c.system, c.code) for c in codings(consent.policyRule)}
    return any((p.uri is not None and p.uri in uris) or (p.code is not None and (p.system, p.code) in rules)
               for p in settings.accepted_policies)


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    reference_time = ctx.service_time
    months = ctx.rules.settings.consent.max_age_months
    earliest = months_before(reference_time, months)
    mine = [c for c in ctx.of_patient("Consent") if ref_of(c.patient) == ctx.patient_key]
    rejected: list[tuple[str, str, str]] = []  # (reference, reason, case)
    undated: list[str] = []
    for consent in sorted(mine, key=lambda c: utc(as_datetime(c.dateTime, ctx.tz) or reference_time), reverse=True):
        key = key_of(consent)
        if consent.status != "active":
            rejected.append((key, f"status {consent.status}", "inactive"))
            continue
        if not _accepted(consent, ctx):
            rejected.append((key, "not a consent to communication-technology services", "wrong-kind"))
            continue
        if consent.provision is not None and consent.provision.type == "deny":
            rejected.append((key, "the patient declined", "denied"))
            continue
        when = as_datetime(consent.dateTime, ctx.tz)
        if when is None:
            undated.append(key)
            continue
        if before(reference_time, when):
            rejected.append((key, f"dated {when:%d %b %Y}, after the service", "after-service"))
            continue
        if before(when, earliest):
            rejected.append((key, f"dated {when:%d %b %Y}, more than {months} months before the service", "expired"))
            continue
        return CriterionResult(ID, "met", f"Consent documented on {when:%d %b %Y}.", (key,))
    if undated:
        return CriterionResult(ID, "unknown", "A consent is on file but undated; confirm it is within "
                               f"{months} months.", tuple(undated), {"case": "undated"})
    if rejected:
        reasons = "; ".join(reason for _, reason, _ in rejected[:3])
        return CriterionResult(ID, "not-met", f"No valid consent: {reasons}. Obtain the patient's consent "
                               "(verbal is acceptable) and document it.", tuple(k for k, _, _ in rejected),
                               {"case": rejected[0][2]})
    return CriterionResult(ID, "not-met", "No consent for virtual services is documented. Obtain it (verbal is "
                           "acceptable) and record it.", facts={"case": "missing"})
