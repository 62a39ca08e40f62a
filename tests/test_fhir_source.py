"""DataSource: prefetch first (absent / null / OperationOutcome), then the FHIR server, on time."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import responses

from cds_service.fhir.client import FHIR_JSON, FhirClient
from cds_service.fhir.source import DataSource, DataUnavailable, Fetched, FetchStats, Query

BASE = "https://fhir.example.org/r4"
TOKEN = "s3cr3t-T0ken-abcdef"
PATIENT_ID = "pat-98765"
COMM_REL = f"Communication?subject=Patient/{PATIENT_ID}&sent=ge2024-01-01"
COMM_URL = f"{BASE}/{COMM_REL}"
ENC_REL = "Encounter/123"
ENC_URL = f"{BASE}/{ENC_REL}"


def comm(cid: str) -> dict[str, Any]:
    return {"resourceType": "Communication", "id": cid, "status": "completed"}


def encounter(eid: str = "123") -> dict[str, Any]:
    return {"resourceType": "Encounter", "id": eid, "status": "finished"}


def outcome(text: str = "denied") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "forbidden", "diagnostics": text}],
    }


def bundle(resources: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }
    if next_url is not None:
        b["link"] = [{"relation": "next", "url": next_url}]
    return b


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="test-fhir")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def make_client(**kwargs: Any) -> FhirClient:
    kwargs.setdefault("access_token", TOKEN)
    return FhirClient(BASE, **kwargs)


def make_source(
    executor: ThreadPoolExecutor,
    prefetch: dict[str, Any] | None,
    client: FhirClient | bool | None = True,
    deadline_in: float = 10.0,
    **kwargs: Any,
) -> DataSource:
    if client is True:
        client = make_client()
    elif client is False:
        client = None
    return DataSource(prefetch, client, executor, time.monotonic() + deadline_in, **kwargs)


COMM_Q = Query("communications", COMM_REL)
ENC_Q = Query("encounter", ENC_REL)


def assert_phi_free(text: str) -> None:
    assert PATIENT_ID not in text
    assert TOKEN not in text
    assert "fhir.example.org" not in text


# -- Query --


@pytest.mark.parametrize(
    ("fallback", "is_read"),
    [
        ("Encounter/123", True),
        ("Patient/pat-1", True),
        ("Encounter?patient=1", False),
        ("Encounter", False),
        ("Coverage?beneficiary=Patient/1&status=active", False),
        ("Patient/1/_history/2", False),
    ],
)
def test_query_is_read(fallback: str, is_read: bool) -> None:
    assert Query("k", fallback).is_read is is_read


# -- prefetch semantics --


def test_key_absent_is_fetched_from_the_server(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(COMM_URL, json=bundle([comm("c1"), comm("c2")]))
        source = make_source(executor, {"other": None})
        out = source.fetch([COMM_Q])
        assert rsps.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"
    got = out["communications"]
    assert got.origin == "fhir"
    assert [r["id"] for r in got.resources] == ["c1", "c2"]
    assert got.truncated is False and got.note is None
    assert source.stats.fhir_requests == 1
    assert source.stats.waves == 1
    assert source.stats.prefetch_hits == 0


def test_no_prefetch_at_all_fetches_everything(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(COMM_URL, json=bundle([comm("c1")]))
        rsps.get(ENC_URL, json=encounter())
        source = make_source(executor, None)
        out = source.fetch([COMM_Q, ENC_Q])
    assert {k: v.origin for k, v in out.items()} == {"communications": "fhir", "encounter": "fhir"}
    assert source.stats.fhir_requests == 2
    assert source.stats.waves == 1


def test_key_present_null_means_no_data_and_no_request(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        source = make_source(executor, {"communications": None})
        out = source.fetch([COMM_Q])
        assert len(rsps.calls) == 0
    assert out["communications"] == Fetched("communications", "prefetch-null")
    assert out["communications"].resources == []
    assert source.stats.fhir_requests == 0
    assert source.stats.waves == 0


def test_key_present_null_without_client_is_not_an_error(executor: ThreadPoolExecutor) -> None:
    out = make_source(executor, {"encounter": None}, client=False).fetch([ENC_Q])
    assert out["encounter"].origin == "prefetch-null"


def test_prefetched_bundle_is_used_without_request(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        source = make_source(executor, {"communications": bundle([comm("c1"), comm("c2")])})
        out = source.fetch([COMM_Q])
        assert len(rsps.calls) == 0
    got = out["communications"]
    assert got.origin == "prefetch"
    assert [r["id"] for r in got.resources] == ["c1", "c2"]
    assert source.stats.prefetch_hits == 1
    assert source.stats.waves == 0
    assert source.stats.fhir_requests == 0


def test_prefetched_empty_bundle_means_no_data_and_no_request(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        out = make_source(
            executor, {"communications": {"resourceType": "Bundle", "type": "searchset", "total": 0}}
        ).fetch([COMM_Q])
        assert len(rsps.calls) == 0
    assert out["communications"].origin == "prefetch"
    assert out["communications"].resources == []


def test_prefetched_single_resource_for_a_read(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        out = make_source(executor, {"encounter": encounter()}, client=False).fetch([ENC_Q])
        assert len(rsps.calls) == 0
    assert out["encounter"].origin == "prefetch"
    assert out["encounter"].resources == [encounter()]


def test_prefetched_bundle_mixing_outcomes_and_resources_keeps_only_resources(
    executor: ThreadPoolExecutor,
) -> None:
    value = bundle([comm("c1")])
    value["entry"].append({"resource": outcome("some results suppressed"), "search": {"mode": "outcome"}})
    with responses.RequestsMock() as rsps:
        out = make_source(executor, {"communications": value}).fetch([COMM_Q])
        assert len(rsps.calls) == 0
    assert out["communications"].origin == "prefetch"
    assert [r["resourceType"] for r in out["communications"].resources] == ["Communication"]


def test_operation_outcome_prefetch_is_treated_as_absent(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        fetched = rsps.get(COMM_URL, json=bundle([comm("c1")]))
        source = make_source(executor, {"communications": outcome()})
        out = source.fetch([COMM_Q])
        assert fetched.call_count == 1
    assert out["communications"].origin == "fhir"
    assert [r["id"] for r in out["communications"].resources] == ["c1"]
    assert source.stats.prefetch_hits == 0


def test_bundle_of_only_operation_outcomes_is_treated_as_absent(executor: ThreadPoolExecutor) -> None:
    value = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": outcome("one"), "search": {"mode": "outcome"}},
            {"resource": outcome("two")},
            {"fullUrl": "urn:uuid:no-resource"},
        ],
    }
    with responses.RequestsMock() as rsps:
        fetched = rsps.get(COMM_URL, json=bundle([comm("c1")]))
        out = make_source(executor, {"communications": value}).fetch([COMM_Q])
        assert fetched.call_count == 1
    assert out["communications"].origin == "fhir"


@pytest.mark.parametrize(
    "value",
    [
        "Bundle",
        "",
        [bundle([comm("stale")])],
        [],
        42,
        True,
        {"entry": [{"resource": comm("stale")}]},
        {},
        {"resourceType": 3},
        {"resourceType": None},
    ],
    ids=[
        "string",
        "empty-string",
        "list",
        "empty-list",
        "int",
        "bool",
        "dict-no-type",
        "empty-dict",
        "int-type",
        "null-type",
    ],
)
def test_malformed_prefetch_value_is_fetched(executor: ThreadPoolExecutor, value: Any) -> None:
    with responses.RequestsMock() as rsps:
        fetched = rsps.get(COMM_URL, json=bundle([comm("c1")]))
        out = make_source(executor, {"communications": value}).fetch([COMM_Q])
        assert fetched.call_count == 1
    assert out["communications"].origin == "fhir"
    assert [r["id"] for r in out["communications"].resources] == ["c1"]


def test_malformed_prefetch_without_client_is_unavailable(executor: ThreadPoolExecutor) -> None:
    with pytest.raises(DataUnavailable):
        make_source(executor, {"communications": "garbage"}, client=False).fetch([COMM_Q])


# -- prefetched first page with next links --


def test_prefetched_bundle_with_next_link_fetches_remaining_pages(executor: ThreadPoolExecutor) -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    p3 = "Communication?_getpages=abc&_getpagesoffset=2"  # relative next link
    with responses.RequestsMock() as rsps:
        rsps.get(p2, json=bundle([comm("c2")], next_url=p3))
        rsps.get(f"{BASE}/{p3}", json=bundle([comm("c3")]))
        source = make_source(executor, {"communications": bundle([comm("c1")], next_url=p2)})
        out = source.fetch([COMM_Q])
        assert len(rsps.calls) == 2
        assert all(c.request.headers["Authorization"] == f"Bearer {TOKEN}" for c in rsps.calls)
    got = out["communications"]
    assert got.origin == "prefetch"
    assert [r["id"] for r in got.resources] == ["c1", "c2", "c3"]
    assert got.truncated is False
    assert source.stats.prefetch_hits == 1


def test_prefetched_bundle_paging_respects_page_cap(executor: ThreadPoolExecutor) -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    p3 = f"{BASE}?_getpages=abc&_getpagesoffset=2"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(p2, json=bundle([comm("c2")], next_url=p3))
        third = rsps.get(p3, json=bundle([comm("c3")]))
        source = make_source(
            executor, {"communications": bundle([comm("c1")], next_url=p2)}, client=make_client(max_pages=2)
        )
        out = source.fetch([COMM_Q])
        assert third.call_count == 0
    assert out["communications"].truncated is True
    assert [r["id"] for r in out["communications"].resources] == ["c1", "c2"]


def test_prefetched_bundle_with_foreign_next_link_is_not_followed(executor: ThreadPoolExecutor) -> None:
    foreign = "https://evil.example.net/r4?_getpages=abc"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        landing = rsps.get(foreign, json=bundle([comm("evil")]))
        out = make_source(executor, {"communications": bundle([comm("c1")], next_url=foreign)}).fetch([COMM_Q])
        assert landing.call_count == 0
        assert len(rsps.calls) == 0
    assert [r["id"] for r in out["communications"].resources] == ["c1"]


@pytest.mark.parametrize(("required", "status"), [(True, 500), (False, 500), (True, 401), (False, 403)])
def test_prefetched_bundle_next_page_failure(executor: ThreadPoolExecutor, required: bool, status: int) -> None:
    p2 = f"{BASE}/Communication?subject=Patient/{PATIENT_ID}&_page=2"
    query = Query("communications", COMM_REL, required=required)
    with responses.RequestsMock() as rsps:
        rsps.get(p2, status=status, json=outcome(f"Patient/{PATIENT_ID}"))
        source = make_source(executor, {"communications": bundle([comm("c1")], next_url=p2)})
        if required:
            with pytest.raises(DataUnavailable) as info:
                source.fetch([query])
            assert info.value.key == "communications"
            assert "next page of prefetched data" in info.value.reason
            assert_phi_free(str(info.value))
        else:
            out = source.fetch([query])
            got = out["communications"]
            assert got.origin == "unavailable"
            assert got.resources == []
            assert got.note is not None
            assert got.note.endswith(
                "FHIR server answered HTTP 500" if status == 500 else "FHIR server refused the credentials"
            )
            assert_phi_free(got.note)


def test_prefetched_bundle_with_next_link_and_no_client_uses_first_page(executor: ThreadPoolExecutor) -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    out = make_source(executor, {"communications": bundle([comm("c1")], next_url=p2)}, client=False).fetch([COMM_Q])
    assert out["communications"].origin == "prefetch"
    assert [r["id"] for r in out["communications"].resources] == ["c1"]


def test_prefetched_bundle_with_unfollowable_next_link_is_marked_truncated(
    executor: ThreadPoolExecutor,
) -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    out = make_source(executor, {"communications": bundle([comm("c1")], next_url=p2)}, client=False).fetch([COMM_Q])
    assert out["communications"].truncated is True


def test_stats_count_requests_made_to_page_a_prefetched_bundle(executor: ThreadPoolExecutor) -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    with responses.RequestsMock() as rsps:
        rsps.get(p2, json=bundle([comm("c2")]))
        source = make_source(executor, {"communications": bundle([comm("c1")], next_url=p2)})
        source.fetch([COMM_Q])
        assert len(rsps.calls) == 1
    assert source.stats.fhir_requests == 1


def test_paging_a_prefetched_bundle_is_bounded_by_the_deadline(executor: ThreadPoolExecutor) -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    release = threading.Event()

    def slow(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        release.wait(1.5)
        return 200, {"Content-Type": FHIR_JSON}, json.dumps(bundle([comm("c2")]))

    with responses.RequestsMock() as rsps:
        rsps.add_callback(responses.GET, p2, callback=slow)
        source = make_source(executor, {"communications": bundle([comm("c1")], next_url=p2)}, deadline_in=0.3)
        start = time.monotonic()
        try:
            with pytest.raises(DataUnavailable):
                source.fetch([COMM_Q])
            elapsed = time.monotonic() - start
        finally:
            release.set()
            executor.shutdown(wait=True)
    assert elapsed < 0.3 + 0.5


# -- no client --


def test_required_query_without_client_raises_data_unavailable(executor: ThreadPoolExecutor) -> None:
    source = make_source(executor, {}, client=False)
    with pytest.raises(DataUnavailable) as info:
        source.fetch([ENC_Q])
    assert info.value.key == "encounter"
    assert info.value.reason == "no fhirServer in the request"
    assert str(info.value) == "encounter: no fhirServer in the request"


def test_unavailable_reason_is_configurable(executor: ThreadPoolExecutor) -> None:
    source = make_source(executor, {}, client=False, unavailable_reason="fhirServer not on the allowlist")
    with pytest.raises(DataUnavailable, match="allowlist"):
        source.fetch([ENC_Q])


def test_optional_query_without_client_is_unavailable(executor: ThreadPoolExecutor) -> None:
    source = make_source(executor, {}, client=False)
    out = source.fetch([Query("coverage", f"Coverage?beneficiary=Patient/{PATIENT_ID}", required=False)])
    assert out["coverage"].origin == "unavailable"
    assert out["coverage"].note == "no fhirServer in the request"
    assert out["coverage"].resources == []
    assert source.client is None


def test_without_client_prefetched_data_still_served(executor: ThreadPoolExecutor) -> None:
    source = make_source(executor, {"communications": bundle([comm("c1")]), "encounter": None}, client=False)
    out = source.fetch([COMM_Q, ENC_Q])
    assert out["communications"].origin == "prefetch"
    assert out["encounter"].origin == "prefetch-null"


# -- FHIR errors --


@pytest.mark.parametrize(
    "mock",
    [
        {"status": 500, "json": outcome(f"Patient/{PATIENT_ID} {TOKEN}")},
        {"status": 401},
        {"status": 302, "headers": {"Location": f"https://elsewhere.example.net/Patient/{PATIENT_ID}"}},
        {"body": requests.exceptions.ReadTimeout(f"{COMM_URL}")},
        {"body": requests.exceptions.ConnectionError(f"{COMM_URL} Bearer {TOKEN}")},
        {"body": "<html>not fhir</html>"},
    ],
    ids=["500", "401", "redirect", "timeout", "connection", "not-json"],
)
def test_fhir_error_on_required_query_raises_data_unavailable(
    executor: ThreadPoolExecutor, mock: dict[str, Any]
) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(COMM_URL, **mock)
        source = make_source(executor, {})
        with pytest.raises(DataUnavailable) as info:
            source.fetch([COMM_Q])
    assert info.value.key == "communications"
    assert_phi_free(str(info.value))
    assert source.stats.fhir_requests == 1


def test_fhir_error_on_optional_query_is_unavailable_with_note(executor: ThreadPoolExecutor) -> None:
    query = Query("coverage", f"Coverage?beneficiary=Patient/{PATIENT_ID}&status=active", required=False)
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/{query.fallback}", status=503)
        rsps.get(COMM_URL, json=bundle([comm("c1")]))
        source = make_source(executor, {})
        out = source.fetch([query, COMM_Q])
    assert out["coverage"].origin == "unavailable"
    assert out["coverage"].note == "FHIR server answered HTTP 503"
    assert out["coverage"].resources == []
    assert out["communications"].origin == "fhir"
    assert source.stats.fhir_requests == 2


def test_required_failure_raises_even_when_other_queries_succeed(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(COMM_URL, json=bundle([comm("c1")]))
        rsps.get(ENC_URL, status=500)
        with pytest.raises(DataUnavailable) as info:
            make_source(executor, {}).fetch([COMM_Q, ENC_Q])
    assert info.value.key == "encounter"
    assert info.value.reason == "FHIR server answered HTTP 500"


def test_client_deadline_passed_gives_data_unavailable_without_request(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        source = make_source(executor, {}, client=make_client(deadline=time.monotonic() - 1))
        with pytest.raises(DataUnavailable, match="deadline"):
            source.fetch([COMM_Q])
        assert len(rsps.calls) == 0


# -- reads --


def test_read_query_returns_the_resource(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(ENC_URL, json=encounter())
        out = make_source(executor, {}).fetch([ENC_Q])
    assert out["encounter"].origin == "fhir"
    assert out["encounter"].resources == [encounter()]


@pytest.mark.parametrize("status", [404, 410])
def test_read_query_of_missing_resource_returns_empty(executor: ThreadPoolExecutor, status: int) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(ENC_URL, status=status, json=outcome("gone"))
        out = make_source(executor, {}).fetch([ENC_Q])
    assert out["encounter"].origin == "fhir"
    assert out["encounter"].resources == []


def test_read_query_answered_with_operation_outcome_is_an_error(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(ENC_URL, json=outcome())
        with pytest.raises(DataUnavailable, match="OperationOutcome"):
            make_source(executor, {}).fetch([ENC_Q])


def test_search_truncation_is_reported(executor: ThreadPoolExecutor) -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(COMM_URL, json=bundle([comm("c1")], next_url=p2))
        rsps.get(p2, json=bundle([comm("c2")]))
        out = make_source(executor, {}, client=make_client(max_pages=1)).fetch([COMM_Q])
    assert out["communications"].truncated is True
    assert [r["id"] for r in out["communications"].resources] == ["c1"]


# -- concurrency, deadline, stats --


def _slow_json(
    payload: dict[str, Any], delay: float, active: list[int], peak: list[int], lock: threading.Lock
) -> Callable[[requests.PreparedRequest], tuple[int, dict[str, str], str]]:
    def callback(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(delay)
        finally:
            with lock:
                active[0] -= 1
        return 200, {"Content-Type": FHIR_JSON}, json.dumps(payload)

    return callback


def test_queries_of_a_wave_run_concurrently(executor: ThreadPoolExecutor) -> None:
    delay = 0.3
    active, peak, lock = [0], [0], threading.Lock()
    queries = [
        Query("communications", COMM_REL),
        Query("encounter", ENC_REL),
        Query("procedures", f"Procedure?patient={PATIENT_ID}&date=ge2024-01-01"),
        Query("consent", f"Consent?patient={PATIENT_ID}", required=False),
    ]
    payloads = [bundle([comm("c1")]), encounter(), bundle([]), bundle([])]
    with responses.RequestsMock() as rsps:
        for query, payload in zip(queries, payloads, strict=True):
            rsps.add_callback(
                responses.GET,
                f"{BASE}/{query.fallback}",
                callback=_slow_json(payload, delay, active, peak, lock),
            )
        source = make_source(executor, {})
        start = time.monotonic()
        out = source.fetch(queries)
        elapsed = time.monotonic() - start
    assert elapsed < 0.9, f"4 x {delay}s queries took {elapsed:.2f}s: not concurrent"
    assert peak[0] >= 2
    assert {k: v.origin for k, v in out.items()} == {q.key: "fhir" for q in queries}
    assert out["encounter"].resources == [encounter()]
    assert source.stats.fhir_requests == 4
    assert source.stats.waves == 1


def test_slow_required_query_beyond_deadline_raises_promptly(executor: ThreadPoolExecutor) -> None:
    deadline_in = 0.4
    release = threading.Event()

    def slow(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        release.wait(5.0)
        return 200, {"Content-Type": FHIR_JSON}, json.dumps(encounter())

    with responses.RequestsMock() as rsps:
        rsps.add_callback(responses.GET, ENC_URL, callback=slow)
        rsps.get(COMM_URL, json=bundle([comm("c1")]))
        source = make_source(executor, {}, deadline_in=deadline_in)
        start = time.monotonic()
        try:
            with pytest.raises(DataUnavailable) as info:
                source.fetch([COMM_Q, ENC_Q])
            elapsed = time.monotonic() - start
        finally:
            release.set()
            executor.shutdown(wait=True)  # let the worker finish while the mock is still active
    assert elapsed < deadline_in + 0.5
    assert info.value.key == "encounter"
    assert "deadline" in info.value.reason


def test_slow_optional_query_beyond_deadline_is_unavailable(executor: ThreadPoolExecutor) -> None:
    release = threading.Event()
    optional = Query("consent", f"Consent?patient={PATIENT_ID}", required=False)

    def slow(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        release.wait(5.0)
        return 200, {"Content-Type": FHIR_JSON}, json.dumps(bundle([]))

    with responses.RequestsMock() as rsps:
        rsps.add_callback(responses.GET, f"{BASE}/{optional.fallback}", callback=slow)
        rsps.get(COMM_URL, json=bundle([comm("c1")]))
        source = make_source(executor, {}, deadline_in=0.3)
        start = time.monotonic()
        try:
            out = source.fetch([COMM_Q, optional])
            elapsed = time.monotonic() - start
        finally:
            release.set()
            executor.shutdown(wait=True)
    assert elapsed < 0.3 + 0.5
    assert out["communications"].origin == "fhir"
    assert out["consent"].origin == "unavailable"
    assert out["consent"].note == "deadline exceeded before the FHIR server answered"


def test_deadline_already_passed_for_the_source(executor: ThreadPoolExecutor) -> None:
    release = threading.Event()

    def slow(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        release.wait(5.0)
        return 200, {"Content-Type": FHIR_JSON}, json.dumps(encounter())

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_callback(responses.GET, ENC_URL, callback=slow)
        source = make_source(executor, {}, deadline_in=-1.0)
        start = time.monotonic()
        try:
            with pytest.raises(DataUnavailable, match="deadline"):
                source.fetch([ENC_Q])
            assert time.monotonic() - start < 0.5
        finally:
            release.set()
            executor.shutdown(wait=True)


def test_injected_clock_drives_the_deadline(executor: ThreadPoolExecutor) -> None:
    release = threading.Event()

    def slow(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        release.wait(5.0)
        return 200, {"Content-Type": FHIR_JSON}, json.dumps(encounter())

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_callback(responses.GET, ENC_URL, callback=slow)
        # The source's clock says the deadline is long gone although the monotonic clock disagrees.
        source = DataSource({}, make_client(), executor, 100.0, clock=lambda: 1000.0)
        try:
            with pytest.raises(DataUnavailable, match="deadline"):
                source.fetch([ENC_Q])
        finally:
            release.set()
            executor.shutdown(wait=True)


def test_stats_count_requests_and_waves_across_waves(executor: ThreadPoolExecutor) -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    with responses.RequestsMock() as rsps:
        rsps.get(COMM_URL, json=bundle([comm("c1")], next_url=p2))
        rsps.get(p2, json=bundle([comm("c2")]))
        rsps.get(ENC_URL, json=encounter())
        source = make_source(executor, {"consent": bundle([])})
        assert source.stats == FetchStats()

        source.fetch([COMM_Q, Query("consent", f"Consent?patient={PATIENT_ID}")])
        assert source.stats.fhir_requests == 2  # two pages of one search
        assert source.stats.waves == 1
        assert source.stats.prefetch_hits == 1

        source.fetch([ENC_Q])
        assert source.stats.fhir_requests == 3
        assert source.stats.waves == 2

        # A wave answered entirely from prefetch is not a wave of requests.
        source.fetch([Query("consent", f"Consent?patient={PATIENT_ID}")])
        assert source.stats.waves == 2
        assert source.stats.prefetch_hits == 2
        assert source.stats.fhir_requests == 3


def test_empty_wave_does_nothing(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        source = make_source(executor, {})
        assert source.fetch([]) == {}
        assert len(rsps.calls) == 0
    assert source.stats == FetchStats()


def test_fetch_accepts_any_iterable(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(ENC_URL, json=encounter())
        out = make_source(executor, {}).fetch(q for q in [ENC_Q])
    assert out["encounter"].resources == [encounter()]


# -- several fallback queries sharing one prefetch key --


SENT_Q = Query("communications", f"Communication?subject=Patient/{PATIENT_ID}&sent=ge2024-01-01", name="comm:sent")
RECEIVED_Q = Query(
    "communications", f"Communication?subject=Patient/{PATIENT_ID}&received=ge2024-01-01", name="comm:received"
)


def test_result_name_defaults_to_the_prefetch_key() -> None:
    assert Query("k", "Encounter/1").result_name == "k"
    assert Query("k", "Encounter/1", name="n").result_name == "n"


def test_shared_key_not_prefetched_fetches_each_query_under_its_name(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/{SENT_Q.fallback}", json=bundle([comm("sent")]))
        rsps.get(f"{BASE}/{RECEIVED_Q.fallback}", json=bundle([comm("received")]))
        source = make_source(executor, {})
        out = source.fetch([SENT_Q, RECEIVED_Q])
    assert set(out) == {"comm:sent", "comm:received"}
    assert [r["id"] for r in out["comm:sent"].resources] == ["sent"]
    assert [r["id"] for r in out["comm:received"].resources] == ["received"]
    assert out["comm:sent"].key == out["comm:received"].key == "communications"
    assert source.stats.fhir_requests == 2


@pytest.mark.parametrize("value", [bundle([comm("c1")]), None], ids=["bundle", "null"])
def test_shared_key_prefetched_answers_once_without_requests(executor: ThreadPoolExecutor, value: Any) -> None:
    with responses.RequestsMock() as rsps:
        source = make_source(executor, {"communications": value})
        out = source.fetch([SENT_Q, RECEIVED_Q])
        assert len(rsps.calls) == 0
    # The prefetched data answers both queries; it is recorded once, under the first query's name.
    assert list(out) == ["comm:sent"]
    assert out["comm:sent"].origin == ("prefetch" if value else "prefetch-null")
    assert source.stats.waves == 0


def test_shared_key_with_operation_outcome_prefetch_fetches_both(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/{SENT_Q.fallback}", json=bundle([comm("sent")]))
        rsps.get(f"{BASE}/{RECEIVED_Q.fallback}", json=bundle([]))
        out = make_source(executor, {"communications": outcome()}).fetch([SENT_Q, RECEIVED_Q])
    assert {k: v.origin for k, v in out.items()} == {"comm:sent": "fhir", "comm:received": "fhir"}


def test_named_query_failure_reports_the_prefetch_key(executor: ThreadPoolExecutor) -> None:
    optional = Query("communications", RECEIVED_Q.fallback, required=False, name="comm:received")
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/{SENT_Q.fallback}", status=500)
        rsps.get(f"{BASE}/{optional.fallback}", status=500)
        source = make_source(executor, {})
        with pytest.raises(DataUnavailable) as info:
            source.fetch([SENT_Q, optional])
    assert info.value.key == "communications"


def test_named_optional_query_unavailable_is_stored_under_its_name(executor: ThreadPoolExecutor) -> None:
    optional = Query("communications", RECEIVED_Q.fallback, required=False, name="comm:received")
    out = make_source(executor, {}, client=False).fetch([optional])
    assert list(out) == ["comm:received"]
    assert out["comm:received"].origin == "unavailable"


# -- batch Bundles --


def _batch_response(*entries: tuple[str, dict[str, Any] | None]) -> dict[str, Any]:
    out = []
    for status, resource in entries:
        entry: dict[str, Any] = {"response": {"status": status}}
        if resource is not None:
            entry["resource"] = resource
        out.append(entry)
    return {"resourceType": "Bundle", "type": "batch-response", "entry": out}


def _sent_batch(call: Any) -> list[str]:
    body = json.loads(call.request.body)
    assert body["resourceType"] == "Bundle" and body["type"] == "batch"
    return [e["request"]["url"] for e in body["entry"] if e["request"]["method"] == "GET"]


def test_a_wave_goes_out_as_one_batch(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, json=_batch_response(("200 OK", bundle([comm("c1")])), ("200 OK", encounter())))
        source = make_source(executor, None, batch=True)
        out = source.fetch([COMM_Q, ENC_Q])
        assert _sent_batch(rsps.calls[0]) == [COMM_REL, ENC_REL]
        assert rsps.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert rsps.calls[0].request.headers["Content-Type"] == FHIR_JSON
    assert [r["id"] for r in out["communications"].resources] == ["c1"]
    assert out["encounter"].resources == [encounter()]
    assert source.stats.fhir_requests == 1 and source.stats.waves == 1


def test_a_single_query_is_not_batched(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(ENC_URL, json=encounter())
        out = make_source(executor, None, batch=True).fetch([ENC_Q])
    assert out["encounter"].resources == [encounter()]


def test_batch_entries_fail_one_by_one_as_gets_would(executor: ThreadPoolExecutor) -> None:
    optional = Query("media", "Media?subject=Patient/x", required=False)
    gone = Query("gone", "Encounter/404")
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, json=_batch_response(("200 OK", bundle([comm("c1")])), ("500 Internal Server Error",
                                                                               outcome("boom")),
                                             ("404 Not Found", outcome("not found"))))
        out = make_source(executor, None, batch=True).fetch([COMM_Q, optional, gone])
    assert out["media"].origin == "unavailable" and out["media"].degraded
    assert out["gone"].origin == "fhir" and out["gone"].resources == []
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, json=_batch_response(("500", None), ("200 OK", encounter())))
        with pytest.raises(DataUnavailable) as caught:
            make_source(executor, None, batch=True).fetch([COMM_Q, ENC_Q])
    assert caught.value.key == "communications"
    assert_phi_free(caught.value.reason)


def test_a_refused_batch_falls_back_to_gets_and_is_remembered(executor: ThreadPoolExecutor) -> None:
    from cds_service.fhir.source import BatchRefusals

    now = [0.0]
    refusals = BatchRefusals(retry_seconds=60, clock=lambda: now[0])
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, status=405, json=outcome("batch not supported"))
        rsps.get(COMM_URL, json=bundle([comm("c1")]))
        rsps.get(ENC_URL, json=encounter())
        out = make_source(executor, None, batch=True, batch_refusals=refusals).fetch([COMM_Q, ENC_Q])
        assert [c.request.method for c in rsps.calls].count("POST") == 1
    assert {k: v.origin for k, v in out.items()} == {"communications": "fhir", "encounter": "fhir"}
    assert refusals.refused(BASE)
    with responses.RequestsMock() as rsps:  # within the retry time: straight to GETs, no POST
        rsps.get(COMM_URL, json=bundle([comm("c1")]))
        rsps.get(ENC_URL, json=encounter())
        make_source(executor, None, batch=True, batch_refusals=refusals).fetch([COMM_Q, ENC_Q])
        assert all(c.request.method == "GET" for c in rsps.calls)
    now[0] = 61.0
    assert not refusals.refused(BASE)


@pytest.mark.parametrize("answer", [
    {"resourceType": "Bundle", "type": "searchset", "entry": []},  # not a batch-response
    _batch_response(("200 OK", encounter())),  # one entry for two requests
    {"resourceType": "OperationOutcome", "issue": []},
])
def test_something_else_than_a_batch_response_is_a_refusal(executor: ThreadPoolExecutor,
                                                           answer: dict[str, Any]) -> None:
    from cds_service.fhir.source import BatchRefusals

    refusals = BatchRefusals()
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, json=answer)
        rsps.get(COMM_URL, json=bundle([comm("c1")]))
        rsps.get(ENC_URL, json=encounter())
        out = make_source(executor, None, batch=True, batch_refusals=refusals).fetch([COMM_Q, ENC_Q])
    assert out["encounter"].resources == [encounter()] and refusals.refused(BASE)


def test_a_post_that_breaks_falls_back_without_giving_up_batches(executor: ThreadPoolExecutor) -> None:
    from cds_service.fhir.source import BatchRefusals

    refusals = BatchRefusals()
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, body=requests.ConnectionError("dropped by a proxy"))
        rsps.get(COMM_URL, json=bundle([comm("c1")]))
        rsps.get(ENC_URL, json=encounter())
        out = make_source(executor, None, batch=True, batch_refusals=refusals).fetch([COMM_Q, ENC_Q])
    assert out["encounter"].resources == [encounter()]
    assert not refusals.refused(BASE)  # maybe an outage, not a server without batches


def test_refused_credentials_on_a_batch_fail_the_wave_without_retrying(executor: ThreadPoolExecutor) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, status=401, json=outcome("expired"))
        with pytest.raises(DataUnavailable) as caught:
            make_source(executor, None, batch=True).fetch([COMM_Q, ENC_Q])
        assert len(rsps.calls) == 1
    assert "credentials" in caught.value.reason and caught.value.key == "communications, encounter"


def test_a_batch_entry_with_more_pages_is_paged(executor: ThreadPoolExecutor) -> None:
    page2 = f"{BASE}/Communication?page=2"
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, json=_batch_response(("200 OK", bundle([comm("c1")], next_url=page2)),
                                             ("200 OK", encounter())))
        rsps.get(page2, json=bundle([comm("c2")]))
        source = make_source(executor, None, batch=True)
        out = source.fetch([COMM_Q, ENC_Q])
    assert [r["id"] for r in out["communications"].resources] == ["c1", "c2"]
    assert source.stats.fhir_requests == 2


def test_a_batch_answer_too_large_to_parse_at_once_is_asked_again_query_by_query(
        executor: ThreadPoolExecutor) -> None:
    from cds_service.fhir.source import BatchRefusals

    refusals = BatchRefusals()
    big = _batch_response(("200 OK", bundle([comm(f"c{i}") for i in range(100)])), ("200 OK", encounter()))
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, json=big)
        rsps.get(COMM_URL, json=bundle([comm("c1")]))
        rsps.get(ENC_URL, json=encounter())
        client = make_client(max_response_bytes=len(json.dumps(big)) - 1)
        out = make_source(executor, None, client=client, batch=True, batch_refusals=refusals).fetch([COMM_Q, ENC_Q])
    assert [r["id"] for r in out["communications"].resources] == ["c1"]
    assert not refusals.refused(BASE)  # the server does batches; this answer was just too large


def test_required_data_is_waited_for_until_the_answer_time_before_the_deadline(executor: ThreadPoolExecutor) -> None:
    release = threading.Event()

    def hang(request: Any) -> tuple[int, dict[str, str], str]:
        release.wait(5)
        return 200, {}, json.dumps(encounter())

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:  # the hanging call ends later
        rsps.add_callback(responses.GET, ENC_URL, callback=hang)
        source = make_source(executor, None, deadline_in=1.0, answer_time=0.3)
        started = time.monotonic()
        with pytest.raises(DataUnavailable):
            source.fetch([ENC_Q])
        waited = time.monotonic() - started
        release.set()
    assert waited < 0.95  # gave up 0.3 s before the deadline, leaving the time to answer
