"""Structured, PHI-free logs.

Log records carry only what operations need (request id, route, service, hook, status, timings, FHIR call counts).
Call sites pass fields via ``extra``; the formatter writes only the fields on its allowlist, so a resource body or a
token handed to a logger by mistake still never reaches the output.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

ALLOWED_FIELDS = (
    "event", "request_id", "method", "route", "status", "duration_ms", "service", "hook", "cards",
    "fhir_requests", "waves", "prefetch_hits", "skipped_resources", "error_type", "reason", "key",
)

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in ALLOWED_FIELDS if hasattr(record, k)}


def _json_line(created: float, level: str, name: str, msg: str, fields: dict[str, Any]) -> str:
    """One log line: time, level, logger and message, then the allowlisted ``fields`` (already filtered)."""
    document: dict[str, Any] = {
        "ts": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": name,
        "msg": msg,
    }
    document.update(fields)
    try:
        # One JSON object per line, compact. orjson writes a request's line in a fifth of the stdlib's time
        # (every hook call writes one); it writes NaN as null, which is valid JSON where the stdlib's is not.
        return orjson.dumps(document, default=str).decode("utf-8")
    except TypeError:  # an integer beyond 64 bits, or a string orjson refuses: the stdlib writes it
        return json.dumps(document, default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        return _json_line(record.created, record.levelname, record.name, msg, _fields(record))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        return f"{record.levelname:7s} {record.name}: {msg} {extras}".rstrip()


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Configure the ``g2250_cds`` logger once (idempotent; tests and gunicorn workers call it again)."""
    logger = logging.getLogger("g2250_cds")
    logger.setLevel(level)
    # Our lines carry neither the caller's file and line nor thread and process names: skip collecting them on
    # every record (the logging HOWTO's "Optimization" section; a stack walk per request line otherwise).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    # logProcesses stays on: gunicorn's own error-log format uses %(process)d (a None there is a logging error).
    logging.logMultiprocessing = False
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    for handler in logger.handlers:
        if getattr(handler, "_g2250", False):
            handler.setFormatter(formatter)
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._g2250 = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    logger.propagate = False
    # urllib3 logs request URLs at DEBUG ("GET /fhir/Encounter?patient=..."): patient ids. Keep it quiet even
    # when an operator turns the root logger up.
    for noisy in ("urllib3", "requests"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def request_line(logger: logging.Logger, fields: dict[str, Any]) -> None:
    """A request's log line: what ``logger.info("request", extra=fields)`` writes, written straight to the stream
    when the logger is as :func:`configure_logging` left it — our one JSON handler, no filters, not propagating,
    INFO enabled — without building a ``LogRecord`` and passing it through the logging machinery (about a third of
    the line's cost; every hook call writes one, issue 13). Any other set-up (another handler, a test capturing
    records, text format) gets the record as before."""
    handlers = logger.handlers
    handler = handlers[0] if len(handlers) == 1 else None
    if (handler is None or not getattr(handler, "_g2250", False) or type(handler.formatter) is not JsonFormatter
            or logger.filters or handler.filters or logger.propagate or logger.disabled
            or handler.level > logging.INFO
            or not logger.isEnabledFor(logging.INFO)):
        logger.info("request", extra=fields)
        return
    line = _json_line(time.time(), "INFO", logger.name, "request",
                      {key: fields[key] for key in ALLOWED_FIELDS if key in fields})
    stream = handler.stream  # type: ignore[attr-defined]
    handler.acquire()
    try:
        stream.write(line + handler.terminator)  # type: ignore[attr-defined]
        stream.flush()
    except Exception:  # as StreamHandler.emit: a broken stream is reported by logging, never raised
        handler.handleError(logging.makeLogRecord({"name": logger.name, "msg": "request", "levelno": logging.INFO,
                                                   "levelname": "INFO"}))
    finally:
        handler.release()
