"""FhirClient over HTTP: headers, read/search outcomes, paging, redirects, timeouts, PHI-free errors."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests
import responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from responses import matchers

from cds_service.fhir.client import (
    FHIR_JSON,
    DeadlineExceeded,
    FhirAccessError,
    FhirClient,
    SearchResult,
    add_entries,
)

BASE = "https://fhir.example.org/r4"
TOKEN = "s3cr3t-T0ken-abcdef"
PATIENT_ID = "pat-98765"
PATIENT_URL = f"{BASE}/Patient/{PATIENT_ID}"
SEARCH_REL = f"Communication?subject=Patient/{PATIENT_ID}&sent=ge2024-01-01"
SEARCH_URL = f"{BASE}/{SEARCH_REL}"


def patient(pid: str = PATIENT_ID) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid}


def comm(cid: str) -> dict[str, Any]:
    return {"resourceType": "Communication", "id": cid, "status": "completed"}


def outcome(text: str = "too costly") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "warning", "code": "too-costly", "diagnostics": text}],
    }


def bundle(resources: list[dict[str, Any]], next_url: str | None = None, **extra: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }
    links = [{"relation": "self", "url": "https://fhir.example.org/r4/self-link-is-never-followed"}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    b["link"] = links
    b.update(extra)
    return b


def client(**kwargs: Any) -> FhirClient:
    kwargs.setdefault("access_token", TOKEN)
    return FhirClient(BASE, **kwargs)


def assert_phi_free(exc: BaseException) -> None:
    text = str(exc)
    assert TOKEN not in text
    assert PATIENT_ID not in text
    assert "fhir.example.org" not in text
    if isinstance(exc, FhirAccessError):
        assert exc.reason == text


# -- headers --


def test_bearer_token_and_fhir_accept_header_are_sent() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(
            PATIENT_URL,
            json=patient(),
            match=[matchers.header_matcher({"Authorization": f"Bearer {TOKEN}", "Accept": FHIR_JSON})],
        )
        assert client().read(f"Patient/{PATIENT_ID}") == patient()
    assert FHIR_JSON == "application/fhir+json"


@pytest.mark.parametrize("token", [None, ""])
def test_no_authorization_header_without_token(token: str | None) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, json=patient())
        FhirClient(BASE, access_token=token).read(f"Patient/{PATIENT_ID}")
        sent = rsps.calls[0].request.headers
    assert "Authorization" not in sent
    assert sent["Accept"] == FHIR_JSON


def test_headers_sent_on_every_page_of_a_search() -> None:
    page2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    expected = matchers.header_matcher({"Authorization": f"Bearer {TOKEN}", "Accept": FHIR_JSON})
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url=page2), match=[expected])
        rsps.get(page2, json=bundle([comm("c2")]), match=[expected])
        result = client().search(SEARCH_REL)
    assert [r["id"] for r in result.resources] == ["c1", "c2"]


def test_extra_headers_are_added() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(
            PATIENT_URL,
            json=patient(),
            match=[matchers.header_matcher({"Epic-Client-ID": "abc", "Accept": FHIR_JSON})],
        )
        client(extra_headers={"Epic-Client-ID": "abc"}).read(f"Patient/{PATIENT_ID}")


def test_token_is_never_put_in_the_url() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=bundle([]))
        client().search(SEARCH_REL)
        assert TOKEN not in rsps.calls[0].request.url


@pytest.mark.parametrize(
    ("base", "relative"),
    [
        (BASE, f"Patient/{PATIENT_ID}"),
        (BASE + "/", f"Patient/{PATIENT_ID}"),
        (BASE, f"/Patient/{PATIENT_ID}"),
        (BASE + "//", f"//Patient/{PATIENT_ID}"),
    ],
)
def test_url_for_joins_base_and_relative_path(base: str, relative: str) -> None:
    assert FhirClient(base).url_for(relative) == PATIENT_URL


# -- read --


def test_read_200_returns_the_resource() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, json=patient(), content_type=FHIR_JSON)
        c = client()
        assert c.read(f"Patient/{PATIENT_ID}") == patient()
    assert c.requests_made == 1


@pytest.mark.parametrize("status", [404, 410])
def test_read_missing_resource_returns_none(status: int) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, status=status, json=outcome("not found"))
        assert client().read(f"Patient/{PATIENT_ID}") is None


@pytest.mark.parametrize("status", [404, 410])
def test_read_missing_resource_with_empty_body_returns_none(status: int) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, status=status, body="")
        assert client().read(f"Patient/{PATIENT_ID}") is None


@pytest.mark.parametrize(
    ("status", "fragment"),
    [
        (401, "refused the credentials"),
        (403, "refused the credentials"),
        (400, "HTTP 400"),
        (429, "HTTP 429"),
        (500, "HTTP 500"),
        (503, "HTTP 503"),
    ],
)
def test_read_error_status_raises_with_status(status: int, fragment: str) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, status=status, json=outcome(f"Patient/{PATIENT_ID} {TOKEN}"))
        with pytest.raises(FhirAccessError) as info:
            client().read(f"Patient/{PATIENT_ID}")
    assert info.value.status == status
    assert fragment in info.value.reason
    assert not isinstance(info.value, DeadlineExceeded)
    assert_phi_free(info.value)


@pytest.mark.parametrize(
    "body", ["<html>Patient pat-98765 not here</html>", "", "{not json", b"\xff\xfe\x00garbage"]
)
def test_read_non_json_body_raises(body: str | bytes) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, body=body, content_type="text/html")
        with pytest.raises(FhirAccessError) as info:
            client().read(f"Patient/{PATIENT_ID}")
    assert "not JSON" in info.value.reason
    assert info.value.status == 200
    assert_phi_free(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        [patient()],
        "Patient",
        42,
        None,
        {"id": PATIENT_ID},
        {"resourceType": 7, "id": PATIENT_ID},
        {"resourceType": None},
    ],
)
def test_read_json_that_is_not_a_resource_raises(payload: Any) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, body=json.dumps(payload), content_type=FHIR_JSON)
        with pytest.raises(FhirAccessError) as info:
            client().read(f"Patient/{PATIENT_ID}")
    assert "not a FHIR resource" in info.value.reason
    assert_phi_free(info.value)


def test_read_answered_with_operation_outcome_raises() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, json=outcome(f"no access to Patient/{PATIENT_ID}"))
        with pytest.raises(FhirAccessError) as info:
            client().read(f"Patient/{PATIENT_ID}")
    assert "OperationOutcome" in info.value.reason
    assert_phi_free(info.value)


# -- redirects --


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("target", ["https://elsewhere.example.net/steal", f"{BASE}/Patient/other"])
def test_read_redirect_is_not_followed(status: int, target: str) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        source = rsps.get(PATIENT_URL, status=status, headers={"Location": target})
        landing = rsps.get(target, json=patient("other"))
        with pytest.raises(FhirAccessError) as info:
            client().read(f"Patient/{PATIENT_ID}")
        assert source.call_count == 1
        assert landing.call_count == 0
        assert len(rsps.calls) == 1
    assert info.value.status == status
    assert "redirect" in info.value.reason
    assert_phi_free(info.value)


def test_redirect_on_a_later_search_page_is_not_followed() -> None:
    page2 = f"{BASE}?_getpages=abc&_getpagesoffset=10"
    target = "https://elsewhere.example.net/page2"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url=page2))
        rsps.get(page2, status=302, headers={"Location": target})
        landing = rsps.get(target, json=bundle([comm("evil")]))
        with pytest.raises(FhirAccessError) as info:
            client().search(SEARCH_REL)
        assert landing.call_count == 0
        assert len(rsps.calls) == 2
    assert info.value.status == 302


# -- transport failures --


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (requests.exceptions.ReadTimeout(f"read timed out {PATIENT_URL}"), "timed out"),
        (requests.exceptions.ConnectTimeout(f"connect timed out {PATIENT_URL}"), "timed out"),
        (requests.exceptions.Timeout("timeout"), "timed out"),
        (requests.exceptions.ConnectionError(f"refused {PATIENT_URL} Bearer {TOKEN}"), "unreachable"),
        (requests.exceptions.SSLError(f"bad cert for {PATIENT_URL}"), "unreachable"),
        (requests.exceptions.ChunkedEncodingError(f"broken {PATIENT_URL}"), "unreachable"),
        (requests.exceptions.TooManyRedirects(f"{PATIENT_URL}"), "unreachable"),
    ],
    ids=["read-timeout", "connect-timeout", "timeout", "connection", "ssl", "chunked", "too-many-redirects"],
)
def test_transport_errors_become_phi_free_access_errors(error: Exception, fragment: str) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, body=error)
        with pytest.raises(FhirAccessError) as info:
            client().read(f"Patient/{PATIENT_ID}")
    assert fragment in info.value.reason
    assert info.value.status is None
    assert isinstance(info.value.__cause__, requests.RequestException)
    assert_phi_free(info.value)


def test_timeout_during_search_raises() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, body=requests.exceptions.ReadTimeout())
        with pytest.raises(FhirAccessError, match="timed out") as info:
            client().search(SEARCH_REL)
    assert_phi_free(info.value)


def test_unreachable_host_raises_access_error() -> None:
    # Nothing registered: responses refuses the connection with a message that names the URL.
    with responses.RequestsMock() as rsps:
        with pytest.raises(FhirAccessError, match="unreachable") as info:
            client().search(SEARCH_REL)
        assert len(rsps.calls) == 1
    assert_phi_free(info.value)


# -- deadline --


@pytest.mark.parametrize("op", ["read", "search"])
def test_deadline_already_passed_raises_without_any_request(op: str) -> None:
    c = client(deadline=time.monotonic() - 0.01)
    with responses.RequestsMock() as rsps:
        with pytest.raises(DeadlineExceeded) as info:
            if op == "read":
                c.read(f"Patient/{PATIENT_ID}")
            else:
                c.search(SEARCH_REL)
        assert len(rsps.calls) == 0
    assert c.requests_made == 0
    assert isinstance(info.value, FhirAccessError)
    assert info.value.status is None
    assert_phi_free(info.value)


def test_deadline_passed_between_pages_stops_paging() -> None:
    page2 = f"{BASE}?_getpages=abc&_getpagesoffset=10"
    c = client(deadline=time.monotonic() + 60)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:

        def first_page(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
            c.deadline = time.monotonic() - 0.01  # the hook's time runs out while page 1 is read
            return 200, {"Content-Type": FHIR_JSON}, json.dumps(bundle([comm("c1")], next_url=page2))

        rsps.add_callback(responses.GET, SEARCH_URL, callback=first_page)
        second = rsps.get(page2, json=bundle([comm("c2")]))
        with pytest.raises(DeadlineExceeded):
            c.search(SEARCH_REL)
        assert second.call_count == 0


def test_request_timeout_is_bounded_by_the_deadline() -> None:
    c = client(timeout=30.0, deadline=time.monotonic() + 0.75)
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, json=patient())
        c.read(f"Patient/{PATIENT_ID}")
        timeout = rsps.calls[0].request.req_kwargs["timeout"]
    assert 0 < timeout <= 0.75


def test_request_timeout_is_the_configured_one_when_deadline_far() -> None:
    c = client(timeout=1.5, deadline=time.monotonic() + 600)
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, json=patient())
        c.read(f"Patient/{PATIENT_ID}")
        assert rsps.calls[0].request.req_kwargs["timeout"] == 1.5


def test_request_timeout_without_deadline() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(PATIENT_URL, json=patient())
        client(timeout=2.5).read(f"Patient/{PATIENT_ID}")
        assert rsps.calls[0].request.req_kwargs["timeout"] == 2.5


# -- search and paging --


def test_search_single_page() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1"), comm("c2")]))
        c = client()
        result = c.search(SEARCH_REL)
    assert isinstance(result, SearchResult)
    assert [r["id"] for r in result.resources] == ["c1", "c2"]
    assert result.pages == 1
    assert result.truncated is False
    assert result.outcomes == []
    assert c.requests_made == 1


def test_search_empty_bundle() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json={"resourceType": "Bundle", "type": "searchset", "total": 0})
        result = client().search(SEARCH_REL)
    assert result.resources == [] and result.pages == 1 and not result.truncated


@pytest.mark.parametrize(
    ("next_link", "expected_url"),
    [
        ("Communication?_getpages=abc&_page=2", f"{BASE}/Communication?_getpages=abc&_page=2"),
        ("/r4/Communication?_page=2&_getpages=abc", f"{BASE}/Communication?_page=2&_getpages=abc"),
        ("?_getpages=abc&_getpagesoffset=10", f"{BASE}/?_getpages=abc&_getpagesoffset=10"),
    ],
    ids=["relative-to-base", "root-relative", "query-only"],
)
def test_paging_follows_relative_next_links(next_link: str, expected_url: str) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url=next_link))
        rsps.get(expected_url, json=bundle([comm("c2")]))
        result = client().search(SEARCH_REL)
        assert rsps.calls[1].request.url == expected_url
    assert [r["id"] for r in result.resources] == ["c1", "c2"]
    assert result.pages == 2
    assert result.truncated is False


def test_paging_follows_absolute_next_links_over_several_pages() -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=2&_count=2"
    p3 = f"{BASE}?_getpages=abc&_getpagesoffset=4&_count=2"
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1"), comm("c2")], next_url=p2))
        rsps.get(p2, json=bundle([comm("c3"), comm("c4")], next_url=p3))
        rsps.get(p3, json=bundle([comm("c5")]))
        c = client()
        result = c.search(SEARCH_REL)
    assert [r["id"] for r in result.resources] == ["c1", "c2", "c3", "c4", "c5"]
    assert result.pages == 3
    assert result.truncated is False
    assert c.requests_made == 3


def test_next_link_origin_comparison_ignores_host_case() -> None:
    p2 = "https://FHIR.Example.org/r4?_getpages=abc&_getpagesoffset=10"
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url=p2))
        rsps.get(p2, json=bundle([comm("c2")]))
        result = client().search(SEARCH_REL)
    assert len(result.resources) == 2


def test_page_cap_reached_sets_truncated_and_stops() -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    p3 = f"{BASE}?_getpages=abc&_getpagesoffset=2"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url=p2))
        rsps.get(p2, json=bundle([comm("c2")], next_url=p3))
        third = rsps.get(p3, json=bundle([comm("c3")]))
        c = client(max_pages=2)
        result = c.search(SEARCH_REL)
        assert third.call_count == 0
        assert len(rsps.calls) == 2
    assert result.truncated is True
    assert result.pages == 2
    assert [r["id"] for r in result.resources] == ["c1", "c2"]
    assert c.requests_made == 2


def test_page_cap_of_one_reads_only_the_first_page() -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url=p2))
        second = rsps.get(p2, json=bundle([comm("c2")]))
        result = client(max_pages=1).search(SEARCH_REL)
        assert second.call_count == 0
    assert result.truncated is True and result.pages == 1


def test_last_page_exactly_at_cap_is_not_truncated() -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url=p2))
        rsps.get(p2, json=bundle([comm("c2")]))
        result = client(max_pages=2).search(SEARCH_REL)
    assert result.truncated is False and result.pages == 2


@pytest.mark.parametrize(
    "foreign",
    [
        "https://evil.example.net/r4?_getpages=abc",
        "http://fhir.example.org/r4?_getpages=abc",  # scheme downgrade
        "https://fhir.example.org:8443/r4?_getpages=abc",  # other port
        "//evil.example.net/r4?_getpages=abc",  # protocol-relative
        "https://fhir.example.org.evil.example.net/r4?_getpages=abc",
        "https://user@evil.example.net/r4?_getpages=abc",
    ],
)
def test_next_link_to_another_origin_is_not_followed(foreign: str) -> None:
    target = requests.Request(
        "GET", foreign if not foreign.startswith("//") else "https:" + foreign
    ).prepare()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url=foreign))
        landing = rsps.get(str(target.url), json=bundle([comm("evil")]))
        result = client().search(SEARCH_REL)
        assert landing.call_count == 0
        assert len(rsps.calls) == 1
    assert [r["id"] for r in result.resources] == ["c1"]
    assert result.pages == 1


def test_refused_cross_origin_next_link_marks_result_truncated() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url="https://evil.example.net/r4?_getpages=abc"))
        result = client().search(SEARCH_REL)
    assert result.truncated is True


def test_next_link_pointing_at_the_same_url_stops() -> None:
    with responses.RequestsMock() as rsps:
        loop = rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url=SEARCH_URL))
        c = client()
        result = c.search(SEARCH_REL)
        assert loop.call_count == 1
    assert result.pages == 1
    assert c.requests_made == 1
    assert [r["id"] for r in result.resources] == ["c1"]


def test_next_link_cycle_between_two_pages_stops() -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    with responses.RequestsMock() as rsps:
        first = rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url=p2))
        second = rsps.get(p2, json=bundle([comm("c2")], next_url=SEARCH_URL))
        result = client(max_pages=50).search(SEARCH_REL)
        assert first.call_count == 1
        assert second.call_count == 1
    assert result.pages == 2
    assert [r["id"] for r in result.resources] == ["c1", "c2"]


@pytest.mark.parametrize(
    "links",
    [
        [{"relation": "previous", "url": f"{BASE}?_getpages=abc&_getpagesoffset=0"}],
        [{"relation": "self", "url": f"{BASE}?_getpages=abc"}],
        [{"relation": "next"}],
        [{"relation": "next", "url": None}],
        [{"relation": "next", "url": 12}],
        ["next"],
        None,
        "next",
    ],
)
def test_links_that_are_not_usable_next_links_are_ignored(links: Any) -> None:
    page = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": comm("c1")}], "link": links}
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=page)
        result = client().search(SEARCH_REL)
        assert len(rsps.calls) == 1
    assert result.pages == 1 and not result.truncated


def test_error_on_a_later_page_fails_the_search() -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=bundle([comm("c1")], next_url=p2))
        rsps.get(p2, status=500, body="boom")
        with pytest.raises(FhirAccessError) as info:
            client().search(SEARCH_REL)
    assert info.value.status == 500
    assert_phi_free(info.value)


@pytest.mark.parametrize("status", [404, 410, 401, 403, 500])
def test_search_error_statuses_raise(status: int) -> None:
    # Unlike a read, a search that answers 404 is an error, not "no data".
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, status=status, json=outcome())
        with pytest.raises(FhirAccessError) as info:
            client().search(SEARCH_REL)
    assert info.value.status == status
    assert_phi_free(info.value)


def test_search_non_json_page_raises() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, body="<html>login</html>", content_type="text/html")
        with pytest.raises(FhirAccessError, match="not JSON"):
            client().search(SEARCH_REL)


def test_search_answered_with_bare_operation_outcome_goes_to_outcomes() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=outcome())
        result = client().search(SEARCH_REL)
    assert result.resources == []
    assert result.outcomes == [outcome()]
    assert result.pages == 1


def test_search_answered_with_a_single_resource_keeps_it() -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=comm("c9"))
        result = client().search(SEARCH_REL)
    assert result.resources == [comm("c9")]


def test_operation_outcome_entries_go_to_outcomes_not_resources() -> None:
    page = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": comm("c1"), "search": {"mode": "match"}},
            {"resource": outcome("date param ignored"), "search": {"mode": "outcome"}},
            {"resource": outcome("no mode given")},
            {"resource": patient(), "search": {"mode": "include"}},
            {"resource": comm("odd"), "search": {"mode": "outcome"}},
        ],
    }
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=page)
        result = client().search(SEARCH_REL)
    assert [(r["resourceType"], r["id"]) for r in result.resources] == [
        ("Communication", "c1"),
        ("Patient", PATIENT_ID),
    ]
    assert [o.get("id") or o["issue"][0]["diagnostics"] for o in result.outcomes] == [
        "date param ignored",
        "no mode given",
        "odd",
    ]


def test_entries_without_a_resource_are_skipped() -> None:
    page = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"fullUrl": f"{BASE}/Communication/gone"},
            {"resource": None},
            {"resource": "Communication/c0"},
            {"resource": {"id": "no-type"}},
            {"resource": {"resourceType": 3, "id": "bad-type"}},
            None,
            "entry",
            {"resource": comm("c1"), "search": "match"},
            {"resource": comm("c2"), "search": None},
        ],
    }
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json=page)
        result = client().search(SEARCH_REL)
    assert [r["id"] for r in result.resources] == ["c1", "c2"]
    assert result.outcomes == []


@pytest.mark.parametrize("entry", [None, "x", {}, []])
def test_bundle_with_odd_entry_container(entry: Any) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(SEARCH_URL, json={"resourceType": "Bundle", "type": "searchset", "entry": entry})
        result = client().search(SEARCH_REL)
    assert result.resources == [] and result.outcomes == []


# -- collect_pages (a first page already in hand) --


def test_collect_pages_without_next_makes_no_request() -> None:
    with responses.RequestsMock() as rsps:
        c = client()
        result = c.collect_pages(bundle([comm("c1")]))
        assert len(rsps.calls) == 0
    assert [r["id"] for r in result.resources] == ["c1"]
    assert result.pages == 1
    assert c.requests_made == 0


def test_collect_pages_follows_next_of_the_page_in_hand() -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    with responses.RequestsMock() as rsps:
        rsps.get(p2, json=bundle([comm("c2")]))
        result = client().collect_pages(bundle([comm("c1")], next_url=p2))
    assert [r["id"] for r in result.resources] == ["c1", "c2"]
    assert result.pages == 2


def test_collect_pages_counts_the_page_in_hand_against_the_cap() -> None:
    p2 = f"{BASE}?_getpages=abc&_getpagesoffset=1"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        second = rsps.get(p2, json=bundle([comm("c2")]))
        result = client(max_pages=1).collect_pages(bundle([comm("c1")], next_url=p2))
        assert second.call_count == 0
    assert result.truncated is True


def test_collect_pages_with_nothing_returns_empty() -> None:
    with responses.RequestsMock():
        result = client().collect_pages(None)
    assert result == SearchResult()


# -- add_entries never crashes --

_json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
_json = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)
_resource = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Patient", "OperationOutcome", "Communication"])},
    optional={"id": st.text(max_size=4)},
)
_entry = st.one_of(
    _json,
    st.fixed_dictionaries(
        {"resource": _resource | _json},
        optional={
            "search": st.fixed_dictionaries({}, optional={"mode": st.sampled_from(["match", "outcome"])})
        },
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(_entry, max_size=6))
def test_add_entries_partitions_usable_entries(entries: list[Any]) -> None:
    result = SearchResult()
    add_entries({"resourceType": "Bundle", "entry": entries}, result)
    usable = [
        e["resource"]
        for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and isinstance(e["resource"].get("resourceType"), str)
    ]
    assert len(result.resources) + len(result.outcomes) == len(usable)
    assert all(r["resourceType"] != "OperationOutcome" for r in result.resources)


@pytest.mark.parametrize(("asked", "sent"), [
    ("Encounter?patient=1", "Encounter?patient=1&_count=50"),
    ("Encounter", "Encounter?_count=50"),
    ("Encounter?patient=1&_count=5", "Encounter?patient=1&_count=5"),  # the query's own page size wins
])
def test_searches_carry_the_configured_page_size(asked: str, sent: str) -> None:
    client = FhirClient(BASE, page_size=50)
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/{sent}", json={"resourceType": "Bundle", "type": "searchset"},
                 match=[matchers.query_string_matcher(sent.partition("?")[2])])
        client.search(asked)
        rsps.get(f"{BASE}/Encounter/1", json={"resourceType": "Encounter", "id": "1", "status": "finished"},
                 match=[matchers.query_string_matcher("")])
        assert client.read("Encounter/1") is not None  # a read has no page


def test_batch_entries_carry_the_page_size_too() -> None:
    client = FhirClient(BASE, page_size=50)
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, json={"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"response": {"status": "200 OK"}, "resource": {"resourceType": "Bundle", "type": "searchset"}},
            {"response": {"status": "404 Not Found"}}]})
        client.batch(["Encounter?patient=1", "Encounter/2"])
        sent = json.loads(rsps.calls[0].request.body)
    assert [e["request"]["url"] for e in sent["entry"]] == ["Encounter?patient=1&_count=50", "Encounter/2"]


def test_a_large_body_is_not_decoded_once_the_call_has_given_it_up() -> None:
    """Large bodies hold the interpreter while json.loads runs: one at a time, and none after ``decode_by``."""
    import json as _json
    import time as _time

    from cds_service.fhir import client as client_module

    body = _json.dumps({"resourceType": "Bundle", "type": "searchset",
                        "entry": [{"resource": {"resourceType": "Basic", "id": f"b{i}"}}
                                  for i in range(30_000)]}).encode()
    assert len(body) > client_module.LARGE_BODY_BYTES
    late = client_module._Reply(200, body, decode_by=_time.monotonic() - 0.01)
    with pytest.raises(client_module.DeadlineExceeded):
        late.json()
    in_time = client_module._Reply(200, body, decode_by=_time.monotonic() + 30)
    assert len(in_time.json()["entry"]) == 30_000
    small = client_module._Reply(200, b'{"resourceType":"Basic"}', decode_by=_time.monotonic() - 1)
    assert small.json() == {"resourceType": "Basic"}  # small bodies cost nothing worth saving
    with client_module._LARGE_DECODE:  # another thread is decoding a large body: wait only until decode_by
        waiting = client_module._Reply(200, body, decode_by=_time.monotonic() + 0.05)
        with pytest.raises(client_module.DeadlineExceeded):
            waiting.json()
