"""payer-covers-code — billing-rules.md §3, §5 and §6 "Payer matching" (payer profiles kept as data).

The patient's active Coverage on the service date maps to a payer profile (Source of Payment typology codes first,
then payer identifiers and names); the profile says covered, not covered, or verify. "Verify" is never shown as
covered; no active Coverage or no matching profile → unknown.

Cases (``facts["case"]``, §7 "Honest wording"): not-met ``not-covered``; unknown ``verify``, ``no-coverage``,
``unknown-payer``, ``no-code``.
"""

from __future__ import annotations

from typing import Any

from ..context import AssessmentContext
from ..facts import as_datetime, before, codings, key_of, period_end, ref_of
from ..model import CriterionResult
from ..rules_data import CodingValue

ID = "payer-covers-code"


def _active_on(coverage: Any, ctx: AssessmentContext) -> bool:
    if coverage.status != "active":
        return False
    when = ctx.service_time
    period = coverage.period
    if period is not None:
        start, end = as_datetime(period.start, ctx.tz), period_end(period, ctx.tz)
        if (start is not None and before(when, start)) or (end is not None and before(end, when)):
            return False
    return True


def _coding_values(coverage: Any) -> list[CodingValue]:
    concepts = [coverage.type] if coverage.type is not None else []
    concepts += [c.type for c in coverage.class_fhir or () if c.type is not None]
    values = [CodingValue(c.system, c.code, c.display) for c in codings(concepts)]
    # Coverage.class.value/name carry plan identifiers and names ("ASO plan", group numbers).
    values += [CodingValue(None, c.value, c.name) for c in coverage.class_fhir or ()]
    return values


def primary_coverage(ctx: AssessmentContext) -> Any | None:
    mine = [c for c in ctx.of_patient("Coverage")
            if ref_of(c.beneficiary) == ctx.patient_key and _active_on(c, ctx)]
    return min(mine, key=lambda c: (c.order is None, c.order or 0), default=None)


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    coverage = primary_coverage(ctx)
    if coverage is None:
        return CriterionResult(ID, "unknown", "No active coverage on file for the service date; verify the payer.",
                               facts={"case": "no-coverage"})
    payors = [ctx.bag.get(ref_of(p)) for p in coverage.payor or ()]
    names = [p.name for p in payors if p is not None and getattr(p, "name", None)]
    names += [p.display for p in coverage.payor or () if p.display]
    identifiers = [i.value for p in payors if p is not None for i in getattr(p, "identifier", None) or () if i.value]
    identifiers += [p.identifier.value for p in coverage.payor or () if p.identifier is not None and p.identifier.value]
    values = _coding_values(coverage)
    profile = ctx.rules.payers.match(type_and_class=values, payer_names=names, payer_identifiers=identifiers)
    evidence = (key_of(coverage), *(key_of(p) for p in payors if p is not None))
    if profile is None:
        return CriterionResult(ID, "unknown", "The payer has no profile here; verify coverage of remote "
                               "assessments with the plan.", evidence, {"case": "unknown-payer"})
    code = ctx.code
    if code is None:
        return CriterionResult(ID, "unknown", f"{profile.name}: no code applies to this practitioner yet.",
                               evidence, {"profile": profile.id, "case": "no-code"})
    self_insured = ctx.rules.payers.is_self_insured(values, ctx.rules.settings.self_insured_markers)
    verdict = profile.coverage_for(code, self_insured=self_insured)
    plan = " (self-insured plan)" if self_insured else ""
    facts = {"profile": profile.id}
    if verdict == "covered":
        return CriterionResult(ID, "met", f"{profile.name}{plan} covers {code} (as of {profile.as_of:%b %Y}).",
                               evidence, facts)
    if verdict == "not-covered":
        return CriterionResult(ID, "not-met", f"{profile.name}{plan} does not cover {code}: {profile.note}",
                               evidence, {**facts, "case": "not-covered"})
    return CriterionResult(ID, "unknown", f"{profile.name}{plan}: coverage of {code} not confirmed; verify with "
                           "the plan.", evidence, {**facts, "case": "verify"})
