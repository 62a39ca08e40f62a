"""The Bulk Data ``$export`` client (``cds_service.audit.bulk``) and SMART Backend Services
(``cds_service.audit.smart``) against a stand-in server in its own process (``tests/support/bulk_server.py``) that
verifies client assertions for real and injects the faults a real server shows."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cds_service.audit import keys
from cds_service.audit.bulk import (
    STATE_FILE,
    BulkExportError,
    export_to_directory,
    retry_after_seconds,
    summarize_outcomes,
    utc_instant,
)
from cds_service.audit.smart import (
    ASSERTION_TYPE,
    SmartAuthError,
    SmartBackendAuth,
    jwk_thumbprint,
    public_jwk,
    public_jwks,
)
from tests.support.bulk_server import BulkServer

CLIENT = "g2250-audit-test"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP384R1())
JWKS = {"keys": public_jwks(RSA_KEY)["keys"] + public_jwks(EC_KEY)["keys"]}


def _resources() -> list[dict[str, Any]]:
    """Synthetic: three patients, their encounters and messages, and a type the rules never read."""
    out: list[dict[str, Any]] = []
    for n in range(3):
        updated = f"2024-0{n + 1}-15T12:00:00Z"
        out.append({"resourceType": "Patient", "id": f"p{n}", "meta": {"lastUpdated": updated}})
        out.append({"resourceType": "Encounter", "id": f"e{n}", "status": "finished",
                    "class": {"code": "VR"}, "subject": {"reference": f"Patient/p{n}"},
                    "meta": {"lastUpdated": updated}})
        out.append({"resourceType": "Communication", "id": f"c{n}", "status": "completed",
                    "subject": {"reference": f"Patient/p{n}"}, "meta": {"lastUpdated": updated}})
        out.append({"resourceType": "Immunization", "id": f"i{n}", "status": "completed",
                    "patient": {"reference": f"Patient/p{n}"}, "meta": {"lastUpdated": updated}})
    return out


BASE_CONFIG = {"client_id": CLIENT, "jwks": JWKS, "resources": _resources(), "polls_before_done": 1,
               "retry_after": "0"}


@pytest.fixture(scope="module")
def stand_in() -> Iterator[BulkServer]:
    with BulkServer(**BASE_CONFIG) as server:
        yield server


@pytest.fixture
def server(stand_in: BulkServer) -> BulkServer:
    stand_in.reset()
    return stand_in


def _auth(server: BulkServer, key: Any = RSA_KEY, **more: Any) -> SmartBackendAuth:
    return SmartBackendAuth(server.base_url, CLIENT, key, **more)


class Sleeps:
    """An injected ``sleep`` that records the waits (and waits for real only as long as asked to)."""

    def __init__(self, real: bool = False) -> None:
        self.waits: list[float] = []
        self.real = real

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.real:
            time.sleep(seconds)


def _fhir(server: BulkServer, method: str | None = None) -> list[dict[str, Any]]:
    return [r for r in server.requests() if r["path"].startswith("/fhir/") and ".well-known" not in r["path"]
            and (method is None or r["method"] == method)]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]


# ------------------------------------------------------------------------------------------------ happy paths


def test_system_export_with_rs384_writes_the_audit_types_and_releases_the_job(server: BulkServer,
                                                                               tmp_path: Path) -> None:
    auth = _auth(server)
    result = export_to_directory(server.base_url, tmp_path, auth=auth, sleep=Sleeps())

    assert sorted(p.name for p in result.files) == ["Communication.001.ndjson", "Encounter.001.ndjson",
                                                    "Patient.001.ndjson"]
    assert result.counts == {"Communication": 3, "Encounter": 3, "Patient": 3}
    assert {r["id"] for r in _lines(tmp_path / "Patient.001.ndjson")} == {"p0", "p1", "p2"}
    assert result.errors == [] and result.requires_access_token is True
    assert set(result.timings) == {"kickoff", "wait", "download", "total"}

    kickoff = _fhir(server)[0]
    assert kickoff["path"] == "/fhir/$export"
    assert kickoff["accept"] == "application/fhir+json" and kickoff["prefer"] == "respond-async"
    query = dict(kickoff["query"])
    assert query["_type"] == ",".join(sorted(keys.AUDIT_TYPES))  # what the rules read, nothing else
    assert query["_outputFormat"] == "application/fhir+ndjson"
    assert "_since" not in query and "_until" not in query
    assert all(r["token_valid"] for r in _fhir(server))  # every FHIR request carried a valid token
    deletes = _fhir(server, "DELETE")
    assert len(deletes) == 1 and deletes[0]["path"].startswith("/fhir/bulk-status/")  # released after download
    assert server.state()["token_results"] == ["issued scope=system/*.read"]
    assert auth.tokens_issued == 1  # one token for the whole run (cached)
    assert any(".well-known/smart-configuration" in r["path"] for r in server.requests())


def test_es384_key_is_accepted(server: BulkServer, tmp_path: Path) -> None:
    auth = _auth(server, EC_KEY)
    assert auth.alg == "ES384"
    result = export_to_directory(server.base_url, tmp_path, auth=auth, sleep=Sleeps())
    assert result.counts["Patient"] == 3
    assert jwt.get_unverified_header(auth.client_assertion("http://x/token"))["alg"] == "ES384"


def test_group_and_patient_level_paths(server: BulkServer, tmp_path: Path) -> None:
    export_to_directory(server.base_url, tmp_path / "g", level="group", group_id="all", auth=_auth(server),
                        sleep=Sleeps())
    export_to_directory(server.base_url, tmp_path / "p", level="patient", auth=_auth(server), sleep=Sleeps())
    kickoffs = [r["path"] for r in _fhir(server, "GET") if r["path"].endswith("$export")]
    assert kickoffs == ["/fhir/Group/all/$export", "/fhir/Patient/$export"]


def test_unknown_group_is_a_clear_error(server: BulkServer, tmp_path: Path) -> None:
    with pytest.raises(BulkExportError, match=r"^kick-off refused at .*/Group/nope/\$export: HTTP 404 \(not-found\)$"):
        export_to_directory(server.base_url, tmp_path, level="group", group_id="nope", auth=_auth(server),
                            sleep=Sleeps())
    with pytest.raises(BulkExportError, match="needs a group id"):
        export_to_directory(server.base_url, tmp_path, level="group", sleep=Sleeps())


def test_since_and_until_are_utc_instants_with_z(server: BulkServer, tmp_path: Path) -> None:
    eastern = timezone(timedelta(hours=-5))
    result = export_to_directory(
        server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps(),
        since=datetime(2024, 2, 1, 0, 0, tzinfo=eastern), until=datetime(2024, 3, 1, tzinfo=UTC))
    query = dict(_fhir(server)[0]["query"])
    assert query["_since"] == "2024-02-01T05:00:00.000Z"
    assert query["_until"] == "2024-03-01T00:00:00.000Z"
    assert result.counts == {"Communication": 1, "Encounter": 1, "Patient": 1}  # only p1 changed in February
    assert utc_instant(datetime(2024, 7, 1, 12, 30)) == "2024-07-01T12:30:00.000Z"  # naive means UTC


def test_types_are_a_pass_through_and_until_can_be_withheld(server: BulkServer, tmp_path: Path) -> None:
    export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps(), types=["Patient"],
                        until=datetime(2030, 1, 1, tzinfo=UTC), send_until=False,
                        extra_params={"_elements": "id"})
    query = dict(_fhir(server)[0]["query"])
    assert query["_type"] == "Patient" and "_until" not in query and query["_elements"] == "id"


def test_static_headers_without_smart(server: BulkServer, tmp_path: Path) -> None:
    server.configure(require_auth=False, requires_access_token=False)
    result = export_to_directory(server.base_url, tmp_path, headers={"X-Test": "1"}, sleep=Sleeps())
    assert result.counts["Patient"] == 3
    assert not any(r["authorization"] for r in _fhir(server))


def test_a_server_that_wants_a_token_without_one_is_a_clear_error(server: BulkServer, tmp_path: Path) -> None:
    with pytest.raises(BulkExportError, match=r"kick-off refused .*: HTTP 401 \(login\)$"):
        export_to_directory(server.base_url, tmp_path, sleep=Sleeps())


# ------------------------------------------------------------------------------------------------ SMART


def test_client_assertion_claims(server: BulkServer) -> None:
    auth = _auth(server, scope="system/Patient.read")
    token_url = auth.resolve_token_url()
    assert token_url == f"{server.origin}/auth/token"
    first, second = auth.client_assertion(token_url), auth.client_assertion(token_url)
    header = jwt.get_unverified_header(first)
    assert header["alg"] == "RS384" and header["typ"] == "JWT"
    assert header["kid"] == public_jwk(RSA_KEY)["kid"] == jwk_thumbprint(public_jwk(RSA_KEY))
    claims = jwt.decode(first, RSA_KEY.public_key(), algorithms=["RS384"], audience=token_url)
    assert claims["iss"] == claims["sub"] == CLIENT
    assert 0 < claims["exp"] - time.time() <= 300
    assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]


def test_the_stand_in_refuses_a_replayed_assertion_and_a_wrong_audience(server: BulkServer) -> None:
    auth = _auth(server)
    token_url = auth.resolve_token_url()
    form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": auth.client_assertion(token_url), "scope": "system/*.read"}
    assert requests.post(token_url, data=form, timeout=5).status_code == 200
    again = requests.post(token_url, data=form, timeout=5)
    assert again.status_code == 401 and again.json()["error_description"] == "jti replayed"
    wrong = {**form, "client_assertion": auth.client_assertion("https://elsewhere.invalid/token")}
    refused = requests.post(token_url, data=wrong, timeout=5).json()
    assert refused["error_description"] == "invalid: InvalidAudienceError"


def test_an_unregistered_key_is_refused_with_a_clear_message(server: BulkServer, tmp_path: Path) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(BulkExportError) as caught:
        export_to_directory(server.base_url, tmp_path, auth=_auth(server, stranger), sleep=Sleeps())
    assert str(caught.value) == ("SMART Backend Services: token request refused: HTTP 401 invalid_client: "
                                 "no registered key with that kid")
    assert not _fhir(server)  # nothing was asked of the FHIR server without a token


def test_algorithm_must_match_the_key() -> None:
    with pytest.raises(SmartAuthError, match="does not match"):
        SmartBackendAuth("http://127.0.0.1:1/fhir", CLIENT, EC_KEY, alg="RS384")


def test_from_config_reads_a_pem_file(tmp_path: Path, server: BulkServer) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = tmp_path / "client.pem"
    pem.write_bytes(EC_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    auth = SmartBackendAuth.from_config(server.base_url, {"client_id": CLIENT, "private_key": "client.pem"},
                                        relative_to=tmp_path)
    assert auth.alg == "ES384" and auth.kid == public_jwks(pem)["keys"][0]["kid"]
    assert auth.token()  # the stand-in verified the assertion against the registered JWK Set
    with pytest.raises(SmartAuthError, match="client_id is required"):
        SmartBackendAuth.from_config(server.base_url, {"private_key": str(pem)})
    with pytest.raises(SmartAuthError, match="no such file"):
        SmartBackendAuth.from_config(server.base_url, {"client_id": "x", "private_key": "missing.pem"},
                                     relative_to=tmp_path)


def test_a_token_rejected_mid_run_is_renewed_once(server: BulkServer, tmp_path: Path) -> None:
    server.configure(revoke_tokens_after=1, polls_before_done=2)  # the kick-off passes, the first poll gets 401
    auth = _auth(server)
    result = export_to_directory(server.base_url, tmp_path, auth=auth, sleep=Sleeps())
    assert result.counts["Patient"] == 3
    assert auth.tokens_issued == 2
    valid = [r["token_valid"] for r in _fhir(server)]
    assert valid.count(False) == 1 and valid[-1] is True


def test_a_token_about_to_expire_is_renewed_before_use(server: BulkServer, tmp_path: Path) -> None:
    server.configure(token_lifetime=1, polls_before_done=2, retry_after="1")
    auth = _auth(server)
    export_to_directory(server.base_url, tmp_path, auth=auth, sleep=Sleeps(real=True))
    assert auth.tokens_issued >= 2
    assert all(r["token_valid"] for r in _fhir(server))  # renewed before expiry: never refused


def test_no_token_in_logs_or_errors(server: BulkServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.configure(revoke_tokens_after=1, status_faults=[500], error_outcomes=[
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing"}]}])
    auth = _auth(server)
    seen: list[str] = []
    original = auth.token

    def spy(session: Any = None) -> str:
        token = original(session)
        seen.append(token)
        return token

    auth.token = spy  # type: ignore[method-assign]
    export_to_directory(server.base_url, tmp_path, auth=auth, sleep=Sleeps())
    assert len(set(seen)) == 2
    everything = " ".join(str(r.__dict__) for r in caplog.records) + (tmp_path / STATE_FILE).read_text("utf-8")
    assert not any(token in everything for token in seen)
    assert "client_assertion" not in everything


# ------------------------------------------------------------------------------------------------ polling


def test_retry_after_seconds_and_x_progress_are_honoured(server: BulkServer, tmp_path: Path) -> None:
    server.configure(polls_before_done=3, retry_after="2")
    sleeps, progress = Sleeps(), []
    export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=sleeps, on_progress=progress.append)
    assert sleeps.waits == [2.0, 2.0, 2.0]
    assert progress == ["step 1", "step 2", "step 3"]


def test_retry_after_as_an_http_date(server: BulkServer, tmp_path: Path) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    server.configure(polls_before_done=1, retry_after=when)
    sleeps = Sleeps()
    export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=sleeps)
    assert len(sleeps.waits) == 1 and 27 <= sleeps.waits[0] <= 30
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_without_retry_after_polling_backs_off_exponentially_to_a_ceiling(server: BulkServer,
                                                                        tmp_path: Path) -> None:
    server.configure(polls_before_done=5, retry_after=None)
    sleeps = Sleeps()
    export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=sleeps, initial_wait_seconds=1,
                        max_wait_seconds=5)
    assert sleeps.waits == [1, 2, 4, 5, 5]


def test_429_and_5xx_are_waited_out(server: BulkServer, tmp_path: Path) -> None:
    server.configure(status_faults=[429, 500, 503], fault_retry_after="3", kickoff_faults=[429, 503])
    sleeps = Sleeps()
    result = export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=sleeps)
    assert result.counts["Encounter"] == 3
    statuses = [r["path"] for r in _fhir(server, "GET")]
    assert sum(p.endswith("$export") for p in statuses) == 3  # two refused kick-offs, then one accepted
    assert sleeps.waits == [0, 0, 3, 3, 3, 0]  # kick-off faults say Retry-After 0, status faults 3, then progress


def test_a_failed_export_is_reported_with_its_issue_codes(server: BulkServer, tmp_path: Path) -> None:
    server.configure(status_faults=[400])
    with pytest.raises(BulkExportError, match=r"^the export failed: HTTP 400 \(throttled\)$"):
        export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps())
    assert _fhir(server, "DELETE")  # released


def test_polling_gives_up_after_poll_max_seconds(server: BulkServer, tmp_path: Path) -> None:
    server.configure(polls_before_done=10_000, retry_after="1")
    started = time.monotonic()
    with pytest.raises(BulkExportError, match=r"gave up after 1\.5 s waiting for the export"):
        export_to_directory(server.base_url, tmp_path, auth=_auth(server), poll_max_seconds=1.5,
                            sleep=Sleeps(real=True))
    assert time.monotonic() - started < 5
    assert len(_fhir(server, "DELETE")) == 1  # the abandoned job is released
    assert "status_url" not in json.loads((tmp_path / STATE_FILE).read_text("utf-8"))


# ------------------------------------------------------------------------------------------------ downloads


def test_error_files_are_reported_without_free_text(server: BulkServer, tmp_path: Path) -> None:
    server.configure(error_outcomes=[
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                                                        "diagnostics": "Patient Jane Synthetic-Doe is invalid",
                                                        "details": {"coding": [{"code": "MSG_BAD"}],
                                                                    "text": "Jane Synthetic-Doe"}}]},
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                                                        "diagnostics": "Patient John Synthetic is invalid",
                                                        "details": {"coding": [{"code": "MSG_BAD"}]}}]},
        {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "not-supported"}]},
    ])
    result = export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps())
    assert result.errors == ["error.001.ndjson: 2 × error processing [MSG_BAD]",
                             "error.001.ndjson: 1 × warning not-supported"]
    assert [p.name for p in result.error_files] == ["error.001.ndjson"]
    assert "Synthetic" not in " ".join(result.errors)
    assert summarize_outcomes([b"{not json", b""], "x") == ["x: 1 line(s) not an OperationOutcome"]


def test_requires_access_token_decides_whether_files_get_the_token(server: BulkServer, tmp_path: Path) -> None:
    server.configure(requires_access_token=False)
    result = export_to_directory(server.base_url, tmp_path / "a", auth=_auth(server), sleep=Sleeps())
    assert result.requires_access_token is False
    files = [r for r in _fhir(server) if "bulk-files" in r["path"]]
    assert files and not any(r["authorization"] for r in files)
    server.reset()
    export_to_directory(server.base_url, tmp_path / "b", auth=_auth(server), sleep=Sleeps())
    files = [r for r in _fhir(server) if "bulk-files" in r["path"]]
    assert files and all(r["token_valid"] for r in files)


def test_a_download_broken_in_the_middle_is_fetched_again(server: BulkServer, tmp_path: Path) -> None:
    server.configure(break_downloads={"Patient.ndjson": 2})
    result = export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps())
    assert len(_lines(tmp_path / "Patient.001.ndjson")) == 3
    assert result.counts["Patient"] == 3
    gets = [r for r in _fhir(server) if r["path"].endswith("/Patient.ndjson")]
    assert [r["cut"] for r in gets] == [True, True, False]
    assert not list(tmp_path.glob("*.part"))


def test_a_rerun_resumes_downloads_and_reuses_complete_files(server: BulkServer, tmp_path: Path) -> None:
    server.configure(break_downloads={"Patient.ndjson": 100})
    with pytest.raises(BulkExportError, match=r"^download of .*/Patient\.ndjson broke off after \d+ bytes"):
        export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps(), download_retries=1,
                            keep_on_failure=True)
    assert not _fhir(server, "DELETE")  # kept for the rerun
    assert (tmp_path / "Communication.001.ndjson").is_file() and (tmp_path / "Encounter.001.ndjson").is_file()
    server.configure(break_downloads={})
    before = len(server.requests())
    result = export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps(),
                                 keep_on_failure=True)
    rerun = server.requests()[before:]
    assert result.resumed and result.reused_files == 2
    fhir = [(r["method"], r["path"].rsplit("/", 2)[-2:]) for r in rerun
            if r["path"].startswith("/fhir/") and ".well-known" not in r["path"]]
    # no kick-off, no polling: only the broken file again, then the job is released
    assert [(method, name) for method, (_, name) in fhir][:1] == [("GET", "Patient.ndjson")]
    assert [method for method, _ in fhir] == ["GET", "DELETE"] and fhir[1][1][0] == "bulk-status"
    assert result.counts == {"Communication": 3, "Encounter": 3, "Patient": 3}


def test_after_success_a_rerun_reuses_everything_and_a_damaged_file_restarts_the_export(
        server: BulkServer, tmp_path: Path) -> None:
    export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps())
    before = len(server.requests())
    again = export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps())
    assert again.reused_files == 3 and again.downloaded_bytes == 0
    assert len(server.requests()) == before  # not one request
    (tmp_path / "Patient.001.ndjson").write_text('{"resourceType": "Patient", "id": "p0"}\n', "utf-8")
    third = export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps())
    # the saved job was released after the first run (404 now): the export starts again from the kick-off
    assert sum(r["path"].endswith("$export") for r in _fhir(server)) == 2
    assert third.counts["Patient"] == 3 and len(_lines(tmp_path / "Patient.001.ndjson")) == 3


def test_a_different_request_does_not_reuse_files(server: BulkServer, tmp_path: Path) -> None:
    export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps())
    result = export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps(), types=["Patient"])
    assert result.reused_files == 0
    assert sorted(p.name for p in tmp_path.glob("*.ndjson")) == ["Patient.001.ndjson"]


def test_a_crash_while_polling_resumes_at_the_saved_status_url(server: BulkServer, tmp_path: Path) -> None:
    server.configure(polls_before_done=2)

    def crash(seconds: float) -> None:
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=crash)
    assert json.loads((tmp_path / STATE_FILE).read_text("utf-8"))["status_url"].startswith(server.base_url)
    result = export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=Sleeps())
    assert result.resumed and result.counts["Patient"] == 3
    assert sum(r["path"].endswith("$export") for r in _fhir(server)) == 1  # no second kick-off


def test_keyboard_interrupt_deletes_the_job(server: BulkServer, tmp_path: Path) -> None:
    server.configure(polls_before_done=5)

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_to_directory(server.base_url, tmp_path, auth=_auth(server), sleep=interrupt)
    deletes = _fhir(server, "DELETE")
    assert len(deletes) == 1
    assert all(job["deleted"] for job in server.state()["jobs"].values())
    assert "status_url" not in json.loads((tmp_path / STATE_FILE).read_text("utf-8"))


def test_an_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    from tests.support.fhir_server import free_port

    base = f"http://127.0.0.1:{free_port()}/fhir"
    with pytest.raises(BulkExportError, match=r"^gave up after 0\.5 s waiting for the kick-off"):
        export_to_directory(base, tmp_path, poll_max_seconds=0.5, initial_wait_seconds=0.1,
                            sleep=Sleeps(real=True))
    with pytest.raises(BulkExportError, match="SMART discovery failed: ConnectionError"):
        export_to_directory(base, tmp_path, auth=SmartBackendAuth(base, CLIENT, RSA_KEY), sleep=Sleeps())
