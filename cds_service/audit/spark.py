"""The population audit as a Spark application (issue 14 "Engines", ``spark``): the same job as ``local``, with
the same rows and the same input / skipped counts, on ``local[N]`` or any cluster, reading NDJSON from any
Hadoop-compatible path (``file:``, ``hdfs:``, ``s3a:``…; gzip by name is transparent).

The plan, one way through:

1. ``spark.read.text`` every file; each line keeps its file (``_metadata.file_path``) for per-file counts.
2. Each line is classified by :func:`classify_line` — ``json.loads`` and ``keys.patient_of`` /
   ``keys.marks_candidate`` themselves, in a Python UDF. Spark's own JSON expressions were tried first and
   disagree with Python on lines that matter: ``try_parse_json`` / ``get_json_object`` accept trailing content
   (two resources glued on one line, ``{...} x``) that ``json.loads`` rejects, and reject ``NaN`` and lone
   surrogates it accepts — so the count of skipped lines and the set of candidates would differ from ``local``.
   Correctness first: one parse per line, in the worker, with the very functions every engine shares.
3. The classified lines are persisted (memory, spilling to disk); only the text of patient-scoped and shared
   lines is kept. Counts per file / reason / type are one small aggregate.
4. Shared resources (``keys.SHARED_TYPES``: practitioners, roles, organizations…) are collected and broadcast as
   JSON text; each Python worker builds ``AuditSettings`` and the shared record once (cached per process).
5. Only the lines of candidate patients (a patient with any line for which ``marks_candidate`` holds) are
   shuffled, grouped by patient, and given to ``patient.audit_patient`` — non-candidates are never parsed again.
6. Rows (few: one per assessment) are collected to the driver and sorted by (patient, assessment_id).

Networking: a ``local[...]`` master binds the driver to loopback (``SPARK_LOCAL_IP``, ``spark.driver.host``,
``spark.driver.bindAddress`` = 127.0.0.1) with the UI off — a local run needs no network at all. Python workers run
the driver's interpreter (``spark.pyspark.python``). On a cluster master, or attached to the session of a
``spark-submit``, the cluster's own settings are used.

``python -m cds_service.audit.spark --ndjson ... --out ...`` (or ``spark-submit`` of this module) is the
``population-audit`` command with ``--engine spark``, attached to the submit's session.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from cds_service.audit import engine, keys

if TYPE_CHECKING:  # pyspark is an optional extra (g2250-cds[spark]); imported only when the engine runs
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
APP_NAME = "g2250-cds population-audit"

# sources.MAX_LINE_BYTES / SKIP_TOO_LONG: a line too long to be a resource is counted, never parsed (the same limit
# and words as the local engine; copied rather than imported so this module's workers need nothing else).
try:
    from cds_service.audit.sources import MAX_LINE_BYTES, SKIP_TOO_LONG
except ImportError:  # pragma: no cover - sources.py is part of the package; kept for partial checkouts
    MAX_LINE_BYTES = 32 * 1024 * 1024
    SKIP_TOO_LONG = "line-too-long"

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_BLANK = ""  # classify_line's reason for an empty / whitespace-only line: neither counted nor skipped

AuditFn = Callable[..., Any]      # (patient_id, raw, *, shared, settings) -> PatientAudit-like (.rows, .skipped)
SharedFn = Callable[[Iterable[dict[str, Any]]], Any]
SettingsFn = Callable[[engine.SettingsSpec], Any]


# -- classification (runs in the Python workers; pure, so tests call it directly) ----------------------------------
def classify_line(text: str | None) -> tuple[str | None, str | None, str | None, bool]:
    """``(skip_reason, resourceType, patient_id, marks_candidate)`` of one NDJSON line.

    ``skip_reason`` is None for a line that is a resource to count, ``""`` for a blank line (ignored, as a trailing
    newline is), else one of ``engine.SKIP_*`` / ``SKIP_TOO_LONG``. ``resourceType`` is set for every resource
    (``by_type`` counts them, a no-patient one included); ``patient_id`` for a resource of ``keys.PATIENT_PATHS``.
    The decisions are ``json.loads`` and ``keys`` themselves, so this engine and Python never disagree."""
    if text is None:  # the reader replaces an over-long line by null before it reaches Python
        return SKIP_TOO_LONG, None, None, False
    if text.startswith("\ufeff"):  # a byte-order mark at the start of a file is not part of the first resource
        text = text[1:]
    if not text.strip():
        return _BLANK, None, None, False
    try:
        resource = json.loads(text)
        if _SURROGATE_ESCAPE.search(text):
            # "\ud800" alone is JSON text but no Unicode string: the local engine's reader rejects it, and no
            # output (Parquet, CSV) could write it. A proper pair (an emoji written ASCII-only) encodes fine.
            json.dumps(resource, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return engine.SKIP_NOT_JSON, None, None, False
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return engine.SKIP_NOT_RESOURCE, None, None, False
    rtype = resource["resourceType"]
    if rtype not in keys.PATIENT_PATHS:
        return None, rtype, None, False
    patient = keys.patient_of(resource)
    if patient is None:
        return engine.SKIP_NO_PATIENT, rtype, None, False
    # The raw-text superset every engine applies to charges: a \\u escape could spell a remote code (local.py).
    candidate = keys.marks_candidate(resource) or (rtype in keys.CHARGE_TYPES and "\\u" in text)
    return None, rtype, patient, candidate


def file_label(path: str) -> str:
    """The basename reported for a file (``skipped[].file``): ``file:///x/a%20b.ndjson`` → ``a b.ndjson``, the same
    name the local engine reports for the same file."""
    return unquote(posixpath.basename(urlparse(path).path.rstrip("/")))


# -- per-patient evaluation (runs in the Python workers) -----------------------------------------------------------
_WORKER_STATE: dict[Any, tuple[Any, Any]] = {}


def _defaults(audit_fn: AuditFn | None, shared_fn: SharedFn | None,
              settings_fn: SettingsFn | None) -> tuple[AuditFn, SharedFn, SettingsFn]:
    # Imported here, in the worker: the engine works (and is tested with fakes) without the per-patient module.
    if audit_fn is None or shared_fn is None or settings_fn is None:
        from cds_service.audit import patient

        audit_fn = audit_fn or patient.audit_patient
        shared_fn = shared_fn or patient.build_shared
        settings_fn = settings_fn or patient.AuditSettings.from_spec
    return audit_fn, shared_fn, settings_fn


def _ref(resource: dict[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


UNATTRIBUTED = "-"  # skipped[].file of a skip no input file can be named for (local.py writes the same)


def _skip_pairs(items: Iterable[Any]) -> Iterator[tuple[str | None, str]]:
    """``(reference, reason)`` pairs from ``PatientAudit.skipped`` (already pairs) or ``SharedRecord.skipped``
    (``SkippedResource`` objects, worded by ``patient.skip_reason`` like every other invalid resource)."""
    for item in items or ():
        if isinstance(item, tuple | list) and len(item) >= 2:
            yield item[0], str(item[1])
            continue
        from cds_service.audit.patient import skip_reason

        yield getattr(item, "reference", None), skip_reason(item)


def _parse_lines(lines: Iterable[tuple[str, str]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Resources of (file, line) pairs already classified as resources, and the file each reference came from."""
    raw: list[dict[str, Any]] = []
    files_of: dict[str, str] = {}
    for file, line in lines:
        resource = json.loads(line.removeprefix("\ufeff"))
        raw.append(resource)
        files_of[_ref(resource)] = file
    return raw, files_of


def _attributed(skipped: Iterable[Any], files_of: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(file, reason) of each resource a per-patient or shared function skipped, by the reference it names."""
    for ref, reason in _skip_pairs(skipped):
        yield (files_of.get(ref, UNATTRIBUTED) if isinstance(ref, str) else UNATTRIBUTED), reason


def _evaluate_partition(groups: Iterable[tuple[str, Iterable[tuple[str, str]]]], *, run_id: str,
                        spec: engine.SettingsSpec, shared_lines: Any, audit_fn: AuditFn | None,
                        shared_fn: SharedFn | None, settings_fn: SettingsFn | None) -> Iterator[tuple[Any, ...]]:
    """One partition of (patient, [(file, line)]) → ("row", row) and ("skip", file, reason) items.

    Settings and the shared record are built once per Python worker process (workers are reused across tasks) and
    keyed by the run, so a second run in the same process never sees the first run's settings or shared record.
    A patient whose audit raises is counted (``audit-error: <exception type>``, as ``local`` does), not fatal."""
    audit, build_shared, make_settings = _defaults(audit_fn, shared_fn, settings_fn)
    state = _WORKER_STATE.get(run_id)
    if state is None:
        shared_raw, _ = _parse_lines(shared_lines.value)
        state = (make_settings(spec), build_shared(shared_raw))
        _WORKER_STATE.clear()
        _WORKER_STATE[run_id] = state
    settings, shared = state
    for patient_id, members in groups:
        raw, files_of = _parse_lines(sorted(members))  # a stable order whatever the shuffle delivered
        try:
            audited = audit(patient_id, raw, shared=shared, settings=settings)
        except Exception as exc:  # one odd record must not end a population run
            log.warning("population audit: a patient's record could not be judged (%s)", type(exc).__name__,
                        extra={"event": "audit-patient-error"})
            yield ("skip", UNATTRIBUTED, f"audit-error: {type(exc).__name__}")
            continue
        for row in audited.rows:
            yield ("row", dict(row))
        for file, reason in _attributed(getattr(audited, "skipped", ()), files_of):
            yield ("skip", file, reason)


# -- the session ---------------------------------------------------------------------------------------------------
def _is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[") or master.startswith("local-cluster[")


def spark_session(master: str | None = None, *, workers: int = 1, progress: bool = False) -> tuple[
        SparkSession, bool]:
    """``(session, created)``: the active session when there is one (``spark-submit``, a notebook, a test's
    fixture), else a new one on ``master`` — the submit's ``spark.master`` if set, else ``local[workers]``.

    A local master is bound to loopback with the UI off: a local run opens no port on any other interface."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        if master and active.sparkContext.master != master:
            log.warning("attached to the running Spark session; its master is kept (--spark-master ignored)")
        return active, False
    # The Python workers run the driver's interpreter (the venv with fhir.resources): the launcher reads the
    # environment, and the spark.pyspark.python property alone was not honoured when started from the CLI.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    conf = SparkConf()  # holds spark-submit's properties when the module was submitted
    chosen = master or conf.get("spark.master", None) or f"local[{max(1, workers)}]"
    builder = (SparkSession.builder.master(chosen).appName(APP_NAME)
               .config("spark.pyspark.python", sys.executable)
               .config("spark.pyspark.driver.python", sys.executable)
               .config("spark.ui.showConsoleProgress", "true" if progress and sys.stderr.isatty() else "false")
               # the shuffles are small (counts; the candidates' lines): a few partitions per core, not 200
               .config("spark.sql.shuffle.partitions", str(max(4, 2 * workers))))
    if _is_local(chosen):
        os.environ["SPARK_LOCAL_IP"] = LOOPBACK  # read by the JVM at launch (block manager, RPC)
        builder = (builder.config("spark.driver.host", LOOPBACK).config("spark.driver.bindAddress", LOOPBACK)
                   .config("spark.ui.enabled", "false"))
    session = builder.getOrCreate()
    return session, True


# -- inputs --------------------------------------------------------------------------------------------------------
def _input_files(session: SparkSession, paths: Sequence[str]) -> dict[str, int]:
    """Each input file and its bytes as stored (compressed size for gzip), through Hadoop's FileSystem so any
    Hadoop-compatible path works. A directory contributes its NDJSON files (``sources.is_ndjson_name``, not
    recursively), as ``--ndjson`` does locally; a missing path is a ``SourceError`` naming it (exit 3)."""
    from cds_service.audit.sources import SourceError, is_ndjson_name

    jvm = session.sparkContext._jvm
    hadoop_conf = session.sparkContext._jsc.hadoopConfiguration()
    sizes: dict[str, int] = {}
    for name in paths:
        path = jvm.org.apache.hadoop.fs.Path(name)
        fs = path.getFileSystem(hadoop_conf)
        if not fs.exists(path):
            raise SourceError(f"{name}: not found — check the path")
        status = fs.getFileStatus(path)
        if not status.isDirectory():
            sizes.setdefault(name, int(status.getLen()))
            continue
        members = sorted((str(s.getPath().toString()), int(s.getLen())) for s in fs.listStatus(path)
                         if s.isFile() and is_ndjson_name(s.getPath().getName()))
        if not members:
            raise SourceError(f"{name}: no NDJSON file in this directory")
        for member, size in members:
            sizes.setdefault(member, size)
    return sizes


def _classified(session: SparkSession, files: Sequence[str]) -> DataFrame:
    """One row per line: ``path, reason, rtype, patient, candidate, shared, value`` — ``value`` only where a later
    step reads it (patient-scoped and shared resources), so the persisted table stays small beside the input.

    What the JVM can say without Python it says: a line over ``MAX_LINE_BYTES`` is ``line-too-long``, a line that
    is not UTF-8 is ``not-json`` (Spark keeps a line's bytes as they are; the local engine's reader rejects them).
    Everything else is :func:`classify_line`."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    schema = T.StructType([
        T.StructField("reason", T.StringType()), T.StructField("rtype", T.StringType()),
        T.StructField("patient", T.StringType()), T.StructField("candidate", T.BooleanType()),
    ])
    classify = F.udf(classify_line, schema, useArrow=False)  # no pandas needed: plain pickled batches
    too_long = F.octet_length("value") > MAX_LINE_BYTES
    not_utf8 = ~F.is_valid_utf8("value")
    read = session.read.text(list(files)).select(
        F.col("_metadata.file_path").alias("path"), F.col("value"),
        F.when(too_long, F.lit(SKIP_TOO_LONG)).when(not_utf8, F.lit(engine.SKIP_NOT_JSON)).alias("jvm_reason"))
    judged = read.select("path", "value", "jvm_reason",
                         classify(F.when(F.col("jvm_reason").isNull(), F.col("value"))
                                  .otherwise(F.lit("x"))).alias("c"))
    ok = F.col("jvm_reason").isNull()
    reason = F.coalesce(F.col("jvm_reason"), F.col("c.reason"))
    rtype = F.when(ok, F.col("c.rtype"))
    patient = F.when(ok, F.col("c.patient"))
    shared = (rtype.isin(*sorted(keys.SHARED_TYPES)) & reason.isNull())
    return judged.select(
        "path", reason.alias("reason"), rtype.alias("rtype"), patient.alias("patient"),
        F.coalesce(F.when(ok, F.col("c.candidate")), F.lit(False)).alias("candidate"), shared.alias("shared"),
        F.when(shared | patient.isNotNull(), F.col("value")).alias("value"))


def _counts(stats: Iterable[Any], sizes: dict[str, int]) -> tuple[dict[str, Any], Counter[tuple[str, str]]]:
    """``input`` (totals and ``per_file``, the local engine's shape) and the line-level skips, from the counts per
    (path, reason, resourceType). A resource is a line that is a JSON object with a string resourceType, a
    no-patient one included; blank lines are neither lines nor skips."""
    per_file: dict[str, dict[str, Any]] = {}

    def entry(label: str) -> dict[str, Any]:
        return per_file.setdefault(label, {"lines": 0, "bytes": 0, "resources": 0, "by_type": Counter()})

    for path, size in sizes.items():
        entry(file_label(path))["bytes"] += size
    skipped: Counter[tuple[str, str]] = Counter()
    by_type: Counter[str] = Counter()
    lines = resources = 0
    for row in stats:
        reason, rtype, count = row["reason"], row["rtype"], int(row["count"])
        if reason == _BLANK:
            continue
        label = file_label(row["path"])
        item = entry(label)
        item["lines"] += count
        lines += count
        if rtype is not None:
            item["resources"] += count
            item["by_type"][rtype] += count
            by_type[rtype] += count
            resources += count
        if reason is not None:
            skipped[(label, reason)] += count
    for item in per_file.values():
        item["by_type"] = dict(sorted(item["by_type"].items()))
    counts = {"files": len(sizes), "bytes": sum(sizes.values()), "lines": lines, "resources": resources,
              "patients": 0, "candidates": 0, "by_type": dict(sorted(by_type.items())),
              "per_file": dict(sorted(per_file.items()))}
    return counts, skipped


# -- the engine ----------------------------------------------------------------------------------------------------
def run_spark(files: Sequence[str], *, spec: engine.SettingsSpec, workers: int, progress: bool,
              master: str | None = None, session: SparkSession | None = None, audit_fn: AuditFn | None = None,
              shared_fn: SharedFn | None = None, settings_fn: SettingsFn | None = None) -> engine.EngineResult:
    """The population audit of ``files`` on Spark: the same ``EngineResult`` as ``local.run_local``.

    ``session`` attaches to a given session (tests share one); otherwise :func:`spark_session` attaches to the
    active one or starts one on ``master`` and stops it at the end. ``audit_fn`` / ``shared_fn`` / ``settings_fn``
    replace ``patient.audit_patient`` / ``build_shared`` / ``AuditSettings.from_spec`` (tests inject fakes; they
    must be picklable). ``timings["spark_session"]`` is the session start (≈0 when attached); the run's other
    phases are ``read_classify`` (every line read, classified and counted) and ``evaluate`` (candidates grouped
    and judged)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    started = time.perf_counter()
    timings: dict[str, float] = {}
    created = False
    if session is None:
        session, created = spark_session(master, workers=workers, progress=progress)
    timings["spark_session"] = round(time.perf_counter() - started, 3)
    classified = None
    try:
        mark = time.perf_counter()
        sizes = _input_files(session, files)
        classified = _classified(session, list(sizes)).persist(StorageLevel.MEMORY_AND_DISK)
        counts, skipped = _counts(classified.groupBy("path", "reason", "rtype").count().collect(), sizes)
        flags = (classified.where(F.col("patient").isNotNull()).groupBy("patient")
                 .agg(F.max("candidate").alias("candidate")))
        totals = flags.agg(F.count(F.lit(1)).alias("patients"),
                           F.count(F.when(F.col("candidate"), 1)).alias("candidates")).first()
        counts["patients"], counts["candidates"] = int(totals["patients"]), int(totals["candidates"])
        shared_lines = sorted((file_label(r["path"]), r["value"])
                              for r in classified.where("shared").select("path", "value").collect())
        timings["read_classify"] = round(time.perf_counter() - mark, 3)

        mark = time.perf_counter()
        _, build_shared, _ = _defaults(audit_fn, shared_fn, settings_fn)
        if shared_lines:  # invalid shared resources are counted once, here, not once per worker building them
            shared_raw, files_of = _parse_lines(shared_lines)
            skipped.update(_attributed(getattr(build_shared(shared_raw), "skipped", ()), files_of))
        members = (classified.where(F.col("patient").isNotNull())
                   .join(flags.where("candidate").select("patient"), "patient", "left_semi")
                   .select("patient", "path", "value"))
        broadcast = session.sparkContext.broadcast(shared_lines)
        try:
            evaluate = partial(_evaluate_partition, run_id=uuid.uuid4().hex, spec=spec, shared_lines=broadcast,
                               audit_fn=audit_fn, shared_fn=shared_fn, settings_fn=settings_fn)
            items = (members.rdd.map(lambda r: (r[0], (file_label(r[1]), r[2])))
                     .groupByKey(numPartitions=max(1, session.sparkContext.defaultParallelism))
                     .mapPartitions(evaluate).collect())
        finally:
            broadcast.unpersist()
        timings["evaluate"] = round(time.perf_counter() - mark, 3)
    finally:
        if classified is not None:
            classified.unpersist()
        if created:
            session.stop()
    rows = [item[1] for item in items if item[0] == "row"]
    rows.sort(key=lambda r: (r.get("patient") or "", r.get("assessment_id") or ""))
    skipped.update((item[1], item[2]) for item in items if item[0] == "skip")
    timings["total"] = round(time.perf_counter() - started, 3)
    return engine.EngineResult(
        rows=rows, input=counts, timings=timings,
        skipped=[{"file": f, "reason": r, "count": n} for (f, r), n in sorted(skipped.items())])


# -- spark-submit ----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cds_service.audit.spark --ndjson ... --out DIR`` or ``spark-submit …/spark.py --ndjson …``: the
    ``population-audit`` command with ``--engine spark`` (same options, outputs and exit codes), attached to the
    submit's session when there is one."""
    from cds_service import cli

    args = list(sys.argv[1:] if argv is None else argv)
    if "--engine" not in args and not any(a.startswith("--engine=") for a in args):
        args += ["--engine", "spark"]
    return cli.main(["population-audit", *args])


if __name__ == "__main__":
    sys.exit(main())
