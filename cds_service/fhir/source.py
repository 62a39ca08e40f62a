"""Prefetch first, then the FHIR server: the canonical CDS Hooks data path (cds-hooks.md "Prefetch").

For each piece of data a hook needs (a :class:`Query`, named by its prefetch key):

* key **absent** from ``prefetch`` → the client did not fetch it: query ``fhirServer`` ourselves;
* key present with **null** → the data does not exist: do not refetch;
* key holding an **OperationOutcome** (or a Bundle of only those) → the client's fetch failed: treat as absent;
* data needed, not prefetched, and no ``fhirServer`` or the fetch fails → :class:`DataUnavailable` (HTTP 412).

Independent queries of one wave run concurrently on a shared thread pool, bounded by the hook's deadline.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, InvalidStateError
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from .capabilities import CAPABILITIES, CapabilityCache, ServerCapabilities
from .client import (
    BatchEntry,
    BatchRefused,
    DeadlineExceeded,
    FhirAccessError,
    FhirClient,
    FhirTimeout,
    SearchResult,
    add_entries,
    bundle_entries,
    bundle_links,
)

Origin = Literal["prefetch", "prefetch-null", "fhir", "unavailable"]


class Query(NamedTuple):
    """One piece of data: its prefetch ``key`` and the relative FHIR URL to fetch when not prefetched.

    A named tuple: immutable and hashable like the frozen dataclass it was, and built in a third of the time (a
    hook call plans about thirty of them, prefetched or not)."""

    key: str
    fallback: str
    required: bool = True
    name: str | None = None  # result name when several fallback queries share one prefetch key
    # Search result parameters (_include, _revinclude) whose use the answer's self link must show (FHIR R4
    # search.html §3.1.1.6); ``Fetched.honored`` says whether it did. Filters are not listed: a server ignoring a
    # filter answers a superset, which the rules filter again; one ignoring an include answers less.
    verify: tuple[tuple[str, str], ...] = ()
    # The capability (capabilities.py) the query relies on: a refusal or an ignored parameter is remembered for the
    # server, which then gets the plan without it.
    feature: str | None = None

    @property
    def result_name(self) -> str:
        return self.name or self.key

    @property
    def is_read(self) -> bool:
        return "?" not in self.fallback and self.fallback.count("/") == 1


@dataclass
class Fetched:
    key: str
    origin: Origin
    resources: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False
    note: str | None = None  # PHI-free, e.g. why an optional query had no data
    # An optional query failed for a reason that may hide data (timeout, 5xx, bad body) — unlike a server saying
    # it does not support the search (400/404/405/501). Criteria relying on it must not come out "met".
    degraded: bool = False
    # For a query with ``verify``: True when the self link shows every listed parameter and no OperationOutcome
    # says one was not supported; False otherwise (the answer holds less than asked); None when not checked.
    honored: bool | None = None


_UNSUPPORTED = frozenset({400, 404, 405, 501})
# Errors that reading a malformed answer can raise in code written for well-formed ones.
_SHAPE_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError)

log = logging.getLogger("g2250_cds")


class DataUnavailable(Exception):
    """Required data could not be obtained (→ HTTP 412). ``reason`` is PHI-free."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def _is_outcome_only(value: dict[str, Any]) -> bool:
    """An OperationOutcome, or a Bundle holding only OperationOutcomes of which one reports an error.

    A searchset whose only entry is a *warning* outcome (e.g. "unknown search parameter ignored") is a valid
    empty result, not a failed prefetch.
    """
    if value.get("resourceType") == "OperationOutcome":
        return True
    if value.get("resourceType") != "Bundle":
        return False
    entries = [e for e in bundle_entries(value) or () if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
    if not entries or not all(e["resource"].get("resourceType") == "OperationOutcome" for e in entries):
        return False
    return any(
        isinstance(issue, dict) and issue.get("severity") in ("error", "fatal")
        for e in entries for issue in _issues(e["resource"])
    ) or not any(_issues(e["resource"]) for e in entries)


def _issues(outcome: dict[str, Any]) -> list[Any]:
    issues = outcome.get("issue")
    return issues if isinstance(issues, list) else []


class BatchRefusals:
    """FHIR servers that answered a batch Bundle with an error, remembered for ``retry_seconds`` (per process): in
    that time their waves go out as concurrent GETs straight away, without first paying a refused batch."""

    def __init__(self, retry_seconds: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def refused(self, base_url: str) -> bool:
        with self._lock:
            until = self._until.get(base_url)
            if until is not None and until <= self._clock():
                del self._until[base_url]
                return False
            return until is not None

    def remember(self, base_url: str) -> None:
        with self._lock:
            self._until[base_url] = self._clock() + self.retry_seconds


BATCH_REFUSALS = BatchRefusals()


def _fail(target: Future[Fetched], exc: BaseException) -> None:
    # A future the wave cancelled at its deadline takes no late answer (InvalidStateError): drop it.
    with contextlib.suppress(InvalidStateError):
        target.set_exception(exc)


def _settle(target: Future[Fetched], outcome: Callable[[], Fetched]) -> None:
    """Complete a query's future with ``outcome()`` or the error it raised (unless the wave gave up on it)."""
    try:
        value = outcome()
    except BaseException as exc:  # handed to whoever waits on the future, as an executor would
        _fail(target, exc)
        return
    with contextlib.suppress(InvalidStateError):
        target.set_result(value)


def _forward(source: Future[Fetched], target: Future[Fetched]) -> None:
    source.add_done_callback(lambda done: _settle(target, done.result))


@dataclass
class FetchStats:
    fhir_requests: int = 0
    waves: int = 0
    prefetch_hits: int = 0


class DataSource:
    """The data of one hook call: the request's ``prefetch`` backed by a FHIR client (or none)."""

    def __init__(
        self,
        prefetch: dict[str, Any] | None,
        client: FhirClient | None,
        executor: Executor,
        deadline: float,
        *,
        unavailable_reason: str = "no fhirServer in the request",
        clock: Callable[[], float] = time.monotonic,
        reserve: float = 0.0,
        answer_time: float = 0.0,
        batch: bool = False,
        batch_refusals: BatchRefusals = BATCH_REFUSALS,
        capabilities: CapabilityCache = CAPABILITIES,
    ) -> None:
        self._prefetch = prefetch or {}
        self._client = client
        self._executor = executor
        self._deadline = deadline
        self._unavailable_reason = unavailable_reason
        self._clock = clock
        # Optional data is waited for only until `reserve` seconds before the deadline: that time is kept for
        # parsing and the rules, so a hanging optional query costs a verdict of "unknown", not the whole call.
        self._reserve = reserve
        # Required data is waited for until `answer_time` seconds before the deadline: the 412 must be out by the
        # deadline. The client's requests themselves run until the deadline, so the answer is written before the
        # abandoned requests wake up and compete with it for the interpreter.
        self._answer_time = answer_time
        # Several queries of a wave go out as one batch Bundle when the server takes them (one round trip instead
        # of one per query, and one connection); otherwise as concurrent GETs.
        self._batch = batch
        self._batch_refusals = batch_refusals
        self._capabilities = capabilities
        self.stats = FetchStats()

    @property
    def client(self) -> FhirClient | None:
        return self._client

    def prefetched(self, key: str) -> bool:
        """Whether the request's prefetch holds ``key`` (then no fallback query of that key goes to the server)."""
        return key in self._prefetch

    def server_capabilities(self) -> tuple[ServerCapabilities | None, frozenset[str]]:
        """The FHIR server's declared search capabilities and the features it refused or ignored before, from the
        per-process cache. Never waits: when the server's CapabilityStatement is not known yet it is requested on
        the executor — concurrently with the wave the caller sends next — and this call plans without it (None)."""
        client = self._client
        if client is None:
            return None, frozenset()
        cache = self._capabilities
        fresh, capabilities = cache.lookup(client.base_url)
        if not fresh and cache.start_fetch(client.base_url):
            try:
                self._executor.submit(_read_capabilities, client, cache)
            except RuntimeError:  # executor shut down: plan without, ask another time
                cache.fetch_failed(client.base_url)
        return capabilities, cache.refused(client.base_url)

    def _from_prefetch(self, query: Query) -> Fetched | None:
        if query.key not in self._prefetch:
            return None
        value = self._prefetch[query.key]
        if value is None:
            return Fetched(query.key, "prefetch-null")
        if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
            return None  # malformed prefetch value: the client's fetch is unusable, fetch ourselves
        if value["resourceType"] != "Bundle":
            if value["resourceType"] == "OperationOutcome":
                return None
            self.stats.prefetch_hits += 1
            return Fetched(query.key, "prefetch", [value])
        if bundle_entries(value) is None:
            return None  # its entries cannot be read: as if not prefetched (cds-hooks.md "Prefetch"), fetch ourselves
        result = SearchResult()
        add_entries(value, result)
        if not result.resources and result.outcomes and _is_outcome_only(value):
            return None
        self.stats.prefetch_hits += 1
        # Next pages are only left here without a client (nobody can fetch them): the list is incomplete.
        return Fetched(query.key, "prefetch", result.resources, truncated=_has_next(value))

    def _first_page_to_follow(self, query: Query) -> dict[str, Any] | None:
        """A prefetched first page whose next links the client can follow (cds-hooks.md), else None."""
        value = self._prefetch.get(query.key)
        if (
            self._client is None
            or not isinstance(value, dict)
            or value.get("resourceType") != "Bundle"
            or bundle_entries(value) is None
            or _is_outcome_only(value)
            or not _has_next(value)
        ):
            return None
        return value

    def _page_prefetched(self, query: Query, bundle: dict[str, Any]) -> Fetched:
        assert self._client is not None
        try:
            result = self._client.collect_pages(bundle)
        except FhirAccessError as exc:
            raise FhirAccessError(f"next page of prefetched data: {exc.reason}", exc.status) from exc
        return Fetched(query.key, "prefetch", result.resources, truncated=result.truncated)

    def _fetch(self, query: Query, entry: BatchEntry | None = None) -> Fetched:
        """The query asked on its own, or read from its ``entry`` of a batch answer (next pages still fetched)."""
        assert self._client is not None
        client = self._client
        if query.is_read:
            resource = client.read(query.fallback) if entry is None else client.read_entry(entry)
            return Fetched(query.key, "fhir", [resource] if resource is not None else [])
        if query.verify:
            return self._fetch_verified(query, entry)
        result = client.search(query.fallback) if entry is None else client.search_entry(entry)
        return Fetched(query.key, "fhir", result.resources, truncated=result.truncated)

    def _fetch_verified(self, query: Query, entry: BatchEntry | None) -> Fetched:
        """A search whose first page (with its self link) is read here, then its next pages as usual."""
        assert self._client is not None
        client = self._client
        if entry is None:
            first = client.read(_with_page_size(query.fallback, client.page_size))
            if first is None:  # 404/410 to a search: the server does not search this type
                raise FhirAccessError("FHIR server does not support this search", 404)
        else:
            _check_entry(entry)
            first = entry.resource
            if first is None:
                raise FhirAccessError("FHIR server answered a batch search without a Bundle", entry.status)
        result = client.collect_pages(first)
        honored = _honored(first, result.outcomes, query.verify)
        return Fetched(query.key, "fhir", result.resources, truncated=result.truncated, honored=honored)

    def _fetch_batch(self, answers: dict[Query, Future[Fetched]]) -> None:
        """Runs on the executor: one batch for the wave's queries, each answer settling its query's future. Next
        pages are read on the executor too, concurrently; a refused batch falls back to one GET per query."""
        assert self._client is not None
        client = self._client
        queries = list(answers)
        try:
            entries = client.batch([query.fallback for query in queries])
        except (DeadlineExceeded, FhirTimeout) as exc:
            failure: BaseException = exc  # no time left to ask again
        except FhirAccessError as exc:
            if exc.status in (401, 403):
                failure = exc  # the same credentials would be refused one by one
            else:
                # Refused (HTTP error, not a batch-response: not by batch again for a while), or the POST itself
                # failed (a proxy or firewall dropping POSTs to the base URL, or an outage): ask one by one now.
                if isinstance(exc, BatchRefused):
                    self._batch_refusals.remember(client.base_url)
                for query in queries:
                    _forward(self._executor.submit(self._fetch, query), answers[query])
                return
        except BaseException as exc:  # never leave a query's future unsettled
            failure = exc
        else:
            failure = None
        if failure is not None:
            for query in queries:
                _fail(answers[query], failure)
            return
        for query, entry in zip(queries, entries, strict=True):
            if not query.is_read and entry.resource is not None and _has_next(entry.resource):
                _forward(self._executor.submit(self._fetch, query, entry), answers[query])
            else:
                _settle(answers[query], lambda query=query, entry=entry: self._fetch(query, entry))

    def check_deadline(self) -> None:
        """Raise :class:`DataUnavailable` when the hook's deadline has passed (e.g. after parsing a large record)."""
        if self._clock() > self._deadline:
            raise DataUnavailable("(all)", "deadline exceeded while reading the record")

    @property
    def deadline(self) -> float:
        return self._deadline

    def fetch(self, queries: Iterable[Query]) -> dict[str, Fetched]:
        """One wave: every query answered from prefetch or fetched concurrently, within the deadline."""
        try:
            return self._wave(queries)
        finally:
            if self._client is not None:
                self.stats.fhir_requests = self._client.requests_made

    def _wave(self, queries: Iterable[Query]) -> dict[str, Fetched]:
        """Plan (prefetch or server), send (batch or GETs, each query its own future), wait (two deadlines), map
        (answers and failures to results, or one :class:`DataUnavailable` naming every missing required key)."""
        plan = self._plan(queries)
        pending = self._send(plan)
        not_done = self._wait(pending)
        return self._map(plan.answered, pending, not_done)

    def _plan(self, queries: Iterable[Query]) -> _WavePlan:
        """What the prefetch answers, which prefetched first pages have next pages to read, and what must be
        asked of the server. Without a client, what must be asked is unavailable now: required → 412."""
        plan = _WavePlan()
        answered_keys: set[str] = set()
        for query in queries:
            if query.key in answered_keys:
                continue  # another fallback query of this prefetch key; the prefetched data answers both
            first_page = self._first_page_to_follow(query)
            if first_page is not None:
                plan.to_page.append((query, first_page))
                answered_keys.add(query.key)
                continue
            from_prefetch = self._from_prefetch(query)
            if from_prefetch is not None:
                plan.answered[query.result_name] = from_prefetch
                answered_keys.add(query.key)
            else:
                plan.to_fetch.append(query)
        if plan.to_fetch or plan.to_page:
            self.stats.waves += 1
        if self._client is None:  # (and then nothing is to be paged: that needs a client too)
            for query in plan.to_fetch:
                if query.required:
                    raise DataUnavailable(query.key, self._unavailable_reason)
                plan.answered[query.result_name] = Fetched(query.key, "unavailable", note=self._unavailable_reason)
            plan.to_fetch = []
        return plan

    def _send(self, plan: _WavePlan) -> dict[Future[Fetched], Query]:
        """Start every request of the wave on the executor: next pages of prefetched Bundles, then the queries —
        as one batch Bundle when there are several and the server takes batches, else one GET each. Every query
        gets its own future either way."""
        pending: dict[Future[Fetched], Query] = {}
        for query, first_page in plan.to_page:
            self.stats.prefetch_hits += 1
            pending[self._executor.submit(self._page_prefetched, query, first_page)] = query
        if not plan.to_fetch:
            return pending
        assert self._client is not None  # _plan leaves nothing to fetch without one
        if self._batch and len(plan.to_fetch) > 1 and not self._batch_refusals.refused(self._client.base_url):
            answers: dict[Query, Future[Fetched]] = {query: Future() for query in plan.to_fetch}
            pending.update({future: query for query, future in answers.items()})
            self._executor.submit(self._fetch_batch, answers)
        else:
            pending.update({self._executor.submit(self._fetch, query): query for query in plan.to_fetch})
        return pending

    def _wait(self, pending: dict[Future[Fetched], Query]) -> set[Future[Fetched]]:
        """Wait for the answers, in two stages: every query until ``reserve`` before the deadline, then required
        ones until ``answer_time`` before it. Returns the futures given up on, cancelled."""
        if not pending:
            return set()
        soft_deadline = self._deadline - max(self._reserve, self._answer_time)
        _, not_done = wait_futures(pending, timeout=max(0.0, soft_deadline - self._clock()))
        still_required = [f for f in not_done if pending[f].required]
        if still_required:
            _, late = wait_futures(still_required, timeout=max(0.0, self._deadline - self._answer_time - self._clock()))
            not_done = {f for f in not_done if not f.done()} | set(late)
        for future in not_done:
            future.cancel()
        return set(not_done)

    def _map(self, answered: dict[str, Fetched], pending: dict[Future[Fetched], Query],
             not_done: set[Future[Fetched]]) -> dict[str, Fetched]:
        """Each query's answer or failure: an optional one becomes "unavailable" (``degraded`` unless the server
        said it does not support the search); every required one that failed is named in one
        :class:`DataUnavailable`, so an operator sees the whole gap."""
        results = dict(answered)
        missing: dict[str, str] = {}  # required key -> why
        for future, query in pending.items():
            if future in not_done:
                reason, degraded = "deadline exceeded before the FHIR server answered", True
            else:
                try:
                    results[query.result_name] = future.result()
                    continue
                except FhirAccessError as exc:
                    reason, degraded = exc.reason, exc.status not in _UNSUPPORTED
                except _SHAPE_ERRORS as exc:
                    # A server answer of a shape nobody foresaw, met in reading it: its data is unknown (412 when
                    # required), not a 5xx. Logged by kind, so the reader that tripped can be fixed.
                    log.warning("unreadable FHIR answer", extra={"event": "fhir-unreadable",
                                                                 "error_type": type(exc).__name__})
                    reason, degraded = "FHIR server answer could not be read", True
            if query.feature is not None and not degraded and self._client is not None:
                # Refused (Prefer: handling=strict, or a search the server does not do): not asked again for a while.
                self._capabilities.remember_refusal(self._client.base_url, query.feature)
            if query.required:
                missing.setdefault(query.key, reason)
            else:
                results[query.result_name] = Fetched(query.key, "unavailable", note=reason, degraded=degraded)
        for query in pending.values():
            answer = results.get(query.result_name)
            if (query.feature is not None and self._client is not None and answer is not None
                    and answer.honored is False):
                self._capabilities.remember_refusal(self._client.base_url, query.feature)  # declared, yet ignored
        if missing:
            raise DataUnavailable(", ".join(missing), next(iter(missing.values())))
        return results


@dataclass
class _WavePlan:
    """One wave, planned: results already known, prefetched first pages to follow, queries to ask the server."""

    answered: dict[str, Fetched] = field(default_factory=dict)
    to_page: list[tuple[Query, dict[str, Any]]] = field(default_factory=list)
    to_fetch: list[Query] = field(default_factory=list)


def _read_capabilities(client: FhirClient, cache: CapabilityCache) -> None:
    """Runs on the executor: ``GET [base]/metadata`` (FHIR R4 http.html#capabilities) into the cache. Any failure
    leaves the server with the two-wave plan until the cache asks again."""
    try:
        statement = client.read("metadata")
    except Exception:  # whatever went wrong, the plan without capabilities stays correct
        cache.fetch_failed(client.base_url)
        return
    cache.store(client.base_url, statement)


def _with_page_size(relative: str, page_size: int | None) -> str:
    """The search with the client's page size (``_count``) unless it names one, as ``FhirClient.search`` sends it."""
    if page_size is None or "_count=" in relative:
        return relative
    return f"{relative}&_count={page_size}" if "?" in relative else f"{relative}?_count={page_size}"


def _check_entry(entry: BatchEntry) -> None:
    """A batch entry's status, checked as ``FhirClient.search_entry`` checks it."""
    if 300 <= entry.status < 400:
        raise FhirAccessError("FHIR server answered with a redirect, which is not followed", entry.status)
    if entry.status in (401, 403):
        raise FhirAccessError("FHIR server refused the credentials", entry.status)
    if entry.status >= 400:
        raise FhirAccessError(f"FHIR server answered HTTP {entry.status}", entry.status)


def _honored(first_page: dict[str, Any], outcomes: list[dict[str, Any]],
             expected: tuple[tuple[str, str], ...]) -> bool:
    """Whether a search used every expected (parameter, value): FHIR R4 search.html §3.1.1.6 "the server SHALL
    return the parameters that were actually used to process the search" in the self link, and servers that ignore
    a parameter may say so in an OperationOutcome (``not-supported``). No self link: not shown, so not honored."""
    if first_page.get("resourceType") != "Bundle":
        return False
    for outcome in outcomes:
        for issue in _issues(outcome):
            if isinstance(issue, dict) and (issue.get("code") == "not-supported"
                                            or issue.get("severity") in ("error", "fatal")):
                return False
    selfs = [link.get("url") for link in bundle_links(first_page) if link.get("relation") == "self"]
    if not selfs or not isinstance(selfs[0], str):
        return False
    try:
        used = set(parse_qsl(urlsplit(selfs[0]).query, keep_blank_values=True))
    except ValueError:
        return False
    return all(pair in used for pair in expected)


def _has_next(bundle: dict[str, Any]) -> bool:
    return any(link.get("relation") == "next" and link.get("url") for link in bundle_links(bundle))
