"""JWT ``jti`` replay caches, shared by every worker process and every replica.

CDS Hooks 2.0 "Trusting CDS Clients", payload table: ``jti`` is "a nonce string value that uniquely identifies this
authentication JWT (used to protect against replay attacks)"; cds-hooks.md "Trusting CDS clients": "reject a replay
within the token lifetime". A token may be replayed to *any* gunicorn worker of *any* replica, so the memory of
used ``jti``s must live outside the process:

* :class:`RedisReplayCache` when ``redis_url`` is configured — ``SET key 1 NX EX ttl`` through a pooled client;
* :class:`DatabaseReplayCache` otherwise — a table in the configured ``database_url`` (SQLite file or PostgreSQL)
  with the hashed key as primary key and an expiry; one atomic ``INSERT … ON CONFLICT`` decides, expired rows
  are purged now and then. No extra infrastructure: the database is already there for feedback and the audit log;
* :class:`MemoryReplayCache` only for an in-memory SQLite database (tests, one process).

Keys are ``sha256(issuer|jti)``: the raw ``jti`` is never stored. Every store failure raises
:class:`ReplayStoreUnavailable`; the authenticator turns it into a refusal (fail closed → 401): a token whose
``jti`` cannot be recorded is never accepted.

Expiry: an entry lives for the token's remaining lifetime plus the clock skew. Tokens live at most
``MAX_TOKEN_LIFETIME_SECONDS`` (one hour) — so a store that forgets (a Redis without persistence restarting, a
database restored from an old backup) opens a replay window of at most that lifetime for tokens minted before.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import BigInteger, Column, MetaData, String, Table, create_engine, delete, event, insert, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from .store import create_racing

log = logging.getLogger("g2250_cds.auth")

#: Seconds between two purges of expired rows by one process (:class:`DatabaseReplayCache`).
PURGE_INTERVAL_SECONDS = 60.0
#: Connection timeouts (seconds) for the replay store: a request waits at most about this long before a 401.
STORE_TIMEOUT_SECONDS = 2.0


class ReplayStoreUnavailable(Exception):
    """The shared replay store could not be read or written. Callers must refuse the token (fail closed)."""


class ReplayCache(Protocol):
    """Remembers token ids for their remaining lifetime."""

    kind: str  # "memory", "database" or "redis": for the start-up line and /readyz, never a URL

    def add_if_new(self, key: str, ttl_seconds: float) -> bool:
        """Record ``key`` for ``ttl_seconds``; ``False`` when it is already recorded (a replay).

        Raises :class:`ReplayStoreUnavailable` when the store cannot answer.
        """
        ...


def hashed_key(key: str) -> str:
    """The stored form of ``issuer|jti``: 64 hex digits; the raw jti is never written anywhere."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# In process (tests with an in-memory SQLite database only)
# --------------------------------------------------------------------------------------------------------------


class MemoryReplayCache:
    """Per-process replay cache: thread-safe, entries expire, size bounded.

    Not shared between worker processes or replicas, so :func:`replay_cache_for` only picks it for an in-memory
    SQLite database (a test app in one process). When full, expired entries go first; if it is still full the
    entries closest to expiry are evicted (their tokens are about to expire anyway). Only verified tokens reach the
    cache, so filling it takes a valid key.
    """

    kind = "memory"

    def __init__(self, max_entries: int = 100_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        with self._lock:
            self._purge_expired(self._clock())
            return len(self._expiry)

    def _purge_expired(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expiry, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expiry:
                del self._expiry[key]

    def _evict_soonest(self) -> None:
        while self._heap:
            expiry, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expiry:
                del self._expiry[key]
                return

    def add_if_new(self, key: str, ttl_seconds: float) -> bool:
        now = self._clock()
        with self._lock:
            expiry = self._expiry.get(key)
            if expiry is not None and expiry > now:
                return False
            self._purge_expired(now)
            while len(self._expiry) >= self._max_entries:
                self._evict_soonest()
            new_expiry = now + max(float(ttl_seconds), 0.0)
            self._expiry[key] = new_expiry
            heapq.heappush(self._heap, (new_expiry, key))
            if len(self._heap) > 2 * self._max_entries:  # drop stale heap entries now and then
                self._heap = [(e, k) for e, k in self._heap if self._expiry.get(k) == e]
                heapq.heapify(self._heap)
            return True

    def ping(self) -> bool:
        return True


# --------------------------------------------------------------------------------------------------------------
# Redis (redis_url configured)
# --------------------------------------------------------------------------------------------------------------


def redis_client(url: str, *, timeout: float = 1.0, max_connections: int = 32) -> redis.Redis:
    """A pooled client: one connection pool per process, stale connections health-checked and retried once.

    A connection broken by a Redis restart fails its next command with ``ConnectionError`` before anything was
    executed; one retry on a fresh connection hides that. Timeouts are not retried: a ``SET NX`` that timed out
    may have been applied, and a retry would then wrongly see a replay.
    """
    retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    pool = redis.ConnectionPool.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                         health_check_interval=30, max_connections=max_connections, retry=retry)
    return redis.Redis(connection_pool=pool)


class RedisReplayCache:
    """Replay cache in Redis, shared by every worker and replica: ``SET <prefix><sha256(key)> 1 NX EX ceil(ttl)``.

    Redis errors fail closed (:class:`ReplayStoreUnavailable`). Redis keeps keys in memory: without persistence
    (``appendonly yes`` or RDB snapshots) a restart forgets every used ``jti`` — see the README, "Security".
    """

    kind = "redis"

    def __init__(self, client: redis.Redis, prefix: str = "g2250:jti:") -> None:
        self._client = client
        self._prefix = prefix

    def redis_key(self, key: str) -> str:
        return self._prefix + hashed_key(key)

    def add_if_new(self, key: str, ttl_seconds: float) -> bool:
        ttl = max(1, math.ceil(ttl_seconds))
        try:
            created = self._client.set(self.redis_key(key), b"1", nx=True, ex=ttl)
        except redis.RedisError as exc:
            log.warning("replay cache unavailable", extra={"event": "auth-replay-cache-error",
                                                           "error_type": type(exc).__name__})
            raise ReplayStoreUnavailable("redis") from None
        return bool(created)

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------------------------------------------
# The configured database (no redis_url): SQLite file or PostgreSQL
# --------------------------------------------------------------------------------------------------------------

replay_metadata = MetaData()

#: One row per (issuer, jti) seen, until the token has expired. ``key_hash`` = sha256("issuer|jti").
jti_table = Table(
    "auth_jti",
    replay_metadata,
    Column("key_hash", String(64), primary_key=True),  # the unique constraint that makes the insert atomic
    Column("expires_at", BigInteger, nullable=False, index=True),  # epoch milliseconds
)


def _normalise_database_url(url: str) -> str:
    # "postgresql://" means psycopg2 to SQLAlchemy; this project ships psycopg 3 (as cds_service.store does).
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def is_in_memory_sqlite(database_url: str) -> bool:
    """``sqlite://``, ``sqlite:///:memory:`` or a ``mode=memory`` URI: a database private to one process."""
    try:
        url = make_url(database_url)
    except Exception:  # not a URL SQLAlchemy knows; the store reports it
        return False
    if not url.drivername.startswith("sqlite"):
        return False
    database = url.database or ""
    return database in ("", ":memory:") or "mode=memory" in database or url.query.get("mode") == "memory"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers and the one writer do not block each other
    cursor.execute(f"PRAGMA busy_timeout={int(STORE_TIMEOUT_SECONDS * 1000) * 2}")
    cursor.close()


class DatabaseReplayCache:
    """Replay cache in the service's database: table ``auth_jti`` (``key_hash`` primary key, ``expires_at``).

    One statement decides, atomically, in every process of every replica::

        INSERT INTO auth_jti (key_hash, expires_at) VALUES (:k, :exp)
        ON CONFLICT (key_hash) DO UPDATE SET expires_at = excluded.expires_at
        WHERE auth_jti.expires_at <= :now
        RETURNING key_hash

    A row returned: the ``jti`` is new (or only an expired row had it). None: a live row exists — a replay.
    PostgreSQL and SQLite (≥ 3.35) both support this upsert; another dialect falls back to a plain ``INSERT``
    whose unique violation means a replay. Expired rows are deleted by whichever process purges first, at most once per
    ``purge_interval`` seconds per process. Time is wall-clock epoch milliseconds (shared by every host).
    """

    kind = "database"

    def __init__(self, database_url: str, *, clock: Callable[[], float] = time.time,
                 purge_interval: float = PURGE_INTERVAL_SECONDS, engine: Engine | None = None) -> None:
        url = _normalise_database_url(database_url)
        if engine is None:
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if url.startswith("sqlite"):
                kwargs["connect_args"] = {"check_same_thread": False, "timeout": STORE_TIMEOUT_SECONDS * 2}
            elif url.startswith("postgresql"):
                kwargs["connect_args"] = {"connect_timeout": max(1, int(STORE_TIMEOUT_SECONDS))}
                kwargs.update(pool_size=4, max_overflow=8, pool_timeout=STORE_TIMEOUT_SECONDS)
            engine = create_engine(url, **kwargs)
            if url.startswith("sqlite"):
                event.listen(engine, "connect", _sqlite_pragmas)
        self.engine = engine
        self._dialect = engine.dialect.name
        self._clock = clock
        self._purge_interval = float(purge_interval)
        self._last_purge = -math.inf
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._purge_lock = threading.Lock()

    # -- schema ----------------------------------------------------------------------------------------------
    def create_schema(self) -> None:
        """Create ``auth_jti`` if missing; several workers or replicas may race to do it, losing is fine."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            create_racing(self.engine, lambda: replay_metadata.create_all(self.engine))  # creates what is missing
            self._schema_ready = True

    # -- the check -------------------------------------------------------------------------------------------
    def _statement(self, key_hash: str, expires_at: int, now: int) -> Any:
        values = {"key_hash": key_hash, "expires_at": expires_at}
        if self._dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        elif self._dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            return None
        statement = dialect_insert(jti_table).values(**values)
        # RETURNING rather than rowcount: psycopg 3 reports no row count for this statement.
        return statement.on_conflict_do_update(
            index_elements=[jti_table.c.key_hash],
            set_={"expires_at": statement.excluded.expires_at},
            where=jti_table.c.expires_at <= now,
        ).returning(jti_table.c.key_hash)

    def add_if_new(self, key: str, ttl_seconds: float) -> bool:
        now = int(self._clock() * 1000)
        expires_at = now + max(1000, math.ceil(float(ttl_seconds) * 1000))
        key_hash = hashed_key(key)
        try:
            self.create_schema()
            statement = self._statement(key_hash, expires_at, now)
            with self.engine.begin() as conn:
                if statement is not None:
                    created = conn.execute(statement).first() is not None
                else:
                    created = self._insert_or_update(conn, key_hash, expires_at, now)
        except SQLAlchemyError as exc:
            log.warning("replay cache unavailable", extra={"event": "auth-replay-cache-error",
                                                           "error_type": type(exc).__name__})
            raise ReplayStoreUnavailable("database") from None
        self._maybe_purge(now)
        return created

    @staticmethod
    def _insert_or_update(conn: Any, key_hash: str, expires_at: int, now: int) -> bool:
        """Portable fallback: a savepointed INSERT; on a unique violation, take over the row only if expired."""
        try:
            with conn.begin_nested():
                conn.execute(insert(jti_table).values(key_hash=key_hash, expires_at=expires_at))
            return True
        except IntegrityError:
            taken = conn.execute(update(jti_table).where(jti_table.c.key_hash == key_hash,
                                                         jti_table.c.expires_at <= now)
                                 .values(expires_at=expires_at))
            return taken.rowcount == 1

    # -- housekeeping ----------------------------------------------------------------------------------------
    def _maybe_purge(self, now_ms: int) -> None:
        if now_ms / 1000 - self._last_purge < self._purge_interval:
            return
        if not self._purge_lock.acquire(blocking=False):
            return  # another thread of this process is purging
        try:
            self._last_purge = now_ms / 1000
            self.purge(now_ms)
        finally:
            self._purge_lock.release()

    def purge(self, now_ms: int | None = None) -> int:
        """Delete the rows of expired tokens; returns how many. Failures are logged, never raised (the next
        purge tries again; a stale row is harmless: its token has expired)."""
        now_ms = int(self._clock() * 1000) if now_ms is None else now_ms
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(delete(jti_table).where(jti_table.c.expires_at <= now_ms)).rowcount or 0)
        except SQLAlchemyError as exc:
            log.warning("replay cache purge failed", extra={"event": "auth-replay-cache-purge",
                                                            "error_type": type(exc).__name__})
            return 0

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except SQLAlchemyError:
            return False

    def close(self) -> None:
        self.engine.dispose()


# --------------------------------------------------------------------------------------------------------------
# Choice
# --------------------------------------------------------------------------------------------------------------


def replay_cache_for(redis_url: str | None, database_url: str | None = None) -> ReplayCache:
    """The replay cache every worker and replica of this configuration shares.

    Redis when ``redis_url`` is set; else the configured database; in-process memory only when there is no
    shared store to use (no ``database_url``, or an in-memory SQLite database — a test app in one process).
    """
    if redis_url:
        return RedisReplayCache(redis_client(redis_url))
    if database_url and not is_in_memory_sqlite(database_url):
        return DatabaseReplayCache(database_url)
    return MemoryReplayCache()
