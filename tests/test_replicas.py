"""Two service instances — two gunicorn masters, as two replicas would run — sharing PostgreSQL and Redis:
feedback sent to either is visible to both, and a JWT used against one is refused as a replay by the other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from cds_service.store import FeedbackStore
from tests.conftest import require_redis
from tests.support.fhir_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ISSUER = "https://ehr.replica-test.example"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ROOT = Path(__file__).resolve().parents[1]
DISCHARGE = json.loads((ROOT / "fhir_fixtures" / "requests" / "encounter-discharge.json").read_text("utf-8"))


def _token(audience: str) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "aud": audience, "exp": now + 120, "iat": now, "jti": str(uuid.uuid4())},
                      KEY, algorithm="RS384", headers={"kid": "k1", "typ": "JWT"})


def _start(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cds_service.cli", "serve", "--port", str(port), "--config", str(config),
             "--workers", "2"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def _wait_ready(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(150):
        if process.poll() is not None:
            pytest.fail(f"replica exited: {log.read_text('utf-8', errors='replace')[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    pytest.fail("replica did not become ready")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def test_two_masters_share_postgresql_and_redis(tmp_path: Path, postgres_url: str) -> None:
    redis_url = require_redis()  # G2250_TEST_REDIS_URL
    ports = [free_port(), free_port()]
    audience = "https://cds.replica-test.example/cds-services"  # both replicas sit behind one public URL
    jwk: dict[str, Any] = {**RSAAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "k1", "alg": "RS384"}
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "auth": {"required": True, "audience": audience,
                 "clients": [{"issuer": ISSUER, "jwks": {"keys": [jwk]}, "fhir_servers": []}]},
        "database_url": postgres_url,
        "redis_url": redis_url,
        "logging": {"level": "WARNING", "format": "json"},
    }), "utf-8")
    processes = [_start(config, port, tmp_path / f"replica-{port}.log") for port in ports]
    try:
        for port, process in zip(ports, processes, strict=True):
            _wait_ready(port, process, tmp_path / f"replica-{port}.log")
        urls = [f"http://127.0.0.1:{port}/cds-services/g2250-encounter-discharge" for port in ports]
        token = _token(audience)
        first = requests.post(urls[0], json=DISCHARGE, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert first.status_code == 200
        replay = requests.post(urls[1], json=DISCHARGE, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert replay.status_code == 401  # the jti was seen by the other replica
        card = first.json()["cards"][0]["uuid"]
        for i, url in enumerate(urls):
            feedback = requests.post(url + "/feedback", headers={"Authorization": f"Bearer {_token(audience)}"},
                                     timeout=10, json={"feedback": [
                                         {"card": card, "outcome": "overridden", "outcomeTimestamp":
                                          f"2026-11-18T16:0{i}:00Z"}]})
            assert feedback.status_code == 200
    finally:
        for process in processes:
            _stop(process)
    store = FeedbackStore(postgres_url)
    try:
        assert len(store.feedback_for_card(card)) == 2  # both replicas wrote to the one database
    finally:
        store.dispose()
