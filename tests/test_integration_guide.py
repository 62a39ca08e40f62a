"""The README's integration guide, executed as written: "Register a client end to end" (dev-token, the config,
``serve``, the ``curl`` calls, the replay, live cards from SEKMET with fixtures shifted to today) and the feedback
example of "Acting on suggestions". The shell blocks are read from README.md and run with bash — only the ports,
the SEKMET directory and the path of the venvs are substituted — and the outputs the README shows are compared
with what the commands print, so the guide cannot drift from the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import REQUIRE_INTEGRATION
from tests.support.fhir_server import free_port, sekmet_binary
from tests.support.served import wait_ready

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REGISTER = "### Register a client end to end"
SUGGESTIONS = "### Acting on suggestions, and the feedback to send"
BIN = Path(sys.executable).parent


def _section(title: str) -> str:
    text = README.read_text("utf-8")
    start = text.index(title)
    end = min(i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i > 0)
    return text[start:end]


def _blocks(title: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block of a README section, in order (indented blocks dedented)."""
    found = re.findall(r"^( *)```(\w+)\n(.*?)^\1```", _section(title), re.S | re.M)
    return [(lang, "\n".join(line[len(indent):] for line in body.splitlines()) + "\n")
            for indent, lang, body in found]


def _sh(title: str) -> list[str]:
    return [body for lang, body in _blocks(title) if lang == "sh"]


def _text(title: str) -> list[str]:
    return [body for lang, body in _blocks(title) if lang == "text"]


def _matches(shown: str, printed: str) -> None:
    """Every line the README shows is printed, in order; ``…`` stands for any text (the keys), and any time stamp
    or uuid (the expiry, the jti) for another of its kind."""
    lines = printed.splitlines()
    position = 0
    variable = {r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ": "a time stamp",
                r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}": "a uuid (the jti)"}
    splitter = re.compile("(…|" + "|".join(variable) + ")")
    for line in shown.splitlines():
        pattern = ""
        for part in splitter.split(line):
            if part == "…":
                pattern += ".*?"
            elif any(re.fullmatch(v, part) for v in variable):
                pattern += next(v for v in variable if re.fullmatch(v, part))
            else:
                pattern += re.escape(part)
        regex = re.compile(pattern + ("" if line.endswith("…") else "$"))
        while position < len(lines) and not regex.match(lines[position]):
            position += 1
        assert position < len(lines), f"README shows {line!r}, not printed:\n{printed}"
        position += 1


class Guide:
    """The README's commands with this test's ports and paths, run with bash in a scratch directory."""

    def __init__(self, work: Path, port: int, fhir_port: int) -> None:
        self.work = work
        self.port = port
        self.fhir_port = fhir_port
        self.processes: list[subprocess.Popen[bytes]] = []

    def subst(self, text: str) -> str:
        """The README's text with this test's ports and paths."""
        sekmet = sekmet_binary()
        text = (text.replace("127.0.0.1:8250", f"127.0.0.1:{self.port}")
                .replace("127.0.0.1:8090", f"127.0.0.1:{self.fhir_port}")
                .replace("port: 8090", f"port: {self.fhir_port}")
                .replace("/tmp/g2250-sekmet", str(self.work / "sekmet-data"))
                .replace("source .venv/bin/activate", f'export PATH="{BIN}:$PATH"')
                .replace("g2250-cds serve --config dev-config.yaml", f"g2250-cds serve --config dev-config.yaml "
                                                                     f"--port {self.port}"))
        return text.replace(".venv-sekmet/bin/sekmet", str(sekmet)) if sekmet is not None else text

    def adapt(self, script: str) -> str:
        return f'export PATH="{BIN}:$PATH"\nset -e\n{self.subst(script)}'

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", self.adapt(script)], cwd=self.work, capture_output=True, text=True,
                              timeout=180, check=False)

    def start(self, script: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(["bash", "-c", self.adapt(script)], cwd=self.work, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=5)


@pytest.fixture
def guide(tmp_path: Path) -> Iterator[Guide]:
    work = tmp_path / "repo"
    work.mkdir()
    (work / "fhir_fixtures").symlink_to(ROOT / "fhir_fixtures")  # the README runs from the repository root
    g = Guide(work, free_port(), free_port())
    try:
        yield g
    finally:
        g.stop()


def _token_command(script: str) -> str:
    match = re.search(r"TOKEN=\$\((g2250-cds dev-token [^)]*)\)", script)
    assert match, script
    return match.group(1)


def test_readme_documents_these_commands() -> None:
    sh = _sh(REGISTER)
    assert len(sh) == 7, "the registration steps: dev-token, config, serve, call, replay, SEKMET, live call"
    dev_token = ("g2250-cds dev-token --issuer https://ehr.example.test --audience http://127.0.0.1:8250/cds-services "
                 "--kid ehr-test-1")
    assert sh[0] == f"source .venv/bin/activate\n{dev_token}\n"
    assert "auth:\n  required: true\n  audience: http://127.0.0.1:8250/cds-services\n" in sh[1]
    assert "jwks: $(cat dev-keys/ehr-test-1.jwks.json)" in sh[1]
    assert "g2250-cds check-config dev-config.yaml" in sh[1]
    assert sh[2] == "g2250-cds serve --config dev-config.yaml\n"
    call = ("curl -s http://127.0.0.1:8250/cds-services/g2250-encounter-discharge \\\n"
            "  -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\n"
            "  --data-binary @fhir_fixtures/requests/encounter-discharge.json\n")
    assert sh[3] == f"TOKEN=$({dev_token} --quiet)\n{call}"
    assert sh[4].startswith("curl -s -o /dev/null -w '%{http_code}\\n' ")
    assert sh[4].endswith("--data-binary @fhir_fixtures/requests/encounter-discharge.json\n")
    assert sh[5].rstrip().endswith(".venv-sekmet/bin/sekmet serve --config /tmp/g2250-sekmet/sekmet.yaml")
    assert sh[6].startswith("g2250-cds load-fixtures --fhir-server http://127.0.0.1:8090/fhir --shift-to now "
                            "--write-requests dev-requests\n")
    assert "--data-binary @dev-requests/s35-unrelated-visit-next-day.json" in sh[6]
    feedback = _sh(SUGGESTIONS)
    assert len(feedback) == 1 and "/cds-services/g2250-encounter-discharge/feedback" in feedback[0]


def test_register_a_client_end_to_end_as_the_readme_says(guide: Guide) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl not installed (the README's calls use it)")
    sh, shown = _sh(REGISTER), _text(REGISTER)
    base = f"http://127.0.0.1:{guide.port}/cds-services"

    # 1. keys and a first token; the README's stderr lines are printed
    first = guide.run(sh[0])
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().count(".") == 2
    _matches(guide.subst(shown[0]), first.stderr)
    assert (guide.work / "dev-keys" / "ehr-test-1.pem").exists()

    # 2. the config, validated
    config = guide.run(sh[1])
    assert config.returncode == 0, config.stderr
    _matches(shown[1], config.stdout)

    # 3. serve: the start-up lines the README shows, exactly
    log = guide.work / "serve.log"
    server = guide.start(sh[2], log)
    wait_ready(server, f"http://127.0.0.1:{guide.port}/healthz", timeout=60,
               log=lambda: log.read_text("utf-8", errors="replace"))
    startup = guide.subst(shown[2]).splitlines()
    printed = log.read_text("utf-8").splitlines()[:len(startup)]
    _matches("\n".join(startup), "\n".join(printed))  # line for line: nothing missing, nothing in between

    # 4. the documented token and request through requests: a card, then 401 for the replay
    token = guide.run(_token_command(sh[3])).stdout.strip()
    body = (ROOT / "fhir_fixtures" / "requests" / "encounter-discharge.json").read_bytes()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    answer = requests.post(f"{base}/g2250-encounter-discharge", data=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["cards"]
    replay = requests.post(f"{base}/g2250-encounter-discharge", data=body, headers=headers, timeout=30)
    assert replay.status_code == 401 and replay.content == b""

    # ... and the README's own curl lines: the card it shows, then 401
    calls = guide.run(sh[3] + sh[4])
    assert calls.returncode == 0, calls.stderr
    assert calls.stdout.endswith("401\n")
    printed = calls.stdout.removesuffix("401\n")
    assert json.loads(printed)["cards"]
    assert printed.startswith(shown[3].strip().removesuffix("…"))
    assert shown[4].strip() == "401"

    # feedback, as "Acting on suggestions" sends it: accepted (curl) and overridden (the JSON shown)
    accepted = guide.run(_sh(SUGGESTIONS)[0])
    assert accepted.returncode == 0 and accepted.stdout == "200\n", accepted.stdout + accepted.stderr
    overridden = next(body for lang, body in _blocks(SUGGESTIONS) if lang == "json")
    headers["Authorization"] = "Bearer " + guide.run(_token_command(sh[3])).stdout.strip()
    stored = requests.post(f"{base}/g2250-patient-view/feedback", data=overridden.encode(), headers=headers,
                           timeout=30)
    assert stored.status_code == 200, stored.text

    # 5. live cards today: SEKMET, the fixtures shifted to now, patient-view for s35
    if sekmet_binary() is None:
        if REQUIRE_INTEGRATION:
            pytest.fail("SEKMET not installed in .venv-sekmet (G2250_REQUIRE_INTEGRATION=1)")
        pytest.skip("SEKMET not installed in .venv-sekmet: steps 1-4 passed, step 5 not run")
    sekmet_log = guide.work / "sekmet.log"
    sekmet = guide.start(sh[5], sekmet_log)
    wait_ready(sekmet, f"http://127.0.0.1:{guide.fhir_port}/fhir/metadata", timeout=90,
               log=lambda: sekmet_log.read_text("utf-8", errors="replace"))
    live = guide.run(sh[6])
    assert live.returncode == 0, live.stderr
    cards = live.stdout[live.stdout.index('{"cards"'):]
    assert json.loads(cards)["cards"], live.stdout
    assert cards.startswith(shown[-1].strip().removesuffix("…"))
