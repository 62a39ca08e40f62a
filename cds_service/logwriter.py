"""The determination log's database writes, in a process of their own (issue 13: the hook path's p99).

A gunicorn worker answers hook calls on its threads and, on one more thread, copies the journal's rows into the
database (``store.DeterminationLog``). That copy costs about 0.14 ms of CPU a row (building the rows, SQLAlchemy,
the worklist feed), done in batches of a few hundred rows: 20-65 ms holding the worker's GIL, in slices of the
interpreter's 5 ms switch interval. A hook call that arrived during a batch waited for those slices: measured
in process on a 56 KB record, a new patient per call, p50 2.6 ms either way, p99 7.8 ms with the writer thread,
4.9-5.4 ms with this child, 2.9 ms with no writes at all (the thread still reads the journal and hands each batch
over: 0.03 ms of the worker's CPU a row instead of 0.14).

So in a served worker (``journal.writer: auto`` under ``g2250-cds serve``, or ``process``) the writer thread keeps
the journal's bookkeeping — which rows are pending, which are committed, adoption of dead processes' segments —
and hands each batch's journal lines to a child process over a socket; the child builds the rows and runs the
transaction (rows and worklist feed, as before) and answers how many rows were new. The thread waits on the
socket without the GIL. Nothing about durability changes: the rows stay in the journal until the child has
committed them; a child that fails, hangs past ``timeout`` or dies is a failed write (counted, logged, retried with
back-off: the same path as a database outage) and is started again for the next try. The child is a fresh
interpreter (``python -m cds_service.logwriter``: never a fork of a threaded worker) and ends when its worker ends
or closes the socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from datetime import UTC, tzinfo
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

#: ``journal.writer: auto`` means a process inside a served worker (``server._service`` sets this before it builds
#: the app) and a thread everywhere else: tests, the CLI and embedded apps build many short-lived logs.
PROCESS_BY_DEFAULT = False


class WriterFailed(RuntimeError):
    """The child could not write a batch (``error_type``: the child's exception class, never its message)."""

    def __init__(self, error_type: str) -> None:
        super().__init__(f"determination writer process: {error_type}")
        self.error_type = error_type


def use_process(setting: str | None) -> bool:
    """Whether ``journal.writer`` (``auto``, ``process`` or ``thread``) asks for the writer process here."""
    return setting == "process" or (setting in (None, "auto") and PROCESS_BY_DEFAULT)


class WriterProcess:
    """A child process that writes journal records into ``database_url`` (see the module's docstring).

    ``insert(records)`` sends the records of one journal batch and returns how many rows were new; it raises
    :class:`WriterFailed` when the child reports an error, and ``TimeoutError`` / ``EOFError`` / ``OSError`` when it
    does not answer in ``timeout`` seconds or is gone (the child is then stopped and a new one started next time).
    Used by one thread at a time (the log's writer).

    The child is ``python -m cds_service.logwriter FD`` with one end of a socket pair: not ``multiprocessing``'s
    spawn, which runs the parent's ``__main__`` module again in the child (a script without a main guard would run
    twice), and never a fork of a threaded worker."""

    def __init__(self, database_url: str, *, rates: Any = None, tz: tzinfo = UTC, worklist: bool = True,
                 timeout: float = 60.0) -> None:
        self.database_url = database_url
        self.rates, self.tz, self.worklist = rates, tz, worklist
        self.timeout = timeout
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._alive() else None

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The child imports this package from where the parent did (a checkout, an editable install).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        # Its metrics stay its own: in the workers' multi-process directory a child's files would outlive it (no
        # worker marks it dead) and its gauges would count forever. The writer's metrics are the worker's.
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.pop("prometheus_multiproc_dir", None)
        try:
            process = subprocess.Popen([sys.executable, "-m", "cds_service.logwriter", str(theirs.fileno())],
                                       pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        self._process, self._conn = process, conn
        self.starts += 1
        conn.send((self.database_url, self.rates, self.tz, self.worklist))

    def insert(self, lines: list[bytes]) -> tuple[int, int]:
        """Write one journal batch: its records' lines as journaled (``Batch.lines``), sent as bytes — the child
        reads them. Pickling records decoded here instead took one C call of several milliseconds a batch (about
        4 ms for 110 calls' records) holding the worker's GIL: a hook call arriving then waited for it.

        Returns (rows new in the database, lines the child could not read: skipped, never retried)."""
        if self._conn is None or not self._alive():
            self.stop()  # a child that died between batches: its socket closed, its exit status collected
            self._start()
        conn = self._conn
        assert conn is not None
        try:
            conn.send_bytes(b"\n".join(lines))
            if not conn.poll(self.timeout):
                raise TimeoutError(f"no answer in {self.timeout:g} s")
            status, value = conn.recv()
        except BaseException:
            self.stop()  # a half-sent batch or a late answer must not be read as the next batch's
            raise
        if status != "ok":
            raise WriterFailed(str(value))
        new, unreadable = value
        return int(new), int(unreadable)

    def stop(self, timeout: float = 2.0) -> None:
        """End the child: close the socket (it exits at once when idle), then kill it if it lingers."""
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
        if process is not None:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def _serve(conn: Connection) -> None:
    """The child's loop: its settings first, then one batch of journal lines in, ``("ok", (new rows, unreadable
    lines))`` or ``("error", class name)`` out, until the socket closes."""
    from .store import FeedbackStore, rows_of

    database_url, rates, tz, worklist = conn.recv()
    feed = None
    if worklist:
        from .worklist.publish import HookFeed

        feed = HookFeed(rates=rates, tz=tz)
    store = FeedbackStore(database_url)
    try:
        while True:
            try:
                blob = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the worker closed the socket or is gone
            try:
                records, unreadable = _records(blob)
                answer: tuple[str, Any] = ("ok", (store.insert_determinations(rows_of(records), feed), unreadable))
            except Exception as exc:  # reported by class name only: a database message may quote row values
                answer = ("error", type(exc).__name__)
            try:
                conn.send(answer)
            except (EOFError, OSError):
                return
    finally:
        store.dispose()


def _records(blob: bytes) -> tuple[list[dict[str, Any]], int]:
    """The records of a batch's lines, and how many lines did not read (their checksum matched, so they are what
    was written: a record that can never be read, skipped and counted like a corrupt line rather than retried
    for ever)."""
    from .journal import decode_line

    records = []
    unreadable = 0
    for line in blob.split(b"\n") if blob else ():
        record = decode_line(line)
        if record is None or "journal" in record:
            unreadable += record is None
            continue
        records.append(record)
    return records, unreadable


def main(argv: list[str] | None = None) -> int:
    """``python -m cds_service.logwriter FD``: serve the socket ``FD`` (started by :class:`WriterProcess`)."""
    args = sys.argv[1:] if argv is None else argv
    # Ctrl-C in a terminal reaches the whole process group: the worker decides when its child ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve(Connection(int(args[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
