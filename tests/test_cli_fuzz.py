"""Fuzz the command line in-process: no input — config file or argument — ever yields a traceback (issue 12).

``cds_service.cli.main([...])`` runs over a generated corpus (fixed seed, bounded size and time):

* config documents made by mutating a valid config: keys dropped, duplicated, misspelt, moved, retyped; dates
  quoted, unquoted and invalid; times unquoted; deep nesting; anchors, aliases, merge keys, alias bombs and
  recursive aliases; huge numbers; YAML tags; binary and non-UTF-8 bytes; tabs; a byte order mark; truncation and
  character-level damage — each through ``check-config`` and, as ``--config``, through ``serve`` (gunicorn
  stubbed), which must agree with it;
* argument vectors of every subcommand with values replaced, dropped, duplicated, reordered and added.

Every run must end with a documented exit status (0 done, 1 evaluate's service answered an error, 2 usage or
config error, 3 FHIR server or database failed), a non-empty stderr on failure, and no Python traceback text.
Hypothesis adds arbitrary bytes and text (derandomized). Nothing touches the network: ``requests`` is cut off.
"""

from __future__ import annotations

import io
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service import cli

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261118
DOCUMENTS = 260
ARGVS = 300
DOCUMENTED = {0, 1, 2, 3}
TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File ".*", line \d+')


# --------------------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------------------
def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(argv)  # must return, never raise
    return code, out.getvalue(), err.getvalue()


def problems_of(argv: list[str], code: int, out: str, err: str) -> list[str]:
    found = []
    if code not in DOCUMENTED:
        found.append(f"exit {code}")
    if code != 0 and not err.strip():
        found.append("failure without a message")
    if TRACEBACK.search(err):
        found.append("traceback text on stderr")
    if code == 2 and out.strip():
        found.append("usage error printed on stdout")
    return [f"{argv!r}: {p}\n    {err[-600:]!r}" for p in found]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory and data directory of our own, no config from the environment, no network, and
    ``serve`` that stops before gunicorn."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("G2250_CDS_CONFIG", raising=False)
    monkeypatch.delenv("G2250_CDS_TRACEBACK", raising=False)

    def offline(*_args: Any, **_kwargs: Any) -> Any:
        raise requests.ConnectionError("no network in the CLI fuzz test")

    monkeypatch.setattr(requests.Session, "send", offline)
    monkeypatch.setattr("cds_service.server.run_gunicorn", lambda *_a, **_k: None)
    monkeypatch.setattr("cds_service.logs.configure_logging", lambda *_a, **_k: None)
    yield tmp_path


# --------------------------------------------------------------------------------------------------------------
# Config documents
# --------------------------------------------------------------------------------------------------------------
def valid_config(tmp: Path) -> dict[str, Any]:
    return {
        "auth": {
            "required": True,
            "audience": ["http://localhost:8250/cds-services", "http://127.0.0.1:8250/cds-services"],
            "clock_skew_seconds": 30,
            "clients": [{"issuer": "https://ehr.example.org", "jwks_url": "https://ehr.example.org/jwks.json",
                         "allowed_jku": ["https://ehr.example.org/jku.json"],
                         "fhir_servers": ["http://127.0.0.1:8090/fhir"]}],
        },
        "fhir": {"allowed_servers": ["http://127.0.0.1:8090/fhir"], "timeout_seconds": 2.0, "max_pages": 10,
                 "page_size": 100, "batch": "auto"},
        "deadline_seconds": 4.0,
        "calendar": {"timezone": "America/New_York", "holidays": "US", "extra_holidays": ["2026-12-24"],
                     "mode": "business-days", "working_hours": {"start": "08:00", "end": "17:00"}},
        "database_url": f"sqlite:///{tmp / 'fuzz.db'}",
        "redis_url": None,
        "journal": {"dir": str(tmp / "journal"), "fsync": "interval"},
        "server": {"max_body_bytes": 1048576, "cors_allowed_origins": ["*"], "workers": 2, "threads": 4},
        "logging": {"level": "ERROR", "format": "json"},
        "rules": {"settings": {"prior_service_scope": "organization", "soonest_slot_tolerance_minutes": 30}},
    }


ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**63, 10**40, 0.5, -0.0, float("inf"), float("nan"), "", " ", "text", "yes",
    "NO", "on", "2026-02-30", "17:00", "http://", "ftp://x", "https://h:99999/x", "sqlite://", "mysql://x",
    "postgresql+nosuch://h/db", "redis://h/x", "Mars/Olympus", "XX", "US-ZZ", "é", "\u202e", "\t", [], {}, [None],
    [[[]]], {"a": {"b": {"c": 1}}}, ["http://a b"], {"keys": []}, "x" * 5000,
]
DATES = ["2026-12-24", "2026-02-30", "2026-13-01", "2026-1-1", "20261224", "2026-12-24T10:00:00",
         "2026-12-24 10:00", "2026-12-24T10:00:00-05:00", "0000-01-01", "9999-12-31", "tomorrow", ""]


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(paths_of(item, (*prefix, key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(paths_of(item, (*prefix, i)))
    return found


def container(document: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        document = document[part]
    return document


def mutate_structure(rng: random.Random, document: dict[str, Any]) -> dict[str, Any]:
    for _ in range(rng.randint(1, 4)):
        paths = paths_of(document)
        if not paths:
            break
        path = rng.choice(paths)
        parent = container(document, path)
        key = path[-1]
        action = rng.choice(["drop", "retype", "retype", "rename", "move", "wrap", "date"])
        if action == "drop":
            del parent[key]
        elif action == "retype":
            parent[key] = rng.choice(ODD_VALUES)
        elif action == "rename" and isinstance(key, str):
            value = parent.pop(key)
            parent[rng.choice([key[:-1], key + "s", key.upper(), key.replace("_", "-"), "x" + key, "unknown"])] = value
        elif action == "move" and isinstance(key, str) and isinstance(parent, dict):
            document[key if key not in document else key + "_"] = parent.pop(key)
        elif action == "wrap":
            parent[key] = rng.choice([[parent[key]], {"value": parent[key]}])
        elif action == "date":
            document.setdefault("calendar", {})
            if isinstance(document["calendar"], dict):
                document["calendar"]["extra_holidays"] = rng.sample(DATES, rng.randint(1, 4))
    return document


def unquote_dates(text: str) -> str:
    for day in DATES:
        if day:
            text = text.replace(f"'{day}'", day)
    return text.replace("'08:00'", "08:00").replace("'17:00'", "17:00")


def damage_text(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        if not chars:
            break
        i = rng.randrange(len(chars))
        op = rng.choice(["delete", "insert", "replace"])
        piece = rng.choice([*":-[]{}&*!|>'\"#%@`,? \n\t\\", "\x00", "\x1b", "\ufeff", "é", "\udcff"])
        if op == "delete":
            del chars[i]
        elif op == "insert":
            chars.insert(i, piece)
        else:
            chars[i] = piece
    return "".join(chars)


def special_documents(tmp: Path) -> list[bytes]:
    bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))
    good = yaml.safe_dump(valid_config(tmp), sort_keys=False)
    return [s.encode("utf-8") if isinstance(s, str) else s for s in [
        "", "\n\n", "# only a comment\n", "~\n", "- a\n- b\n", "just text\n", "42\n", "{}\n", "[]\n",
        "a: &a [*a]\n", "a: &a {b: *a}\n", bomb, "x: " + "[" * 400 + "]" * 400 + "\n",
        "x:\n" + "".join(" " * (2 * i) + f"k{i}:\n" for i in range(1, 60)), "deadline_seconds: " + "9" * 5000 + "\n",
        "deadline_seconds: 1.0e+400\n", "deadline_seconds: .nan\n", "deadline_seconds: -.inf\n",
        "base: &b {timezone: UTC}\ncalendar:\n  <<: *b\n  mode: business-days\n",
        "calendar: {<<: [*missing]}\n", "calendar: !!binary aGVsbG8=\n", "server: !!set {a, b}\n",
        "x: !!python/object/apply:os.system [ls]\n", "calendar: {extra_holidays: !!timestamp 2026-01-01}\n",
        "calendar: !!omap [a: 1, b: 2]\n", "? [a, b]\n: c\n", "? {a: b}\n: c\n", "1: a\nnull: b\ntrue: c\n",
        "on: yes\n", "calendar:\n\ttimezone: UTC\n", "a: b: c\n", "a: 'unclosed\n", 'a: "\\x"\n',
        "%YAML 9.9\n---\na: 1\n",
        "---\na: 1\n---\nb: 2\n", "a: 1\n...\n", "\ufeffdeadline_seconds: 3\n", "deadline_seconds: 3\x00\n",
        "x: \x1b[31m\n", "calendar: {timezone: \u00e9}\n", b"\xef\xbb\xbf" + good.encode("utf-8"),
        b"calendar: {timezone: \xff\xfe}\n", b"\xff\xfe\x00a\x00:\x00 \x001\x00", bytes(range(256)),
        "calendar:\n  extra_holidays: [2026-02-30]\n", "calendar:\n  extra_holidays: [2026-12-24]\n",
        "calendar:\n  working_hours: {start: 8:00, end: 17:00}\n", "deadline_seconds: 1\ndeadline_seconds: 2\n",
        "auth: {clients: [{issuer: a}, {issuer: a}], required: true, audience: 'http://x/y'}\n",
        "rules: {taxonomy: [{prefix: '', outcome: G2250}]}\n", "rules: {payers: [{}]}\n", "rules: []\n",
        good, unquote_dates(good),
    ]]


def generated_documents(tmp: Path) -> list[bytes]:
    rng = random.Random(SEED)
    documents = special_documents(tmp)
    while len(documents) < DOCUMENTS:
        document = mutate_structure(rng, valid_config(tmp))
        try:
            text = yaml.safe_dump(document, sort_keys=rng.random() < 0.5, allow_unicode=rng.random() < 0.5,
                                  default_flow_style=rng.choice([None, False, True]))
        except (yaml.YAMLError, ValueError):
            continue
        if rng.random() < 0.4:
            text = unquote_dates(text)
        roll = rng.random()
        if roll < 0.15:
            text = damage_text(rng, text)
        elif roll < 0.2:
            text = text[: rng.randrange(len(text) + 1)]
        elif roll < 0.25:
            lines = text.splitlines(keepends=True)
            i = rng.randrange(len(lines))
            text = "".join([*lines[: i + 1], lines[i], *lines[i + 1:]])  # a duplicated line: a duplicate key
        elif roll < 0.3:
            text = text.replace("  ", "\t", 1)
        raw = text.encode("utf-8", "surrogatepass")
        roll = rng.random()
        if roll < 0.05:
            raw = b"\xef\xbb\xbf" + raw
        elif roll < 0.1:
            i = rng.randrange(len(raw) + 1)
            raw = raw[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + raw[i:]
        elif roll < 0.13:
            raw = text.encode("latin-1", "replace")
        documents.append(raw)
    return documents


def test_config_corpus_never_a_traceback(sandbox: Path) -> None:
    started = time.monotonic()
    failures: list[str] = []
    outcomes: dict[int, int] = {}
    for i, raw in enumerate(generated_documents(sandbox)):
        path = sandbox / f"config-{i}.yaml"
        path.write_bytes(raw)
        argv = ["check-config", str(path)]
        code, out, err = run(argv)
        outcomes[code] = outcomes.get(code, 0) + 1
        failures += problems_of(argv, code, out, err)
        if code == 0 and not out.startswith(f"OK: {path}"):
            failures.append(f"{argv!r}: exit 0 without OK: {out!r}")
        if code == 2 and not all(line.startswith(str(path)) for line in err.splitlines()):
            failures.append(f"{argv!r}: a problem line without the file name: {err!r}")
        # the same loader and the same verdict for --config of serve (gunicorn stubbed)
        serve = ["serve", "--config", str(path), "--port", "8250"]
        serve_code, serve_out, serve_err = run(serve)
        failures += problems_of(serve, serve_code, serve_out, serve_err)
        if (serve_code == 0) != (code == 0) or (code == 2 and serve_code != 2):
            failures.append(f"{serve!r}: exit {serve_code}, check-config said {code}: {serve_err[-300:]!r}")
    assert not failures, "\n".join(failures[:20])
    assert outcomes.get(0, 0) >= 5 and outcomes.get(2, 0) >= 100, outcomes  # both kinds really exercised
    assert time.monotonic() - started < 60


# --------------------------------------------------------------------------------------------------------------
# Argument vectors
# --------------------------------------------------------------------------------------------------------------
def argument_files(tmp: Path) -> dict[str, str]:
    files = {
        "good.yaml": yaml.safe_dump({"database_url": f"sqlite:///{tmp / 'args.db'}", "logging": {"level": "ERROR"},
                                     "journal": {"dir": str(tmp / "journal")}}),
        "bad.yaml": "calendar: {extra_holidays: [2026-02-30]}\nnope: 1\n",
        "request.json": (ROOT / "fhir_fixtures" / "requests" / "patient-view.json").read_text("utf-8"),
        "bad.json": "{oops", "list.json": "[1, 2]", "nan.json": '{"hook": NaN}', "empty.json": "",
        "deep.json": "[" * 100000 + "]" * 100000, "order-sign.json": json.dumps({"hook": "order-sign"}),
        "no-context.json": json.dumps({"hook": "patient-view", "hookInstance": "x"}),
    }
    for name, text in files.items():
        (tmp / name).write_text(text, "utf-8")
    (tmp / "latin1.json").write_bytes(b'{"hook": "caf\xe9"}')
    (tmp / "dir.json").mkdir(exist_ok=True)
    return {name: str(tmp / name) for name in [*files, "latin1.json", "dir.json"]}


def base_argvs(files: dict[str, str]) -> list[list[str]]:
    good = files["good.yaml"]
    return [
        ["serve", "--host", "127.0.0.1", "--port", "8250", "--workers", "1", "--config", good],
        ["evaluate", files["request.json"], "--config", good, "--now", "2026-12-14T15:10:00-05:00",
         "--service", "g2250-patient-view"],
        ["audit", "--config", good, "--since", "2026-11-18", "--patient", "Patient/p1", "--encounter",
         "Encounter/e1", "--limit", "10"],
        ["check-config", good],
        ["load-fixtures", "--fhir-server", "http://127.0.0.1:9/fhir", "--token", "abc.def"],
        ["load-fixtures", "--shift-to", "2027-03-10", "--dry-run", "--strategy", "nearest", "--config", good],
    ]


def junk_values(files: dict[str, str]) -> list[str]:
    return [
        "", " ", "0", "-1", "1", "65535", "65536", "99999", "abc", "1e3", "0x50", "٣", "+5", "1.5", "\x00", "\udcff",
        "a\nb", "--", "-", "-x", "--port", "2026-02-30", "2026-11-18", "2026-11-18T09:00:00",
        "2026-11-18T09:00:00-05:00", "2026-11-18T09:00:00Z", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00",
        "now", "Patient/1", "Encounter/x y", "Patient/", "/", "http://", "ftp://x", "http://[::1", "x" * 5000,
        "::1", "[::1]", "0.0.0.0", "localhost", "bad host", "g2250-patient-view", "nope", "keep-verdict",
        *files.values(), str(Path(files["good.yaml"]).parent / "missing.yaml"),
    ]


def mutated_argvs(files: dict[str, str]) -> list[list[str]]:
    rng = random.Random(SEED + 1)
    bases = base_argvs(files)
    junk = junk_values(files)
    options = ["--host", "--port", "--workers", "--config", "--service", "--now", "--since", "--patient",
               "--encounter", "--limit", "--fhir-server", "--token", "--shift-to", "--strategy", "--write-requests",
               "--dry-run", "--version", "--help", "--nope"]
    argvs = [list(b) for b in bases]
    while len(argvs) < ARGVS:
        argv = list(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            action = rng.choice(["value", "value", "value", "drop", "add", "duplicate", "swap", "command"])
            if action == "value" and len(argv) > 1:
                argv[rng.randrange(1, len(argv))] = rng.choice(junk)
            elif action == "drop" and len(argv) > 1:
                del argv[rng.randrange(1, len(argv))]
            elif action == "add":
                argv[1:1] = [rng.choice(options), rng.choice(junk)][: rng.randint(1, 2)]
            elif action == "duplicate" and len(argv) > 2:
                i = rng.randrange(1, len(argv) - 1)
                argv += argv[i:i + 2]
            elif action == "swap" and len(argv) > 2:
                i, j = rng.randrange(1, len(argv)), rng.randrange(1, len(argv))
                argv[i], argv[j] = argv[j], argv[i]
            elif action == "command":
                argv[0] = rng.choice(["serve", "evaluate", "audit", "check-config", "load-fixtures", "Serve", ""])
        # --write-requests only into the sandbox; keep the slow story shift rare
        if "--write-requests" in argv[:-1]:
            argv[argv.index("--write-requests") + 1] = str(Path(files["good.yaml"]).parent / "requests")
        argvs.append(argv)
    return argvs


def test_argument_corpus_never_a_traceback(sandbox: Path) -> None:
    started = time.monotonic()
    files = argument_files(sandbox)
    failures: list[str] = []
    outcomes: dict[int, int] = {}
    for argv in mutated_argvs(files):
        code, out, err = run(argv)
        outcomes[code] = outcomes.get(code, 0) + 1
        failures += problems_of(argv, code, out, err)
    assert not failures, "\n".join(failures[:20])
    assert outcomes.get(2, 0) >= ARGVS // 3 and outcomes.get(0, 0) >= 5, outcomes
    assert time.monotonic() - started < 90


# --------------------------------------------------------------------------------------------------------------
# Hypothesis: arbitrary bytes and text as a config file
# --------------------------------------------------------------------------------------------------------------
YAML_ALPHABET = st.sampled_from([*"abcdeflmnortuxyz019 :-[]{}&*!|>'\"#%@`,?\n\t.~_/\\", "\ufeff", "é", "\x00"])
KEYS = st.sampled_from(["auth", "calendar", "timezone", "extra_holidays", "working_hours", "database_url",
                        "deadline_seconds", "fhir", "allowed_servers", "rules", "settings", "<<"])


@st.composite
def yaml_like(draw: Callable[..., Any]) -> bytes:
    pieces = draw(st.lists(st.one_of(st.text(YAML_ALPHABET, max_size=12), KEYS.map(lambda k: f"{k}: "),
                                     st.sampled_from(DATES), st.just("\n  ")), max_size=40))
    return "".join(pieces).encode("utf-8", "surrogatepass")


def _check_config_bytes(tmp: Path, raw: bytes) -> None:
    path = tmp / "hypothesis.yaml"
    path.write_bytes(raw)
    argv = ["check-config", str(path)]
    code, out, err = run(argv)
    assert not problems_of(argv, code, out, err), (raw, code, err)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=400), yaml_like()))
def test_check_config_on_arbitrary_bytes(sandbox: Path, raw: bytes) -> None:
    _check_config_bytes(sandbox, raw)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(argv=st.lists(st.one_of(st.sampled_from(["serve", "evaluate", "audit", "check-config", "load-fixtures",
                                                 "--port", "--since", "--limit", "--now", "--patient", "--host",
                                                 "--workers", "--service", "--config", "--shift-to"]),
                               st.text(max_size=20)), max_size=6))
def test_arbitrary_argument_vectors(sandbox: Path, argv: list[str]) -> None:
    code, out, err = run(argv)
    assert not problems_of(argv, code, out, err), (argv, code, err)
