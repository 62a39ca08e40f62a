"""The benchmark's realistic records (bench/records.py): every new patient's own times are their own, master data's
are shared, and the verdicts are the template's whatever the patient."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import pytest
from flask import Flask

from bench.realistic import shifted_text
from bench.records import HOOKS, PLACEHOLDER, TIME_MARK, TZ, VARIANTS, instantiate, time_shift, variant
from cds_service.app import runtime_of

_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def _times(request: dict[str, Any]) -> dict[bool, set[str]]:
    """Every dateTime/instant string value outside narratives, by whether it is the patient's own (an ``rb`` id)."""
    found: dict[bool, set[str]] = {True: set(), False: set()}

    def walk(value: Any, own: bool) -> None:
        if isinstance(value, dict):
            own = own or str(value.get("id", "")).startswith("rb")
            for key, member in value.items():
                if key != "text":
                    walk(member, own)
        elif isinstance(value, list):
            for member in value:
                walk(member, own)
        elif isinstance(value, str) and _TIME.match(value):
            found[own].add(value)

    walk(request.get("prefetch"), False)
    return found


@pytest.mark.parametrize("hook", HOOKS)
def test_each_patient_has_own_times_and_master_data_keeps_its_own(hook: str) -> None:
    text = shifted_text(hook, "33", datetime.now(TZ))
    assert PLACEHOLDER in text and f'"{TIME_MARK}' in text
    first, second, zero = (json.loads(instantiate(text, n)) for n in (1, 2, 0))
    for request in (first, second, zero):
        assert f'"{TIME_MARK}' not in json.dumps(request)  # never on the wire
    a, b, z = _times(first), _times(second), _times(zero)
    assert a[True] and not a[True] & b[True] and not a[True] & z[True]  # no own time shared between patients
    assert a[False] == b[False] == z[False]  # practitioners', roles', organizations', schedules' times
    assert len(a[True]) == len(z[True])
    assert time_shift(0).total_seconds() == 0 and all(0 < time_shift(n).total_seconds() < 600 for n in range(1, 2000))


def _verdicts(answer: dict[str, Any]) -> list[Any]:
    out = []
    for card in answer["cards"]:
        det = card["extension"]["g2250-cds.determination"]
        out.append((card["indicator"], det["status"], det.get("code"), det.get("modifiers"),
                    [(c["id"], c["status"], sorted(re.sub(r"rb\d{8}", "P", e) for e in c.get("evidence") or ()))
                     for c in det["criteria"]]))
    return out


@pytest.mark.parametrize("size", ["33", "20"])
def test_moved_times_keep_every_verdict(app: Flask, monkeypatch: pytest.MonkeyPatch, size: str) -> None:
    """Patients whose own times moved (by the most and the least of time_shift) get patient 0's cards: indicator,
    status, code, modifiers, and every criterion's status and evidence."""
    from hooks import SERVICES

    runtime = runtime_of(app)
    now = datetime.now(TZ)
    monkeypatch.setattr(runtime, "clock", lambda: now)
    shifts = {n: time_shift(n).total_seconds() for n in range(1, 600)}
    most, least = max(shifts, key=shifts.__getitem__), min(shifts, key=shifts.__getitem__)
    for service in SERVICES:
        text = shifted_text(service.hook, size, now)
        base = _verdicts(runtime.invoke(service.id, json.loads(instantiate(text, 0))))
        assert base, service.hook
        for n in (most, least, 7):
            assert _verdicts(runtime.invoke(service.id, json.loads(instantiate(text, n)))) == base, (service.hook, n)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_rewrite_the_record_and_keep_every_verdict(app: Flask, monkeypatch: pytest.MonkeyPatch,
                                                            name: str) -> None:
    """Each variant (another generator's habits) changes what it says it changes, and every hook's cards keep
    their verdicts."""
    from hooks import SERVICES

    runtime = runtime_of(app)
    now = datetime.now(TZ)
    monkeypatch.setattr(runtime, "clock", lambda: now)
    for service in SERVICES:
        text = shifted_text(service.hook, "33", now)
        plain = instantiate(text, 5)
        written = variant(plain, name, 5)
        before, after = json.loads(plain), json.loads(written)
        if name == "newest-first":
            entries = [e["resource"]["id"] for e in before["prefetch"]["encounters"]["entry"]
                       if e.get("search", {}).get("mode") != "include"]
            after_entries = [e["resource"]["id"] for e in after["prefetch"]["encounters"]["entry"]]
            assert after_entries[:len(entries)] == entries[::-1]
        elif name == "own-codes":
            def codes(request: str) -> set[str]:
                return set(re.findall(r'"code":"([A-Z]\d\d\.\d\d)"', request))

            other = variant(instantiate(text, 6), name, 6)
            assert codes(written) - codes(plain) and codes(written) - codes(other)  # codes of this patient's own
            # the episode's own resources are as they were
            for key in ("communications", "media"):
                episode = [e for e in before["prefetch"][key]["entry"] if "-h-" not in e["resource"]["id"]]
                assert all(e in after["prefetch"][key]["entry"] for e in episode)
        else:
            assert len(written) < 0.7 * len(plain) and "xhtml" in plain
            assert not re.search(r'"id":"rb00000005[^"]*"[^{}]*"text":\{"status"', written)
        assert variant(plain, name, 5) == written  # the same patient is written the same way
        base = _verdicts(runtime.invoke(service.id, before))
        assert _verdicts(runtime.invoke(service.id, after)) == base, (service.hook, name)
    with pytest.raises(ValueError, match="unknown variant"):
        variant(plain, "other", 5)
