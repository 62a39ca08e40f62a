"""The population audit's files in ``--out`` (contract.md ``population-audit``): ``findings.parquet``,
``findings.csv``, ``summary.json`` and ``report.html``.

Every file is written under a temporary name in the same directory and renamed into place, so a reader (or a
rerun after a crash) never sees half a file: either the previous complete output or the new one. The row schema
is ``findings.COLUMNS`` — Parquet keeps its types (lists stay lists), CSV joins list columns with ``"; "`` for
spreadsheet users.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import findings
from .engine import EngineResult

FINDINGS_PARQUET = "findings.parquet"
FINDINGS_CSV = "findings.csv"
SUMMARY_JSON = "summary.json"
REPORT_HTML = "report.html"
LIST_SEPARATOR = "; "


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` when the block ends without an error, removed
    otherwise."""
    target = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    os.chmod(temp, 0o644)  # mkstemp makes 0600; the findings are meant to be shared like report.html beside them
    try:
        yield Path(temp)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def arrow_schema() -> Any:
    """The Arrow schema of the findings, from ``findings.COLUMNS``."""
    import pyarrow as pa

    kinds = {"string": pa.string(), "double": pa.float64(), "bool": pa.bool_(), "list<string>": pa.list_(pa.string())}
    return pa.schema([pa.field(name, kinds[kind]) for name, kind, _ in findings.COLUMNS])


def _cell(name: str, value: Any) -> Any:
    if name in findings.LIST_COLUMNS:
        return [str(v) for v in value] if isinstance(value, list | tuple) else []
    return value


def write_parquet(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """``findings.parquet``: one row per finding, the columns and types of ``findings.COLUMNS``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema()
    columns = {name: [_cell(name, row.get(name)) for row in rows] for name in findings.COLUMN_NAMES}
    table = pa.table(columns, schema=schema)
    with atomic_path(path) as temp:
        pq.write_table(table, temp, compression="zstd")
    return Path(path)


def _csv_text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name in findings.LIST_COLUMNS:
        return LIST_SEPARATOR.join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return str(value)


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """``findings.csv``: the same rows, a header of ``findings.COLUMN_NAMES``, list columns joined with ``"; "``,
    empty for null."""
    with atomic_path(path) as temp, temp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(findings.COLUMN_NAMES)
        for row in rows:
            writer.writerow([_csv_text(name, row.get(name)) for name in findings.COLUMN_NAMES])
    return Path(path)


def minimal_summary(rows: Sequence[Mapping[str, Any]], result: EngineResult, **context: Any) -> dict[str, Any]:
    """The counts when ``summary.summarize`` is not available: rows and money per class, input, skipped lines,
    timings."""
    classes: dict[str, dict[str, Any]] = {c: {"count": 0, "amount": 0.0} for c in findings.CLASSES}
    for row in rows:
        entry = classes.setdefault(str(row.get("class")), {"count": 0, "amount": 0.0})
        entry["count"] += 1
        amount = row.get("estimated_amount")
        if isinstance(amount, int | float) and not isinstance(amount, bool) and math.isfinite(amount):
            entry["amount"] = round(entry["amount"] + float(amount), 2)
    reasons: Counter[str] = Counter()
    for item in result.skipped:
        reasons[item["reason"]] += int(item["count"])
    return {"run": {k: v for k, v in context.items() if k != "rates_source"}, "rows": len(rows), "classes": classes,
            "input": result.input,
            "skipped": {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items())),
                        "by_file": result.skipped},
            "timings": result.timings}


def build_summary(rows: Sequence[Mapping[str, Any]], result: EngineResult, **context: Any) -> dict[str, Any]:
    """``summary.summarize(rows, result, **context)`` (the full summary; ``context``: ``as_of``, ``since``,
    ``until``, ``engine``, ``rates_source``), or :func:`minimal_summary` while that module is not installed."""
    try:
        from .summary import summarize
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.summary":
            raise
        return minimal_summary(rows, result, **context)
    return summarize(rows, result, **context)


def write_json(path: str | os.PathLike[str], document: Any) -> Path:
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return Path(path)


def write_report_html(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]],
                      summary: Mapping[str, Any]) -> Path | None:
    """``report.html`` from ``report.write_report``; None (nothing written) while that module is not installed."""
    try:
        from .report import write_report
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.report":
            raise
        return None
    write_report(Path(path), list(rows), dict(summary))  # atomic itself (temporary name, then rename)
    return Path(path)


def write_outputs(out_dir: str | os.PathLike[str], result: EngineResult,
                  **context: Any) -> tuple[dict[str, Path], dict[str, Any]]:
    """Every output file of the audit of ``result`` in ``out_dir`` (``context`` as :func:`build_summary`): returns
    ``{file name: path}`` of the files written and the summary."""
    rows = result.rows
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = {
        FINDINGS_PARQUET: write_parquet(folder / FINDINGS_PARQUET, rows),
        FINDINGS_CSV: write_csv(folder / FINDINGS_CSV, rows),
    }
    summary = build_summary(rows, result, **context)
    written[SUMMARY_JSON] = write_json(folder / SUMMARY_JSON, summary)
    report = write_report_html(folder / REPORT_HTML, rows, summary)
    if report is not None:
        written[REPORT_HTML] = report
    return written, summary
