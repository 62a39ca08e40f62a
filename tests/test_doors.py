"""One episode, one verdict (billing-rules.md §7): every door that can see an assessment judges it the same way.

For every fixture scenario, against the real FHIR server (SEKMET or FHIR_BASE_URL) loaded with fhir_fixtures/:
the scenario's assessment is reached through ``patient-view`` **without** ``encounterId`` (how the CDS Hooks
sandbox and Oracle Health call), ``patient-view`` with it, ``encounter-start`` and ``encounter-discharge`` on its
review encounter — each by FHIR fallback (``Prefer: handling=strict``) and by prefetch resolved from the discovery
templates as an EHR would (keys it cannot fill omitted). The determination of that assessment — status, code,
modifiers, deadline and every criterion with its evidence and detail — must be identical through all of them, and
equal to the scenario's written expectation. ``appointment-book`` changes the record (it adds a proposed
appointment), so it is a door only on its own scenarios (``bench.waves.doors_of``).

The rules judge every assessment a hook looks at even when the hook shows no card (patient-view is silent on a
"not billable"); the test reads those verdicts by recording each call of the one judging function.

Every fallback call needs at most two waves of FHIR requests (``bench/waves.py`` reports the distribution).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from flask import Flask

from bench.waves import doors_of
from cds_service.app import runtime_of
from cds_service.rules.model import Determination
from cds_service.runtime import InvocationStats
from tests.support.determinations import Recorder
from tests.support.fhir_server import FhirServer
from tests.test_integration_fhir import SERVICE_FOR_HOOK, hook_request, resolve_prefetch, scenarios

pytestmark = pytest.mark.integration

def _of_assessment(item: dict[str, Any], found: list[Determination]) -> Determination | None:
    """The scenario's assessment among the verdicts of one call: by its review encounter, else its receipt."""
    encounter = item.get("assessmentEncounter")
    receipt = datetime.fromisoformat(item["receipt"]) if item.get("receipt") else None
    for determination in found:
        if encounter and determination.encounter == encounter:
            return determination
    for determination in found:
        if receipt is not None and determination.receipt_time == receipt:
            return determination
    return None


def _call(app: Flask, hook: str, context: dict[str, Any], item: dict[str, Any], server: FhirServer,
          prefetch: bool) -> tuple[dict[str, Any], InvocationStats]:
    door_item = {**item, "hook": hook, "context": context, "id": f"{item['id']}-{hook}"}
    body = hook_request(door_item, server)
    service_id = SERVICE_FOR_HOOK[hook]
    if prefetch:
        body["prefetch"] = resolve_prefetch(app, service_id, context, server)
    stats = InvocationStats(service_id, hook)
    response = runtime_of(app).invoke(service_id, body, stats=stats)
    return response, stats


def _verdict(determination: Determination) -> dict[str, Any]:
    document = determination.to_extension()
    document["practitioner"] = determination.practitioner
    document["encounter"] = determination.encounter
    return document


def _assert_expected(item: dict[str, Any], verdict: dict[str, Any], door: str) -> None:
    expected = item["expected"]
    got = {c["id"]: c["status"] for c in verdict["criteria"]}
    assert (verdict["status"], verdict.get("code"), verdict.get("modifiers"), verdict.get("deadline"), got) == (
        expected["status"], expected.get("code"), expected.get("modifiers"), expected.get("deadline"),
        expected["criteria"]), (item["id"], door)


def _assert_no_charge_for_the_unbillable(response: dict[str, Any], door: str) -> None:
    """No card ever offers to create a G2250/G2010 charge for a new patient or a not-billable assessment."""
    for card in response["cards"]:
        determination = card["extension"]["g2250-cds.determination"]
        creates = [a for s in card.get("suggestions", ()) for a in s["actions"] if a["type"] == "create"]
        if not creates:
            continue
        statuses = {c["id"]: c["status"] for c in determination["criteria"]}
        assert determination["status"] in ("billable", "needs-review"), door
        assert "not-met" not in statuses.values(), door  # established-patient "not-met" (a new patient) included


@pytest.mark.parametrize("scenario_id", [s["id"] for s in scenarios()])
def test_every_door_gives_the_same_verdict(fhir_app: Callable[..., Flask], loaded_fhir: FhirServer,
                                           monkeypatch: pytest.MonkeyPatch, scenario_id: str) -> None:
    item = next(s for s in scenarios() if s["id"] == scenario_id)
    app = fhir_app(datetime.fromisoformat(item["now"]))
    recorder = Recorder(monkeypatch)
    verdicts: dict[str, dict[str, Any]] = {}
    for hook, context in doors_of(item):
        for prefetch in (False, True):
            door = f"{hook}{'+encounterId' if 'encounterId' in context else ''} by {'prefetch' if prefetch else 'FHIR'}"
            response, stats = _call(app, hook, context, item, loaded_fhir, prefetch)
            if not prefetch:
                assert stats.waves <= 2, (door, stats.waves)
            determination = _of_assessment(item, recorder.take())
            assert determination is not None, (item["id"], door, "the door did not judge the assessment")
            verdicts[door] = _verdict(determination)
            _assert_no_charge_for_the_unbillable(response, door)
            # What the door shows agrees with what it judged.
            shown = [c["extension"]["g2250-cds.determination"] for c in response["cards"]]
            if hook == "patient-view" and determination.status == "not-billable":
                assert determination.to_extension() not in shown, (item["id"], door)  # nothing to say
            elif hook != "appointment-book":  # appointment-book: only when the proposal bundles it
                assert determination.to_extension() in shown, (item["id"], door)
    assert len(verdicts) >= 2, item["id"]  # at least one door, by both data paths
    first_door, first = next(iter(verdicts.items()))
    for door, verdict in verdicts.items():
        assert verdict == first, (item["id"], first_door, door)
    _assert_expected(item, first, first_door)
