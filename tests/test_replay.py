"""jti replay protection shared by every worker and replica (cds_service.replay; CDS Hooks 2.0 "Trusting CDS
Clients": ``jti`` "used to protect against replay attacks"; cds-hooks.md: "reject a replay within the token
lifetime").

Unit tests of the database cache (SQLite file and PostgreSQL) and the pooled Redis client, then the real thing:
``g2250-cds serve`` under gunicorn with three workers, a new TCP connection per request, and — read from
``/proc`` — the worker that accepted each connection, so the test *knows* the replay went to a worker other than
the one that accepted the token. On SQLite (the embedded defaults), on PostgreSQL, on Redis, and across two
replicas sharing PostgreSQL.
"""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from cds_service.cli import startup_summary
from cds_service.config import config_from_mapping
from cds_service.replay import (
    DatabaseReplayCache,
    MemoryReplayCache,
    RedisReplayCache,
    ReplayStoreUnavailable,
    hashed_key,
    is_in_memory_sqlite,
    redis_client,
    replay_cache_for,
)
from cds_service.web.auth import Authenticator, AuthError, ReplayCacheUnavailable
from tests.conftest import REDIS_URL
from tests.support.fhir_server import free_port
from tests.support.served import stop_process_group

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_INTEGRATION = os.environ.get("G2250_REQUIRE_INTEGRATION") == "1"
REDIS_TEST_URL = REDIS_URL  # G2250_TEST_REDIS_URL (tests/conftest.py)
DISCHARGE = json.loads((ROOT / "fhir_fixtures" / "requests" / "encounter-discharge.json").read_text("utf-8"))
ISSUER = "https://ehr.replay-test.example"
KEY = ec.generate_private_key(ec.SECP384R1())
JWK: dict[str, Any] = {**ECAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "k1", "alg": "ES384"}
SERVICE = "/cds-services/g2250-encounter-discharge"


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _unavailable(reason: str) -> None:
    if REQUIRE_INTEGRATION:
        pytest.fail(f"{reason} (G2250_REQUIRE_INTEGRATION=1)")
    pytest.skip(reason)


def _redis_or_skip() -> None:
    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError:
        _unavailable(f"Redis not reachable at {REDIS_TEST_URL}")
    finally:
        client.close()


# --------------------------------------------------------------------------------------------------------------
# The database cache
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'replay.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_database_cache_refuses_a_second_use_until_expiry(database_url: str) -> None:
    clock = FakeClock(1_800_000_000)
    cache = DatabaseReplayCache(database_url, clock=clock)
    try:
        assert cache.add_if_new("iss|jti-1", 300)
        assert not cache.add_if_new("iss|jti-1", 300)
        assert cache.add_if_new("other-iss|jti-1", 300)  # the issuer is part of the key
        clock.advance(299)
        assert not cache.add_if_new("iss|jti-1", 300)
        clock.advance(1)  # expired: the same jti may be used again (its old token is refused as expired anyway)
        assert cache.add_if_new("iss|jti-1", 300)
        assert not cache.add_if_new("iss|jti-1", 300)
    finally:
        cache.close()


def test_database_cache_stores_only_hashes_and_purges_expired_rows(database_url: str) -> None:
    clock = FakeClock(1_800_000_000)
    cache = DatabaseReplayCache(database_url, clock=clock, purge_interval=60)
    try:
        assert cache.add_if_new("iss|secret-jti-a", 10)
        assert cache.add_if_new("iss|secret-jti-b", 1000)
        with cache.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT key_hash, expires_at FROM auth_jti").all()
        assert {r[0] for r in rows} == {hashed_key("iss|secret-jti-a"), hashed_key("iss|secret-jti-b")}
        assert all(len(r[0]) == 64 and "secret" not in r[0] for r in rows)
        clock.advance(61)  # a's token expired; the next check purges (at most once a minute per process)
        assert cache.add_if_new("iss|secret-jti-c", 10)
        with cache.engine.connect() as conn:
            left = {r[0] for r in conn.exec_driver_sql("SELECT key_hash FROM auth_jti").all()}
        assert left == {hashed_key("iss|secret-jti-b"), hashed_key("iss|secret-jti-c")}
        assert cache.purge() == 0
    finally:
        cache.close()


def test_database_cache_is_atomic_across_connections(database_url: str) -> None:
    # Eight caches (eight engines: as many processes would have) race for the same key: exactly one wins.
    caches = [DatabaseReplayCache(database_url) for _ in range(8)]
    try:
        caches[0].create_schema()
        for round_ in range(5):
            key = f"iss|race-{round_}-{uuid.uuid4()}"
            barrier = threading.Barrier(len(caches))
            results: list[bool] = []

            def race(cache: DatabaseReplayCache, key: str = key, barrier: threading.Barrier = barrier,
                     results: list[bool] = results) -> None:
                barrier.wait()
                results.append(cache.add_if_new(key, 60))

            threads = [threading.Thread(target=race, args=(cache,)) for cache in caches]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert sorted(results) == [False] * (len(caches) - 1) + [True]
    finally:
        for cache in caches:
            cache.close()


def test_database_cache_creates_its_table_once_under_a_race(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    caches = [DatabaseReplayCache(url) for _ in range(4)]
    errors: list[BaseException] = []

    def first_use(cache: DatabaseReplayCache) -> None:
        try:
            cache.add_if_new(f"iss|{uuid.uuid4()}", 60)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(c,)) for c in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for cache in caches:
        cache.close()
    assert errors == []
    with sqlite3.connect(tmp_path / "fresh.db") as conn:
        assert conn.execute("SELECT count(*) FROM auth_jti").fetchone() == (4,)


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://postgres@127.0.0.1:1/test",  # nothing listens
    "sqlite:////nonexistent-directory/g2250/replay.db",  # cannot be opened
])
def test_unreachable_database_fails_closed(url: str) -> None:
    cache = DatabaseReplayCache(url)
    try:
        started = time.monotonic()
        with pytest.raises(ReplayStoreUnavailable):
            cache.add_if_new("iss|jti", 60)
        assert time.monotonic() - started < 10
        assert cache.ping() is False
    finally:
        cache.close()


def test_authenticator_refuses_when_the_store_is_down(caplog: pytest.LogCaptureFixture) -> None:
    config = config_from_mapping({"auth": {"required": True, "audience": "https://cds.example.org/cds-services",
                                           "clients": [{"issuer": ISSUER, "jwks": {"keys": [JWK]}}]}}, "test")
    cache = DatabaseReplayCache("postgresql+psycopg://postgres@127.0.0.1:1/test")
    auth = Authenticator(config, replay=cache)
    token = _token("https://cds.example.org/cds-services" + SERVICE.removeprefix("/cds-services"), jti="secret-jti")
    with pytest.raises(ReplayCacheUnavailable) as info:
        auth.authenticate(f"Bearer {token}", SERVICE)
    assert isinstance(info.value, AuthError)  # → a bare 401
    assert info.value.reason == "replay cache unavailable"
    assert "secret-jti" not in caplog.text and token.split(".")[1] not in caplog.text
    cache.close()


def test_replay_cache_for_picks_the_shared_store(tmp_path: Path) -> None:
    assert isinstance(replay_cache_for(None, f"sqlite:///{tmp_path / 'x.db'}"), DatabaseReplayCache)
    assert isinstance(replay_cache_for(None, "postgresql+psycopg://u@h/db"), DatabaseReplayCache)
    assert isinstance(replay_cache_for(REDIS_TEST_URL, f"sqlite:///{tmp_path / 'x.db'}"), RedisReplayCache)
    for in_memory in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:t?mode=memory&uri=true"):
        assert is_in_memory_sqlite(in_memory)
        assert isinstance(replay_cache_for(None, in_memory), MemoryReplayCache)
    assert not is_in_memory_sqlite("sqlite:///g2250-cds.db")
    assert not is_in_memory_sqlite("postgresql+psycopg://u@h/db")


# --------------------------------------------------------------------------------------------------------------
# Redis: pooled client, fail closed
# --------------------------------------------------------------------------------------------------------------


def test_redis_client_is_pooled_and_retries_only_connection_errors() -> None:
    _redis_or_skip()
    client = redis_client(REDIS_TEST_URL)
    try:
        cache = RedisReplayCache(client, prefix=f"g2250:test:{uuid.uuid4().hex}:")
        assert cache.ping()
        key = f"iss|{uuid.uuid4()}"
        assert cache.add_if_new(key, 5)
        assert not cache.add_if_new(key, 5)
        pool = client.connection_pool
        assert pool is cache._client.connection_pool  # one pool per process, reused by every call
        retry = pool.connection_kwargs["retry"]
        assert redis.ConnectionError in retry._supported_errors
        assert redis.TimeoutError not in retry._supported_errors  # a SET NX that timed out may have been applied
        # A connection killed under the pool (as by a Redis restart) costs no refusal: one retry, new connection.
        for connection in list(pool._available_connections):
            connection.disconnect()
        assert cache.add_if_new(f"iss|{uuid.uuid4()}", 5)
        client.delete(cache.redis_key(key))
    finally:
        client.close()


def test_redis_down_fails_closed() -> None:
    cache = RedisReplayCache(redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3))
    with pytest.raises(ReplayStoreUnavailable):
        cache.add_if_new("iss|jti", 5)
    assert cache.ping() is False


# --------------------------------------------------------------------------------------------------------------
# Through `g2250-cds serve`: several workers, several replicas
# --------------------------------------------------------------------------------------------------------------


def _token(audience: str, *, jti: str | None = None, lifetime: int = 120) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "aud": audience, "exp": now + lifetime, "iat": now,
                       "jti": jti or str(uuid.uuid4())}, KEY, algorithm="ES384",
                      headers={"kid": "k1", "typ": "JWT"})


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def master(self) -> int:
        return self.process.pid

    def workers(self) -> set[int]:
        """The gunicorn worker pids: the master's children."""
        children: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.master:
                children.add(int(entry.name))
        return children

    def output(self) -> str:
        return self.log.read_text("utf-8", errors="replace")


def _serve(config: Path, *, workers: int, log: Path, cwd: Path, env: dict[str, str] | None = None) -> Replica:
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cds_service.cli", "serve", "--port", str(port), "--config", str(config),
             "--workers", str(workers)],
            stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})},
        )
    replica = Replica(process, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited: {replica.output()[-3000:]}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            if response.status == 200 and len(replica.workers()) == workers:
                return replica
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    _stop(replica)
    pytest.fail(f"serve did not become ready: {replica.output()[-3000:]}")


def _stop(replica: Replica) -> None:
    stop_process_group(replica.process, grace=30)


def _socket_owner(client_port: int, server_port: int, candidates: set[int], timeout: float = 5.0) -> int | None:
    """The pid among ``candidates`` holding the server side of the TCP connection from ``client_port``.

    Linux: /proc/net/tcp maps the connection (local = server port, remote = client port) to a socket inode; the
    worker that accepted it has that inode among its file descriptors.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inode = None
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if local_port == server_port and remote_port == client_port and fields[9] != "0":
                    inode = fields[9]
        if inode is not None:
            link = f"socket:[{inode}]"
            for pid in candidates:
                try:
                    fds = list(Path(f"/proc/{pid}/fd").iterdir())
                except OSError:
                    continue
                for fd in fds:
                    try:
                        if os.readlink(fd) == link:
                            return pid
                    except OSError:
                        continue
        time.sleep(0.01)
    return None


def _call(replica: Replica, token: str, workers: set[int]) -> tuple[int, int | None]:
    """POST the hook on a new TCP connection; (status, pid of the worker that accepted the connection)."""
    conn = http.client.HTTPConnection("127.0.0.1", replica.port, timeout=30)
    try:
        conn.connect()
        # Accepted before a byte is sent (gthread accepts as soon as the connection is established), so the owner
        # is known before any answer could close the connection.
        owner = _socket_owner(conn.sock.getsockname()[1], replica.port, workers)
        conn.request("POST", SERVICE, body=json.dumps(DISCHARGE),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                              "Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status, owner
    finally:
        conn.close()


def _procfs_or_skip() -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc to tell the workers apart")


def _config(tmp_path: Path, audience: str, **extra: Any) -> Path:
    path = tmp_path / f"config-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "auth": {"required": True, "audience": audience,
                 "clients": [{"issuer": ISSUER, "jwks": {"keys": [JWK]}, "fhir_servers": []}]},
        "logging": {"level": "WARNING", "format": "json"},
        **extra,
    }), "utf-8")
    return path


def _assert_replays_refused_everywhere(replicas: list[Replica], audience: str) -> None:
    """One token accepted once; then replayed on new connections until every worker of every replica has refused
    it at least once (bounded attempts). Fresh tokens keep working on every worker."""
    workers = {replica.port: replica.workers() for replica in replicas}
    token = _token(audience + SERVICE.removeprefix("/cds-services"))
    status, first_worker = _call(replicas[0], token, workers[replicas[0].port])
    assert status == 200
    assert first_worker is not None
    refused_by: dict[int, set[int]] = {replica.port: set() for replica in replicas}
    rounds = 0
    while rounds < 150:  # typically 5-15 rounds until the kernel has handed a connection to every worker
        rounds += 1
        for replica in replicas:
            status, worker = _call(replica, token, workers[replica.port])
            assert status == 401, f"replay accepted by worker {worker} of replica on port {replica.port}"
            if worker is not None:
                refused_by[replica.port].add(worker)
        if all(refused_by[r.port] == workers[r.port] for r in replicas):
            break
    print(f"replays until every worker refused: {rounds} round(s); {refused_by}")
    other_workers = {w for port, pids in refused_by.items() for w in pids} - {first_worker}
    assert other_workers, "no replay reached a worker other than the one that accepted the token"
    for replica in replicas:
        # every worker of every replica was seen refusing the replay (the kernel spreads new connections)
        assert refused_by[replica.port] == workers[replica.port], refused_by
    # Not a blanket refusal: fresh tokens are accepted by whichever worker answers.
    for replica in replicas:
        for _ in range(3):
            assert _call(replica, _token(audience + SERVICE.removeprefix("/cds-services")),
                         workers[replica.port])[0] == 200


@pytest.fixture
def stopper() -> Iterator[Callable[[Replica], Replica]]:
    started: list[Replica] = []

    def track(replica: Replica) -> Replica:
        started.append(replica)
        return replica

    yield track
    for replica in started:
        _stop(replica)


@pytest.mark.integration
def test_serve_with_the_embedded_defaults_refuses_replays_on_every_worker(
        tmp_path: Path, stopper: Callable[[Replica], Replica]) -> None:
    # Only auth is configured: database_url is the embedded default (g2250-cds.db under $XDG_DATA_HOME/g2250-cds),
    # no redis_url — the setup of issue 11's measurement.
    _procfs_or_skip()
    audience = "https://cds.replay-test.example/cds-services"
    config = _config(tmp_path, audience)
    replica = stopper(_serve(config, workers=3, log=tmp_path / "serve.log", cwd=tmp_path,
                             env={"XDG_DATA_HOME": str(tmp_path)}))
    _assert_replays_refused_everywhere([replica], audience)
    assert (tmp_path / "g2250-cds" / "g2250-cds.db").exists()
    output = replica.output()  # the start-up line: listen address, auth, audience, replay store
    assert f"listening on http://127.0.0.1:{replica.port}/cds-services (3 workers)" in output
    assert "auth: required" in output
    assert f"audience (JWT aud, exactly as callers type the URL): {audience}" in output
    assert "jti replay cache: database (sqlite)" in output


@pytest.mark.integration
@pytest.mark.postgres
def test_serve_on_postgresql_refuses_replays_on_every_worker(
        tmp_path: Path, postgres_url: str, stopper: Callable[[Replica], Replica]) -> None:
    _procfs_or_skip()
    audience = "https://cds.replay-test.example/cds-services"
    config = _config(tmp_path, audience, database_url=postgres_url)
    replica = stopper(_serve(config, workers=3, log=tmp_path / "serve.log", cwd=tmp_path))
    _assert_replays_refused_everywhere([replica], audience)
    assert "jti replay cache: database (postgresql)" in replica.output()
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM auth_jti").scalar_one() >= 4
    finally:
        engine.dispose()


@pytest.mark.integration
def test_serve_on_redis_refuses_replays_on_every_worker(
        tmp_path: Path, stopper: Callable[[Replica], Replica]) -> None:
    _procfs_or_skip()
    _redis_or_skip()
    audience = "https://cds.replay-test.example/cds-services"
    config = _config(tmp_path, audience, redis_url=REDIS_TEST_URL,
                     database_url=f"sqlite:///{tmp_path / 'r.db'}")
    replica = stopper(_serve(config, workers=3, log=tmp_path / "serve.log", cwd=tmp_path))
    _assert_replays_refused_everywhere([replica], audience)
    assert "jti replay cache: redis" in replica.output()
    with sqlite3.connect(tmp_path / "r.db") as conn:  # Redis answered: the database holds no jti
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "auth_jti" not in tables or conn.execute("SELECT count(*) FROM auth_jti").fetchone() == (0,)


@pytest.mark.integration
@pytest.mark.postgres
def test_two_replicas_on_postgresql_refuse_replays_on_every_worker(
        tmp_path: Path, postgres_url: str, stopper: Callable[[Replica], Replica]) -> None:
    # Two gunicorn masters (two replicas behind one public URL), two workers each, one PostgreSQL, no Redis.
    _procfs_or_skip()
    audience = "https://cds.replay-test.example/cds-services"
    config = _config(tmp_path, audience, database_url=postgres_url)
    replicas = [stopper(_serve(config, workers=2, log=tmp_path / f"replica-{i}.log", cwd=tmp_path))
                for i in range(2)]
    _assert_replays_refused_everywhere(replicas, audience)
    # and the other way round: a token first used on the second replica is refused by the first
    token = _token(audience + SERVICE.removeprefix("/cds-services"))
    assert _call(replicas[1], token, replicas[1].workers())[0] == 200
    for _ in range(4):
        assert _call(replicas[0], token, replicas[0].workers())[0] == 401


# --------------------------------------------------------------------------------------------------------------
# The start-up line never shows a secret
# --------------------------------------------------------------------------------------------------------------


def test_startup_summary_shows_no_secret() -> None:
    config = config_from_mapping({
        "auth": {"required": True, "audience": ["http://localhost:8250/cds-services"],
                 "clients": [{"issuer": ISSUER, "jwks": {"keys": [JWK]}, "fhir_servers": ["http://localhost:8090/fhir"]}]},
        "database_url": "postgresql+psycopg://g2250:db-password-42@db.internal/g2250",
        "redis_url": "redis://:redis-password-42@redis.internal:6379/0",
        "server": {"cors_allowed_origins": ["http://localhost:8080"]},
    }, "test")
    text = "\n".join(startup_summary(config, "127.0.0.1", 8250))
    assert "password-42" not in text
    assert "jti replay cache: redis" in text
    assert "http://localhost:8250/cds-services" in text and "http://localhost:8080" in text
    assert "http://localhost:8090/fhir" in text
    assert JWK["x"] not in text  # key ids, never key material
