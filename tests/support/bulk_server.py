"""A stand-in FHIR Bulk Data server with a SMART Backend Services token endpoint, in a process of its own, whose
faults a test chooses.

    with BulkServer(client_id="audit", jwks=public_jwks(key)) as server:
        server.configure(resources=[...], polls_before_done=2, retry_after="1", status_faults=[429, 500])
        export_to_directory(server.base_url, out, auth=SmartBackendAuth(server.base_url, "audit", key))
        server.requests()        # what the client sent, in arrival order (paths, queries, had-a-valid-token)

The server is this file run as a script (stdlib ``http.server`` + PyJWT), bound to 127.0.0.1 on a free port; the
test talks to it over HTTP under ``/_control/`` (configure, read the request log). It implements:

``GET /fhir/.well-known/smart-configuration``  ``token_endpoint`` = ``http://127.0.0.1:<port>/auth/token``
``POST /auth/token``  client_credentials with a private_key_jwt assertion, verified for real against the registered
    JWK Set (kid → key, signature, alg RS384/ES384, ``aud`` = the token URL, ``iss`` = ``sub`` = client id, ``exp``
    present and at most 5 minutes ahead, ``jti`` never seen before); answers an opaque token with ``expires_in`` =
    ``token_lifetime`` (the server then refuses it with 401 once that time is over)
``GET /fhir/$export``, ``/fhir/Patient/$export``, ``/fhir/Group/<id>/$export``  kick-off (needs
    ``Prefer: respond-async``; ``_type`` / ``_since`` / ``_until`` filter the configured resources by type and
    ``meta.lastUpdated``); 202 + ``Content-Location``
``GET /fhir/bulk-status/<job>``  ``status_faults`` first (one per poll: a status code, sent with ``Retry-After:
    fault_retry_after``), then ``polls_before_done`` answers 202 with ``X-Progress`` (and ``Retry-After:
    retry_after`` when set), then the manifest (``requiresAccessToken`` as configured, ``error`` when
    ``error_outcomes`` are configured); ``DELETE`` ends the job (later polls and downloads: 404)
``GET /fhir/bulk-files/<job>/<name>``  the NDJSON; ``break_downloads`` = {name: n} cuts the body of that file off
    half-way the first n times (full ``Content-Length`` announced, connection closed)

Other faults: ``kickoff_faults`` (status codes for the first kick-offs), ``revoke_tokens_after`` (after that many
authorised FHIR requests every token issued so far is refused with 401, as when a token expires mid-run).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

DEFAULTS: dict[str, Any] = {
    "client_id": "audit-client",
    "jwks": {"keys": []},
    "scopes": "system/*.read",
    "token_lifetime": 300,
    "require_auth": True,
    "requires_access_token": True,
    "resources": [],
    "error_outcomes": [],
    "polls_before_done": 1,
    "retry_after": "0",
    "status_faults": [],
    "fault_retry_after": "0",
    "kickoff_faults": [],
    "break_downloads": {},
    "revoke_tokens_after": None,
    "groups": ["all"],
    "kickoff_status": 202,
}
ALGS = ["RS384", "ES384"]


# ------------------------------------------------------------------------------------------------ the server side


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.config: dict[str, Any] = json.loads(json.dumps(DEFAULTS))
        self.log: list[dict[str, Any]] = []
        self.tokens: dict[str, float] = {}  # access token → expiry (epoch seconds)
        self.jti_seen: set[str] = set()
        self.token_results: list[str] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self.authorised_requests = 0
        self.kickoffs = 0
        self.port = 0


STATE = _State()


def _outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}


def _verify_assertion(assertion: str, token_url: str) -> str | None:
    """None when the client assertion is good; else why not (SMART Backend Services' checks)."""
    import jwt

    config = STATE.config
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError as exc:
        return f"malformed: {exc}"
    if header.get("alg") not in ALGS:
        return f"alg {header.get('alg')} not accepted"
    candidates = [k for k in config["jwks"].get("keys", []) if k.get("kid") == header.get("kid")]
    if not candidates:
        return "no registered key with that kid"
    try:
        key = jwt.PyJWK.from_dict(candidates[0])
        claims = jwt.decode(assertion, key.key, algorithms=ALGS, audience=token_url,
                            options={"require": ["exp", "iss", "sub", "aud", "jti"]})
    except jwt.PyJWTError as exc:
        return f"invalid: {type(exc).__name__}"
    if claims["iss"] != config["client_id"] or claims["sub"] != config["client_id"]:
        return "iss/sub is not the registered client"
    if claims["exp"] > time.time() + 300 + 5:
        return "exp more than 5 minutes ahead"
    with STATE.lock:
        if claims["jti"] in STATE.jti_seen:
            return "jti replayed"
        STATE.jti_seen.add(claims["jti"])
    return None


def _since_until_ok(resource: dict[str, Any], since: str | None, until: str | None) -> bool:
    updated = (resource.get("meta") or {}).get("lastUpdated")
    if not updated or not (since or until):
        return True
    moment = datetime.fromisoformat(updated.replace("Z", "+00:00"))
    if since and moment < datetime.fromisoformat(since.replace("Z", "+00:00")):
        return False
    return not (until and moment >= datetime.fromisoformat(until.replace("Z", "+00:00")))


class Handler(BaseHTTPRequestHandler):
    server_version = "BulkStandIn/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test reads the structured log instead

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
              content_type: str = "application/fhir+json") -> None:
        data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, **more: Any) -> dict[str, Any]:
        parts = urlsplit(self.path)
        entry = {"method": self.command, "path": parts.path, "query": parse_qsl(parts.query),
                 "accept": self.headers.get("Accept"), "prefer": self.headers.get("Prefer"),
                 "authorization": bool(self.headers.get("Authorization")), **more}
        with STATE.lock:
            STATE.log.append(entry)
        return entry

    def _authorised(self, entry: dict[str, Any]) -> bool:
        config = STATE.config
        header = self.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else None
        with STATE.lock:
            expiry = STATE.tokens.get(token or "")
            valid = expiry is not None and expiry > time.time()
            if valid:
                STATE.authorised_requests += 1
                limit = config.get("revoke_tokens_after")
                if limit is not None and STATE.authorised_requests > limit:
                    STATE.tokens.clear()  # every token issued so far now fails, as if expired
                    config["revoke_tokens_after"] = None
                    valid = False
        entry["token_valid"] = valid
        if not config["require_auth"] or valid:
            return True
        self._send(401, _outcome("login", "token missing, expired or unknown"),
                   {"WWW-Authenticate": 'Bearer realm="bulk"'})
        return False

    # -- routes -----------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/_control/requests":
            with STATE.lock:
                body = {"requests": STATE.log, "token_results": STATE.token_results,
                        "jobs": {k: {"deleted": v["deleted"]} for k, v in STATE.jobs.items()}}
            self._send(200, body, content_type="application/json")
            return
        if path in ("/fhir/.well-known/smart-configuration", "/.well-known/smart-configuration"):
            self._record()
            self._send(200, {
                "token_endpoint": f"http://127.0.0.1:{STATE.port}/auth/token",
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": ALGS,
                "grant_types_supported": ["client_credentials"],
                "capabilities": ["client-confidential-asymmetric", "permission-v1"],
            }, content_type="application/json")
            return
        entry = self._record()
        if path.endswith("/$export"):
            self._kickoff(path, entry)
        elif path.startswith("/fhir/bulk-status/"):
            self._status(path.rsplit("/", 1)[-1], entry)
        elif path.startswith("/fhir/bulk-files/"):
            self._file(path, entry)
        else:
            self._send(404, _outcome("not-found", "no such route"))

    def do_DELETE(self) -> None:
        path = urlsplit(self.path).path
        entry = self._record()
        if not path.startswith("/fhir/bulk-status/") or not self._authorised(entry):
            if not path.startswith("/fhir/bulk-status/"):
                self._send(404, _outcome("not-found", "no such route"))
            return
        with STATE.lock:
            job = STATE.jobs.get(path.rsplit("/", 1)[-1])
            if job is not None:
                job["deleted"] = True
        self._send(202 if job else 404, _outcome("informational", "deleted") if job else _outcome("not-found", "?"))

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path == "/_control/config":
            update = json.loads(raw or b"{}")
            with STATE.lock:
                if update.pop("_reset", False):
                    STATE.config = json.loads(json.dumps(DEFAULTS))
                    STATE.log.clear()
                    STATE.token_results.clear()
                    STATE.jobs.clear()
                    STATE.tokens.clear()
                    STATE.authorised_requests = 0
                    STATE.kickoffs = 0
                if update.pop("_expire_tokens", False):
                    STATE.tokens.clear()
                STATE.config.update(update)
            self._send(200, {"ok": True}, content_type="application/json")
            return
        if path == "/auth/token":
            self._token(dict(parse_qsl(raw.decode())))
            return
        self._record()
        self._send(405, _outcome("not-supported", "POST is not used here"))

    def _token(self, form: dict[str, str]) -> None:
        token_url = f"http://127.0.0.1:{STATE.port}/auth/token"
        problem = None
        if form.get("grant_type") != "client_credentials":
            problem = "unsupported_grant_type"
        elif form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            problem = "invalid_request"
        else:
            reason = _verify_assertion(form.get("client_assertion", ""), token_url)
            if reason:
                with STATE.lock:
                    STATE.token_results.append(f"refused: {reason}")
                self._send(401, {"error": "invalid_client", "error_description": reason},
                           content_type="application/json")
                return
        if problem:
            with STATE.lock:
                STATE.token_results.append(f"refused: {problem}")
            self._send(400, {"error": problem}, content_type="application/json")
            return
        token = secrets.token_hex(16)
        lifetime = int(STATE.config["token_lifetime"])
        with STATE.lock:
            STATE.tokens[token] = time.time() + lifetime
            STATE.token_results.append(f"issued scope={form.get('scope')}")
        self._send(200, {"access_token": token, "token_type": "bearer", "expires_in": lifetime,
                         "scope": form.get("scope") or STATE.config["scopes"]}, content_type="application/json")

    def _kickoff(self, path: str, entry: dict[str, Any]) -> None:
        if not self._authorised(entry):
            return
        config = STATE.config
        with STATE.lock:
            STATE.kickoffs += 1
            fault = config["kickoff_faults"][STATE.kickoffs - 1] if STATE.kickoffs <= len(
                config["kickoff_faults"]) else None
        if fault:
            self._send(int(fault), _outcome("transient" if fault >= 500 else "throttled", "try later"),
                       {"Retry-After": "0"})
            return
        if "respond-async" not in (self.headers.get("Prefer") or ""):
            self._send(400, _outcome("invalid", "Prefer: respond-async is required"))
            return
        if path.startswith("/fhir/Group/") and path.split("/")[3] not in config["groups"]:
            self._send(404, _outcome("not-found", "no such group"))
            return
        if int(config["kickoff_status"]) != 202:
            self._send(int(config["kickoff_status"]), _outcome("not-supported", "refused"))
            return
        params: dict[str, str] = dict(entry["query"])
        types = [t for t in params.get("_type", "").split(",") if t]
        by_type: dict[str, list[dict[str, Any]]] = {}
        for resource in config["resources"]:
            if types and resource["resourceType"] not in types:
                continue
            if not _since_until_ok(resource, params.get("_since"), params.get("_until")):
                continue
            by_type.setdefault(resource["resourceType"], []).append(resource)
        job_id = secrets.token_hex(6)
        files = {f"{t}.ndjson": "".join(json.dumps(r) + "\n" for r in rs).encode() for t, rs in sorted(by_type.items())}
        if config["error_outcomes"]:
            files["errors.ndjson"] = "".join(json.dumps(o) + "\n" for o in config["error_outcomes"]).encode()
        with STATE.lock:
            STATE.jobs[job_id] = {"files": files, "polls": 0, "faults": list(config["status_faults"]),
                                  "deleted": False, "types": sorted(by_type),
                                  "counts": {t: len(rs) for t, rs in by_type.items()}}
        self._send(202, _outcome("informational", "accepted"),
                   {"Content-Location": f"http://127.0.0.1:{STATE.port}/fhir/bulk-status/{job_id}"})

    def _status(self, job_id: str, entry: dict[str, Any]) -> None:
        if not self._authorised(entry):
            return
        config = STATE.config
        with STATE.lock:
            job = STATE.jobs.get(job_id)
            if job is None or job["deleted"]:
                job = None
            elif job["faults"]:
                fault = int(job["faults"].pop(0))
                self._send(fault, _outcome("transient" if fault >= 500 else "throttled", "busy"),
                           {"Retry-After": str(config["fault_retry_after"])})
                return
            else:
                job["polls"] += 1
        if job is None:
            self._send(404, _outcome("not-found", "no such export"))
            return
        if job["polls"] <= int(config["polls_before_done"]):
            headers = {"X-Progress": f"step {job['polls']}"}
            if config["retry_after"] is not None:
                headers["Retry-After"] = str(config["retry_after"])
            self._send(202, None, headers)
            return
        base = f"http://127.0.0.1:{STATE.port}/fhir/bulk-files/{job_id}"
        manifest = {
            "transactionTime": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request": f"http://127.0.0.1:{STATE.port}/fhir/$export",
            "requiresAccessToken": bool(config["requires_access_token"]),
            "output": [{"type": t, "url": f"{base}/{t}.ndjson", "count": job["counts"][t]} for t in job["types"]],
            "error": ([{"type": "OperationOutcome", "url": f"{base}/errors.ndjson"}]
                      if "errors.ndjson" in job["files"] else []),
        }
        self._send(200, manifest, content_type="application/json")

    def _file(self, path: str, entry: dict[str, Any]) -> None:
        if STATE.config["requires_access_token"] and not self._authorised(entry):
            return
        _, _, _, job_id, name = path.split("/", 4)
        with STATE.lock:
            job = STATE.jobs.get(job_id)
            data = None if job is None or job["deleted"] else job["files"].get(name)
            breaks = STATE.config["break_downloads"]
            cut = data is not None and breaks.get(name, 0) > 0
            if cut:
                breaks[name] -= 1
        entry["cut"] = cut
        if data is None:
            self._send(404, _outcome("not-found", "no such file"))
            return
        if not cut:
            self._send(200, data, content_type="application/fhir+ndjson")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+ndjson")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


def serve() -> None:
    """Run the stand-in on 127.0.0.1 (free port); print ``PORT <n>`` and serve until stdin closes."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    STATE.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(f"PORT {STATE.port}", flush=True)
    sys.stdin.read()  # the test process holds the other end; it closing (or dying) ends this server
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------------------------------------------ the test side


class BulkServer:
    """The stand-in, started in a child process; ``configure`` and ``requests`` talk to it over loopback HTTP."""

    def __init__(self, **config: Any) -> None:
        self._config = config
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/fhir"

    def start(self) -> BulkServer:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=Path(__file__).resolve().parent,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"bulk stand-in did not start: {line!r}")
        self.port = int(line.split()[1])
        if self._config:
            self.configure(**self._config)
        return self

    def configure(self, **config: Any) -> None:
        import requests

        requests.post(f"{self.origin}/_control/config", json=config, timeout=5).raise_for_status()

    def reset(self, **config: Any) -> None:
        self.configure(_reset=True, **{**self._config, **config})

    def expire_tokens(self) -> None:
        self.configure(_expire_tokens=True)

    def state(self) -> dict[str, Any]:
        import requests

        response = requests.get(f"{self.origin}/_control/requests", timeout=5)
        response.raise_for_status()
        return dict(response.json())

    def requests(self) -> list[dict[str, Any]]:
        return list(self.state()["requests"])

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            if self.process.stdin:
                self.process.stdin.close()
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        finally:
            if self.process.stdout:
                self.process.stdout.close()
            self.process = None

    def __enter__(self) -> BulkServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


if __name__ == "__main__":
    serve()
