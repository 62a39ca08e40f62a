"""``g2250-cds serve`` as a subprocess for the worklist's browser and OIDC tests: the production WSGI server
(gunicorn, its own process group), a temporary config, 127.0.0.1 and a free port, SQLite or PostgreSQL.

In token mode (the embedded default) ``serve`` prints a one-time sign-in URL (``…/worklist/login?token=…``, as
Jupyter does); :class:`ServedWorklist` reads it from the server's output, which is kept in a log file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from cds_service.mappings import deep_merge
from tests.support.fhir_server import free_port
from tests.support.served import stop_process_group, wait_ready

LOGIN_URL = re.compile(r"https?://[^\s\"']+/worklist/login\?token=[A-Za-z0-9_\-%.~]+")


@dataclass
class ServedWorklist:
    base_url: str                  # http://127.0.0.1:PORT
    database_url: str
    config_path: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def worklist(self) -> str:
        return f"{self.base_url}/worklist/"

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def login_url(self, timeout: float = 10.0) -> str:
        """The one-time sign-in URL ``serve`` printed (token mode); fails the test when none was printed."""
        deadline = time.monotonic() + timeout
        while True:
            found = LOGIN_URL.findall(self.log())
            if found:
                return str(found[-1])
            if time.monotonic() > deadline or self.process.poll() is not None:
                pytest.fail("serve printed no one-time sign-in URL (…/worklist/login?token=…): "
                            + self.log()[-2000:])
            time.sleep(0.1)

    def hook_services(self) -> dict[str, str]:
        """Hook name → service id, from the discovery endpoint."""
        answer = requests.get(f"{self.base_url}/cds-services", timeout=10)
        answer.raise_for_status()
        return {service["hook"]: service["id"] for service in answer.json()["services"]}

    def call_hook(self, request_body: dict[str, Any]) -> dict[str, Any]:
        """POST a CDS Hooks request (with its prefetch) to the service for its hook: a real door into the
        determination log."""
        service = self.hook_services()[request_body["hook"]]
        answer = requests.post(f"{self.base_url}/cds-services/{service}", json=request_body, timeout=30)
        assert answer.status_code == 200, answer.text[:2000]
        body: dict[str, Any] = answer.json()
        return body

    def stop(self) -> None:
        stop_process_group(self.process, grace=20)


def start_worklist_server(work_dir: Path, *, database_url: str | None = None, port: int | None = None,
                          config: dict[str, Any] | None = None, workers: int = 1,
                          timeout: float = 60.0) -> ServedWorklist:
    """``g2250-cds serve`` with a config of the test's (``config`` deep-merged over ours: its database, a journal
    in ``work_dir``, JSON logs at WARNING), listening on 127.0.0.1:``port`` (a free one by default); returns once
    ``/readyz`` answers 200."""
    work_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    database_url = database_url or f"sqlite:///{work_dir / 'worklist.db'}"
    settings: dict[str, Any] = {
        "database_url": database_url,
        "journal": {"dir": str(work_dir / "journal")},
        "logging": {"level": "WARNING", "format": "json"},
        "worklist": {"session_secret_file": str(_session_secret(work_dir))},
    }
    settings = deep_merge(settings, config or {})
    config_path = work_dir / "config.yaml"
    config_path.write_text(json.dumps(settings, indent=2), "utf-8")  # JSON is YAML
    log_path = work_dir / "serve.log"
    metrics_dir = work_dir / "metrics"
    metrics_dir.mkdir(exist_ok=True)
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cds_service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--config", str(config_path), "--workers", str(workers)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    served = ServedWorklist(f"http://127.0.0.1:{port}", database_url, config_path, process, log_path)
    try:
        wait_ready(process, f"{served.base_url}/readyz", timeout=timeout, log=served.log)
    except BaseException:
        served.stop()
        raise
    return served


@contextmanager
def served_worklist(work_dir: Path, **options: Any) -> Iterator[ServedWorklist]:
    served = start_worklist_server(work_dir, **options)
    try:
        yield served
    finally:
        served.stop()


def _session_secret(work_dir: Path) -> Path:
    path = work_dir / "session.key"
    if not path.exists():
        path.write_text(os.urandom(32).hex(), "utf-8")
        path.chmod(0o600)
    return path
