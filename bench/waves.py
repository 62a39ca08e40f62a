"""Waves of FHIR requests per hook call on the fallback path, over every fixture scenario and every door.

billing-rules.md §7 makes every hook judge an assessment from the whole record, so every door that can see an
assessment (patient-view with and without ``encounterId``, encounter-start, encounter-discharge, and
appointment-book on its own scenarios) must gather what the rules need; this report shows what that costs in
dependent round trips. Target: at most two waves per call in the common case (tests/test_doors.py asserts it for
every fixture scenario).

    .venv/bin/python -m bench.waves            # starts SEKMET on 127.0.0.1, loads fhir_fixtures/, prints a table
    .venv/bin/python -m bench.waves --two-wave # the same without the first-wave look-ahead (issue 13): "before"
    FHIR_BASE_URL=... FHIR_TOKEN=... .venv/bin/python -m bench.waves   # against another server holding them

The service reads a server's CapabilityStatement once (concurrently with its first call's first wave, which is
therefore planned without it); this report reads it before the first call, so every call shows the steady state.

Not a timing benchmark: the service runs in this process (waves are counted, not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

SERVICE_FOR_HOOK = {
    "patient-view": "g2250-patient-view",
    "encounter-start": "g2250-encounter-start",
    "encounter-discharge": "g2250-encounter-discharge",
    "appointment-book": "g2250-appointment-book",
}
PATIENT_VIEW_DAYS = 30  # contract.md "patient-view": open submissions of the last 30 days


def scenarios() -> list[dict[str, Any]]:
    return json.loads(resources.files("fhir_fixtures").joinpath("scenarios.json").read_text("utf-8"))


def doors_of(item: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(hook, context) of every door that can see a scenario's assessment. appointment-book changes the record
    (a proposed appointment), so it is a door only on its own scenarios, with their context."""
    if item["hook"] == "appointment-book":
        return [("appointment-book", dict(item["context"]))]
    context = item["context"]
    base = {k: context[k] for k in ("patientId", "userId") if k in context}
    now = datetime.fromisoformat(item["now"])
    receipt = datetime.fromisoformat(item["receipt"]) if item.get("receipt") else None
    recent = receipt is not None and now - timedelta(days=PATIENT_VIEW_DAYS) <= receipt <= now
    doors: list[tuple[str, dict[str, Any]]] = [("patient-view", dict(base))] if recent else []
    encounter = item.get("assessmentEncounter")
    if encounter:
        with_encounter = {**base, "encounterId": encounter.split("/", 1)[1]}
        if recent:
            doors.append(("patient-view", with_encounter))
        doors += [("encounter-start", with_encounter), ("encounter-discharge", with_encounter)]
    return doors


def request_body(hook: str, context: dict[str, Any], base_url: str, token: str | None,
                 instance: str) -> dict[str, Any]:
    body: dict[str, Any] = {"hook": hook, "hookInstance": instance, "context": context, "fhirServer": base_url}
    if token:
        body["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                     "scope": "user/*.read", "subject": "cds-service"}
    return body


def prime_capabilities(base_url: str, token: str | None) -> None:
    """Read the server's CapabilityStatement into the service's cache, as its first call would have."""
    import requests

    from cds_service.fhir.capabilities import CAPABILITIES

    headers = {"Accept": "application/fhir+json", **({"Authorization": f"Bearer {token}"} if token else {})}
    reply = requests.get(f"{base_url.rstrip('/')}/metadata", headers=headers, timeout=30)
    CAPABILITIES.store(base_url.rstrip("/"), reply.json() if reply.ok else None)


def measure(base_url: str, token: str | None, database_url: str = "sqlite://") -> Counter[tuple[str, int]]:
    from cds_service.app import create_app, runtime_of
    from cds_service.config import config_from_mapping
    from cds_service.runtime import InvocationStats

    waves: Counter[tuple[str, int]] = Counter()
    config = config_from_mapping({"database_url": database_url, "fhir": {"allowed_servers": [base_url]},
                                  "logging": {"level": "ERROR", "format": "json"}}, "bench.waves")
    for n, item in enumerate(scenarios()):
        now = datetime.fromisoformat(item["now"])
        app = create_app(config, clock=lambda now=now: now)
        runtime = runtime_of(app)
        try:
            for hook, context in doors_of(item):
                stats = InvocationStats(SERVICE_FOR_HOOK[hook], hook)
                runtime.invoke(SERVICE_FOR_HOOK[hook], request_body(hook, context, base_url, token,
                                                                    f"waves-{n}-{hook}"), stats=stats)
                label = hook + (" (no encounterId)" if hook == "patient-view" and "encounterId" not in context
                                else "")
                waves[(label, stats.waves)] += 1
        finally:
            runtime.close()
    return waves


def render(waves: Counter[tuple[str, int]]) -> str:
    hooks = sorted({hook for hook, _ in waves})
    most = max((w for _, w in waves), default=0)
    header = "| door | " + " | ".join(f"{w} wave{'s' if w != 1 else ''}" for w in range(1, most + 1)) + " | calls |"
    lines = [header, "|" + "---|" * (most + 2)]
    for hook in hooks:
        counts = [waves.get((hook, w), 0) for w in range(1, most + 1)]
        lines.append(f"| {hook} | " + " | ".join(str(c) for c in counts) + f" | {sum(counts)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--two-wave", action="store_true",
                        help="without the first-wave look-ahead (the plan for servers that declare no includes)")
    args = parser.parse_args(argv)
    import tempfile

    from cds_service.cli import load_fixtures
    from hooks import gather

    if args.two_wave:
        gather._one_round_trip_queries = lambda *a, **k: []  # type: ignore[assignment]

    base_url = os.environ.get("FHIR_BASE_URL")
    server = None
    if base_url:
        token = os.environ.get("FHIR_TOKEN")
    else:
        from fhir_fixtures.sekmet import sekmet_binary, start_sekmet

        binary = sekmet_binary()
        if binary is None:
            print("no SEKMET: run `bash tests/run-all.sh` once, or set SEKMET_BIN or FHIR_BASE_URL", file=sys.stderr)
            return 2
        server = start_sekmet(binary)
        base_url, token = server.base_url, server.token
    try:
        load_fixtures(base_url, token)
        prime_capabilities(base_url, token)
        # A database file: an in-memory SQLite database is one per connection, so the determination log's writer
        # thread would find no table (harmless, but noisy).
        with tempfile.TemporaryDirectory(prefix="g2250-waves-") as directory:
            print(render(measure(base_url, token, f"sqlite:///{directory}/waves.db")))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
