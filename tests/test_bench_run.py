"""``bench.run`` moves each fixture story to just before the real clock, in SEKMET and in its request body alike."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from bench.run import HOOKS, REQUESTS_DIR, TZ, shifted_fixtures

SCENARIOS = json.loads((REQUESTS_DIR.parent / "scenarios.json").read_text("utf-8"))


def _find(node: Any, rtype: str, rid: str) -> dict[str, Any] | None:
    if isinstance(node, dict):
        if node.get("resourceType") == rtype and node.get("id") == rid:
            return node
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    return next((found for child in children if (found := _find(child, rtype, rid)) is not None), None)


def test_every_request_moves_with_its_story_to_the_week_before_now() -> None:
    bodies = {h: json.loads((REQUESTS_DIR / f"{h}.json").read_text("utf-8")) for h in HOOKS}
    for now in (datetime(2026, 12, 4, 15, 0, tzinfo=TZ), datetime(2027, 3, 10, 9, 30, tzinfo=TZ)):
        bundles, moved, days = shifted_fixtures(bodies, now)
        assert set(moved) == set(HOOKS)
        for hook, body in moved.items():
            assert days[hook] % 7 == 0, hook  # whole weeks keep weekdays (business hours)
            item = next(i for i in SCENARIOS if i["context"].get("patientId") == body["context"]["patientId"]
                        and i["hook"] == body["hook"])
            story = datetime.fromisoformat(item["now"]) + timedelta(days=days[hook])
            assert now - timedelta(days=7) < story <= now + timedelta(hours=2), (hook, story)  # wall clock, DST
        # The discharge's encounter has the same dates in its prefetch and in the bundle SEKMET is given.
        encounter_id = moved["encounter-discharge"]["context"]["encounterId"]
        in_body = _find(moved["encounter-discharge"]["prefetch"], "Encounter", encounter_id)
        in_bundle = _find([bundle for _, bundle in bundles], "Encounter", encounter_id)
        assert in_body is not None and in_bundle is not None
        assert in_body["period"] == in_bundle["period"]
        original = _find(bodies["encounter-discharge"]["prefetch"], "Encounter", encounter_id)
        assert (original is not None and original["period"] != in_body["period"]) or days["encounter-discharge"] == 0
