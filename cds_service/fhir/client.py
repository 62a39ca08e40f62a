"""One HTTP client for the EHR's FHIR R4 server.

Everything outbound to a FHIR server goes through :class:`FhirClient`: bearer token, per-request timeout bounded by
the hook's deadline, ``Bundle.link[next]`` paging with a page cap, no redirects (an allowed server must not bounce
us to another host), and next links only on the same origin as the base URL. Errors carry a reason that is safe to
log: never the token, never a URL with patient ids in it.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

FHIR_JSON = "application/fhir+json"
# A batch answer is parsed in one piece, holding the interpreter the whole time (~25 ms per MB): past this size
# the wave is asked again query by query, each answer under the usual cap, so a huge record cannot push a call
# far past its deadline.
BATCH_RESPONSE_BYTES = 4 * 1024 * 1024


class FhirAccessError(Exception):
    """Data could not be obtained from the FHIR server. ``reason`` is PHI-free and safe to log."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class DeadlineExceeded(FhirAccessError):
    """The hook's overall deadline passed before the data arrived."""

    def __init__(self) -> None:
        super().__init__("deadline exceeded before the FHIR server answered")


class FhirTimeout(FhirAccessError):
    """The server took longer than the request's time budget."""

    def __init__(self) -> None:
        super().__init__("FHIR server timed out")


@dataclass
class SearchResult:
    """Resources of a search (all pages read), plus what a reader of the evidence must know about it."""

    resources: list[dict[str, Any]] = field(default_factory=list)
    pages: int = 0
    truncated: bool = False  # more pages existed than the page cap allowed
    outcomes: list[dict[str, Any]] = field(default_factory=list)  # OperationOutcome entries (search.mode outcome)


# json.loads of a multi-megabyte body is one C call that holds the interpreter for tens of milliseconds; several
# concurrent ones (a wave of queries answered with huge Bundles) starve the thread that must write the hook's answer
# before its deadline. Large bodies are therefore decoded one at a time, and not at all once the call has given
# them up (``decode_by``): the answer thread waits for at most one decode.
LARGE_BODY_BYTES = 1024 * 1024
_LARGE_DECODE = threading.Lock()


class _Reply:
    """Status and body of a fully read response."""

    __slots__ = ("content", "decode_by", "status_code")

    def __init__(self, status_code: int, content: bytes, decode_by: float | None = None) -> None:
        self.status_code = status_code
        self.content = content
        self.decode_by = decode_by  # time.monotonic() after which the body is not worth decoding

    def json(self) -> Any:
        if len(self.content) < LARGE_BODY_BYTES:
            return parse_json(self.content)
        wait = -1.0 if self.decode_by is None else max(0.0, self.decode_by - time.monotonic())
        if not _LARGE_DECODE.acquire(timeout=wait):
            raise DeadlineExceeded()
        try:
            if self.decode_by is not None and time.monotonic() >= self.decode_by:
                raise DeadlineExceeded()
            return parse_json(self.content)
        finally:
            _LARGE_DECODE.release()


class UnreadableJson(ValueError):
    """A body that is not JSON text as FHIR and RFC 8259 define it. The message is PHI-free."""


# RFC 8259 §8.2: a "\\uD800"-style escape not part of a surrogate pair is not Unicode text; such a string cannot be
# encoded, stored or answered. A prefilter on the bytes (a high surrogate escape not followed by a low one, or a
# low one not preceded by a high one) so that only suspicious bodies pay for the exact check.
_LONE_SURROGATE_ESCAPE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _no_constant(name: str) -> Any:
    raise UnreadableJson(f"{name} is not a JSON number")  # RFC 8259 §6: no NaN or Infinity


def parse_json(content: bytes) -> Any:
    """A FHIR server's answer as JSON, strictly: UTF-8 only (FHIR R4 http.html "the UTF-8 encoding SHALL be
    used"; RFC 8259 §8.1), no NaN/Infinity literals (RFC 8259 §6), no unpaired surrogate escapes, nesting within
    the interpreter's recursion limit. Anything else raises :class:`UnreadableJson`; the service then treats the
    answer as unusable (never a crash, never partial data taken for the whole). A number too large for a float
    (``1e999``) reads as infinity, which the resource's validation refuses: that resource alone is skipped."""
    try:
        text = content.decode("utf-8-sig")  # RFC 8259 §8.1: a byte order mark may be ignored
    except UnicodeDecodeError as exc:  # also UTF-8-encoded surrogates (b"\xed\xa0\x80"), invalid in UTF-8
        raise UnreadableJson("not UTF-8") from exc
    try:
        document = json.loads(text, parse_constant=_no_constant)
    except RecursionError as exc:  # nested deeper than the interpreter can parse: no FHIR resource is
        raise UnreadableJson("nested too deeply") from exc
    except UnreadableJson:
        raise
    except ValueError as exc:  # JSONDecodeError, or an integer longer than int_max_str_digits
        raise UnreadableJson("not JSON") from exc
    if b"\\u" in content and _LONE_SURROGATE_ESCAPE.search(content) and has_lone_surrogate(document):
        raise UnreadableJson("unpaired UTF-16 surrogate escape")
    return document


def has_lone_surrogate(document: Any) -> bool:
    """JSON allows "\\ud800" escapes that are not valid Unicode text; such strings cannot be stored or echoed."""
    try:
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        return True  # cannot even be written back out: not usable either
    return False


class _Watchdog:
    """One thread for every in-flight FHIR read: at its deadline, a read's socket is shut down, which ends a read
    blocked on a trickling server (a Timer thread per request would cost more than the request)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._cancelled: set[int] = set()
        self._cond = threading.Condition()
        self._counter = 0
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, response: requests.Response) -> int:
        with self._cond:
            self._counter += 1
            ticket = self._counter
            heapq.heappush(self._heap, (deadline, ticket, response))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fhir-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return ticket

    def disarm(self, ticket: int) -> None:
        with self._cond:
            self._cancelled.add(ticket)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] in self._cancelled:
                    self._cancelled.discard(heapq.heappop(self._heap)[1])
                if not self._heap:
                    self._cond.wait(timeout=5)
                    if not self._heap:
                        self._thread = None
                        return
                    continue
                deadline, _, response = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(timeout=wait)
                    continue
                heapq.heappop(self._heap)
            _shut(response)


def _shut(response: requests.Response) -> None:
    """Shut the response's socket. urllib3 keeps it on the connection, or — for a body delimited by the server
    closing the connection — only inside http.client's file object; both places are tried."""
    raw = response.raw
    candidates = [getattr(getattr(raw, "connection", None), "sock", None)]
    file_object = getattr(getattr(raw, "_fp", None), "fp", None)
    candidates.append(getattr(getattr(file_object, "raw", None), "_sock", None))
    for sock in candidates:
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            return


WATCHDOG = _Watchdog()


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class FhirClient:
    """Read and search one FHIR R4 server on behalf of one hook call."""

    def __init__(
        self,
        base_url: str,
        *,
        access_token: str | None = None,
        timeout: float = 2.0,
        max_pages: int = 10,
        session: requests.Session | None = None,
        deadline: float | None = None,
        extra_headers: dict[str, str] | None = None,
        max_entries: int = 2000,
        max_response_bytes: int = 32 * 1024 * 1024,
        page_size: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_pages = max_pages
        self.deadline = deadline  # time.monotonic() value
        # When the hook stops waiting for answers to write its own (deadline - answer time): a large body (over
        # LARGE_BODY_BYTES) is not decoded after that (set by the runtime; the deadline when not set).
        self.decode_by: float | None = None
        self._session = session or requests.Session()
        self._headers = {"Accept": FHIR_JSON}
        if access_token:
            self._headers["Authorization"] = f"Bearer {access_token}"
        if extra_headers:
            self._headers.update(extra_headers)
        self.max_entries = max_entries
        self.max_response_bytes = max_response_bytes
        self.page_size = page_size  # _count on the searches this client sends (not on next links it follows)
        self.requests_made = 0
        self._count_lock = threading.Lock()

    # -- low level -------------------------------------------------------------------------------------------
    def _timeout(self) -> float:
        if self.deadline is None:
            return self.timeout
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded()
        return min(self.timeout, remaining)

    def _get(self, url: str) -> _Reply:
        return self._send("GET", url)

    def _send(self, method: str, url: str, payload: bytes | None = None, max_bytes: int | None = None) -> _Reply:
        """One request with a *total* time budget and a size cap.

        ``requests``' timeout bounds each socket read, not the whole body: a server trickling one byte at a time
        would hold a worker thread indefinitely. The body is streamed under a watchdog that shuts the socket when
        the budget is spent, and refused past ``max_response_bytes``.
        """
        budget = self._timeout()
        started = time.monotonic()
        with self._count_lock:  # the client is shared by the concurrent queries of one hook call
            self.requests_made += 1
        try:
            headers = self._headers if payload is None else {**self._headers, "Content-Type": FHIR_JSON}
            response = self._session.request(method, url, data=payload, headers=headers, timeout=budget,
                                             allow_redirects=False, stream=True)
        except requests.Timeout as exc:
            raise FhirTimeout() from exc
        except requests.RequestException as exc:
            raise FhirAccessError(f"FHIR server unreachable ({type(exc).__name__})") from exc
        ticket = WATCHDOG.arm(started + budget, response)
        try:
            body = bytearray()
            for chunk in response.iter_content(65536):
                body += chunk
                if len(body) > (max_bytes or self.max_response_bytes):
                    raise FhirAccessError("FHIR server response is larger than the service reads",
                                          response.status_code)
        except (requests.RequestException, OSError, ValueError) as exc:
            late = time.monotonic() - started >= budget
            if late:
                raise FhirTimeout() from exc
            raise FhirAccessError("FHIR server connection broke") from exc
        finally:
            WATCHDOG.disarm(ticket)
            response.close()
        if time.monotonic() - started > budget:
            raise FhirTimeout()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            # The hook call has answered (or answers now) without it: decoding a large late body would only hold
            # the interpreter while the answer is being written.
            raise DeadlineExceeded()
        decode_by = self.decode_by if self.decode_by is not None else self.deadline
        return _Reply(response.status_code, bytes(body), decode_by)

    @staticmethod
    def _json(response: _Reply) -> dict[str, Any]:
        # The Content-Type is not looked at: a FHIR JSON body under a wrong media type is still read, and any other
        # body fails here. The reason names the kind of problem only, never the body.
        try:
            body = response.json()
        except UnreadableJson as exc:
            raise FhirAccessError(f"FHIR server returned a body that is not JSON ({exc})",
                                  response.status_code) from exc
        if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
            raise FhirAccessError("FHIR server returned JSON that is not a FHIR resource", response.status_code)
        return body

    def _check_status(self, response: _Reply) -> None:
        _check_code(response.status_code)

    def url_for(self, relative: str) -> str:
        return f"{self.base_url}/{relative.lstrip('/')}"

    # -- public ----------------------------------------------------------------------------------------------
    def read(self, relative: str) -> dict[str, Any] | None:
        """``GET Type/id``; ``None`` when the resource does not exist (404/410)."""
        response = self._get(self.url_for(relative))
        if response.status_code in (404, 410):
            return None
        self._check_status(response)
        return _read_result(self._json(response), response.status_code)

    def batch(self, relatives: list[str]) -> list[BatchEntry]:
        """Several GETs in one round trip: ``POST [base]`` with a ``batch`` Bundle (FHIR R4 http.html#transaction).

        One answer per request, in order. Raises :class:`BatchRefused` when the server does not do batches (an
        HTTP error, or a body that is not a ``batch-response`` with one entry per request); the caller then asks
        one by one. Refused credentials or a transport failure raise :class:`FhirAccessError` as a GET would.
        """
        bundle = {"resourceType": "Bundle", "type": "batch",
                  "entry": [{"request": {"method": "GET", "url": self._paged(relative.lstrip("/"))}}
                            for relative in relatives]}
        response = self._send("POST", self.base_url, json.dumps(bundle, separators=(",", ":")).encode(),
                              max_bytes=min(self.max_response_bytes, BATCH_RESPONSE_BYTES))
        if response.status_code in (401, 403) or 300 <= response.status_code < 400:
            _check_code(response.status_code)
        if response.status_code >= 400:
            raise BatchRefused(f"FHIR server refused a batch (HTTP {response.status_code})", response.status_code)
        try:
            body = self._json(response)
        except FhirAccessError as exc:
            raise BatchRefused(exc.reason, response.status_code) from exc
        entries = body.get("entry") if body.get("resourceType") == "Bundle" else None
        if body.get("type") != "batch-response" or not isinstance(entries, list) or len(entries) != len(relatives):
            raise BatchRefused("FHIR server answered a batch with something else than a batch-response")
        return [BatchEntry.of(entry) for entry in entries]

    def read_entry(self, entry: BatchEntry) -> dict[str, Any] | None:
        """A batch entry answering ``GET Type/id``, read as :meth:`read` reads a response."""
        if entry.status in (404, 410):
            return None
        _check_code(entry.status)
        if entry.resource is None:
            raise FhirAccessError("FHIR server answered a batch read without the resource", entry.status)
        return _read_result(entry.resource, entry.status)

    def search_entry(self, entry: BatchEntry) -> SearchResult:
        """A batch entry answering a search: its Bundle, and the next pages it links to (same rules as search)."""
        _check_code(entry.status)
        if entry.resource is None:
            raise FhirAccessError("FHIR server answered a batch search without a Bundle", entry.status)
        return self.collect_pages(entry.resource)

    def search(self, relative: str) -> SearchResult:
        """``GET Type?params``, following ``next`` links up to the page cap."""
        return self.collect_pages(None, self.url_for(self._paged(relative)))

    def _paged(self, relative: str) -> str:
        """A search with the configured page size (``_count``) unless it names one itself; reads unchanged."""
        path, _, query = relative.partition("?")
        if self.page_size is None or (not query and "/" in path.strip("/")) or "_count=" in query:
            return relative
        return f"{path}?{query}&_count={self.page_size}" if query else f"{path}?_count={self.page_size}"

    def collect_pages(self, first_page: dict[str, Any] | None, next_url: str | None = None) -> SearchResult:
        """Gather entries from ``first_page`` (already in hand, e.g. a prefetched Bundle) and its next pages."""
        result = SearchResult()
        page = first_page
        url = next_url
        seen_urls: set[str] = set()
        while True:
            if page is None:
                if url is None:
                    break
                if result.pages >= self.max_pages:
                    result.truncated = True
                    break
                seen_urls.add(url)
                response = self._get(url)
                self._check_status(response)
                page = self._json(response)
            result.pages += 1
            if page.get("resourceType") != "Bundle":
                if page.get("resourceType") == "OperationOutcome":
                    result.outcomes.append(page)
                else:
                    result.resources.append(page)
                break
            add_entries(page, result, limit=self.max_entries, stop_at=self.decode_by)
            if len(result.resources) > self.max_entries:
                # More than any one patient's episode holds: read no further, and say the list is incomplete.
                del result.resources[self.max_entries:]
                result.truncated = True
                break
            url = self._next_link(page, seen_urls, result)
            page = None
        return result

    def _next_link(self, bundle: dict[str, Any], seen: set[str], result: SearchResult) -> str | None:
        for link in bundle_links(bundle):
            if link.get("relation") == "next" and isinstance(link.get("url"), str):
                try:
                    url = urljoin(self.base_url + "/", link["url"])
                    same_origin = _origin(url) == _origin(self.base_url)
                except ValueError:  # not a URL (e.g. an unclosed IPv6 bracket): the pages cannot be read
                    result.truncated = True
                    return None
                if url in seen:
                    return None  # a loop: nothing new to read
                # A next link to another origin would make us a relay for whatever the page names.
                if not same_origin:
                    result.truncated = True  # pages exist that will not be read
                    return None
                return url
        return None


class BatchRefused(FhirAccessError):
    """The server does not answer batch Bundles: ask one request at a time instead."""


@dataclass(frozen=True)
class BatchEntry:
    """One answer of a batch-response: the HTTP status of its ``response.status`` and its resource."""

    status: int
    resource: dict[str, Any] | None

    @classmethod
    def of(cls, entry: Any) -> BatchEntry:
        if not isinstance(entry, dict) or not isinstance(entry.get("response"), dict):
            return cls(502, None)  # an answer we cannot read counts as a failed request, not as "no data"
        text = entry["response"].get("status")
        code = text.split(" ", 1)[0] if isinstance(text, str) else ""
        resource = entry.get("resource")
        ok = isinstance(resource, dict) and isinstance(resource.get("resourceType"), str)
        # Three ASCII digits (RFC 9110 §15): str.isdigit alone also takes "²" or "١", which int() refuses or misreads.
        valid = len(code) == 3 and code.isascii() and code.isdigit()
        return cls(int(code) if valid else 502, resource if ok else None)


def _check_code(status: int) -> None:
    if 300 <= status < 400:
        raise FhirAccessError("FHIR server answered with a redirect, which is not followed", status)
    if status in (401, 403):
        raise FhirAccessError("FHIR server refused the credentials", status)
    if status >= 400:
        raise FhirAccessError(f"FHIR server answered HTTP {status}", status)


def _read_result(body: dict[str, Any], status: int) -> dict[str, Any]:
    if body["resourceType"] == "OperationOutcome":
        raise FhirAccessError("FHIR server answered a read with an OperationOutcome", status)
    return body


def bundle_entries(bundle: dict[str, Any]) -> list[Any] | None:
    """``Bundle.entry``: a list (empty when absent), or ``None`` when it is not an array — FHIR R4 json.html: "an
    element that may repeat is always represented as an array", so such a Bundle cannot be read at all."""
    entries = bundle.get("entry")
    if entries is None:
        return []
    return entries if isinstance(entries, list) else None


def bundle_links(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """``Bundle.link`` entries that are objects; none when ``link`` is not an array (a link that cannot be read
    cannot be followed, and says nothing). Other elements (``total``, ``type``) are not read, so their shape does
    not matter."""
    links = bundle.get("link")
    if not isinstance(links, list):
        return []
    return [link for link in links if isinstance(link, dict)]


def add_entries(bundle: dict[str, Any], result: SearchResult, *, limit: int | None = None,
                stop_at: float | None = None) -> None:
    """The resources of ``bundle`` into ``result`` (OperationOutcomes apart). Entries that are not objects or hold
    no resource object are skipped (an entry may legitimately carry only ``response`` or ``request``). A Bundle
    whose ``entry`` is not an array gives no resources and marks the result incomplete (``truncated``): what it
    held is unknown, so no rule may conclude from its absence.

    ``limit``: stop one resource past it (the caller truncates and says so) rather than walk a huge page;
    ``stop_at`` (``time.monotonic()``): the hook has stopped waiting for this answer — walking thousands of
    entries of an abandoned page in a background thread would only take the interpreter from the thread writing
    the hook's answer, so :class:`DeadlineExceeded` is raised instead."""
    entries = bundle_entries(bundle)
    if entries is None:
        result.truncated = True
        return
    for n, entry in enumerate(entries):
        if n % 512 == 511:
            if stop_at is not None and time.monotonic() >= stop_at:
                raise DeadlineExceeded()
            if limit is not None and len(result.resources) > limit:
                return
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            continue
        mode = (entry.get("search") or {}).get("mode") if isinstance(entry.get("search"), dict) else None
        if resource["resourceType"] == "OperationOutcome" or mode == "outcome":
            result.outcomes.append(resource)
        else:
            result.resources.append(resource)
