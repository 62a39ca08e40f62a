"""Start a local SEKMET FHIR R4 server to load the fixtures into: used by the tests, the benchmarks (``bench/``) and
the example builder.

SEKMET (``sekmet-fhir==0.1.1``) lives in a venv of its own, because it pins its own FastAPI/pydantic/fhir.resources:
``bash tests/run-all.sh`` installs it in ``.venv-sekmet`` with the versions in ``tests/sekmet-constraints.txt``.
:func:`start_sekmet` runs it on 127.0.0.1 (a free port) with the simulator off, bearer auth on (a random token)
unless asked otherwise, and a fresh data directory that :meth:`FhirServer.stop` removes.

    server = start_sekmet(sekmet_binary())
    try:
        load_fixtures(server.base_url, server.token)   # cds_service.cli
        ...
    finally:
        server.stop()
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]  # the repository, when run from a clone (or an editable install)
DEFAULT_SEKMET_BINS = (ROOT / ".venv-sekmet" / "bin" / "sekmet", Path("/opt/sekmet-venv/bin/sekmet"))


@dataclass
class FhirServer:
    """A FHIR server to talk to: its base URL, bearer token, and (when started here) its process and data."""

    base_url: str
    token: str | None
    process: subprocess.Popen[bytes] | None = None
    data_dir: Path | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def sekmet_binary() -> Path | None:
    """``SEKMET_BIN`` if set, else ``.venv-sekmet/bin/sekmet`` in the repository or ``/opt/sekmet-venv/bin/sekmet``;
    None when there is none."""
    configured = os.environ.get("SEKMET_BIN")
    candidates = (Path(configured),) if configured else DEFAULT_SEKMET_BINS
    return next((c for c in candidates if c.exists()), None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_sekmet(binary: Path, *, timeout: float = 60.0, open_access: bool = False) -> FhirServer:
    """Start SEKMET; with bearer auth (a random token) unless ``open_access`` (like an open test server)."""
    port = free_port()
    token = None if open_access else "t-" + secrets.token_hex(16)
    data_dir = Path(tempfile.mkdtemp(prefix="g2250-sekmet-"))
    base = f"http://127.0.0.1:{port}/fhir"
    config = data_dir / "sekmet.yaml"
    config.write_text(
        "\n".join([
            f"base_url: {base}",
            "host: 127.0.0.1",
            f"port: {port}",
            f"data_dir: {data_dir}",
            "server_auth:",
            *(["  types: [none]"] if token is None else ["  types: [bearer]", f"  tokens: [\"{token}\"]"]),
            "simulator:",
            "  enabled: false",
            "validation:",
            "  inbound: strict",
            "log_inbound: false",
            "",
        ]),
        "utf-8",
    )
    return launch_sekmet(binary, config, base, token, data_dir, timeout=timeout)


def launch_sekmet(binary: Path, config: Path, base: str, token: str | None, data_dir: Path, *,
                  timeout: float = 60.0) -> FhirServer:
    """Run ``sekmet serve`` with a config already written in ``data_dir`` (its log beside it) and wait until
    ``{base}/metadata`` answers; a start-up failure stops it and raises with the log's tail."""
    with (data_dir / "sekmet.log").open("wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [str(binary), "serve", "--config", str(config)],
            cwd=data_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    server = FhirServer(base, token, process, data_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = (data_dir / "sekmet.log").read_text("utf-8", errors="replace")[-2000:]
            server.stop()
            raise RuntimeError(f"SEKMET exited during start-up:\n{text}")
        try:
            if requests.get(f"{base}/metadata", timeout=1).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"SEKMET did not become ready within {timeout} s")
