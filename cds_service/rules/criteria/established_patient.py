"""established-patient — billing-rules.md §2.1, §3 and §7.

CMS: the patient received a professional service from the billing practitioner, or from a practitioner of the same
specialty in the same group, within the previous 3 years. (New patients only during the COVID-19 PHE, ended
11 May 2023.) Met: a finished Encounter other than the assessment itself, starting within the lookback before
receipt, with the billing practitioner or a same-specialty colleague of the same organization. The look-back is
calendar years (months), not elapsed time.

Cases (``facts["case"]``, billing-rules.md §7 "Honest wording"): not-met ``no-prior-visit`` (no finished visit at
all in the look-back), ``other-organization`` (a same-specialty practitioner, but of another organization),
``other-specialty`` (seen only by practitioners of another specialty), ``unattributed-visit`` (visits that name no
practitioner); unknown ``colleague-unknown``, ``no-receipt``, ``no-practitioner``.
"""

from __future__ import annotations

from typing import Any

from ..context import AssessmentContext, people_of, roles_of, specialty_codes
from ..facts import before, key_of, months_before, not_after, period_start, ref_of
from ..model import CriterionResult

ID = "established-patient"


def _dates(visits: list[tuple[Any, Any]]) -> str:
    return ", ".join(f"{start:%d %b %Y}" for start, _ in visits[:3])


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    anchor = ctx.receipt_time or (period_start(ctx.assessment.encounter.period, ctx.tz)
                                  if ctx.assessment.encounter is not None else None)
    if anchor is None:
        return CriterionResult(ID, "unknown", "No receipt time: the 3-year lookback cannot be placed.",
                               facts={"case": "no-receipt"})
    if ctx.practitioner is None:
        return CriterionResult(ID, "unknown", "The billing practitioner is not identified.",
                               facts={"case": "no-practitioner"})
    years = ctx.rules.settings.established_lookback_years
    since = months_before(anchor, 12 * years)  # calendar years, not elapsed time (§2.1)
    own = ctx.assessment.encounter_key
    undecided: list[str] = []
    candidates = []
    for encounter in ctx.of_patient("Encounter"):
        start = period_start(encounter.period, ctx.tz)
        if key_of(encounter) == own or encounter.status != "finished" or start is None:
            continue
        if not (not_after(since, start) and before(start, anchor)):
            continue
        candidates.append((start, encounter))
    candidates.sort(key=lambda c: c[0].timestamp(), reverse=True)
    other_org: list[tuple[Any, Any]] = []
    other_specialty: list[tuple[Any, Any]] = []
    unattributed: list[tuple[Any, Any]] = []
    for start, encounter in candidates:
        if ctx.involves_practitioner(encounter):
            return CriterionResult(ID, "met", f"Seen by the billing practitioner on {start:%d %b %Y}.",
                                   (key_of(encounter),))
        people = people_of(encounter, ctx.bag)
        if not people:
            unattributed.append((start, encounter))
        for colleague in people:
            same = ctx.is_same_specialty_colleague(colleague)
            if same:
                return CriterionResult(
                    ID, "met",
                    f"Seen on {start:%d %b %Y} by a same-specialty colleague in the same organization.",
                    (key_of(encounter), colleague))
            if same is None:
                undecided.append(key_of(encounter))
            elif specialty_codes(roles_of(colleague, ctx.bag)) & ctx.specialty_codes:
                other_org.append((start, encounter))
            else:
                other_specialty.append((start, encounter))
    if undecided:
        return CriterionResult(
            ID, "unknown",
            "Earlier visits were with colleagues whose specialty or organization is not recorded; confirm.",
            tuple(dict.fromkeys(undecided)), {"case": "colleague-unknown"})
    if other_org:
        orgs = sorted({o for _, e in other_org if (o := ref_of(e.serviceProvider))})
        where = f" ({', '.join(orgs)})" if orgs else ""
        return CriterionResult(
            ID, "not-met",
            f"Seen in the last {years} years by a practitioner of the same specialty, but of another "
            f"organization{where} ({_dates(other_org)}); that does not make the patient established here.",
            tuple(dict.fromkeys(key_of(e) for _, e in other_org)), {"case": "other-organization"})
    if other_specialty:
        return CriterionResult(
            ID, "not-met",
            f"Seen in the last {years} years only by practitioners of another specialty ({_dates(other_specialty)}); "
            "no visit with this practitioner or a same-specialty colleague of the organization.",
            tuple(dict.fromkeys(key_of(e) for _, e in other_specialty)), {"case": "other-specialty"})
    if unattributed:
        return CriterionResult(
            ID, "not-met",
            f"Earlier visits ({_dates(unattributed)}) name no practitioner, so none shows a visit with this "
            "practitioner or a same-specialty colleague; add the practitioner to the visit if one took place.",
            tuple(key_of(e) for _, e in unattributed), {"case": "unattributed-visit"})
    return CriterionResult(
        ID, "not-met",
        f"No finished visit is recorded in the {years} years before receipt (new patient).",
        facts={"case": "no-prior-visit"})
