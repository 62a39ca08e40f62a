"""Prefetch path on realistic records (issue 13): the service vs the bare echo of the same bodies, per hook and
record size, a new patient in every request and the same body repeated, interleaved, in one run.

    .venv/bin/python -m bench.realistic                  # about 5-8 minutes (bounded at 10)
    .venv/bin/python -m bench.realistic --quick          # about 2 minutes (bounded at 3)
    .venv/bin/python -m bench.realistic --json out.json --sizes 33,200
    .venv/bin/python -m bench.realistic --profile [--size 33 --hook encounter-discharge --calls 300]
    .venv/bin/python -m bench.realistic --sizes 33 --variant own-codes   # as another generator might write them

Starts ``g2250-cds serve`` (gunicorn, the config's default workers and threads) and ``bench/baseline_app.py``
under the same gunicorn options (as ``bench/run.py`` does), then one driver process (loopback only) that, for each
size, calls per round and per hook: service with a new patient, echo with that same body, service with the fixed
body, echo with the fixed body (order rotated each round). Records come from ``bench/records.py``, shifted by
whole weeks so that each story's clock falls just before now (the service reads the real clock). No FHIR server:
every request is self-contained (prefetch only).

Config of the served service: the embedded defaults except ``auth.required: false``, ``server.max_body_bytes``
16 MiB (the lifelong chart is ~6.5 MB; the default 1 MiB would answer 413), SQLite and journal in a temp dir,
logging to a file. ``deadline_seconds`` stays 4.0: a call past it answers 412, and the statuses say so.

``--profile`` runs the service in-process (Flask test client, no HTTP) under cProfile on new-patient requests
and prints the cumulative cost by area (parsing/validation, gather, rules, cards, schema check, logging, journal).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import signal
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from .procs import BIN, Proc, interpreter, wait_ready
from .records import (
    HOOKS,
    SIZES,
    TZ,
    VARIANTS,
    build_template,
    describe,
    instantiate,
    mark_own_times,
    story_now,
    variant,
)

JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
SIDES = ("svc-new", "echo-new", "svc-same", "echo-same")

# size -> (warm-up rounds, measured rounds, max seconds) for full and quick runs. At 33 resources a full run measures
# 2,000 calls per hook and side: a p99 then rests on the slowest twenty (250 calls rested on two or three; with
# 1,000 a single hook's p99 ratio still moved by 0.3-0.5 between runs of the same code, mostly with the echo's own).
PLAN_FULL = {"33": (10, 2000, 300), "20": (5, 120, 40), "50": (4, 70, 45), "200": (2, 25, 70), "lifelong": (1, 6, 150)}
PLAN_QUICK = {"33": (5, 80, 20), "20": (3, 40, 15), "50": (2, 20, 15), "200": (1, 8, 25), "lifelong": (1, 2, 60)}


def log(message: str) -> None:
    print(f"[realistic {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (as bench/run.py)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def shifted_text(hook: str, size: str, now: datetime | None) -> str:
    """The record template of (hook, size), moved by whole weeks to just before ``now`` (None: story dates), its
    patient's own times marked so that :func:`bench.records.instantiate` gives each patient theirs."""
    request = build_template(hook, size)
    if now is not None:
        from cds_service.fixtures_shift import shift_resource, weekly_shift

        days = weekly_shift(datetime.fromisoformat(story_now(hook)), now, TZ)
        request = shift_resource(request, days, TZ)
    return mark_own_times(json.dumps(request, ensure_ascii=False, separators=(",", ":")))


def service_config(directory: Path) -> Path:
    """``directory/service.yaml``: the config every realistic-record run serves with (module docstring), its
    database and journal in ``directory``."""
    path = directory / "service.yaml"
    path.write_text("\n".join([
        "auth: {required: false}",
        f"database_url: sqlite:///{directory / 'cds.db'}",
        f"journal: {{dir: {directory / 'journal'}}}",
        "server: {max_body_bytes: 16777216}",
        "logging: {level: INFO, format: json}",
        "",
    ]), "utf-8")
    return path


# -- driver process -------------------------------------------------------------------------------------------
def _body(text: str, name: str | None, n: int) -> bytes:
    """Patient ``n``'s request from a template's ``text``, written as the variant ``name`` says (None: as is)."""
    request = instantiate(text, n)
    return (variant(request, name, n) if name else request).encode("utf-8")


def drive(spec: dict[str, Any]) -> dict[str, Any]:
    """Sequential calls on one keep-alive session; per size, rounds of (hook x side), rotated."""
    session = requests.Session()
    session.trust_env = False
    now = datetime.now(TZ) if spec["shift"] else None
    out: dict[str, Any] = {}
    patient = 1
    for size, (warmup, samples, max_s) in spec["plan"].items():
        texts = {h: shifted_text(h, size, now) for h in HOOKS}
        same = {h: _body(texts[h], spec.get("variant"), 0) for h in HOOKS}
        res = {h: {s: {"ms": [], "statuses": Counter()} for s in SIDES} for h in HOOKS}
        determinations: dict[str, Counter] = {h: Counter() for h in HOOKS}
        calls = [(h, s) for h in HOOKS for s in SIDES]
        stop_at = time.monotonic() + max_s
        rounds = 0
        for r in range(warmup + samples):
            if r >= warmup and time.monotonic() > stop_at:
                break
            fresh = {}
            for h in HOOKS:  # built outside the timed calls
                fresh[h] = _body(texts[h], spec.get("variant"), patient)
                patient += 1
            k = r % len(calls)
            for hook, side in calls[k:] + calls[:k]:
                url = (spec["svc_url"] if side.startswith("svc") else spec["echo_url"]) + spec["paths"][hook]
                body = fresh[hook] if side.endswith("new") else same[hook]
                # Named calls: the service logs the id with its own duration (read_in_service); the echo ignores it.
                headers = {**JSON_HEADERS, "X-Request-Id": f"rb.{size}.{hook}.{side}.{r}"}
                t0 = time.perf_counter()
                try:
                    response = session.post(url, data=body, headers=headers, timeout=60)
                    content = response.content
                    status = response.status_code
                except requests.RequestException:
                    content, status = b"", -1
                ms = 1000 * (time.perf_counter() - t0)
                if r >= warmup:
                    res[hook][side]["ms"].append(ms)
                    res[hook][side]["statuses"][str(status)] += 1
                    if side == "svc-new" and status == 200:
                        with contextlib.suppress(ValueError):
                            for card in json.loads(content).get("cards", []):
                                det = (card.get("extension") or {}).get("g2250-cds.determination") or {}
                                determinations[hook][str(det.get("status"))] += 1
            if r >= warmup:
                rounds += 1
        out[size] = {"rounds": rounds, "bytes": {h: len(same[h]) for h in HOOKS},
                     "resources": {h: describe(json.loads(same[h]))["prefetched"] for h in HOOKS},
                     "determinations": {h: dict(c) for h, c in determinations.items()},
                     "per_hook": {h: {s: {"ms": v["ms"], "statuses": dict(v["statuses"])} for s, v in d.items()}
                                  for h, d in res.items()}}
        print(f"driver: size {size}: {rounds} rounds", file=sys.stderr, flush=True)
    session.close()
    times = os.times()
    return {"sizes": out, "driver_cpu_seconds": times.user + times.system}


# -- harness --------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    from hooks import SERVICES

    plan_all = PLAN_QUICK if args.quick else PLAN_FULL
    sizes = args.sizes.split(",") if args.sizes else list(plan_all)
    plan = {s: plan_all[s] for s in sizes}
    tmp = Path(tempfile.mkdtemp(prefix="g2250-realistic-"))
    stack = contextlib.ExitStack()
    started = time.monotonic()
    try:
        cfg = service_config(tmp)
        from cds_service.config import load_config
        from fhir_fixtures.sekmet import free_port

        config = load_config(str(cfg))
        metrics_dir = tmp / "metrics"
        metrics_dir.mkdir()
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), PYTHONUNBUFFERED="1")
        serve = BIN / "g2250-cds"
        serve_cmd = [str(serve)] if serve.exists() else [sys.executable, "-m", "cds_service.cli"]
        svc_port, echo_port = free_port(), free_port()
        svc_url, echo_url = f"http://127.0.0.1:{svc_port}", f"http://127.0.0.1:{echo_port}"
        service = Proc("service", [*serve_cmd, "serve", "--host", "127.0.0.1", "--port", str(svc_port),
                                   "--config", str(cfg)], tmp / "service.log", env=env)
        stack.callback(service.stop)
        echo = Proc("echo", [sys.executable, "-m", "bench.baseline_app", "--config", str(cfg), "--host", "127.0.0.1",
                             "--port", str(echo_port), "--decoder", args.echo_decoder], tmp / "echo.log", env=env)
        stack.callback(echo.stop)
        wait_ready(service, f"{svc_url}/readyz")
        wait_ready(echo, f"{echo_url}/cds-services/ready", method="POST", body=b"{}")
        log(f"service {svc_url}, echo {echo_url}: gunicorn {config.server['workers']} workers x "
            f"{config.server['threads']} threads each; sizes {sizes}")
        spec = {"svc_url": svc_url, "echo_url": echo_url, "plan": plan, "shift": not args.no_shift,
                "variant": args.variant,
                "paths": {s.hook: f"/cds-services/{s.id}" for s in SERVICES}}
        spec_path, out_path = tmp / "spec.json", tmp / "out.json"
        spec_path.write_text(json.dumps(spec), "utf-8")
        bound = 170 if args.quick else 580
        driver = Proc("driver", [sys.executable, "-m", "bench.realistic", "--drive", str(spec_path), str(out_path)],
                      tmp / "driver.log")
        stack.callback(lambda: driver.stop(grace=2))
        while driver.alive():
            if time.monotonic() - started > bound:
                raise RuntimeError(f"driver exceeded the {bound} s bound:\n{driver.log_tail()}")
            time.sleep(0.1)
        if driver.popen.returncode != 0:
            raise RuntimeError(f"driver failed:\n{driver.log_tail()}")
        result = json.loads(out_path.read_text("utf-8"))
        service.stop()  # its log complete
        result["in_service"] = read_in_service(tmp / "service.log", plan)
        result.update(mode="quick" if args.quick else "full", started=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                      workers=config.server["workers"], threads=config.server["threads"],
                      echo_decoder=args.echo_decoder, interpreter=interpreter(), variant=args.variant,
                      seconds=time.monotonic() - started, cpus=os.cpu_count(), loadavg=os.getloadavg())
        return result
    finally:
        stack.close()
        if args.keep:
            log(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def read_in_service(log_path: Path, plan: dict[str, Any]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """The service's own duration of each measured call (its log line's ``duration_ms``: from the body read to
    the answer, without HTTP framing, the worker's thread hand-off or the network), by size, hook and side, from
    the driver's named request ids; warm-up rounds left out."""
    found: dict[str, dict[str, dict[str, list[float]]]] = {}
    with log_path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if '"rb.' not in line:
                continue
            try:
                record = json.loads(line)
                _, size, hook, side, rnd = str(record["request_id"]).split(".")
                if record.get("event") != "http" or int(rnd) < plan[size][0]:
                    continue
                found.setdefault(size, {}).setdefault(hook, {}).setdefault(side, []).append(
                    float(record["duration_ms"]))
            except (ValueError, KeyError, TypeError):
                continue
    return found


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    inside = result.get("in_service", {})
    for size, data in result["sizes"].items():
        pooled: dict[str, list[float]] = {s: [] for s in SIDES}
        pooled_inside: list[float] = []
        for hook in HOOKS:
            d = data["per_hook"][hook]
            for s in SIDES:
                pooled[s].extend(d[s]["ms"])
            own = inside.get(size, {}).get(hook, {}).get("svc-new", [])
            pooled_inside.extend(own)
            rows.append(_row(size, hook, {s: d[s]["ms"] for s in SIDES}, data, {s: d[s]["statuses"] for s in SIDES},
                             own))
        rows.append(_row(size, "all 4 pooled", pooled, data, None, pooled_inside))
    return rows


def _row(size: str, hook: str, ms: dict[str, list[float]], data: dict[str, Any],
         statuses: dict[str, dict[str, int]] | None, inside: list[float]) -> dict[str, Any]:
    q = {s: (pct(v, 0.5), pct(v, 0.99)) for s, v in ms.items()}
    row = {"size": size, "hook": hook, "n": len(ms["svc-new"]),
           "kb": data["bytes"].get(hook, 0) / 1024 if hook in data["bytes"] else None,
           "resources": data["resources"].get(hook), **{f"{s} p50": q[s][0] for s in SIDES},
           **{f"{s} p99": q[s][1] for s in SIDES},
           "new p50 ratio": q["svc-new"][0] / q["echo-new"][0], "new p99 ratio": q["svc-new"][1] / q["echo-new"][1],
           "same p50 ratio": q["svc-same"][0] / q["echo-same"][0],
           "same p99 ratio": q["svc-same"][1] / q["echo-same"][1],
           "in-service n": len(inside), "in-service p50": pct(inside, 0.5), "in-service p99": pct(inside, 0.99)}
    if statuses is not None:
        row["statuses"] = statuses
        row["determinations"] = data["determinations"].get(hook)
    return row


def render(result: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    out = [f"g2250-cds realistic records ({result['mode']}) {result['started']}: {result['cpus']} CPUs, gunicorn "
           f"{result['workers']} workers x {result['threads']} threads (service and echo); "
           f"echo decodes with {result.get('echo_decoder', 'json')}; "
           f"run {result['seconds']:.0f} s; "
           f"driver CPU {result['driver_cpu_seconds']:.0f} s; load {result['loadavg'][0]:.2f}",
           f"interpreter (service, echo and driver): {result.get('interpreter', 'not recorded')}",
           "new = a new patient in every request (service and echo get the same body); same = one body repeated."
           + (f" Records written as another generator might: {result['variant']} ({VARIANTS[result['variant']]})."
              if result.get("variant") else ""),
           "ratio = service / echo of the same bodies, measured interleaved. "
           "Target (issue 13): <= 1.5x at p50 and p99.",
           ""]
    head = (f"{'size':<9}{'hook':<21}{'n':>4}{'KB':>7}{'res':>6}  {'new svc p50/p99 ms':>20}{'echo p50/p99':>16}"
            f"{'x p50':>7}{'x p99':>7}  {'same svc p50/p99':>18}{'echo p50/p99':>15}{'x p50':>7}{'x p99':>7}")
    out.append(head)
    out.append("-" * len(head))
    for r in rows:
        kb = f"{r['kb']:.0f}" if r["kb"] is not None else ""
        res = str(r["resources"]) if r["resources"] is not None else ""
        out.append(
            f"{r['size']:<9}{r['hook']:<21}{r['n']:>4}{kb:>7}{res:>6}  "
            f"{r['svc-new p50']:>9.1f}/{r['svc-new p99']:<9.1f} {r['echo-new p50']:>6.1f}/{r['echo-new p99']:<8.1f}"
            f"{r['new p50 ratio']:>6.2f}x{r['new p99 ratio']:>6.2f}x  "
            f"{r['svc-same p50']:>8.1f}/{r['svc-same p99']:<9.1f}{r['echo-same p50']:>6.1f}/{r['echo-same p99']:<8.1f}"
            f"{r['same p50 ratio']:>6.2f}x{r['same p99 ratio']:>6.2f}x")
    out.append("")
    out.append("Where the time goes (new patient): the service's own duration of the same calls (its log line: body "
               "read to answer) against the driver's round trip; what is left is HTTP, the worker's thread hand-off, "
               "the network stack and scheduling, which the echo's calls go through too.")
    out.append(f"{'size':<9}{'hook':<21}{'n':>5}  {'in service p50/p99 ms':>22}{'p99/p50':>9}  "
               f"{'round trip p50/p99':>19}{'p99/p50':>9}  {'echo p99/p50':>12}")
    for r in rows:
        if not r["in-service n"]:
            continue
        spread = r["in-service p99"] / r["in-service p50"]
        out.append(f"{r['size']:<9}{r['hook']:<21}{r['in-service n']:>5}  "
                   f"{r['in-service p50']:>11.1f}/{r['in-service p99']:<10.1f}{spread:>8.2f}  "
                   f"{r['svc-new p50']:>9.1f}/{r['svc-new p99']:<9.1f}{r['svc-new p99'] / r['svc-new p50']:>8.2f}  "
                   f"{r['echo-new p99'] / r['echo-new p50']:>12.2f}")
    out.append("")
    for r in rows:
        if "statuses" in r:
            bad = {s: st for s, st in r["statuses"].items() if set(st) - {"200"}}
            out.append(f"  {r['size']:<9}{r['hook']:<21} determinations (new): {r['determinations']}"
                       + (f"  NON-200: {bad}" if bad else ""))
    return "\n".join(out)


# -- in-process profile ---------------------------------------------------------------------------------------
AREAS = [  # (area, substrings of a function's file path or name); first match wins, on cumulative time
    ("journal", ("cds_service/journal.py",)),
    ("schema check (request/response)", ("cds_service/web/schemas.py", "jsonschema")),
    ("logging", ("cds_service/logs.py", "/logging/")),
    ("cards", ("hooks/cards.py",)),
    ("rules", ("cds_service/rules/",)),
    ("gather bookkeeping", ("hooks/gather.py", "cds_service/fhir/source.py", "cds_service/record.py")),
    ("parsing/validation", ("cds_service/fhir/parse.py", "cds_service/fhir/lite.py", "fhir/resources", "fhir_core",
                            "pydantic")),
    ("request JSON decode", ("json/decoder.py", "cds_service/app.py:decode_json_body", "orjson.loads")),
]


def profile(args: argparse.Namespace) -> str:
    os.environ.setdefault("G2250_CDS_CONFIG", "")
    tmp = Path(tempfile.mkdtemp(prefix="g2250-profile-"))
    cfg = service_config(tmp)
    import logging

    from cds_service import logwriter, server
    from cds_service.app import create_app
    from cds_service.config import load_config
    from hooks import SERVICES

    # As in a served worker (server._service): the log's database writes in a child process, not on a thread of
    # this interpreter (whose batches would land in the middle of the profiled calls).
    logwriter.PROCESS_BY_DEFAULT = True
    app = create_app(load_config(str(cfg)))
    # Keep the log line's cost, send it nowhere: the service's lines go through the "g2250_cds" logger's own
    # handler (cds_service.logs), not the root logger's.
    for handler in logging.getLogger("g2250_cds").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(io.StringIO())
    # As in a served worker (server._service): without it, the young collections CPython's default threshold
    # starts in the middle of nearly every call land in whatever function is running (orjson.loads showed 1.3 ms).
    server.freeze_start_up_heap()
    server.tune_collector()
    server.tune_switch_interval()
    client = app.test_client()
    path = {s.hook: f"/cds-services/{s.id}" for s in SERVICES}[args.hook]
    text = shifted_text(args.hook, args.size, datetime.now(TZ))
    bodies = [instantiate(text, 10_000_000 + n).encode("utf-8") for n in range(args.calls + 20)]
    for body in bodies[:20]:  # warm-up: imports, caches of master data
        assert client.post(path, data=body, headers=JSON_HEADERS).status_code == 200
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for body in bodies[20:]:
        client.post(path, data=body, headers=JSON_HEADERS)
    prof.disable()
    wall = (time.perf_counter() - t0) / args.calls * 1000
    stats = pstats.Stats(prof)
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values()) / args.calls * 1000
    # Self time by area (exclusive: every function's own time counted once, in the first area it matches).
    own: Counter[str] = Counter()
    for (file, _line, name), (_cc, _nc, tt, _ct, _callers) in raw.items():
        where = f"{file}:{name}"
        area = next((a for a, keys in AREAS if any(k in where for k in keys)), "other (flask, werkzeug, json, stdlib)")
        own[area] += tt / args.calls * 1000
    # Inclusive time by area: the largest cumulative time of a function of the area's files (its entry point).
    incl: dict[str, float] = {}
    for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in raw.items():
        if file == "~":
            continue
        where = f"{file}:{name}"
        area = next((a for a, keys in AREAS if any(k in where for k in keys)), None)
        if area is not None:
            incl[area] = max(incl.get(area, 0.0), ct / args.calls * 1000)
    lines = [f"in-process profile: {args.hook}, size {args.size} ({len(bodies[0]) / 1024:.0f} KB, "
             f"{describe(json.loads(bodies[0]))['prefetched']} prefetched resources), {args.calls} new-patient calls; "
             f"{wall:.2f} ms/call under cProfile ({total:.2f} ms/call of profiled self time)",
             "", "self time by area (ms/call, share):"]
    for area, ms in own.most_common():
        lines.append(f"  {area:<40}{ms:>8.2f}  {100 * ms / total:5.1f} %")
    lines.append("")
    lines.append("inclusive by area (ms/call; nested areas overlap: gather includes parsing):")
    for area, ms in sorted(incl.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {area:<40}{ms:>8.2f}  {100 * ms / wall:5.1f} % of the call")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
    lines.append("")
    lines.append("\n".join(buf.getvalue().splitlines()[:args.top + 12]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--drive"]:
        spec = json.loads(Path(argv[1]).read_text("utf-8"))
        Path(argv[2]).write_text(json.dumps(drive(spec)), "utf-8")
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.realistic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 2 minutes (bounded at 3)")
    parser.add_argument("--sizes", help=f"comma-separated subset of {','.join(SIZES)}")
    parser.add_argument("--json", metavar="OUT", help="also write every latency and summary as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (service log, spec, driver output)")
    parser.add_argument("--no-shift", action="store_true", help="keep the stories' dates (Nov-Dec 2026)")
    parser.add_argument("--echo-decoder", choices=("json", "orjson"), default="json",
                        help="the echo's JSON decoder: the stdlib (default, as when the targets were set) or orjson "
                             "(the service's own fast path)")
    parser.add_argument("--variant", choices=tuple(VARIANTS),
                        help="write every request as another generator might (bench.records.VARIANTS): "
                             + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    parser.add_argument("--profile", action="store_true", help="in-process cProfile instead of the HTTP run")
    parser.add_argument("--size", default="33", help="--profile: record size")
    parser.add_argument("--hook", default="encounter-discharge", help="--profile: hook")
    parser.add_argument("--calls", type=int, default=300, help="--profile: measured calls")
    parser.add_argument("--top", type=int, default=25, help="--profile: functions listed by self time")
    args = parser.parse_args(argv)
    if args.profile:
        print(profile(args))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run(args)
    except (RuntimeError, requests.RequestException) as exc:
        print(f"realistic: failed: {exc}", file=sys.stderr)
        return 1
    rows = summarise(result)
    report = render(result, rows)
    print(report)
    if args.json:
        result["rows"] = rows
        result["report"] = report
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
