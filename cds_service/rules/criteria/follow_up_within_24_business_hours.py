"""follow-up-within-24-business-hours — billing-rules.md §2.4, §3 and §6.

CMS: "with interpretation and follow-up with the patient within 24 business hours". Met: a completed Communication
from the billing practitioner to the patient, linked to the assessment, sent after receipt and no later than
receipt + 24 business hours (weekends and holidays skipped, practice time zone). The deadline and the reply are
compared as instants (§7 "Elapsed windows are elapsed time"; business hours follow the calendar).

Cases (``facts["case"]``, §7 "Honest wording"): pending ``awaiting``; not-met ``late``, ``no-reply``,
``reply-by-other`` (only others answered); unknown ``no-receipt``.
"""

from __future__ import annotations

from ..context import AssessmentContext
from ..facts import not_after
from ..model import CriterionResult

ID = "follow-up-within-24-business-hours"


def _hours(value: float | None) -> str:
    if value is None:
        return "more than a year's"
    return f"{value:.1f}".rstrip("0").rstrip(".")


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    if ctx.receipt_time is None or ctx.deadline is None:
        return CriterionResult(ID, "unknown", "The receipt time of the submission is not recorded.",
                               tuple(s.key for s in ctx.assessment.submissions), {"case": "no-receipt"})
    evidence = tuple(s.key for s in ctx.assessment.submissions)
    due = f"{ctx.deadline:%a %d %b %H:%M %Z}"
    facts = {"receipt": ctx.receipt_time.isoformat(timespec="seconds"),
             "deadline": ctx.deadline.isoformat(timespec="seconds")}
    follow_up = ctx.follow_up
    if follow_up is not None:
        elapsed = ctx.business_hours(ctx.receipt_time, follow_up.sent)
        if elapsed is not None:
            facts["elapsed_business_hours"] = round(elapsed, 2)
        if not_after(follow_up.sent, ctx.deadline):
            return CriterionResult(ID, "met", f"Reply sent {_hours(elapsed)} business hours after receipt "
                                   f"(due {due}).", (*evidence, follow_up.key), facts)
        return CriterionResult(ID, "not-met", f"Reply sent {_hours(elapsed)} business hours after receipt, "
                               f"after the deadline ({due}).", (*evidence, follow_up.key), {**facts, "case": "late"})
    others = tuple(f.key for f in ctx.assessment.follow_ups)
    if not ctx.deadline_passed:
        left = ctx.business_hours(ctx.now, ctx.deadline)
        if left is not None:
            facts["business_hours_left"] = round(left, 2)
        return CriterionResult(ID, "pending", f"Reply due by {due}: {_hours(left)} business hours left.",
                               evidence + others, {**facts, "case": "awaiting"})
    if others:
        return CriterionResult(ID, "not-met", f"No reply from the billing practitioner by {due}; only others "
                               "answered.", evidence + others, {**facts, "case": "reply-by-other"})
    return CriterionResult(ID, "not-met", f"No reply to the patient by {due}.", evidence, {**facts, "case": "no-reply"})
