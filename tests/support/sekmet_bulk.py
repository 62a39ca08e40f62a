"""SEKMET (``sekmet-fhir==0.1.1``) as a Bulk Data source with SMART Backend Services, for the population audit's
end-to-end test.

What SEKMET 0.1.1 offers (read from its installed source, ``sekmet/bulk/server.py`` and ``sekmet/auth/server.py``):

- ``$export`` at system, ``Patient`` and ``Group/{id}`` level (GET or POST), ``Prefer: respond-async`` required;
  parameters ``_outputFormat``, ``_since``, ``_type``, ``_typeFilter`` — **not ``_until``**: an unknown parameter is
  ignored and reported as a ``warning`` / ``not-supported`` OperationOutcome in the manifest's ``error`` files (or
  refused under ``Prefer: handling=strict``); status polling at ``/fhir/bulk-status/{job}`` (202 + ``X-Progress`` +
  ``Retry-After: 1``; 200 + manifest; DELETE cancels), files at ``/fhir/bulk-files/{job}/{Type}.ndjson``;
  ``requiresAccessToken`` is true whenever ``server_auth.types`` does not include ``none``.
- ``server_auth.types: [smart]`` with ``smart_clients`` (``client_id``, ``jwks`` = the client's public JWK Set,
  ``scopes``): the token endpoint ``{root}/auth/token`` (advertised by ``/fhir/.well-known/smart-configuration``)
  verifies the ``private_key_jwt`` assertion (RS384/ES384, ``aud`` = token URL, ``iss`` = ``sub``, ``exp`` ≤ 5 min,
  ``jti`` replay) and issues an HS256 access token valid ``token_lifetime`` seconds; scopes are enforced per
  request — so a ``system/*.read`` token may export but its ``DELETE`` of the status URL is refused with 403 (the
  client logs that and goes on; the job stays until SEKMET restarts).
- ``run_workflow(ctx, key, target, args)`` drives its hospital workflows (``adt.*``, ``billing.*``,
  ``scheduling.*``, ``clinical.*``) against a target; target ``rest:self`` writes over REST to the server named by
  ``base_url``, authenticating with the first static bearer token of ``server_auth`` — which is why the server
  here accepts ``bearer`` (for loading: the fixtures and the workflows) beside ``smart`` (for the export).

Everything binds 127.0.0.1; SEKMET runs in its own process (and its own venv), the population generator too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cds_service.audit.smart import SmartBackendAuth, public_jwks
from fhir_fixtures.sekmet import FhirServer, free_port, launch_sekmet

CLIENT_ID = "g2250-population-audit"

# Runs inside SEKMET's venv: its own hospital workflows, over REST to the running server ("rest:self").
POPULATION_SCRIPT = r"""
import json, sys
from sekmet.config import load_settings
from sekmet.context import AppContext
from sekmet.workflows.registry import run_workflow

config, count = sys.argv[1], int(sys.argv[2])
ctx = AppContext(load_settings(config))
target = "rest:self"
run_workflow(ctx, "adt.facility", target)
run_workflow(ctx, "scheduling.create_schedule", target, {"days": 2})
patients = []
for n in range(count):
    pid = run_workflow(ctx, "adt.register_patient", target)["patient"]["id"]
    patients.append(pid)
    coverage = run_workflow(ctx, "billing.coverage", target, {"patient": pid})["coverage"]["id"]
    visit = run_workflow(ctx, "adt.outpatient_visit", target, {"patient": pid})["encounter"]["id"]
    run_workflow(ctx, "clinical.condition", target, {"patient": pid})
    run_workflow(ctx, "billing.charge", target, {"patient": pid, "encounter": visit})
    run_workflow(ctx, "billing.claim", target, {"patient": pid, "coverage": coverage, "encounter": visit})
    if n % 2 == 0:
        run_workflow(ctx, "scheduling.book", target, {"patient": pid})
    if n % 3 == 0:
        run_workflow(ctx, "adt.discharge", target, {"encounter": visit})
print(json.dumps({"patients": patients}))
"""


@dataclass
class SmartSekmet:
    """A running SEKMET that accepts SMART Backend Services for ``client_id`` (key in ``key_path``) and a static
    bearer token (``server.token``) for loading data."""

    server: FhirServer
    binary: Path
    config_path: Path
    client_id: str
    key_path: Path
    alg: str

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def auth(self, **more: Any) -> SmartBackendAuth:
        from cds_service.audit.smart import load_private_key

        return SmartBackendAuth(self.base_url, self.client_id, load_private_key(self.key_path), alg=self.alg, **more)

    def bulk_config(self) -> dict[str, Any]:
        """The ``audit.bulk`` config block for ``g2250-cds population-audit --bulk-export``."""
        return {"client_id": self.client_id, "private_key_file": str(self.key_path)}

    def stop(self) -> None:
        self.server.stop()


def _write_key(path: Path, alg: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1()) if alg == "ES384" else rsa.generate_private_key(
        public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def start_sekmet_smart(binary: Path, *, alg: str = "RS384", client_id: str = CLIENT_ID,
                       scopes: str = "system/*.read", token_lifetime: int = 3600,
                       timeout: float = 60.0) -> SmartSekmet:
    """Start SEKMET on 127.0.0.1 (free port, fresh data directory) with ``server_auth.types: [smart, bearer]`` and
    one registered SMART client whose key pair is generated here (the public JWK Set goes into SEKMET's config)."""
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="g2250-sekmet-bulk-"))
    key_path = data_dir / "client-key.pem"
    _write_key(key_path, alg)
    token = "t-" + secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}/fhir"
    settings = {
        "base_url": base, "host": "127.0.0.1", "port": port, "data_dir": str(data_dir),
        "server_auth": {"types": ["smart", "bearer"], "tokens": [token], "token_lifetime": token_lifetime,
                        "smart_clients": [{"client_id": client_id, "jwks": public_jwks(key_path, alg=alg),
                                           "scopes": scopes}]},
        "simulator": {"enabled": False, "delay_seconds": 0.2},
        "validation": {"inbound": "strict"},
        "own_private_key_path": str(data_dir / "sekmet-own-key.pem"),
        "log_inbound": False,
    }
    config = data_dir / "sekmet.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False), "utf-8")
    server = launch_sekmet(binary, config, base, token, data_dir, timeout=timeout)
    return SmartSekmet(server, binary, config, client_id, key_path, alg)


def run_population(sekmet: SmartSekmet, patients: int = 6, *, timeout: float = 300.0) -> list[str]:
    """Make ``patients`` patients with SEKMET's own hospital workflows (registration, coverage, outpatient visit,
    condition, charge, claim, appointments, discharge) over REST; returns their ids. The generator runs in SEKMET's
    venv with a config of its own (same server, its own data directory for its local bookkeeping)."""
    python = sekmet.binary.parent / "python"
    work = Path(tempfile.mkdtemp(prefix="g2250-sekmet-wf-"))
    try:
        settings = yaml.safe_load(sekmet.config_path.read_text("utf-8"))
        settings.update({"data_dir": str(work), "own_private_key_path": str(work / "own-key.pem")})
        config = work / "client.yaml"
        config.write_text(yaml.safe_dump(settings, sort_keys=False), "utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
        env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
        done = subprocess.run([str(python), "-c", POPULATION_SCRIPT, str(config), str(patients)], cwd=work,
                              capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"SEKMET workflows failed:\n{done.stderr[-3000:]}")
        return list(json.loads(done.stdout.strip().splitlines()[-1])["patients"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
