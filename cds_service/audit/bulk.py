"""FHIR Bulk Data ``$export`` into a directory of NDJSON files: the population audit's ``--bulk-export`` source.

The flow is the Bulk Data Access IG's (v2.0.0, https://hl7.org/fhir/uv/bulkdata/export.html), in separate steps
(kick-off → poll → download), each with the spec text it follows:

- **kick-off** ``GET [base]/$export`` (system), ``[base]/Group/[id]/$export`` or ``[base]/Patient/$export`` with
  ``Accept: application/fhir+json`` and ``Prefer: respond-async`` ("SHALL be set"); ``_outputFormat`` =
  ``application/fhir+ndjson``; ``_type`` = the resource types the rules read (``keys.AUDIT_TYPES``: "the server
  SHALL NOT return resources of other types" — a smaller export); ``_since`` / ``_until`` (``_until`` is new in
  v2; a server that does not know it ignores it, or refuses it under ``handling=strict``, which we never send) as
  FHIR instants in UTC with ``Z``. The answer is ``202 Accepted`` with ``Content-Location`` = the status URL.
- **status** ``GET`` the status URL: ``202`` with ``X-Progress`` while running — the client waits ``Retry-After``
  (seconds or an HTTP date) and otherwise "SHOULD follow an exponential backoff approach"; ``429 Too Many Requests``
  and transient ``5xx`` are waited out the same way, with a ceiling per wait and ``poll_max_seconds`` in all;
  ``200`` with the manifest (``transactionTime``, ``requiresAccessToken``, ``output``, ``error``); any other ``4xx``
  / ``5xx`` means the export failed (its OperationOutcome issue codes are reported).
- **download** each ``output`` file, streamed to disk in chunks (never held in memory), with the access token only
  when ``requiresAccessToken`` is true ("Value SHALL be true if both the file server and the FHIR API server control
  access using OAuth 2.0 bearer tokens"; when false the file server uses another scheme, e.g. signed S3 URLs, and
  the token must not travel there). The ``error`` files (NDJSON OperationOutcomes) are downloaded and summarised as
  messages that carry severity, issue code and detail codes — never ``diagnostics`` text, which may quote data.
- **delete** ``DELETE`` the status URL once the files are on disk ("the client MAY send a DELETE request ... to
  signal that the files are no longer needed"), and when the run is interrupted (``KeyboardInterrupt``) or fails,
  so the server can stop the job and free the files (``keep_on_failure=True`` keeps it for a rerun to resume).

**Resuming.** ``out_dir/.bulk-export.json`` records the request, the status URL as soon as it is known and, when
complete, the manifest and each finished file's size and SHA-256. A rerun of the same request into the same
directory resumes polling at the saved status URL (no second kick-off), or — with a saved manifest — keeps every
file whose size and hash still match and downloads the rest again (``*.part`` files are partial by definition).
A different request (level, group, types, window, base) starts afresh. If the server no longer has the saved job
or a file (404 / 410), the export starts again once from the kick-off.

Failures raise :class:`BulkExportError` with a one-line message (the command maps it to exit status 3); no access
token, no resource content and no ``diagnostics`` text appear in any message or log record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import requests

from cds_service.audit import keys
from cds_service.audit.smart import SmartAuthError, SmartBackendAuth

log = logging.getLogger(__name__)

Level = Literal["system", "group", "patient"]
STATE_FILE = ".bulk-export.json"
ERRORS_DIR = "errors"
NDJSON = "application/fhir+ndjson"
CHUNK = 1 << 20
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
# IssueType codes under "transient" (http://hl7.org/fhir/issue-type): the IG's "a server SHOULD use a transient
# code ... [when] the polling failure does not indicate failure of the export job"; the client retries those.
TRANSIENT_ISSUES = frozenset({"transient", "lock-error", "no-store", "exception", "timeout", "incomplete",
                              "throttled"})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_SAFE_TYPE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
_OUR_FILE = re.compile(r"^[A-Z][A-Za-z]{0,63}\.\d{3}\.ndjson(\.part)?$")


class BulkExportError(Exception):
    """The export failed; ``str(error)`` is one line meant for the operator (no token, no PHI)."""


@dataclass
class ExportResult:
    """What an export left in ``out_dir``."""

    out_dir: Path
    files: list[Path]                       # the NDJSON data files, in manifest order
    counts: dict[str, int]                  # resources (non-empty lines) per resource type
    errors: list[str]                       # one message per distinct (file, severity, code, details) in error files
    error_files: list[Path] = field(default_factory=list)
    transaction_time: str | None = None
    requires_access_token: bool = False
    reused_files: int = 0                   # files kept from an earlier run (size and SHA-256 matched)
    downloaded_bytes: int = 0
    resumed: bool = False                   # this run continued a job an earlier run kicked off
    timings: dict[str, float] = field(default_factory=dict)  # seconds: kickoff, wait, download, total


def utc_instant(moment: datetime) -> str:
    """A FHIR ``instant`` in UTC with ``Z`` (the IG's ``_since`` / ``_until`` are instants); naive means UTC."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date; None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def summarize_outcomes(lines: Iterable[bytes | str], file_name: str) -> list[str]:
    """Messages for the OperationOutcomes of an error file: ``"<file>: <n> × <severity> <code> [<detail codes>]"``,
    grouped; ``diagnostics`` and ``details.text`` are left out on purpose (free text may quote patient data)."""
    grouped: dict[tuple[str, str, str], int] = {}
    unreadable = 0
    for raw in lines:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            outcome = json.loads(text)
        except ValueError:
            unreadable += 1
            continue
        issues = outcome.get("issue") if isinstance(outcome, dict) else None
        if not isinstance(issues, list) or not issues:
            unreadable += 1
            continue
        for issue in issues:
            if not isinstance(issue, dict):
                continue
            codes = []
            details = issue.get("details")
            for coding in (details.get("coding") or []) if isinstance(details, dict) else []:
                if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                    codes.append(_token(coding["code"]))
            key = (_token(issue.get("severity")), _token(issue.get("code")), ",".join(codes))
            grouped[key] = grouped.get(key, 0) + 1
    messages = [f"{file_name}: {n} × {sev} {code}" + (f" [{det}]" if det else "")
                for (sev, code, det), n in sorted(grouped.items())]
    if unreadable:
        messages.append(f"{file_name}: {unreadable} line(s) not an OperationOutcome")
    return messages


def _token(value: Any) -> str:
    """A code as it may appear in a message: FHIR code characters only, bounded."""
    return re.sub(r"[^A-Za-z0-9._:\-]", "?", value)[:64] if isinstance(value, str) and value else "?"


def _issue_codes(response: requests.Response) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return []
    issues = body.get("issue") if isinstance(body, dict) else None
    return [_token(i.get("code")) for i in issues if isinstance(i, dict)] if isinstance(issues, list) else []


def _describe(response: requests.Response) -> str:
    codes = _issue_codes(response)
    return f"HTTP {response.status_code}" + (f" ({', '.join(codes)})" if codes else "")


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Gone(Exception):
    """The saved job or one of its files is no longer on the server: start again from the kick-off."""


class _Exporter:
    def __init__(self, base_url: str, out_dir: Path, request: dict[str, Any], *, auth: SmartBackendAuth | None,
                 headers: Mapping[str, str], poll_max_seconds: float, max_wait: float, initial_wait: float,
                 timeout: float, download_retries: int, keep_on_failure: bool,
                 on_progress: Callable[[str], None] | None, sleep: Callable[[float], None]) -> None:
        self.base = base_url.rstrip("/")
        self.out_dir = out_dir
        self.request = request
        self.auth = auth
        self.extra_headers = dict(headers)
        self.poll_max = poll_max_seconds
        self.max_wait = max_wait
        self.initial_wait = initial_wait
        self.timeout = timeout
        self.download_retries = download_retries
        self.keep_on_failure = keep_on_failure
        self.on_progress = on_progress
        self.sleep = sleep
        self.session = requests.Session()
        if urlsplit(self.base).hostname in _LOOPBACK:
            self.session.trust_env = False  # a proxy from the environment must never see loopback traffic
        self.state_path = out_dir / STATE_FILE
        self.state: dict[str, Any] = {}
        self.timings: dict[str, float] = {"kickoff": 0.0, "wait": 0.0, "download": 0.0}
        self.resumed = False

    # -- HTTP -------------------------------------------------------------------------------------------------

    def _send(self, method: str, url: str, *, with_token: bool = True, **kwargs: Any) -> requests.Response:
        headers = {**self.extra_headers, **(kwargs.pop("headers", None) or {})}
        kwargs.setdefault("timeout", self.timeout)
        try:
            if self.auth is not None and with_token:
                return self.auth.send(self.session, method, url, headers=headers, **kwargs)
            return self.session.request(method, url, headers=headers, **kwargs)
        except SmartAuthError as exc:
            raise BulkExportError(f"SMART Backend Services: {exc}") from None
        except requests.RequestException as exc:
            raise _Transport(f"{method} {self._where(url)}: {type(exc).__name__}") from None

    def _where(self, url: str) -> str:
        """A URL for messages: scheme, host and path (a query string could carry a signed-URL credential)."""
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    def _wait(self, seconds: float, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BulkExportError(f"gave up after {self.poll_max:g} s waiting for {what} (poll_max_seconds)")
        self.sleep(max(0.0, min(seconds, self.max_wait, remaining)))

    # -- state ------------------------------------------------------------------------------------------------

    def _load_state(self) -> None:
        try:
            saved = json.loads(self.state_path.read_text("utf-8"))
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and saved.get("request") == self.request:
            self.state = saved
        else:
            self.state = {"request": self.request}

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True), "utf-8")
        os.replace(tmp, self.state_path)

    # -- steps ------------------------------------------------------------------------------------------------

    def kickoff(self) -> str:
        started = time.monotonic()
        level, group = self.request["level"], self.request["group"]
        path = {"system": "$export", "patient": "Patient/$export"}.get(level) or f"Group/{group}/$export"
        params: list[tuple[str, str]] = [("_outputFormat", NDJSON)]
        if self.request["types"]:
            params.append(("_type", ",".join(self.request["types"])))
        for name in ("_since", "_until"):
            if self.request.get(name):
                params.append((name, self.request[name]))
        if self.request["type_filters"]:
            params.extend(("_typeFilter", f) for f in self.request["type_filters"])
        params.extend((k, v) for k, v in self.request["extra_params"])
        url = f"{self.base}/{path}"
        deadline = time.monotonic() + self.poll_max
        delay = self.initial_wait
        while True:
            try:
                response = self._send("GET", url, params=params, headers={
                    "Accept": "application/fhir+json", "Prefer": "respond-async"})
            except _Transport as exc:
                log.warning("bulk kick-off transport error; retrying", extra={"event": "bulk-retry",
                                                                             "reason": str(exc)})
                self._wait(delay, deadline, "the kick-off")
                delay = min(delay * 2, self.max_wait)
                continue
            if response.status_code == 202:
                location = response.headers.get("Content-Location")
                response.close()
                if not location:
                    raise BulkExportError(f"kick-off at {self._where(url)} answered 202 without Content-Location")
                self.timings["kickoff"] += time.monotonic() - started
                return urljoin(url, location)
            if response.status_code in RETRYABLE:
                wait = retry_after_seconds(response.headers.get("Retry-After"))
                response.close()
                self._wait(wait if wait is not None else delay, deadline, "the kick-off")
                delay = min(delay * 2, self.max_wait)
                continue
            message = f"kick-off refused at {self._where(url)}: {_describe(response)}"
            response.close()
            raise BulkExportError(message)

    def poll(self, status_url: str) -> dict[str, Any]:
        started = time.monotonic()
        deadline = started + self.poll_max
        delay = self.initial_wait
        failures = 0
        try:
            while True:
                try:
                    response = self._send("GET", status_url, headers={"Accept": "application/json"})
                except _Transport as exc:
                    failures += 1
                    if failures > 8:
                        raise BulkExportError(f"status request failed repeatedly: {exc}") from None
                    self._wait(delay, deadline, "the export")
                    delay = min(delay * 2, self.max_wait)
                    continue
                status = response.status_code
                if status == 200:
                    try:
                        manifest = response.json()
                    except ValueError:
                        raise BulkExportError("the export's manifest is not JSON") from None
                    finally:
                        response.close()
                    return manifest
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                if status == 202:
                    progress = " ".join((response.headers.get("X-Progress") or "").split())[:100]
                    response.close()
                    failures = 0
                    if progress:
                        log.info("bulk export in progress", extra={"event": "bulk-progress", "reason": progress})
                        if self.on_progress is not None:
                            self.on_progress(progress)
                    self._wait(retry_after if retry_after is not None else delay, deadline, "the export")
                    if retry_after is None:
                        delay = min(delay * 2, self.max_wait)
                    continue
                codes = _issue_codes(response)
                described = _describe(response)
                response.close()
                if status in (404, 410):
                    raise _Gone(f"status URL answered {described}")
                transient = status in (429, 503) or (status >= 500 and (
                    not codes or any(c in TRANSIENT_ISSUES for c in codes)))
                if transient:
                    failures += 1
                    if failures > 8:
                        raise BulkExportError(f"the export's status request kept failing: {described}")
                    log.warning("bulk status request failed; backing off",
                                extra={"event": "bulk-retry", "status": status})
                    self._wait(retry_after if retry_after is not None else delay, deadline, "the export")
                    delay = min(delay * 2, self.max_wait)
                    continue
                raise BulkExportError(f"the export failed: {described}")
        finally:
            self.timings["wait"] += time.monotonic() - started

    def download(self, url: str, target: Path, *, with_token: bool, expected: Mapping[str, Any] | None) -> dict:
        """Stream ``url`` to ``target`` (via ``target.part``); the file's size, SHA-256 and line count."""
        if expected and target.is_file() and target.stat().st_size == expected.get("size") and \
                _sha256(target) == expected.get("sha256"):
            return {**expected, "reused": True}
        # the token goes where the manifest says it is needed, and only to the FHIR server's origin or over TLS
        send_token = with_token and (_origin(url) == _origin(self.base) or urlsplit(url).scheme == "https")
        partial = target.with_name(target.name + ".part")
        delay = self.initial_wait
        for attempt in range(1, self.download_retries + 2):
            last = attempt > self.download_retries
            try:
                response = self._send("GET", url, with_token=send_token, stream=True,
                                      headers={"Accept": NDJSON})
            except _Transport as exc:
                if last:
                    raise BulkExportError(f"download failed: {exc}") from None
                self.sleep(min(delay, self.max_wait))
                delay *= 2
                continue
            with response:
                if response.status_code in (404, 410):
                    raise _Gone(f"{self._where(url)} answered HTTP {response.status_code}")
                if response.status_code != 200:
                    if response.status_code in RETRYABLE and not last:
                        wait = retry_after_seconds(response.headers.get("Retry-After"))
                        self.sleep(min(wait if wait is not None else delay, self.max_wait))
                        delay *= 2
                        continue
                    raise BulkExportError(f"download of {self._where(url)} failed: {_describe(response)}")
                digest, size, lines, last_byte = hashlib.sha256(), 0, 0, b"\n"
                try:
                    with partial.open("wb") as handle:
                        for chunk in response.iter_content(CHUNK):
                            if not chunk:
                                continue
                            handle.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                            lines += chunk.count(b"\n")
                            last_byte = chunk[-1:]
                except (requests.RequestException, OSError) as exc:
                    # urllib3 2 enforces Content-Length: a body cut short raises here instead of passing as whole
                    log.warning("bulk download broke off; retrying",
                                extra={"event": "bulk-retry", "error_type": type(exc).__name__})
                    if last:
                        raise BulkExportError(
                            f"download of {self._where(url)} broke off after {size} bytes "
                            f"({type(exc).__name__})") from None
                    self.sleep(min(delay, self.max_wait))
                    delay *= 2
                    continue
            if last_byte != b"\n":
                lines += 1
            os.replace(partial, target)
            return {"size": size, "sha256": digest.hexdigest(), "lines": lines, "reused": False}
        raise BulkExportError(f"download of {self._where(url)} failed")  # pragma: no cover - loop always returns

    def delete(self, status_url: str | None) -> None:
        if not status_url:
            return
        try:
            response = self._send("DELETE", status_url)
            response.close()
            if response.status_code < 300:
                log.info("bulk export released", extra={"event": "bulk-delete", "status": response.status_code})
            else:  # e.g. SEKMET refuses DELETE to a system/*.read token (403): the job expires server-side
                log.warning("bulk export DELETE refused", extra={"event": "bulk-delete",
                                                                 "status": response.status_code})
        except (BulkExportError, _Transport) as exc:
            log.warning("bulk export DELETE failed", extra={"event": "bulk-delete", "reason": str(exc)})

    # -- the whole run ----------------------------------------------------------------------------------------

    def run(self) -> ExportResult:
        started = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._load_state()
        try:
            try:
                result = self._run_once()
            except _Gone as gone:
                log.warning("saved bulk export is gone; starting again", extra={"event": "bulk-restart",
                                                                                "reason": str(gone)})
                self.state = {"request": self.request}
                self._save_state()
                self.resumed = False
                try:
                    result = self._run_once()
                except _Gone as again:
                    raise BulkExportError(f"the export disappeared from the server: {again}") from None
        except KeyboardInterrupt:
            self._release()
            raise
        except BulkExportError:
            if not self.keep_on_failure:
                self._release()
            raise
        except _Transport as exc:
            if not self.keep_on_failure:
                self._release()
            raise BulkExportError(str(exc)) from None
        finally:
            self.session.close()
        result.timings = {**self.timings, "total": time.monotonic() - started}
        return result

    def _release(self) -> None:
        status_url = self.state.get("status_url")
        if status_url:
            self.delete(status_url)
            self.state.pop("status_url", None)
            self.state.pop("manifest", None)  # its files are gone from the server with the job
            self._save_state()

    def _run_once(self) -> ExportResult:
        manifest = self.state.get("manifest")
        status_url = self.state.get("status_url")
        if manifest is None:
            if status_url:
                self.resumed = True
                log.info("resuming a saved bulk export", extra={"event": "bulk-resume"})
            else:
                status_url = self.kickoff()
                self.state["status_url"] = status_url
                self.state["files"] = {}
                self._save_state()
            manifest = self.poll(status_url)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
                raise BulkExportError("the export's manifest has no output list")
            self.state["manifest"] = manifest
            self._save_state()
        else:
            self.resumed = True
        result = self._download_all(manifest)
        if status_url:
            self.delete(status_url)
            self.state.pop("status_url", None)
        self.state["complete"] = True
        self._save_state()
        return result

    def _download_all(self, manifest: Mapping[str, Any]) -> ExportResult:
        started = time.monotonic()
        with_token = manifest.get("requiresAccessToken") is True
        files_state: dict[str, Any] = self.state.setdefault("files", {})
        result = ExportResult(out_dir=self.out_dir, files=[], counts={}, errors=[],
                              transaction_time=manifest.get("transactionTime") if isinstance(
                                  manifest.get("transactionTime"), str) else None,
                              requires_access_token=with_token, resumed=self.resumed)
        per_type: dict[str, int] = {}
        wanted: set[str] = set()
        try:
            for entry in manifest["output"]:
                if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                    raise BulkExportError("the export's manifest has an output entry without a url")
                rtype = entry.get("type") if isinstance(entry.get("type"), str) else ""
                stem = rtype if _SAFE_TYPE.match(rtype) else "Unknown"
                per_type[stem] = per_type.get(stem, 0) + 1
                name = f"{stem}.{per_type[stem]:03d}.ndjson"
                wanted.add(name)
                info = self.download(urljoin(self.base + "/", entry["url"]), self.out_dir / name,
                                     with_token=with_token, expected=files_state.get(name))
                files_state[name] = {k: info[k] for k in ("size", "sha256", "lines")}
                self._save_state()
                result.files.append(self.out_dir / name)
                result.counts[stem] = result.counts.get(stem, 0) + info["lines"]
                if info.get("reused"):
                    result.reused_files += 1
                else:
                    result.downloaded_bytes += info["size"]
            errors = manifest.get("error") if isinstance(manifest.get("error"), list) else []
            if errors:
                (self.out_dir / ERRORS_DIR).mkdir(exist_ok=True)
            for index, entry in enumerate(errors, 1):
                if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                    continue
                name = f"{ERRORS_DIR}/error.{index:03d}.ndjson"
                target = self.out_dir / name
                info = self.download(urljoin(self.base + "/", entry["url"]), target, with_token=with_token,
                                     expected=files_state.get(name))
                files_state[name] = {k: info[k] for k in ("size", "sha256", "lines")}
                self._save_state()
                result.error_files.append(target)
                with target.open("rb") as handle:
                    result.errors.extend(summarize_outcomes(handle, target.name))
        finally:
            self.timings["download"] += time.monotonic() - started
        for stale in self.out_dir.iterdir():  # data files of an earlier, different export (our names only)
            if _OUR_FILE.match(stale.name) and stale.name not in wanted:
                stale.unlink()
        for message in result.errors:
            log.warning("bulk export error file", extra={"event": "bulk-error-file", "reason": message})
        return result


class _Transport(Exception):
    """A connection-level failure (refused, reset, timed out); retried where that is safe."""


def export_to_directory(
    base_url: str,
    out_dir: Path,
    *,
    level: Level = "system",
    group_id: str | None = None,
    types: Sequence[str] | None = tuple(sorted(keys.AUDIT_TYPES)),
    since: datetime | None = None,
    until: datetime | None = None,
    send_until: bool = True,
    type_filters: Sequence[str] = (),
    extra_params: Mapping[str, str] | None = None,
    auth: SmartBackendAuth | None = None,
    headers: Mapping[str, str] | None = None,
    poll_max_seconds: float = 3600.0,
    max_wait_seconds: float = 120.0,
    initial_wait_seconds: float = 1.0,
    timeout_seconds: float = 60.0,
    download_retries: int = 3,
    keep_on_failure: bool = False,
    on_progress: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ExportResult:
    """Run a Bulk Data ``$export`` and leave its NDJSON files in ``out_dir`` (see the module docstring).

    ``types`` limits ``_type`` (default: what the rules read, ``keys.AUDIT_TYPES``; None asks for every type);
    ``since`` / ``until`` become ``_since`` / ``_until`` (``send_until=False`` for a server that refuses
    ``_until``); ``type_filters`` become ``_typeFilter``; ``extra_params`` are passed through as they are.
    ``auth`` adds SMART Backend Services tokens; ``headers`` are sent with every request (e.g. a static
    ``Authorization`` for a test server). ``poll_max_seconds`` bounds the kick-off retries and the waiting for the
    export; ``max_wait_seconds`` caps any one wait (``Retry-After`` included). Raises :class:`BulkExportError`.
    """
    if level not in ("system", "group", "patient"):
        raise BulkExportError(f"unknown export level {level!r} (system, group or patient)")
    if level == "group" and not group_id:
        raise BulkExportError("a group-level export needs a group id")
    if level != "group" and group_id:
        raise BulkExportError("a group id is only used with level='group'")
    if not base_url.startswith(("http://", "https://")):
        raise BulkExportError("the FHIR base URL must be http:// or https://")
    if since is not None and until is not None and since >= until:
        raise BulkExportError("since must be before until")
    request: dict[str, Any] = {
        "base": base_url.rstrip("/"), "level": level, "group": group_id,
        "types": sorted(set(types)) if types else [],
        "_since": utc_instant(since) if since is not None else None,
        "_until": utc_instant(until) if until is not None and send_until else None,
        "type_filters": list(type_filters), "extra_params": sorted((extra_params or {}).items()),
    }
    request["extra_params"] = [list(p) for p in request["extra_params"]]  # JSON round-trip stable
    exporter = _Exporter(
        base_url, Path(out_dir), request, auth=auth, headers=headers or {}, poll_max_seconds=poll_max_seconds,
        max_wait=max_wait_seconds, initial_wait=initial_wait_seconds, timeout=timeout_seconds,
        download_retries=download_retries, keep_on_failure=keep_on_failure, on_progress=on_progress, sleep=sleep,
    )
    return exporter.run()
