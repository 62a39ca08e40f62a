"""``g2250-cds dev-token`` (cds_service/devtoken.py): a test key pair and a CDS Hooks client JWT that the service's
own verifier (cds_service/web/auth.py) accepts once, for a config built from the snippet the command prints."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from cds_service.app import create_app, runtime_of
from cds_service.cli import main
from cds_service.config import Config, config_from_mapping
from cds_service.devtoken import MAX_LIFETIME_SECONDS, WARNING, base_audience, make_dev_token
from cds_service.web.auth import Authenticator, AuthError, MemoryReplayCache

ROOT = Path(__file__).resolve().parents[1]
ISSUER = "https://ehr.example.test"
AUDIENCE = "http://127.0.0.1:8250/cds-services"
PATH = "/cds-services/g2250-encounter-discharge"
DISCHARGE = json.loads((ROOT / "fhir_fixtures" / "requests" / "encounter-discharge.json").read_text("utf-8"))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["dev-token", *args])
    out, err = capsys.readouterr()
    return code, out, err


def snippet_of(stderr: str) -> dict[str, Any]:
    """The ``auth`` block printed on stderr, parsed as YAML (what a user pastes into a config)."""
    lines = stderr.splitlines()
    start = lines.index("auth:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    return yaml.safe_load("\n".join(lines[start:end]))


def mint(capsys: pytest.CaptureFixture[str], key_dir: Path, *extra: str) -> tuple[str, dict[str, Any]]:
    code, out, err = run(capsys, "--issuer", ISSUER, "--audience", AUDIENCE, "--kid", "test-key-1",
                         "--key-dir", str(key_dir), *extra)
    assert code == 0, err
    return out.strip(), snippet_of(err)


def authenticator(snippet: dict[str, Any], tmp_path: Path) -> Authenticator:
    config = config_from_mapping({**snippet, "database_url": f"sqlite:///{tmp_path / 'a.db'}"}, "snippet")
    return Authenticator(config, replay=MemoryReplayCache())


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_token_verifies_with_the_services_verifier_once(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                        alg: str) -> None:
    token, snippet = mint(capsys, tmp_path / "keys", "--alg", alg)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": "test-key-1", "typ": "JWT"}
    assert snippet["auth"]["required"] is True
    assert snippet["auth"]["audience"] == AUDIENCE
    auth = authenticator(snippet, tmp_path)
    client = auth.authenticate(f"Bearer {token}", PATH)
    assert client.issuer == ISSUER
    with pytest.raises(AuthError) as replay:
        auth.authenticate(f"Bearer {token}", PATH)
    assert replay.value.reason == "replayed jti"


def test_over_http_a_card_then_401_for_the_replay(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  make_config: Callable[..., Config]) -> None:
    token, snippet = mint(capsys, tmp_path / "keys")
    app = create_app(make_config(snippet))
    try:
        client = app.test_client()
        headers = {"Authorization": f"Bearer {token}"}
        first = client.post(PATH, json=DISCHARGE, headers=headers)
        assert first.status_code == 200
        assert first.get_json()["cards"]
        second = client.post(PATH, json=DISCHARGE, headers=headers)
        assert second.status_code == 401
        assert second.data == b""  # a bare 401
        # A new token from the same key is a new jti: accepted.
        fresh, _ = mint(capsys, tmp_path / "keys")
        assert client.post(PATH, json=DISCHARGE, headers={"Authorization": f"Bearer {fresh}"}).status_code == 200
    finally:
        runtime_of(app).close()


def test_key_files_created_once_private_0600_public_only_in_the_snippet(capsys: pytest.CaptureFixture[str],
                                                                        tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    code, first, err = run(capsys, "--issuer", ISSUER, "--audience", AUDIENCE, "--key-dir", str(keys))
    assert code == 0
    assert WARNING in err and "created" in err
    pem = keys / "dev-key-1.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in pem.read_bytes()
    jwks = json.loads((keys / "dev-key-1.jwks.json").read_text("utf-8"))
    assert snippet_of(err)["auth"]["clients"][0]["jwks"] == jwks
    for key in jwks["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi"} & key.keys()
        assert key["kid"] == "dev-key-1" and key["alg"] == "ES384" and key["use"] == "sig"
    before = pem.read_bytes()
    code, second, err = run(capsys, "--issuer", ISSUER, "--audience", AUDIENCE, "--key-dir", str(keys))
    assert code == 0 and "reused" in err
    assert pem.read_bytes() == before  # the same key signs every token
    claims = [jwt.decode(t.strip(), options={"verify_signature": False}) for t in (first, second)]
    assert claims[0]["jti"] != claims[1]["jti"]  # a fresh jti on every call
    for c in claims:
        assert c["iss"] == ISSUER and c["aud"] == AUDIENCE
        assert c["exp"] - c["iat"] == MAX_LIFETIME_SECONDS


def test_quiet_prints_the_token_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "--issuer", ISSUER, "--audience", AUDIENCE, "--key-dir", str(tmp_path), "-q")
    assert code == 0 and err == ""
    assert out.count(".") == 2 and len(out.splitlines()) == 1


def test_lifetime_is_at_most_five_minutes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    token, _ = mint(capsys, tmp_path, "--lifetime", "60")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 60
    code, out, err = run(capsys, "--issuer", ISSUER, "--audience", AUDIENCE, "--key-dir", str(tmp_path),
                         "--lifetime", "301")
    assert code == 1 and out == ""
    assert "--lifetime" in err and "Traceback" not in err


def test_every_argument_problem_in_one_message(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "--issuer", "has space", "--audience", "localhost:8250", "--kid", "../x",
                         "--lifetime", "0", "--key-dir", str(tmp_path))
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    for option in ("--issuer", "--audience", "--kid", "--lifetime"):
        assert option in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_existing_key_keeps_its_algorithm(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    mint(capsys, tmp_path, "--alg", "RS384")
    token, snippet = mint(capsys, tmp_path)  # no --alg: the key's own
    assert jwt.get_unverified_header(token)["alg"] == "RS384"
    assert snippet["auth"]["clients"][0]["jwks"]["keys"][0]["kty"] == "RSA"
    code, _, err = run(capsys, "--issuer", ISSUER, "--audience", AUDIENCE, "--kid", "test-key-1",
                       "--key-dir", str(tmp_path), "--alg", "ES384")
    assert code == 1 and "is an RS384 key, not ES384" in err


def test_unreadable_key_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "dev-key-1.pem").write_text("not a key", "utf-8")
    code, out, err = run(capsys, "--issuer", ISSUER, "--audience", AUDIENCE, "--key-dir", str(tmp_path))
    assert code == 1 and out == ""
    assert "not an unencrypted PEM private key" in err and "Traceback" not in err


def test_endpoint_audience_maps_to_its_base(tmp_path: Path) -> None:
    endpoint = AUDIENCE + "/g2250-patient-view"
    assert base_audience(endpoint) == AUDIENCE
    assert base_audience(AUDIENCE) == AUDIENCE
    result = make_dev_token(issuer=ISSUER, audience=endpoint, key_dir=tmp_path)
    assert result.claims["aud"] == endpoint
    config = config_from_mapping({"auth": {"required": True, "audience": AUDIENCE, "clients": [
        {"issuer": ISSUER, "jwks": result.jwks}]}, "database_url": "sqlite://"}, "t")
    auth = Authenticator(config, replay=MemoryReplayCache())
    assert auth.authenticate(f"Bearer {result.token}", "/cds-services/g2250-patient-view").issuer == ISSUER
