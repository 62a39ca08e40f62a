"""practitioner-interpretation — billing-rules.md §2.3, §3 and §6 "Follow-up-dependent criteria".

CMS: interpretation by the billing practitioner personally, not by clinical staff. Met when the follow-up is sent
by them, or an interpretation (ClinicalImpression, Observation, DiagnosticReport) of this assessment is authored by
them. Before the deadline with neither: pending; after it: not met.
"""

from __future__ import annotations

from typing import Any

from ..context import AssessmentContext
from ..episode import practitioner_of
from ..facts import as_datetime, is_void, key_of, ref_of
from ..model import CriterionResult

ID = "practitioner-interpretation"
_INTERPRETATION_TYPES = ("ClinicalImpression", "Observation", "DiagnosticReport")


def _authors(resource: Any) -> list[str | None]:
    rtype = resource.get_resource_type()
    if rtype == "ClinicalImpression":
        return [ref_of(resource.assessor)]
    if rtype == "Observation":
        return [ref_of(p) for p in resource.performer or ()]
    return [ref_of(p) for p in resource.performer or ()] + [ref_of(p) for p in resource.resultsInterpreter or ()]


def _links_to_assessment(resource: Any, ctx: AssessmentContext) -> bool:
    keys = ctx.assessment.keys
    encounter = ref_of(getattr(resource, "encounter", None))
    if encounter is not None and encounter == ctx.assessment.encounter_key:
        return True
    linked: list[Any] = []
    for name in ("derivedFrom", "basedOn", "partOf", "media", "supportingInfo", "investigation"):
        value = getattr(resource, name, None)
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            linked.append(getattr(item, "link", item))
            linked.extend(getattr(item, "item", None) or ())
    return any(ref_of(item) in keys for item in linked)


def interpretation_by_practitioner(ctx: AssessmentContext) -> Any | None:
    if ctx.practitioner is None:
        return None
    for rtype in _INTERPRETATION_TYPES:
        for resource in ctx.of_patient(rtype):
            if is_void(resource) or not _links_to_assessment(resource, ctx):
                continue
            if ctx.practitioner in {practitioner_of(a, ctx.bag) for a in _authors(resource)}:
                return resource
    return None


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    if ctx.practitioner is None:
        return CriterionResult(ID, "unknown", "The billing practitioner is not identified.")
    if ctx.follow_up is not None:
        return CriterionResult(ID, "met", "The billing practitioner sent the follow-up personally.",
                               (ctx.follow_up.key,))
    interpretation = interpretation_by_practitioner(ctx)
    if interpretation is not None:
        when = as_datetime(getattr(interpretation, "issued", None), ctx.tz)
        detail = "Interpretation recorded by the billing practitioner"
        return CriterionResult(ID, "met", detail + (f" on {when:%d %b %Y %H:%M}." if when else "."),
                               (key_of(interpretation),))
    others = [f.key for f in ctx.assessment.follow_ups if f.sender_practitioner != ctx.practitioner]
    if ctx.deadline is None:
        return CriterionResult(ID, "unknown", "No receipt time: cannot tell whether the review is still due.")
    if not ctx.deadline_passed:
        return CriterionResult(ID, "pending", "Awaiting the billing practitioner's own review and reply.",
                               tuple(others))
    if others:
        return CriterionResult(ID, "not-met", "Only staff other than the billing practitioner answered; "
                               "clinical staff cannot interpret for this code.", tuple(others))
    return CriterionResult(ID, "not-met", "No interpretation by the billing practitioner is recorded.")
