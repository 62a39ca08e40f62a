"""``g2250-cds population-audit``: source → engine → outputs (contract.md ``population-audit``, billing-rules.md §8).

The command line (``cli.py``) only parses arguments and maps exceptions to exit statuses; everything else is here,
so tests and the benchmark run the same path:

1. check the options (``--as-of``, ``--since``, ``--until``, ``--out``, the engine) — an :class:`AuditUsageError`
   (exit 2) before anything is read;
2. build the audit settings once in this process (the same ``AuditSettings.from_spec`` every worker runs), so a
   bad config or rules override is a usage error here, not a crash in a worker;
3. the source: ``--ndjson`` files (``sources.resolve_ndjson``) or a Bulk ``$export`` into ``OUT/export/``
   (``bulk.export_to_directory``) — a :class:`sources.SourceError` (exit 3) when it fails;
4. the engine (``local`` or ``spark``), then the outputs.

The export is not windowed by ``--since`` / ``--until``: those bound the *receipt* of the assessments judged,
while Bulk ``_since`` filters on when a resource was last *changed* — and the rules need the history before the
window (the last visit within 3 years, the 7 days before, the follow-up after).
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

from . import findings, keys
from .engine import EngineResult, SettingsSpec
from .sources import SourceError, resolve_ndjson

ENGINES = ("local", "spark")
EXPORT_DIR = "export"
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


class AuditUsageError(ValueError):
    """A bad option or configuration of the audit: one line naming it (exit status 2); nothing was read."""


@dataclass
class AuditOptions:
    """The command's options, as typed (validated by :func:`run_population_audit`)."""

    out: str
    ndjson: list[str] | None = None
    bulk_export: str | None = None
    group: str | None = None
    export_level: str | None = None  # system | patient | group (default: group with --group, else system)
    since: str | None = None
    until: str | None = None
    as_of: str | None = None
    config_path: str | None = None  # the file actually read ($G2250_CDS_CONFIG resolved), None: embedded defaults
    engine: str = "local"
    spark_master: str | None = None
    workers: int | None = None
    progress: bool = True


@dataclass
class AuditOutcome:
    result: EngineResult
    summary: dict[str, Any]
    files: dict[str, Path]
    out_dir: Path
    engine: str
    workers: int
    export_errors: list[str] = field(default_factory=list)


# -- options -------------------------------------------------------------------------------------------------------
def parse_as_of(value: str | None, *, now: datetime | None = None) -> str:
    """``--as-of``: an ISO 8601 date-time with a UTC offset (``Z`` for UTC); default the current time in UTC."""
    if value is None:
        return (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    text = value.strip()
    example = "write e.g. 2026-12-31T17:00:00-05:00 or 2026-12-31T22:00:00Z"
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise AuditUsageError(f"--as-of: not an ISO 8601 date-time: {value!r} — {example}") from None
    if _ISO_DATE.fullmatch(text) or moment.tzinfo is None or moment.utcoffset() is None:
        raise AuditUsageError(f"--as-of: needs a time and a UTC offset: {value!r} — {example}")
    if not 1900 <= moment.year <= 2999:
        raise AuditUsageError(f"--as-of: {value!r} is out of range — choose a moment in the years 1900–2999")
    return text


def parse_window_bound(value: str | None, option: str, zone: Any) -> datetime | None:
    """``--since`` / ``--until``: an ISO date (the start of that day in the practice time zone) or a date-time with
    a UTC offset."""
    if value is None:
        return None
    text = value.strip()
    example = "write 2026-10-01 (start of that day, practice time zone) or 2026-10-01T00:00:00-04:00"
    if _ISO_DATE.fullmatch(text):
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise AuditUsageError(f"{option}: {value!r} is not a real day — {example}") from None
        moment = datetime.combine(day, time(0), tzinfo=zone)
    else:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
        except ValueError:
            raise AuditUsageError(f"{option}: not an ISO 8601 date or date-time: {value!r} — {example}") from None
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise AuditUsageError(f"{option}: a date-time needs a UTC offset: {value!r} — {example}")
    if not 1900 <= moment.year <= 2999:
        raise AuditUsageError(f"{option}: {value!r} is out of range — choose a moment in the years 1900–2999")
    return moment


def _prepare_out(out: str) -> Path:
    if not out or not out.strip():
        raise AuditUsageError("--out: empty path — name the directory for the findings")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise AuditUsageError(f"--out {out}: exists and is not a directory — name a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise AuditUsageError(f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__}) — choose a "
                              "writable directory") from exc
    return path


def _check_options(options: AuditOptions) -> None:
    if (options.ndjson is None) == (options.bulk_export is None):
        raise AuditUsageError("give exactly one source: --ndjson DIR_OR_FILES or --bulk-export FHIR_BASE")
    if options.engine not in ENGINES:
        raise AuditUsageError(f"--engine: {options.engine!r} is not an engine — use local or spark")
    if options.spark_master is not None and options.engine != "spark":
        raise AuditUsageError("--spark-master: only with --engine spark")
    if options.group is not None:
        if options.bulk_export is None:
            raise AuditUsageError("--group: only with --bulk-export (the Group/ID to export)")
        if not _FHIR_ID.fullmatch(options.group):
            raise AuditUsageError(f"--group: not a FHIR id: {options.group!r} — 1-64 letters, digits, '-' or '.'")
    if options.export_level is not None:
        if options.bulk_export is None:
            raise AuditUsageError("--export-level: only with --bulk-export")
        if options.export_level not in ("system", "patient", "group"):
            raise AuditUsageError(f"--export-level: {options.export_level!r} — use system, patient or group")
        if (options.export_level == "group") != (options.group is not None):
            raise AuditUsageError("--export-level group goes with --group ID (and --group with level group)")
    if options.bulk_export is not None and not options.bulk_export.startswith(("http://", "https://")):
        raise AuditUsageError(f"--bulk-export: not an http(s) URL: {options.bulk_export!r} — give the FHIR base URL")
    if options.workers is not None and not 1 <= options.workers <= 256:
        raise AuditUsageError(f"--workers: must be a whole number from 1 to 256, got {options.workers}")


# -- source --------------------------------------------------------------------------------------------------------
def _bulk_auth(config: Any, base_url: str) -> Any:
    """SMART Backend Services from ``audit.bulk``, or None when no client is configured (a test server)."""
    settings = config.audit["bulk"]
    if not settings.get("client_id"):
        return None
    if not settings.get("private_key_file"):
        raise AuditUsageError(f"{config.source}: audit.bulk.private_key_file: required with audit.bulk.client_id "
                              "— the PEM file of the client's private key")
    relative_to = Path(config.source).parent if config.source and Path(config.source).is_file() else None
    key = Path(settings["private_key_file"])
    if not key.is_absolute() and relative_to is not None:
        key = relative_to / key
    if not key.is_file():
        raise AuditUsageError(f"{config.source}: audit.bulk.private_key_file: no such file {key}")
    from .smart import SmartAuthError, SmartBackendAuth

    mapped = {"client_id": settings["client_id"], "private_key": str(key), "alg": settings.get("algorithm"),
              "kid": settings.get("kid"), "token_url": settings.get("token_url"), "scope": settings.get("scope")}
    try:
        return SmartBackendAuth.from_config(base_url, mapped)
    except SmartAuthError as exc:
        raise AuditUsageError(f"{config.source}: audit.bulk: {exc}") from exc


def export_source(options: AuditOptions, config: Any, out_dir: Path) -> tuple[list[str], list[str]]:
    """``--bulk-export``: run the export into ``OUT/export/`` and return its NDJSON files and the server's error
    messages (from the manifest's ``error`` files)."""
    settings = config.audit["bulk"]
    if settings.get("verify_tls") is False:
        raise AuditUsageError(f"{config.source}: audit.bulk.verify_tls: false is not supported — trust a private CA "
                              "with REQUESTS_CA_BUNDLE instead")
    base = options.bulk_export or ""
    auth = _bulk_auth(config, base)
    from . import bulk

    level = options.export_level or ("group" if options.group else "system")
    types = settings.get("types")

    def say(message: str) -> None:
        if options.progress and sys.stderr.isatty():
            print(f"bulk export: {message}", file=sys.stderr, flush=True)

    from .smart import SmartAuthError

    try:
        exported = bulk.export_to_directory(
            base, out_dir / EXPORT_DIR, level=level, group_id=options.group,  # type: ignore[arg-type]
            types=tuple(types) if types else tuple(sorted(keys.AUDIT_TYPES)),
            auth=auth, poll_max_seconds=float(settings.get("poll_max_seconds") or 3600.0), on_progress=say)
    except bulk.BulkExportError as exc:
        raise SourceError(f"--bulk-export {base}: {exc}") from exc
    except SmartAuthError as exc:
        raise SourceError(f"--bulk-export {base}: authentication failed: {exc}") from exc
    return [str(p) for p in exported.files], list(exported.errors)


# -- run -----------------------------------------------------------------------------------------------------------
def _settings(spec: SettingsSpec) -> Any:
    """``AuditSettings.from_spec`` here, once, so a config or rules problem is reported before any worker starts."""
    from cds_service.config import ConfigError
    from cds_service.rules.rules_data import RulesDataError

    from .patient import AuditSettings, AuditSettingsError

    try:
        return AuditSettings.from_spec(spec)
    except AuditSettingsError as exc:
        raise AuditUsageError(str(exc)) from exc
    except ConfigError as exc:
        raise AuditUsageError("\n".join(exc.lines())) from exc
    except RulesDataError as exc:
        raise AuditUsageError(f"rules: {exc}") from exc


def require_spark() -> None:
    """The ``spark`` engine needs the optional extra; say how to get it (exit 2) before anything is read."""
    import importlib.util

    if importlib.util.find_spec("pyspark") is None:
        raise AuditUsageError("--engine spark: pyspark is not installed — pip install 'g2250-cds[spark]' (or use "
                              "--engine local)")


def run_engine(name: str, files: list[str], *, spec: SettingsSpec, workers: int, progress: bool, out_dir: Path,
               spark_master: str | None = None) -> EngineResult:
    """The chosen engine over ``files``; ``spark`` is imported only when asked for."""
    if name == "spark":
        require_spark()
        from .spark import run_spark

        return run_spark(files, spec=spec, workers=workers, progress=progress, master=spark_master)
    from .local import run_local

    return run_local(files, spec=spec, workers=workers, progress=progress, work_dir=out_dir)


def run_population_audit(options: AuditOptions, config: Any) -> AuditOutcome:
    """The whole command for a loaded :class:`cds_service.config.Config`. Raises :class:`AuditUsageError` (exit 2)
    or :class:`SourceError` (exit 3)."""
    from cds_service.rules.calendar import BusinessCalendar

    _check_options(options)
    if options.engine == "spark":
        require_spark()
    as_of = parse_as_of(options.as_of)
    zone = BusinessCalendar.from_config(config.calendar).tz
    since = parse_window_bound(options.since, "--since", zone)
    until = parse_window_bound(options.until, "--until", zone)
    if since is not None and until is not None and since >= until:
        raise AuditUsageError(f"--since {options.since} is not before --until {options.until} — the window is empty")
    workers = options.workers or config.audit.get("workers") or os.cpu_count() or 1
    out_dir = _prepare_out(options.out)
    spec = SettingsSpec(config_path=options.config_path, as_of=as_of,
                        since=since.isoformat() if since else None, until=until.isoformat() if until else None)
    settings = _settings(spec)
    export_errors: list[str] = []
    if options.ndjson is not None:
        files = resolve_ndjson(options.ndjson)
    else:
        files, export_errors = export_source(options, config, out_dir)
    result = run_engine(options.engine, files, spec=spec, workers=workers, progress=options.progress,
                        out_dir=out_dir, spark_master=options.spark_master)
    from . import outputs
    from .summary import rates_source

    written, summary = outputs.write_outputs(
        out_dir, result, as_of=as_of, since=spec.since, until=spec.until, engine=options.engine,
        rates_source=rates_source(getattr(settings.rules, "rates", ()) or ()))
    return AuditOutcome(result=result, summary=summary, files=written, out_dir=out_dir, engine=options.engine,
                        workers=workers, export_errors=export_errors)


def outcome_lines(outcome: AuditOutcome) -> list[str]:
    """The short result printed at the end: counts (and money) per class, input, skipped lines, where the files
    are. Counts only — never a patient."""
    result = outcome.result
    counts: Counter[str] = Counter(str(row.get("class")) for row in result.rows)
    money: dict[str, float] = {}
    for row in result.rows:
        amount = row.get("estimated_amount")
        if isinstance(amount, int | float) and not isinstance(amount, bool):
            money[str(row.get("class"))] = money.get(str(row.get("class")), 0.0) + float(amount)
    seconds = result.timings.get("total")
    lines = [f"population-audit: {len(result.rows)} findings from {result.input.get('patients', 0)} patients "
             f"({result.input.get('candidates', 0)} with a candidate submission or charge), "
             f"{result.input.get('lines', 0)} lines in {result.input.get('files', 0)} files; engine "
             f"{outcome.engine}, {outcome.workers} workers" + (f", {seconds:.1f} s" if seconds is not None else "")]
    for cls in findings.CLASSES:
        extra = f" (${money[cls]:,.2f})" if cls in money and cls != "pending" else ""
        lines.append(f"  {cls}: {counts.get(cls, 0)}{extra}")
    skipped = sum(int(s.get("count", 0)) for s in result.skipped)
    if skipped:
        reasons: Counter[str] = Counter()
        for s in result.skipped:
            reasons[str(s.get("reason", "")).split(":", 1)[0]] += int(s.get("count", 0))
        lines.append(f"  skipped: {skipped} ({', '.join(f'{r} {n}' for r, n in sorted(reasons.items()))}) — per "
                     "file in summary.json")
    for message in outcome.export_errors[:5]:
        lines.append(f"  export error file: {message}")
    lines.append(f"  files: {', '.join(str(p) for p in outcome.files.values())}")
    return lines
