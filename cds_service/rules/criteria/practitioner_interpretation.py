"""practitioner-interpretation — billing-rules.md §2.3, §3, §6 "Follow-up-dependent criteria" and §7.

CMS: interpretation by the billing practitioner personally, not by clinical staff. Met when the follow-up is sent
by them, or an interpretation (ClinicalImpression, Observation, DiagnosticReport) of this assessment is authored by
them. Before the deadline with neither: pending; after it: not met.

§7 "Therapy assistants": a physical/occupational therapy assistant alone cannot make this service billable — when
the billing practitioner chosen is the assistant, or (after the deadline) only an assistant replied or interpreted,
the criterion is not met: the supervising therapist must interpret and reply personally.

Cases (``facts["case"]``): pending ``awaiting``; not-met ``no-reply`` (no reply and no interpretation recorded at
all), ``reply-by-other`` (someone other than the billing practitioner replied), ``interpretation-by-other`` (only
someone else's interpretation, no reply), ``assistant-only``; unknown ``no-practitioner``, ``no-receipt``.
The record cannot show that the interpretation was personal (not delegated): the card says so.
"""

from __future__ import annotations

from typing import Any

from ..context import AssessmentContext
from ..facts import as_datetime, key_of
from ..model import CriterionResult

ID = "practitioner-interpretation"
_ASSISTANT_ALONE = ("The supervising therapist must interpret the media and reply to the patient personally; an "
                    "assistant's work alone cannot be billed.")


def interpretation_by_practitioner(ctx: AssessmentContext) -> Any | None:
    """The first interpretation of this assessment authored or performed by the billing practitioner."""
    if ctx.practitioner is None:
        return None
    return next((r for r, authors in ctx.interpretations if ctx.practitioner in authors), None)


def _assistant_billing(ctx: AssessmentContext) -> CriterionResult:
    rule = ctx.taxonomy.rule
    mine = [f.key for f in ctx.assessment.follow_ups if f.sender_practitioner == ctx.practitioner]
    mine += [key_of(r) for r, authors in ctx.interpretations if ctx.practitioner in authors]
    what = "replied or interpreted" if mine else "is named as the reviewer"
    return CriterionResult(ID, "not-met", f"Only a {rule.label.split(' (')[0].lower()} {what}. {_ASSISTANT_ALONE}",
                           (ctx.practitioner or "", *mine), {"case": "assistant-only"})


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    if ctx.practitioner is None:
        return CriterionResult(ID, "unknown", "The billing practitioner is not identified.",
                               facts={"case": "no-practitioner"})
    if ctx.practitioner_is_assistant:
        return _assistant_billing(ctx)
    if ctx.follow_up is not None:
        return CriterionResult(ID, "met", "The billing practitioner sent the follow-up.",
                               (ctx.follow_up.key,))
    interpretation = interpretation_by_practitioner(ctx)
    if interpretation is not None:
        when = as_datetime(getattr(interpretation, "issued", None), ctx.tz)
        detail = "Interpretation recorded by the billing practitioner"
        return CriterionResult(ID, "met", detail + (f" on {when:%d %b %Y %H:%M}." if when else "."),
                               (key_of(interpretation),))
    replies = [f for f in ctx.assessment.follow_ups if f.sender_practitioner != ctx.practitioner]
    interpretations = [(r, authors) for r, authors in ctx.interpretations if ctx.practitioner not in authors]
    others = [f.key for f in replies] + [key_of(r) for r, _ in interpretations]
    if ctx.deadline is None:
        return CriterionResult(ID, "unknown", "No receipt time: cannot tell whether the review is still due.",
                               tuple(others), {"case": "no-receipt"})
    if not ctx.deadline_passed:
        return CriterionResult(ID, "pending", "Awaiting the billing practitioner's own review and reply.",
                               tuple(others), {"case": "awaiting"})
    people = [f.sender_practitioner for f in replies] + [a for _, authors in interpretations for a in authors]
    if people and all(ctx.is_assistant(p) for p in people):
        return CriterionResult(ID, "not-met", "Only a therapy assistant replied or interpreted. " + _ASSISTANT_ALONE,
                               tuple(others), {"case": "assistant-only"})
    if replies:
        return CriterionResult(ID, "not-met", "Only someone other than the billing practitioner answered the "
                               "patient, and no interpretation by the billing practitioner is recorded; clinical "
                               "staff cannot interpret for this code.", tuple(others), {"case": "reply-by-other"})
    if interpretations:
        return CriterionResult(ID, "not-met", "An interpretation is recorded, but by someone other than the billing "
                               "practitioner, and nobody replied to the patient.", tuple(others),
                               {"case": "interpretation-by-other"})
    return CriterionResult(ID, "not-met", "No reply to the patient and no interpretation is recorded.",
                           facts={"case": "no-reply"})
