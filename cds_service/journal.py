"""The determination journal: an append-only file on local disk, written before a hook call is answered.

Why: the determination log is the record a compliance officer shows an auditor, so "a determination answered is
a determination recorded" must hold when the worker dies right after answering (``kill -9``) and when the
database is slow or down. A hook call therefore appends its determination rows here *before* its response is
written; the determination log's writer thread (``store.DeterminationLog``) copies them into the database later,
idempotently (a unique row key, insert-or-ignore), and marks the journal position done. Nothing is kept only in
memory.

Layout (one directory per database, ``<journal.dir>/<database id>/``, so two services with different databases
can never replay into each other's):

- ``det-<created ns>-<pid>-<token>-<n>.jnl`` — a *segment*, owned by one process, which holds an exclusive
  ``flock`` on it for as long as it may write or drain it. The kernel drops the lock when the process dies
  (``kill -9`` included), so "can I lock it?" is exactly "is its owner dead?". A surviving or restarted worker
  adopts such a segment (taking the lock), replays it into the database and deletes it. Names sort by creation
  time, so replay follows the order rows were written in.
- ``<segment>.pos`` — a hint: the byte offset up to which the segment is in the database. Rewritten in place
  after each committed batch, never fsynced: a stale hint only makes a replay re-insert rows the database then
  ignores (the row key is unique), so the hint saves work and is never needed for correctness.

Record format: one line per hook call, ``<crc32 as 8 hex digits> <compact JSON>\\n``. The first line of a segment
is a header (``{"journal": 1, ...}``). A line without its newline, or whose CRC does not match, at the end of an
adopted segment is a write torn by a crash: that call was never answered (the append completes before the
answer), so it is skipped and counted. Inside a segment it would be corruption: skipped, counted, logged.

Durability (``journal.fsync``):

- ``interval`` (default): the record is ``write``-n before the hook call is answered — from then on it is in the
  kernel and survives any death of the process (``kill -9``, an OOM kill, a gunicorn timeout) — and a background
  thread ``fdatasync``-s every ``fsync_interval_seconds`` (0.05 s). Only a power loss or a kernel crash within
  that interval can lose answered determinations. Cost on the hook path: about 2 µs (plus ~15 µs to serialize).
- ``always``: ``fdatasync`` before every answer, with *group sync* (concurrent calls share one ``fdatasync``), so
  an answer survives a power loss too. Measured on this 2-core machine's ext4 disk: 0.2-0.4 ms per call when the
  disk is quiet, 1.5-4 ms when other work writes to it — on a 3 ms hook call, more than the whole latency budget
  over a bare Flask echo. For a site that must survive power loss and can pay for it (or has a battery-backed
  disk cache, where ``fdatasync`` is cheap).

Bound (``journal.max_bytes``, the bytes pending in the directory, all workers together): an append that would go
past it is refused with :class:`JournalFull`, and the hook call answers 503 with ``Retry-After`` (as when the
journal cannot be written at all). A compliance officer wants no answer the auditor cannot see; an EHR treats
503 as "no advice now". ``/readyz`` reports ``failed`` from 90 % of the bound, before calls are refused, so a load
balancer moves traffic to a healthy replica first. Hook calls that yield no determination are still answered.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .jsonbytes import orjson_reads_exactly

log = logging.getLogger("g2250_cds")

SUFFIX = ".jnl"
POS_SUFFIX = ".pos"
_POS_WIDTH = 20
_READ_CHUNK = 1 << 20  # bytes read per batch from a segment (page cache, normally)
READY_FRACTION = 0.9  # of max_bytes pending: /readyz reports failed from here on


class JournalError(Exception):
    """The journal cannot take this record (disk full, I/O error, unwritable directory)."""


class JournalFull(JournalError):
    """Taking this record would put the journal past ``journal.max_bytes``."""


def database_id(database_url: str) -> str:
    """A stable id for the database a journal belongs to: 16 hex digits of the URL without its password (an SQLite
    path made absolute, so the same file is the same database whatever the working directory)."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        url = url.set(database=str(Path(url.database).resolve()))
    text = url.render_as_string(hide_password=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def default_journal_base(database_url: str) -> Path:
    """Beside an SQLite file (the data dir the operator already backs up), else in the working directory — the
    place the default SQLite file lives. Never under /tmp: the journal must outlive a reboot."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).resolve().parent / "g2250-cds-journal"
    return Path.cwd() / "g2250-cds-journal"


def journal_directory(database_url: str, configured: str | None) -> Path:
    base = Path(configured) if configured else default_journal_base(database_url)
    return base / database_id(database_url)


def encode(payload: dict[str, Any]) -> bytes:
    try:
        # The same compact UTF-8 JSON as the stdlib's below, several times faster (one record per hook call).
        # orjson refuses what it cannot write exactly (an integer beyond 64 bits, a non-string key, a lone
        # surrogate): the stdlib then writes it, or raises as before.
        body = orjson.dumps(payload)
    except TypeError:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(body), body)


@dataclass
class Segment:
    """One journal file this process owns or has adopted (it holds the file's ``flock`` either way)."""

    path: Path
    fd: int
    pos_fd: int
    inode: int
    end: int  # bytes of complete records (own: appended under the lock; adopted: the file size)
    done: int  # bytes whose records are in the database
    rows_pending: int
    adopted: bool = False
    sealed: bool = False  # no longer appended to (adopted segments always are)
    # With ``Journal.lines_only``: the row count of each record appended by this process, by the offset where its
    # line ends; the writer takes it from here instead of reading the record (taken out as the record is read).
    row_counts: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Batch:
    """Records read from one segment, ``[start, end)``; committed with :meth:`Journal.commit` once stored."""

    segment: Segment
    start: int
    end: int
    records: list[dict[str, Any]] = field(default_factory=list)  # read records (see ``Journal.lines_only``)
    # Every record's line as journaled, its checksum verified, in order: what the writer process is sent
    # (logwriter.py), so that the worker neither reads its own records again nor serialises them.
    lines: list[bytes] = field(default_factory=list)
    rows: int = 0
    torn: int = 0
    corrupt: int = 0


class Journal:
    """Append-only journal of one process, plus the segments it adopted from dead processes. Thread-safe."""

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = 64 << 20,
                 segment_bytes: int = 4 << 20, fsync: str = "interval", fsync_interval_seconds: float = 0.05,
                 header: dict[str, Any] | None = None) -> None:
        if fsync not in ("always", "interval"):
            raise ValueError("journal fsync must be 'always' or 'interval'")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.segment_bytes = int(segment_bytes)
        self.fsync = fsync
        self.fsync_interval = float(fsync_interval_seconds)
        self.header = dict(header or {})
        # 64 random bits naming this process's journal; with a per-record counter, a row key unique across
        # processes, replicas and restarts.
        self.token = secrets.token_hex(8)
        self._lock = threading.Lock()  # appends, the segment lists, the counters
        self._sync_lock = threading.Lock()
        self._segments: list[Segment] = []  # own, oldest first; the last one is current unless sealed
        self._adopted: list[Segment] = []
        self._written = 0  # appends written (monotonic), for group sync
        self._synced = 0  # appends known to be on disk
        self._unsynced: list[Segment] = []  # sealed segments whose tail may not be on disk yet
        self._files = 0
        self._directory_dirty = False
        self.pending_bytes = 0  # own and adopted bytes not yet in the database
        self.others_pending_bytes = 0  # segments of other live processes, from the last scan
        self.others_segments = 0
        self.orphans_seen = 0
        self.rows_appended = 0
        self.rows_committed = 0
        self.torn = 0
        self.corrupt = 0
        self.closed = False
        # Set by a reader that needs only the lines (the writer process reads them itself): records appended from
        # then on are not read again in this process (``Segment.row_counts``); ``Batch.records`` then holds only
        # the records of other lines (segment headers excepted: adopted segments, appends before it was set).
        self.lines_only = False
        self._sync_thread: threading.Thread | None = None
        self._stop_sync = threading.Event()
        if self.fsync == "interval":
            self._sync_thread = threading.Thread(target=self._sync_loop, name="journal-sync", daemon=True)
            self._sync_thread.start()

    # -- the request path --------------------------------------------------------------------------------------
    def append(self, line: bytes, rows: int) -> None:
        """Write one encoded record (:func:`encode`) and, with ``fsync: always``, wait until it is on disk.

        Raises :class:`JournalFull` past ``max_bytes`` and :class:`JournalError` when the write fails; either way
        nothing of the record is left in the file."""
        size = len(line)
        with self._lock:
            if self.closed:
                raise JournalError("the journal is closed")
            if self.pending_bytes + self.others_pending_bytes + size > self.max_bytes:
                raise JournalFull(f"journal holds {self.pending_bytes + self.others_pending_bytes} bytes pending "
                                  f"(bound {self.max_bytes})")
            segment = self._current_segment()
            try:
                written = 0
                while written < size:  # a regular file takes it all unless the disk is full; loop anyway
                    written += os.write(segment.fd, line[written:])
            except OSError as exc:
                self._undo_partial(segment)
                raise JournalError(f"journal write failed ({type(exc).__name__}: {exc.strerror})") from exc
            segment.end += size
            segment.rows_pending += rows
            if self.lines_only:
                segment.row_counts[segment.end] = rows
            self.pending_bytes += size
            self.rows_appended += rows
            self._written += 1
            ticket = self._written
        if self.fsync == "always":
            self._sync_until(ticket)

    def _undo_partial(self, segment: Segment) -> None:
        """Cut a partly written record off (under the lock), so the next append starts on a line boundary."""
        try:
            os.ftruncate(segment.fd, segment.end)
        except OSError:
            segment.sealed = True  # cannot even truncate: never append to this file again
            self._unsynced.append(segment)

    def _current_segment(self) -> Segment:
        if self._segments and not self._segments[-1].sealed:
            current = self._segments[-1]
            if current.end < self.segment_bytes:
                return current
            current.sealed = True  # full: the writer drains and deletes it; appends go on in a new file
            self._unsynced.append(current)
        segment = self._open_new_segment()
        self._segments.append(segment)
        return segment

    def _open_new_segment(self) -> Segment:
        for attempt in range(2):
            try:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._files += 1
                name = f"det-{time.time_ns():020d}-{os.getpid()}-{self.token}-{self._files:04d}{SUFFIX}"
                path = self.directory / name
                # Created under a name no scanner takes over (".new"), locked, then renamed: another process's
                # take-over of dead owners' segments can never lock a live segment in the instant between its
                # creation and its owner's lock.
                staging = self.directory / (name + ".new")
                fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
                break
            except FileNotFoundError:
                if attempt:  # the empty directory was removed by a closing process between mkdir and open
                    raise JournalError("cannot create a journal segment (directory vanished)") from None
            except OSError as exc:
                raise JournalError(f"cannot create a journal segment ({type(exc).__name__}: {exc.strerror})"
                                   ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held for the life of this process (or until deleted)
            os.rename(staging, path)
            pos_fd = os.open(str(path) + POS_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            header = encode({"journal": 1, "pid": os.getpid(), "created": time.time(), **self.header})
            os.write(fd, header)
            os.pwrite(pos_fd, b"%0*d\n" % (_POS_WIDTH, len(header)), 0)  # others see nothing pending yet
            if self.fsync == "always":
                os.fdatasync(fd)
                _fsync_directory(self.directory)  # the new file's name must survive a power loss too
            else:
                self._directory_dirty = True  # the sync thread makes the name durable with the data
        except OSError as exc:
            os.close(fd)
            _unlink(staging)
            _unlink(path)
            raise JournalError(f"cannot start a journal segment ({type(exc).__name__}: {exc.strerror})") from exc
        # The header is not pending work: the writer starts after it.
        return Segment(path=path, fd=fd, pos_fd=pos_fd, inode=os.fstat(fd).st_ino, end=len(header),
                       done=len(header), rows_pending=0)

    def _sync_until(self, ticket: int) -> None:
        """Group sync: one ``fdatasync`` covers every append written before it started."""
        if self._synced >= ticket:
            return
        with self._sync_lock:
            if self._synced >= ticket:
                return  # another thread's fdatasync covered this append
            with self._lock:
                target = self._written
                fds = [s.fd for s in self._unsynced]
                self._unsynced = []
                if self._segments and not self._segments[-1].sealed:
                    fds.append(self._segments[-1].fd)
            try:
                for fd in fds:
                    os.fdatasync(fd)
            except OSError as exc:
                raise JournalError(f"journal fsync failed ({type(exc).__name__}: {exc.strerror})") from exc
            self._synced = target

    def _sync_loop(self) -> None:
        while not self._stop_sync.wait(self.fsync_interval):
            try:
                if self._directory_dirty:
                    self._directory_dirty = False
                    _fsync_directory(self.directory)
                if self._synced < self._written:
                    self._sync_until(self._written)
            except (JournalError, OSError) as exc:
                log.error(f"determination journal: {exc}", extra={"event": "journal-sync-failed"})

    # -- the writer's side -------------------------------------------------------------------------------------
    def read_batch(self, max_rows: int) -> Batch | None:
        """The next records not yet in the database, oldest segment first (adopted ones before our own), at most
        ``max_rows`` rows (a single larger record is returned whole). ``None`` when there is nothing to write."""
        with self._lock:
            segments = [(s, s.end) for s in self._adopted + self._segments]
        for segment, end in segments:
            if segment.done >= end:
                continue
            batch = self._parse(segment, end, max_rows)
            if batch.end > batch.start:
                return batch
        return None

    def _parse(self, segment: Segment, end: int, max_rows: int) -> Batch:
        batch = Batch(segment, segment.done, segment.done)
        offset = segment.done
        counts = segment.row_counts
        chunk = _READ_CHUNK
        while offset < end and batch.rows < max_rows:
            data = os.pread(segment.fd, min(chunk, end - offset), offset)
            if not data:
                break
            last_newline = data.rfind(b"\n")
            if last_newline < 0:
                if offset + len(data) >= end:
                    # A record without its newline at the end of an adopted file: a write torn by the crash, so
                    # a call never answered. (An own segment's end always follows a complete record.)
                    batch.torn += 1
                    offset = end
                    break
                chunk *= 2  # one record longer than the chunk: read more
                continue
            position = 0
            while position <= last_newline and batch.rows < max_rows:
                newline = data.index(b"\n", position)
                line = data[position:newline]
                position = newline + 1
                rows = counts.pop(offset + position, None) if counts else None
                if rows is not None:
                    # Appended by this process, and its row count known: checked (its checksum) but not read.
                    if _checksum_matches(line):
                        batch.lines.append(line)
                        batch.rows += rows
                    else:
                        batch.corrupt += 1
                    continue
                record = decode_line(line)
                if record is None:
                    batch.corrupt += 1
                elif "journal" not in record:  # not a segment header
                    batch.records.append(record)
                    batch.lines.append(line)
                    batch.rows += len(record.get("r") or ())
            offset += position
        batch.end = offset
        return batch

    def commit(self, batch: Batch) -> None:
        """Mark ``batch`` as stored in the database; a drained sealed or adopted segment is deleted."""
        segment = batch.segment
        with self._lock:
            if self.closed:  # a writer that outlived close(): leave the file to the replay (rows are ignored twice)
                return
            segment.done = batch.end
            self.pending_bytes -= batch.end - batch.start
            segment.rows_pending = max(0, segment.rows_pending - batch.rows)
            self.rows_committed += batch.rows
            self.torn += batch.torn
            self.corrupt += batch.corrupt
            drained = segment.done >= segment.end
            if drained:  # every line read: a corrupt line's rows (not counted in ``batch.rows``) are not pending
                segment.rows_pending = 0
            current = bool(self._segments) and self._segments[-1] is segment and not segment.sealed
            if drained and current and segment.end >= self.segment_bytes:
                segment.sealed = True  # full and drained: retire it now; the next append opens a new file
                current = False
            if drained and not current:
                self._retire(segment)
                return
        with contextlib.suppress(OSError):  # only a hint (see the module docstring)
            os.pwrite(segment.pos_fd, b"%0*d\n" % (_POS_WIDTH, segment.done), 0)

    def _retire(self, segment: Segment) -> None:
        """Delete a drained segment (under the lock). The data file goes first: a ``.pos`` left alone is
        harmless and swept by :meth:`scan`."""
        if segment in self._segments:
            self._segments.remove(segment)
        if segment in self._adopted:
            self._adopted.remove(segment)
        if segment in self._unsynced:
            self._unsynced.remove(segment)
        _unlink(segment.path)
        _unlink(Path(str(segment.path) + POS_SUFFIX))
        for fd in (segment.fd, segment.pos_fd):
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the data file releases its lock

    def scan(self) -> int:
        """Adopt the segments of dead processes (their lock is free) and count what live ones hold pending.
        Returns the number of segments adopted. Called by the writer at start and every few seconds."""
        if not self.directory.is_dir():
            return 0
        with self._lock:
            mine = {s.name for s in self._segments + self._adopted}
        adopted = 0
        others_bytes = 0
        others = 0
        names = sorted(entry.name for entry in os.scandir(self.directory))
        present = set(names)
        for name in names:
            path = self.directory / name
            if name.endswith(POS_SUFFIX):
                if name[: -len(POS_SUFFIX)] not in present:
                    _unlink(path)  # its segment was deleted after being drained
                continue
            if not name.endswith(SUFFIX) or name in mine:
                continue
            segment, pending = self._try_adopt(path)
            if segment is None:
                if pending is not None:
                    others += 1
                    others_bytes += pending
                continue
            adopted += 1
            with self._lock:
                self._adopted.append(segment)
                self._adopted.sort(key=lambda s: s.name)
                self.pending_bytes += segment.end - segment.done
        with self._lock:
            self.others_pending_bytes = others_bytes
            self.others_segments = others
            self.orphans_seen += adopted
        return adopted

    def _try_adopt(self, path: Path) -> tuple[Segment | None, int | None]:
        """``(segment, None)`` when ``path``'s owner is dead and we now hold it; ``(None, pending bytes)`` when a
        live process holds it; ``(None, None)`` when it vanished meanwhile."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                size = os.fstat(fd).st_size
                os.close(fd)
                return None, max(0, size - _read_hint(path, size, None))
            info = os.fstat(fd)
            try:
                if os.stat(path).st_ino != info.st_ino:
                    raise FileNotFoundError  # deleted (and the name reused) between our open and our lock
            except FileNotFoundError:
                os.close(fd)
                return None, None
            done = _read_hint(path, info.st_size, fd)
            data_rows = os.pread(fd, info.st_size - done, done).count(b"\n") if info.st_size > done else 0
            pos_fd = os.open(str(path) + POS_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            os.close(fd)
            return None, None
        # rows_pending counts records (lines) until parsed; good enough for the backlog gauge of a replay.
        return Segment(path=path, fd=fd, pos_fd=pos_fd, inode=info.st_ino, end=info.st_size, done=done,
                       rows_pending=data_rows, adopted=True, sealed=True), None

    # -- state -------------------------------------------------------------------------------------------------
    def is_current(self, segment: Segment) -> bool:
        """Is ``segment`` the one appends go to?"""
        with self._lock:
            return bool(self._segments) and self._segments[-1] is segment and not segment.sealed

    def pending_rows(self) -> int:
        with self._lock:
            return sum(s.rows_pending for s in self._segments + self._adopted)

    def adopted_segments(self) -> int:
        with self._lock:
            return len(self._adopted)

    def total_pending_bytes(self) -> int:
        with self._lock:
            return self.pending_bytes + self.others_pending_bytes

    def over_bound(self) -> bool:
        """Readiness fails at 90 % of the bound, before appends are refused, so a load balancer moves traffic to
        a healthy replica while this one can still answer."""
        return self.total_pending_bytes() >= READY_FRACTION * self.max_bytes

    def writable(self) -> bool:
        """Can a segment be created here? (Readiness; cheap: an ``access`` check, no file written.)"""
        directory = self.directory
        while not directory.exists() and directory.parent != directory:
            directory = directory.parent
        return os.access(directory, os.W_OK | os.X_OK)

    def close(self) -> None:
        """Release every segment. Drained ones are deleted; the rest stay for the next start to replay."""
        self._stop_sync.set()
        if self._sync_thread is not None:
            self._sync_thread.join(timeout=2)
        with self._lock:
            self.closed = True
            for segment in list(self._segments) + list(self._adopted):
                if segment.done >= segment.end:
                    self._retire(segment)
                    continue
                with contextlib.suppress(OSError):
                    os.fdatasync(segment.fd)
                for fd in (segment.fd, segment.pos_fd):
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._segments = []
            self._adopted = []
        with contextlib.suppress(OSError):  # nothing left: do not leave an empty per-database directory behind
            self.directory.rmdir()


def _checksum_matches(line: bytes) -> bool:
    """Whether a journal line is ``crc32 json`` with the checksum of its JSON (see :func:`encode`)."""
    try:
        return len(line) >= 10 and line[8:9] == b" " and int(line[:8], 16) == zlib.crc32(line[9:])
    except ValueError:
        return False


def decode_line(line: bytes) -> dict[str, Any] | None:
    """One journal line's record (a dict), or None when its checksum or its JSON is not right."""
    if not _checksum_matches(line):
        return None
    try:
        record = _loads(line[9:])
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _loads(body: bytes) -> Any:
    """A record's JSON. orjson reads it several times faster than the stdlib (the writer thread shares the
    worker's interpreter with the hook calls); the stdlib reads what orjson would read differently or refuses:
    an integer of 19 digits or more (orjson makes a float of one beyond 64 bits) and the NaN an older version
    wrote."""
    if orjson_reads_exactly(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


def _read_hint(path: Path, size: int, fd: int | None) -> int:
    """The ``.pos`` hint if it is plausible (within the file, just after a newline), else 0."""
    try:
        with open(str(path) + POS_SUFFIX, "rb") as handle:
            hint = int(handle.read(_POS_WIDTH + 1).strip() or b"0")
    except (OSError, ValueError):
        return 0
    if hint <= 0 or hint > size:
        return 0
    if fd is not None:
        try:
            if os.pread(fd, 1, hint - 1) != b"\n":
                return 0
        except OSError:
            return 0
    return hint


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

