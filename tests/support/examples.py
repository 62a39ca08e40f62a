"""Write self-contained example requests (every datum prefetched) for the README and the benchmarks.

    python -m tests.support.examples            # starts SEKMET, loads the fixtures, writes fhir_fixtures/requests/

Each request is what an EHR with generous prefetch would send: the service's data plan is run once against the
real FHIR server, and every answer is stored under its prefetch key, so ``g2250-cds evaluate`` needs no server.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from cds_service.cli import load_fixtures
from cds_service.fhir.client import FhirClient
from cds_service.fhir.source import DataSource, Fetched, Query
from hooks import SERVICES
from tests.support.fhir_server import FhirServer, sekmet_binary, start_sekmet

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "fhir_fixtures" / "requests"
EXAMPLES = {  # file name → (hook, scenario, context keys left out)
    "encounter-discharge": ("encounter-discharge", "s01-pt-billable", ()),
    "encounter-start": ("encounter-start", "s24-pending-no-follow-up", ()),
    "patient-view": ("patient-view", "s29-uncoded-visit-prior-7-days", ()),
    # As the CDS Hooks sandbox and Oracle Health call it: no encounterId. Same assessment as encounter-discharge,
    # same verdict (billing-rules.md §7).
    "patient-view-no-encounter": ("patient-view", "s01-pt-billable", ("encounterId",)),
    "appointment-book": ("appointment-book", "s52-appointment-book-bundles", ()),
}


class RecordingSource(DataSource):
    """A DataSource that keeps every answer, by prefetch key."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.reads: set[str] = set()

    def fetch(self, queries: Any) -> dict[str, Fetched]:
        queries = list(queries)
        results = super().fetch(queries)
        for query in queries:
            fetched = results.get(query.result_name)
            if fetched is not None:
                self.recorded[query.key].extend(fetched.resources)
                if Query(query.key, query.fallback).is_read:
                    self.reads.add(query.key)
        return results


def _prefetch(source: RecordingSource) -> dict[str, Any]:
    prefetch: dict[str, Any] = {}
    for key, resources in sorted(source.recorded.items()):
        unique = {f"{r['resourceType']}/{r.get('id')}": r for r in resources}
        if key in source.reads:
            prefetch[key] = next(iter(unique.values()), None)
        else:
            prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "total": len(unique),
                             "entry": [{"resource": r} for r in unique.values()]}
    return prefetch


def build(server: FhirServer) -> dict[str, dict[str, Any]]:
    scenarios = {s["id"]: s for s in json.loads((ROOT / "fhir_fixtures" / "scenarios.json").read_text("utf-8"))}
    built = {}
    for name, (hook, scenario_id, left_out) in EXAMPLES.items():
        item = scenarios[scenario_id]
        service = next(s for s in SERVICES if s.hook == hook)
        context = {k: v for k, v in item["context"].items() if k not in left_out}
        body = {"hook": hook, "hookInstance": f"example-{name}", "context": context}
        from hooks.base import HookRequest

        request = HookRequest.from_json(body)
        client = FhirClient(server.base_url, access_token=server.token)
        with ThreadPoolExecutor(8) as pool:
            source = RecordingSource(None, client, pool, time.monotonic() + 30)
            service.gather(request, source, datetime.fromisoformat(item["now"]))
        body["prefetch"] = _prefetch(source)
        built[name] = {"now": item["now"], "scenario": scenario_id, "request": body}
    return built


def main() -> None:
    binary = sekmet_binary()
    if binary is None:
        raise SystemExit("SEKMET is not installed (bash tests/run-all.sh installs it in .venv-sekmet)")
    server = start_sekmet(binary)
    try:
        load_fixtures(server.base_url, server.token)
        OUT.mkdir(parents=True, exist_ok=True)
        for name, example in build(server).items():
            path = OUT / f"{name}.json"
            path.write_text(json.dumps(example["request"], indent=2) + "\n", "utf-8")
            print(f"{path.relative_to(ROOT)}  (scenario {example['scenario']}, --now {example['now']})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
