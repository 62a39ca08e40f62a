"""What a FHIR server declares it can search: its CapabilityStatement, read once per server and cached (issue 13).

The fallback plan (``hooks/gather.py``) can ask in its first round trip for data that otherwise depends on the first
answers (colleagues' roles, the review's practitioners, their schedules and slots) — but only from a server that
supports the search features that takes. FHIR R4 lets a server say so in ``GET [base]/metadata``
(capabilitystatement.html): ``rest.resource[].searchInclude`` ("A list of _include values supported by the
server"), ``rest.resource[].searchRevInclude`` ("A list of _revinclude (reverse include) values supported by the
server") and ``rest.resource[].searchParam`` (the search parameters it supports for the type; ``rest.searchParam``
for all types). R4 has no flag for chained parameters nor for ``:iterate``: a chain is taken as declared when every
parameter it walks through is a declared search parameter of its type.

A declaration is not proof. FHIR R4 search.html §3.1.1.3: servers "SHOULD ignore unknown or unsupported
parameters"; with ``Prefer: handling=strict`` they return an error instead; and §3.1.1.6: "the server SHALL return
the parameters that were actually used to process the search" in the ``self`` link. ``source.py`` checks each
first-round-trip answer against its self link; a refusal or an ignored parameter is remembered here
(:meth:`CapabilityCache.remember_refusal`), and that server gets the two-wave plan again until the entry expires.

The statement is fetched on the executor, concurrently with a call's first wave, never before it: the first call to
a server is not slowed, it simply plans with no capabilities (two waves). Nothing from the statement is logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

CAPABILITY_TTL = 3600.0  # seconds a statement (or a refusal) is trusted; servers change their software rarely
FAILED_RETRY = 300.0  # a server whose statement could not be read is asked again after this long


@dataclass(frozen=True)
class ResourceSearch:
    """What a server declares for searches on one resource type."""

    params: frozenset[str] = frozenset()
    includes: frozenset[str] = frozenset()
    revincludes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ServerCapabilities:
    """The search features of one server, as its CapabilityStatement declares them."""

    resources: dict[str, ResourceSearch] = field(default_factory=dict)
    common_params: frozenset[str] = frozenset()  # rest.searchParam: parameters for every type

    @classmethod
    def from_statement(cls, statement: Any) -> ServerCapabilities | None:
        """Read a CapabilityStatement (R4) tolerantly: None when it is not one or has no server ``rest``; elements
        of the wrong shape count as not declared."""
        if not isinstance(statement, dict) or statement.get("resourceType") != "CapabilityStatement":
            return None
        rests = [r for r in _list(statement.get("rest")) if isinstance(r, dict) and r.get("mode") == "server"]
        if not rests:
            return None
        resources: dict[str, ResourceSearch] = {}
        common: set[str] = set()
        for rest in rests:
            common |= _names(rest.get("searchParam"))
            for resource in _list(rest.get("resource")):
                if not isinstance(resource, dict) or not isinstance(resource.get("type"), str):
                    continue
                before = resources.get(resource["type"], ResourceSearch())
                resources[resource["type"]] = ResourceSearch(
                    before.params | _names(resource.get("searchParam")),
                    before.includes | _strings(resource.get("searchInclude")),
                    before.revincludes | _strings(resource.get("searchRevInclude")))
        return cls(resources, frozenset(common))

    def supports_param(self, resource_type: str, name: str) -> bool:
        if name in self.common_params:
            return True
        found = self.resources.get(resource_type)
        return found is not None and name in found.params

    def supports_chain(self, *steps: tuple[str, str]) -> bool:
        """A chain such as ``Slot?schedule.actor=…`` given as its walk, ``("Slot", "schedule"), ("Schedule",
        "actor")``: every (type, parameter) declared (R4 has no chaining flag)."""
        return bool(steps) and all(self.supports_param(rtype, name) for rtype, name in steps)

    def supports_include(self, resource_type: str, value: str) -> bool:
        """``_include=value`` on searches of ``resource_type`` — or, for an ``:iterate`` include, on the type the
        value starts from (the type of the resources it is applied to)."""
        return any(value in (found.includes if found else ()) or "*" in (found.includes if found else ())
                   for found in (self.resources.get(resource_type), self.resources.get(value.split(":")[0])))

    def supports_revinclude(self, resource_type: str, value: str) -> bool:
        found = self.resources.get(resource_type)
        return found is not None and (value in found.revincludes or "*" in found.revincludes)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _strings(value: Any) -> frozenset[str]:
    return frozenset(v for v in _list(value) if isinstance(v, str))


def _names(value: Any) -> frozenset[str]:
    return frozenset(p["name"] for p in _list(value) if isinstance(p, dict) and isinstance(p.get("name"), str))


@dataclass
class _Entry:
    capabilities: ServerCapabilities | None
    until: float
    refused: dict[str, float] = field(default_factory=dict)  # feature -> until


class CapabilityCache:
    """Per process: each server's capabilities (by base URL) for ``ttl`` seconds, and the features a server refused
    or ignored. Thread-safe; at most one statement fetch per server in flight."""

    def __init__(self, ttl: float = CAPABILITY_TTL, failed_retry: float = FAILED_RETRY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.failed_retry = failed_retry
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self.fetches = 0  # statements requested (tests: read once per server)

    def lookup(self, base_url: str) -> tuple[bool, ServerCapabilities | None]:
        """(fresh, capabilities): fresh is False when the statement must be (re)fetched; an expired statement is
        still given meanwhile (a refusal learnt since is remembered apart), so a refresh costs no call a wave."""
        with self._lock:
            entry = self._entries.get(base_url)
            if entry is None:
                return False, None
            return entry.until > self._clock(), entry.capabilities

    def start_fetch(self, base_url: str) -> bool:
        """Claim the fetch of ``base_url``'s statement; False when another call is already fetching it."""
        with self._lock:
            if base_url in self._in_flight:
                return False
            self._in_flight.add(base_url)
            self.fetches += 1
            return True

    def store(self, base_url: str, statement: Any) -> None:
        """The fetched statement (None or anything unreadable: the server declares nothing we can use)."""
        capabilities = ServerCapabilities.from_statement(statement) if statement is not None else None
        with self._lock:
            self._in_flight.discard(base_url)
            previous = self._entries.get(base_url)
            refused = {f: u for f, u in (previous.refused if previous else {}).items() if u > self._clock()}
            wait = self.ttl if capabilities is not None else self.failed_retry
            self._entries[base_url] = _Entry(capabilities, self._clock() + wait, refused)

    def fetch_failed(self, base_url: str) -> None:
        """No statement (transport error, 4xx/5xx, not JSON): plan two waves, ask again after ``failed_retry``."""
        self.store(base_url, None)

    def remember_refusal(self, base_url: str, feature: str) -> None:
        """The server refused (strict handling) or ignored a search a feature relies on: not again for ``ttl``."""
        with self._lock:
            entry = self._entries.setdefault(base_url, _Entry(None, self._clock()))
            entry.refused[feature] = self._clock() + self.ttl

    def refused(self, base_url: str) -> frozenset[str]:
        with self._lock:
            entry = self._entries.get(base_url)
            if entry is None:
                return frozenset()
            now = self._clock()
            return frozenset(f for f, until in entry.refused.items() if until > now)

    def forget(self, base_urls: Iterable[str] | None = None) -> None:
        """Drop what is known (all servers by default)."""
        with self._lock:
            for base_url in list(self._entries) if base_urls is None else base_urls:
                self._entries.pop(base_url, None)


CAPABILITIES = CapabilityCache()
