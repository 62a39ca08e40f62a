"""An audit log that loses nothing, tested for real: a throw-away PostgreSQL cluster (``initdb``/``pg_ctl`` in a
temporary directory, started by the test), ``g2250-cds serve`` with 2 gunicorn workers, a bounded load of hook
calls from a thread pool — and PostgreSQL stopped in the middle, or a worker killed with ``kill -9``. Every
determination the service answered (a card carrying ``g2250-cds.determination``) must end up in the table exactly
once; feedback sent during the outage answers 503 with ``Retry-After`` and is stored once when retried.

Runs PostgreSQL as the ``postgres`` user when the tests run as root (``initdb`` refuses root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from cds_service.journal import Journal, encode
from tests.support.fhir_server import free_port
from tests.support.served import stop_process_group, wait_ready

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = {path.stem: json.loads(path.read_text("utf-8")) for path in (ROOT / "fhir_fixtures" / "requests").glob(
    "*.json")}
SERVICE_OF = {"patient-view": "g2250-patient-view", "encounter-start": "g2250-encounter-start",
              "encounter-discharge": "g2250-encounter-discharge", "appointment-book": "g2250-appointment-book"}
REQUIRE = os.environ.get("G2250_REQUIRE_INTEGRATION") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason} (G2250_REQUIRE_INTEGRATION=1)")
    pytest.skip(reason)


# -- a private PostgreSQL -------------------------------------------------------------------------------------------
def _pg_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


class PrivatePostgres:
    """One cluster in a temporary directory, on a free port, stopped and started at will."""

    def __init__(self) -> None:
        binaries = _pg_bin()
        if binaries is None:
            _unavailable("PostgreSQL binaries (initdb, pg_ctl) not found")
        self.bin: Path = binaries  # type: ignore[assignment]
        self.root = Path(tempfile.mkdtemp(prefix="g2250-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            if shutil.which("runuser") is None:
                _unavailable("running as root without runuser: cannot start a private PostgreSQL")
            shutil.chown(self.root, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        result = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, timeout=timeout,
                                check=False)
        if result.returncode != 0:
            pytest.fail(f"{tool} failed: {result.stderr.decode(errors='replace')[-1000:]}")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        # fsync off: a test cluster, stopped only cleanly; the service's own durability is what is tested.
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "-t",
                  "30", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                        "stop"], capture_output=True, timeout=30, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    cluster = PrivatePostgres()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def database(private_postgres: PrivatePostgres) -> Iterator[str]:
    """A fresh database per test in the private cluster."""
    name = "g2250_" + uuid.uuid4().hex[:10]
    admin = sa.create_engine(private_postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    yield private_postgres.url.rsplit("/", 1)[0] + f"/{name}"


# -- the service ----------------------------------------------------------------------------------------------------
class Service:
    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.journal_dir = tmp_path / "journal"
        self.config = tmp_path / "config.yaml"
        self.config.write_text(json.dumps({  # JSON is YAML
            "database_url": database_url,
            "journal": {"dir": str(self.journal_dir)},
            "logging": {"level": "WARNING", "format": "json"},
        }), "utf-8")
        self.log = tmp_path / "service.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cds_service.cli", "serve", "--port", str(self.port), "--config",
                 str(self.config), "--workers", "2"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PROMETHEUS_MULTIPROC_DIR": str(_fresh(tmp_path /
                                                                                                    "metrics"))},
            )
        wait_ready(self.process, f"{self.base}/readyz", timeout=30, log=self.tail)

    def tail(self) -> str:
        return self.log.read_text("utf-8", errors="replace")[-3000:]

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def ready(self) -> tuple[int, dict[str, Any]]:
        response = requests.get(f"{self.base}/readyz", timeout=5)
        return response.status_code, response.json()

    def metric(self, name: str) -> float:
        text = requests.get(f"{self.base}/metrics", timeout=5).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    def stop(self) -> None:
        stop_process_group(self.process, grace=20)


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Load:
    """Hook calls from a thread pool until stopped; what was answered, by hookInstance and card uuid."""

    base: str
    threads: int = 3
    answered: list[tuple[str, str]] = field(default_factory=list)  # (hookInstance, card uuid) with a determination
    statuses: dict[int, int] = field(default_factory=dict)
    failures: int = 0  # connections cut (a killed worker): not answered, so not owed to the log
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, index: int) -> None:
        session = requests.Session()
        names = sorted(REQUESTS)
        n = index
        while not self._stop.is_set():
            name = names[n % len(names)]
            n += 1
            body = dict(REQUESTS[name], hookInstance=str(uuid.uuid4()))
            service = SERVICE_OF[body["hook"]]
            try:
                response = session.post(f"{self.base}/cds-services/{service}", json=body, timeout=10)
            except requests.RequestException:
                with self._lock:
                    self.failures += 1
                session = requests.Session()
                continue
            with self._lock:
                self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
            if response.status_code != 200:
                continue
            for card in response.json()["cards"]:
                if "g2250-cds.determination" in (card.get("extension") or {}):
                    with self._lock:
                        self.answered.append((body["hookInstance"], card["uuid"]))
            time.sleep(0.005)  # a bounded load: the machine is shared

    def __enter__(self) -> Load:
        self._pool = ThreadPoolExecutor(self.threads)
        self._futures = [self._pool.submit(self._client, i) for i in range(self.threads)]
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=30)
        self._pool.shutdown()


def _stored(database_url: str) -> list[tuple[str, str]]:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT hook_instance, card_uuid FROM determinations").all()
    finally:
        engine.dispose()
    return [(r[0], r[1]) for r in rows]


def _wait_drained(service: Service, database_url: str, expected: int, seconds: float = 30) -> list[tuple[str, str]]:
    deadline = time.monotonic() + seconds
    stored: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        stored = _stored(database_url)
        if len(stored) >= expected and service.metric("g2250_journal_backlog_rows") == 0:
            return stored
        time.sleep(0.25)
    return stored


def _assert_exactly_once(answered: list[tuple[str, str]], stored: list[tuple[str, str]]) -> None:
    assert answered, "the load produced no determinations"
    assert len(set(answered)) == len(answered)  # each call has its own hookInstance
    missing = set(answered) - set(stored)
    assert not missing, f"{len(missing)} of {len(answered)} answered determinations never stored"
    duplicates = len(stored) - len(set(stored))
    assert duplicates == 0, f"{duplicates} determinations stored twice"


# -- the tests ------------------------------------------------------------------------------------------------------
@pytest.mark.postgres
def test_database_stopped_mid_load_loses_and_duplicates_nothing(tmp_path: Path, private_postgres: PrivatePostgres,
                                                                database: str) -> None:
    service = Service(tmp_path, database)
    feedback_url = f"{service.base}/cds-services/g2250-encounter-discharge/feedback"
    item = {"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2026-11-18T16:00:00Z"}
    try:
        with Load(service.base) as load:
            time.sleep(2)
            private_postgres.stop()
            try:
                time.sleep(1.0)
                during = len(load.answered)
                status, body = service.ready()
                assert status == 200 and body["status"] == "degraded", body  # still answering, journaling
                assert body["checks"]["database"] != "ok"
                refused = requests.post(feedback_url, json={"feedback": [item]}, timeout=10)
                assert refused.status_code == 503, refused.text
                assert refused.headers["Retry-After"].isdigit()
                assert refused.json()["issue"][0]["code"] == "transient"
                time.sleep(3.0)
                assert len(load.answered) > during  # hook calls kept being answered during the outage
                assert service.ready()[1]["journal"]["backlog_bytes"] > 0  # the whole directory's
            finally:
                private_postgres.start()
            time.sleep(2)
        assert set(load.statuses) == {200}, load.statuses  # never a 5xx, also during the outage
        # The EHR retries the feedback (twice: the second must not store it again).
        for _ in range(2):
            assert requests.post(feedback_url, json={"feedback": [item]}, timeout=10).status_code == 200
        stored = _wait_drained(service, database, len(load.answered))
        _assert_exactly_once(load.answered, stored)
        print(f"outage: {sum(load.statuses.values())} calls, {len(load.answered)} determinations answered, "
              f"{len(load.answered) - during} after the stop; all stored once")
        assert service.metric("g2250_journal_write_errors_total") > 0  # the outage is visible
        assert service.metric("g2250_journal_rows_written_total") >= len(load.answered)
        status, body = service.ready()
        assert status == 200 and body["status"] == "ok", body
    finally:
        service.stop()
    engine = sa.create_engine(database)
    try:
        with engine.connect() as conn:
            count = conn.execute(sa.text("SELECT count(*) FROM feedback WHERE card_uuid = :card"),
                                 {"card": item["card"]}).scalar_one()
    finally:
        engine.dispose()
    assert count == 1


@pytest.mark.postgres
def test_worker_killed_mid_load_loses_and_duplicates_nothing(tmp_path: Path, private_postgres: PrivatePostgres,
                                                             database: str) -> None:
    service = Service(tmp_path, database)
    try:
        with Load(service.base) as load:
            time.sleep(2)
            # Every worker (the clients' keep-alive connections may all sit on one): each dies right after
            # answering, its last rows (the group-commit linger) only in its journal.
            for victim in service.workers():
                os.kill(victim, signal.SIGKILL)
            time.sleep(3)
        assert set(load.statuses) == {200}, load.statuses
        stored = _wait_drained(service, database, len(load.answered))
        _assert_exactly_once(load.answered, stored)
        print(f"kill -9: {len(load.answered)} determinations answered, {load.failures} connections cut, "
              f"{service.metric('g2250_journal_rows_replayed_total'):.0f} rows replayed; all stored once")
    finally:
        service.stop()


@pytest.mark.postgres
def test_worker_killed_during_an_outage_is_replayed_when_the_database_returns(
        tmp_path: Path, private_postgres: PrivatePostgres, database: str) -> None:
    """The hardest case: every row answered during the outage sits in the journal of a worker that is then
    killed; its replacement boots without a database and the journal is adopted and replayed when it returns."""
    service = Service(tmp_path, database)
    try:
        with Load(service.base) as load:
            time.sleep(1)
            private_postgres.stop()
            try:
                time.sleep(2)
                for victim in service.workers():
                    os.kill(victim, signal.SIGKILL)
                time.sleep(2)  # gunicorn starts new workers: they must boot with the database down
            finally:
                private_postgres.start()
            time.sleep(1)
        assert set(load.statuses) == {200}, load.statuses
        stored = _wait_drained(service, database, len(load.answered))
        _assert_exactly_once(load.answered, stored)
        replayed = service.metric("g2250_journal_rows_replayed_total")
        print(f"kill -9 during the outage: {len(load.answered)} determinations answered, {replayed:.0f} replayed "
              f"from the killed workers' journals; all stored once")
        assert replayed > 0
    finally:
        service.stop()


# -- the journal on its own -----------------------------------------------------------------------------------------
_DYING_WRITER = """
import os, sys
from cds_service.journal import Journal, encode
journal = Journal(sys.argv[1], fsync="interval")
for i in range(5):
    journal.append(encode({"k": f"dead-{i}", "r": [[i]]}), 1)
os._exit(0)  # no close: for the journal as good as kill -9 (the kernel drops the lock)
"""


def test_a_dead_process_segment_is_adopted_once_and_a_torn_tail_skipped(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    subprocess.run([sys.executable, "-c", _DYING_WRITER, str(directory)], check=True, cwd=ROOT, timeout=60)
    (segment,) = directory.glob("*.jnl")
    with segment.open("ab") as handle:
        handle.write(b'0badc0de {"k": "torn')  # a write cut short by the crash
    first, second = Journal(directory), Journal(directory)
    assert first.scan() == 1 and second.scan() == 0  # the lock: one adopter only
    batch = first.read_batch(100)
    assert batch is not None and [r["k"] for r in batch.records] == [f"dead-{i}" for i in range(5)]
    assert batch.torn == 1  # skipped, counted: that call was never answered
    first.commit(batch)
    assert not list(directory.glob("*.jnl"))  # drained: deleted
    assert first.read_batch(100) is None
    first.close()
    second.close()


def test_a_replay_after_a_crash_never_duplicates(tmp_path: Path) -> None:
    """Rows written, then the process dies before marking them done: the replay inserts nothing twice."""
    from cds_service.store import FeedbackStore, rows_of

    store = FeedbackStore(f"sqlite:///{tmp_path / 'x.db'}")
    directory = tmp_path / "j"
    subprocess.run([sys.executable, "-c", _DYING_WRITER.replace('[[i]]', '[["c", "billable", "G2250", None, None, '
                                                                '"Encounter/e", None, []]]').replace(
        '{"k": f"dead-{i}"', '{"k": f"dead-{i}", "t": "2026-11-18T15:40:00+00:00", "s": "s", "h": f"h{i}"'),
        str(directory)], check=True, cwd=ROOT, timeout=60)
    journal = Journal(directory)
    journal.scan()
    batch = journal.read_batch(3)  # the first three, "written before the crash"
    assert batch is not None
    assert store.insert_determinations(rows_of(batch.records)) == 3
    journal.close()  # not committed: as if the writer died between the insert and marking the position
    again = Journal(directory)
    assert again.scan() == 1
    batch = again.read_batch(100)
    assert batch is not None and len(batch.records) == 5
    assert store.insert_determinations(rows_of(batch.records)) == 2  # the three already stored are ignored
    again.commit(batch)
    again.close()
    assert len(store.determinations()) == 5
    store.dispose()


def test_past_its_bound_the_journal_refuses(tmp_path: Path) -> None:
    from cds_service.journal import JournalFull

    journal = Journal(tmp_path / "j", max_bytes=4096)
    line = encode({"k": "x", "r": [["y" * 500]]})
    with pytest.raises(JournalFull):
        for _ in range(20):
            journal.append(line, 1)
    assert journal.over_bound() or journal.total_pending_bytes() + len(line) > 4096
    batch = journal.read_batch(1000)
    assert batch is not None
    journal.commit(batch)
    journal.append(line, 1)  # drained: room again
    journal.close()
