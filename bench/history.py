"""Synthetic patients for the flat-cost test: scenario s01's episode (copied with new ids) plus N historical
Encounters, N Communications and N Media, all older than the windows the service queries.

The history is spread evenly over the ten years before the episode and kept outside the service's windows
(taken from ``hooks.gather`` so they stay in sync): Encounters older than the 3-year established-patient lookback,
Communications and Media older than the 38-day episode lookback (plus the encounter-age margin and a safety
margin). A service whose queries are bounded by date on the server side reads none of it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hooks.gather import ENCOUNTER_AGE_MARGIN, EPISODE_LOOKBACK, ESTABLISHED_LOOKBACK

from .procs import ROOT

EPISODE_START = datetime.fromisoformat("2026-11-18T09:59:20-05:00")  # s01's patient message
SAFETY = timedelta(days=30)
TAG = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST",
       "display": "test health data"}


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def episode_entries(prefix: str) -> list[dict[str, Any]]:
    """Scenario s01's transaction entries with every ``s01-`` id replaced by ``{prefix}-``."""
    text = (ROOT / "fhir_fixtures" / "01-pt-billable.json").read_text("utf-8")
    return json.loads(text.replace("s01-", f"{prefix}-"))["entry"]


def windows(now: datetime) -> dict[str, tuple[datetime, datetime]]:
    """(oldest, newest) moment for the history of each type: 10 years before the episode up to each cutoff."""
    anchor = min(now, EPISODE_START)
    oldest = EPISODE_START - timedelta(days=3652)
    return {
        "Encounter": (oldest, anchor - ESTABLISHED_LOOKBACK - ENCOUNTER_AGE_MARGIN - SAFETY),
        "Communication": (oldest, anchor - EPISODE_LOOKBACK - ENCOUNTER_AGE_MARGIN - SAFETY),
        "Media": (oldest, anchor - EPISODE_LOOKBACK - ENCOUNTER_AGE_MARGIN - SAFETY),
    }


def history_entries(prefix: str, per_type: int, now: datetime) -> list[dict[str, Any]]:
    patient = f"Patient/{prefix}-pat"
    spans = windows(now)
    entries: list[dict[str, Any]] = []

    def moment(kind: str, i: int) -> datetime:
        lo, hi = spans[kind]
        return lo + (hi - lo) * ((i + 0.5) / per_type)

    for i in range(per_type):
        start = moment("Encounter", i)
        entries.append({
            "resourceType": "Encounter", "id": f"{prefix}-henc-{i}", "meta": {"tag": [TAG]},
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB",
                      "display": "ambulatory"},
            "type": [{"text": "Office visit"}],
            "subject": {"reference": patient},
            "participant": [{"individual": {"reference": "Practitioner/pr-pt-1"}}],
            "period": {"start": _instant(start), "end": _instant(start + timedelta(minutes=30))},
            "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M17.11",
                                        "display": "Unilateral primary osteoarthritis, right knee"}]}],
            "serviceProvider": {"reference": "Organization/org-main"},
        })
        sent = moment("Communication", i)
        entries.append({
            "resourceType": "Communication", "id": f"{prefix}-hcom-{i}", "meta": {"tag": [TAG]},
            "status": "completed",
            "category": [{"text": "Patient portal message"}],
            "subject": {"reference": patient},
            "sent": _instant(sent), "received": _instant(sent + timedelta(seconds=40)),
            "recipient": [{"reference": "Practitioner/pr-pt-1"}],
            "sender": {"reference": patient},
            "payload": [{"contentString": "Synthetic historical message (benchmark data)."}],
        })
        created = moment("Media", i)
        entries.append({
            "resourceType": "Media", "id": f"{prefix}-hmedia-{i}", "meta": {"tag": [TAG]},
            "status": "completed",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image",
                                 "display": "Image"}]},
            "subject": {"reference": patient},
            "createdDateTime": _instant(created), "issued": _instant(created + timedelta(hours=1)),
            "content": {"contentType": "image/jpeg", "url": f"https://portal.example.org/uploads/h/{i}.jpg"},
        })
    return [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in entries]


def transaction_bundles(prefix: str, per_type: int, now: datetime, batch: int = 1000) -> list[dict[str, Any]]:
    """The episode first (one Bundle), then the history in Bundles of ``batch`` entries."""
    history = history_entries(prefix, per_type, now)
    bundles = [{"resourceType": "Bundle", "type": "transaction", "entry": episode_entries(prefix)}]
    for i in range(0, len(history), batch):
        bundles.append({"resourceType": "Bundle", "type": "transaction", "entry": history[i:i + batch]})
    return bundles
