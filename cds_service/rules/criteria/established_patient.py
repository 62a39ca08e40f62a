"""established-patient — billing-rules.md §2.1 and §3.

CMS: the patient received a professional service from the billing practitioner, or from a practitioner of the same
specialty in the same group, within the previous 3 years. (New patients only during the COVID-19 PHE, ended
11 May 2023.) Met: a finished Encounter other than the assessment itself, starting within the lookback before
receipt, with the billing practitioner or a same-specialty colleague of the same organization.
"""

from __future__ import annotations

from ..context import AssessmentContext, people_of
from ..facts import key_of, months_before, period_start
from ..model import CriterionResult

ID = "established-patient"


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    anchor = ctx.receipt_time or (period_start(ctx.assessment.encounter.period, ctx.tz)
                                  if ctx.assessment.encounter is not None else None)
    if anchor is None:
        return CriterionResult(ID, "unknown", "No receipt time: the 3-year lookback cannot be placed.")
    if ctx.practitioner is None:
        return CriterionResult(ID, "unknown", "The billing practitioner is not identified.")
    years = ctx.rules.settings.established_lookback_years
    since = months_before(anchor, 12 * years)
    own = ctx.assessment.encounter_key
    undecided: list[str] = []
    candidates = []
    for encounter in ctx.of_patient("Encounter"):
        start = period_start(encounter.period, ctx.tz)
        if key_of(encounter) == own or encounter.status != "finished" or start is None:
            continue
        if not since <= start < anchor:
            continue
        candidates.append((start, encounter))
    for start, encounter in sorted(candidates, key=lambda c: c[0], reverse=True):
        if ctx.involves_practitioner(encounter):
            return CriterionResult(ID, "met", f"Seen by the billing practitioner on {start:%d %b %Y}.",
                                   (key_of(encounter),))
        for colleague in people_of(encounter, ctx.bag):
            same = ctx.is_same_specialty_colleague(colleague)
            if same:
                return CriterionResult(
                    ID, "met",
                    f"Seen on {start:%d %b %Y} by a same-specialty colleague in the same organization.",
                    (key_of(encounter), colleague))
            if same is None:
                undecided.append(key_of(encounter))
    if undecided:
        return CriterionResult(
            ID, "unknown",
            "Earlier visits were with colleagues whose specialty or organization is not recorded; confirm.",
            tuple(undecided))
    return CriterionResult(
        ID, "not-met",
        f"No visit with this practitioner or a same-specialty colleague in the {years} years before receipt "
        "(new patient).")
