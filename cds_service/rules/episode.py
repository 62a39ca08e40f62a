"""The store-and-forward episode in a patient's record (fhir-profile.md "The episode").

Finds the patient's submissions (Communication with an image/video attachment or a reference to Media, Media,
DocumentReference; text-only messages too, so that a review of one can be told it does not qualify), links them to
the review Encounter (class VR) and the practitioner's follow-up, and groups them into assessments: several images
sent over two days are one assessment with one charge and one clock from the first receipt (billing-rules.md §3
"Receipt time"), while two unrelated submissions in one week are two.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cds_service.record import ResourceBag

from .facts import (
    as_datetime,
    before,
    between,
    earliest,
    is_image_or_video,
    is_void,
    key_of,
    period_start,
    ref_of,
    ref_type,
    shifted,
    utc,
)

PATIENT_SENDER_TYPES = ("Patient", "RelatedPerson")
PRACTITIONER_TYPES = ("Practitioner", "PractitionerRole")
VIRTUAL_CLASS = "VR"
_LAST = datetime.max.replace(tzinfo=UTC)  # sorts after every real instant
_ONE_DAY = timedelta(hours=24)


@dataclass(frozen=True)
class Submission:
    """One thing the patient (or a caregiver) sent."""

    key: str  # "Communication/1", "Media/2", "DocumentReference/3"
    receipt_time: datetime | None
    has_media: bool  # image or video
    media_unknown: bool  # a reference to media that could not be read: cannot tell
    sender: str | None  # "Patient/1" / "RelatedPerson/2"
    encounter: str | None  # linked review encounter, if any
    recipients: tuple[str, ...] = ()
    related_keys: tuple[str, ...] = ()  # Media/DocumentReference referenced by a Communication payload


@dataclass(frozen=True)
class FollowUp:
    key: str
    sent: datetime
    sender: str | None  # "Practitioner/1" or "PractitionerRole/2"
    sender_practitioner: str | None  # resolved Practitioner id
    in_response_to: tuple[str, ...]
    encounter: str | None


@dataclass
class Assessment:
    """One remote assessment: its submissions, review encounter and follow-up candidates."""

    submissions: list[Submission] = field(default_factory=list)
    encounter: Any | None = None  # the review Encounter model
    follow_ups: list[FollowUp] = field(default_factory=list)  # linked practitioner→patient messages, by time

    @property
    def keys(self) -> set[str]:
        found = {s.key for s in self.submissions}
        for s in self.submissions:
            found.update(s.related_keys)
        return found

    @property
    def receipt_time(self) -> datetime | None:
        times = [s.receipt_time for s in self.submissions if s.receipt_time is not None]
        return earliest(*times) if times else None

    @property
    def encounter_key(self) -> str | None:
        return key_of(self.encounter) if self.encounter is not None else None


def _patient_sent(sender: str | None, patient_key: str, bag: ResourceBag | None = None,
                  subject: str | None = None) -> bool:
    """Sent by the patient, or by a caregiver (RelatedPerson) acting for *this* patient: the message's subject is
    the patient, or the RelatedPerson resource names the patient (another patient's caregiver never counts)."""
    if sender == patient_key:
        return True
    if ref_type(sender) != "RelatedPerson":
        return False
    if subject is not None:
        return subject == patient_key
    related = bag.get(sender) if bag is not None else None
    return related is not None and ref_of(related.patient) == patient_key


def _communication_submission(comm: Any, bag: ResourceBag, patient_key: str, tz: Any) -> Submission | None:
    sender = ref_of(comm.sender)
    subject = ref_of(comm.subject)
    if not _patient_sent(sender, patient_key, bag, subject) or is_void(comm):
        return None
    if subject is not None and subject != patient_key:
        return None
    has_media = False
    media_unknown = False
    related: list[str] = []
    media_times: list[datetime] = []
    for payload in comm.payload or ():
        attachment = payload.contentAttachment
        if attachment is not None:
            if is_image_or_video(attachment.contentType):
                has_media = True
            elif not attachment.contentType and (attachment.url or attachment.data):
                media_unknown = True
        if payload.contentReference is not None:
            target_key = ref_of(payload.contentReference)
            target = bag.get(target_key)
            if target_key and ref_type(target_key) in ("Media", "DocumentReference", "Binary"):
                related.append(target_key)
                if target is None:
                    media_unknown = True
                elif _resource_is_media(target):
                    has_media = True
                    when = _media_time(target, tz)
                    if when is not None:
                        media_times.append(when)
    # Receipt: Communication.received, then .sent, then the Media's issued/created (billing-rules.md §3).
    receipt = (as_datetime(comm.received, tz) or as_datetime(comm.sent, tz)
               or (earliest(*media_times) if media_times else None))
    return Submission(
        key=key_of(comm),
        receipt_time=receipt,
        has_media=has_media,
        media_unknown=media_unknown and not has_media,
        sender=sender,
        encounter=_encounter_link(comm.encounter, comm.partOf, comm.inResponseTo, comm.basedOn),
        recipients=tuple(r for r in (ref_of(x) for x in comm.recipient or ()) if r),
        related_keys=tuple(related),
    )


def _encounter_link(*links: Any) -> str | None:
    """The first Encounter among a resource's links (encounter, partOf, inResponseTo, basedOn; fhir-profile.md)."""
    for link in links:
        for item in link if isinstance(link, list) else [link]:
            key = ref_of(item)
            if ref_type(key) == "Encounter":
                return key
    return None


def _resource_is_media(resource: Any) -> bool:
    rtype = resource.get_resource_type()
    if rtype == "Media":
        return resource.content is not None and is_image_or_video(resource.content.contentType)
    if rtype == "DocumentReference":
        return any(c.attachment is not None and is_image_or_video(c.attachment.contentType)
                   for c in resource.content or ())
    if rtype == "Binary":
        return is_image_or_video(resource.contentType)
    return False


def _media_time(resource: Any, tz: Any) -> datetime | None:
    rtype = resource.get_resource_type()
    if rtype == "Media":
        created = as_datetime(resource.createdDateTime, tz) or period_start(resource.createdPeriod, tz)
        return as_datetime(resource.issued, tz) or created
    if rtype == "DocumentReference":
        created = [as_datetime(c.attachment.creation, tz) for c in resource.content or () if c.attachment]
        return as_datetime(resource.date, tz) or next((c for c in created if c is not None), None)
    return None


def _media_submission(media: Any, patient_key: str, tz: Any) -> Submission | None:
    if is_void(media) or ref_of(media.subject) != patient_key:
        return None
    operator = ref_of(media.operator)
    if not _patient_sent(operator, patient_key, subject=ref_of(media.subject)):
        return None
    return Submission(
        key=key_of(media),
        receipt_time=_media_time(media, tz),
        has_media=_resource_is_media(media),
        media_unknown=media.content is None or not media.content.contentType,
        sender=operator,
        encounter=_encounter_link(media.encounter, media.partOf, media.basedOn),
        related_keys=tuple(r for r in (ref_of(x) for x in [*(media.partOf or ()), *(media.basedOn or ())])
                           if ref_type(r) == "Communication"),
    )


def _document_submission(document: Any, patient_key: str, tz: Any) -> Submission | None:
    if is_void(document) or ref_of(document.subject) != patient_key:
        return None
    authors = [ref_of(a) for a in document.author or ()]
    sender = next((a for a in authors if _patient_sent(a, patient_key, subject=ref_of(document.subject))), None)
    if sender is None or not _resource_is_media(document):
        return None  # only patient-authored images/videos; clinical documents are not submissions
    encounters = [ref_of(e) for e in (document.context.encounter or ())] if document.context else []
    return Submission(
        key=key_of(document),
        receipt_time=_media_time(document, tz),
        has_media=True,
        media_unknown=False,
        sender=sender,
        encounter=next((e for e in encounters if e), None),
    )


def find_submissions(bag: ResourceBag, patient_id: str, tz: Any) -> list[Submission]:
    """The patient's submissions in the bag, oldest first as found (computed once per bag and time zone)."""
    return list(bag.memo(("submissions", patient_id, tz), lambda: tuple(_find_submissions(bag, patient_id, tz))))


def _find_submissions(bag: ResourceBag, patient_id: str, tz: Any) -> list[Submission]:
    patient_key = f"Patient/{patient_id}"
    found: list[Submission] = []
    referenced: set[str] = set()
    for comm in bag.of_type("Communication"):
        submission = _communication_submission(comm, bag, patient_key, tz)
        if submission is not None:
            found.append(submission)
            referenced.update(submission.related_keys)
    for media in bag.of_type("Media"):
        if key_of(media) not in referenced and (s := _media_submission(media, patient_key, tz)) is not None:
            found.append(s)
    for document in bag.of_type("DocumentReference"):
        if key_of(document) not in referenced and (s := _document_submission(document, patient_key, tz)) is not None:
            found.append(s)
    return _merge_parts(found)


def _merge_parts(submissions: list[Submission]) -> list[Submission]:
    """A Media whose partOf/basedOn names a patient Communication is that message's attachment, not a second
    submission: fold it into the message (its image counts, the message's receipt time rules)."""
    by_key = {s.key: s for s in submissions}
    parts: dict[str, list[Submission]] = {}
    for submission in submissions:
        parent = next((k for k in submission.related_keys if k in by_key and k != submission.key), None)
        if parent is not None and ref_type(submission.key) in ("Media", "DocumentReference"):
            parts.setdefault(parent, []).append(submission)
    if not parts:
        return submissions
    folded = {p.key for children in parts.values() for p in children}
    merged: list[Submission] = []
    for submission in submissions:
        if submission.key in folded:
            continue
        children = parts.get(submission.key, [])
        if children:
            times = [t for t in [submission.receipt_time, *(c.receipt_time for c in children)] if t is not None]
            submission = Submission(
                key=submission.key,
                receipt_time=submission.receipt_time or (earliest(*times) if times else None),
                has_media=submission.has_media or any(c.has_media for c in children),
                media_unknown=submission.media_unknown and not any(c.has_media for c in children),
                sender=submission.sender,
                encounter=submission.encounter or next((c.encounter for c in children if c.encounter), None),
                recipients=submission.recipients,
                related_keys=tuple(dict.fromkeys([*submission.related_keys, *(c.key for c in children)])),
            )
        merged.append(submission)
    return merged


def find_follow_ups(bag: ResourceBag, patient_id: str, tz: Any) -> list[FollowUp]:
    """Completed practitioner → patient messages with a ``sent`` time (fhir-profile.md "Follow-up to patient")."""
    return list(bag.memo(("follow_ups", patient_id, tz), lambda: tuple(_find_follow_ups(bag, patient_id, tz))))


def _find_follow_ups(bag: ResourceBag, patient_id: str, tz: Any) -> list[FollowUp]:
    patient_key = f"Patient/{patient_id}"
    found: list[FollowUp] = []
    for comm in bag.of_type("Communication"):
        sender = ref_of(comm.sender)
        if ref_type(sender) not in PRACTITIONER_TYPES or comm.status != "completed":
            continue
        recipients = {ref_of(r) for r in comm.recipient or ()}
        to_patient = patient_key in recipients or (ref_of(comm.subject) == patient_key and (
            not recipients or any(ref_type(r) == "RelatedPerson" for r in recipients)))
        if not to_patient:
            continue
        sent = as_datetime(comm.sent, tz)
        if sent is None:
            continue
        found.append(FollowUp(
            key=key_of(comm),
            sent=sent,
            sender=sender,
            sender_practitioner=practitioner_of(sender, bag),
            in_response_to=tuple(r for r in (ref_of(x) for x in comm.inResponseTo or ()) if r),
            encounter=ref_of(comm.encounter),
        ))
    return sorted(found, key=lambda f: utc(f.sent))


def practitioner_of(reference: str | None, bag: ResourceBag) -> str | None:
    """The Practitioner key behind a Practitioner or PractitionerRole reference."""
    if ref_type(reference) == "Practitioner":
        return reference
    if ref_type(reference) == "PractitionerRole":
        role = bag.get(reference)
        if role is not None and role.practitioner is not None:
            return ref_of(role.practitioner)
    return None


def is_review_encounter(encounter: Any) -> bool:
    return encounter.class_fhir is not None and encounter.class_fhir.code == VIRTUAL_CLASS


def group_assessments(
    submissions: Iterable[Submission],
    follow_ups: list[FollowUp],
    bag: ResourceBag,
    grouping_window: timedelta,
) -> list[Assessment]:
    """Group submissions into assessments.

    Linked submissions group by their review encounter (directly, or through a follow-up that answers them).
    An unlinked submission joins the assessment whose first receipt is at most ``grouping_window`` earlier and
    whose follow-up has not been sent yet; otherwise it opens a new assessment.
    """
    by_encounter: dict[str, Assessment] = {}
    loose: list[Submission] = []
    for submission in sorted(submissions, key=lambda s: (s.receipt_time is None, utc(s.receipt_time or _LAST))):
        encounter_key = submission.encounter or _encounter_via_follow_up(submission, follow_ups)
        encounter = bag.get(encounter_key) if encounter_key else None
        if encounter_key and encounter is not None and not is_void(encounter):
            assessment = by_encounter.setdefault(encounter_key, Assessment(encounter=encounter))
            assessment.submissions.append(submission)
        else:
            loose.append(submission)
    assessments = list(by_encounter.values())
    for submission in loose:
        target = _joinable(assessments, submission, follow_ups, grouping_window)
        if target is None:
            target = Assessment()
            assessments.append(target)
        target.submissions.append(submission)
    for assessment in assessments:
        assessment.follow_ups = linked_follow_ups(assessment, follow_ups)
    return sorted(assessments, key=lambda a: (a.receipt_time is None, utc(a.receipt_time or _LAST)))


def _encounter_via_follow_up(submission: Submission, follow_ups: list[FollowUp]) -> str | None:
    for follow_up in follow_ups:
        if follow_up.encounter and submission.key in follow_up.in_response_to:
            return follow_up.encounter
    return None


def _joinable(assessments: list[Assessment], submission: Submission, follow_ups: list[FollowUp],
              window: timedelta) -> Assessment | None:
    if submission.receipt_time is None:
        return None
    for assessment in assessments:
        first = assessment.receipt_time
        if first is None or not between(submission.receipt_time, first, shifted(first, window)):
            continue
        replied = [f.sent for f in linked_follow_ups(assessment, follow_ups) if not before(f.sent, first)]
        if replied and before(earliest(*replied), submission.receipt_time):
            continue  # the practitioner already answered: a new message starts a new episode
        return assessment
    return None


def linked_follow_ups(assessment: Assessment, follow_ups: list[FollowUp]) -> list[FollowUp]:
    """Follow-ups answering one of the submissions (inResponseTo) or recorded on the review encounter."""
    keys = assessment.keys
    encounter_key = assessment.encounter_key
    return [
        f for f in follow_ups
        if keys.intersection(f.in_response_to) or (encounter_key is not None and f.encounter == encounter_key)
    ]


def assessment_for_encounter(assessments: list[Assessment], encounter: Any, tz: Any,
                             grouping_window: timedelta) -> Assessment:
    """The assessment of a given review encounter; unlinked submissions shortly before it are adopted."""
    key = key_of(encounter)
    for assessment in assessments:
        if assessment.encounter_key == key:
            return assessment
    start = period_start(encounter.period, tz)
    if start is not None:
        # A message received up to the grouping window before the review opened, or while it was open (an EHR
        # may open the review encounter at receipt, a second earlier or later).
        end = (as_datetime(encounter.period.end, tz) if encounter.period else None) or shifted(start, _ONE_DAY)
        for assessment in assessments:
            receipt = assessment.receipt_time
            if (assessment.encounter is None and receipt is not None
                    and between(receipt, shifted(start, -grouping_window), end)):
                assessment.encounter = encounter
                return assessment
    return Assessment(encounter=encounter)
