"""patient-submitted-media — billing-rules.md §2.2 and §3.

CMS: "recorded video and/or images submitted by an established patient" — still images or video recorded and sent
by the patient or a caregiver. Text-only messages, questionnaires and device data do not qualify.

Cases (``facts["case"]``, §7 "Honest wording"): not-met ``text-only``, ``no-submission``; unknown ``unknown-type``.
The record cannot show that the patient (not someone else) recorded the media: the card says so.
"""

from __future__ import annotations

from ..context import AssessmentContext
from ..model import CriterionResult

ID = "patient-submitted-media"


def evaluate(ctx: AssessmentContext) -> CriterionResult:
    submissions = ctx.assessment.submissions
    with_media = [s for s in submissions if s.has_media]
    if with_media:
        evidence = [k for s in with_media for k in (s.key, *s.related_keys)]
        by_caregiver = any(s.sender and s.sender.startswith("RelatedPerson/") for s in with_media)
        who = "a caregiver" if by_caregiver else "the patient"
        count = len(with_media)
        return CriterionResult(ID, "met", f"{count} image/video submission{'s' if count > 1 else ''} from {who}.",
                               tuple(evidence))
    undecided = [s for s in submissions if s.media_unknown]
    if undecided:
        return CriterionResult(ID, "unknown", "An attachment's type could not be read; confirm it is an image "
                               "or video.", tuple(s.key for s in undecided), {"case": "unknown-type"})
    if submissions:
        return CriterionResult(ID, "not-met", "The patient sent text only; no image or video was submitted.",
                               tuple(s.key for s in submissions), {"case": "text-only"})
    return CriterionResult(ID, "not-met", "No image or video from the patient is linked to this assessment.",
                           facts={"case": "no-submission"})
