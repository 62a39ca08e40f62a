"""Run the benchmark: ``.venv/bin/python -m bench.run [--quick] [--json OUT]`` (see bench/README.md).

Starts SEKMET, loads the fixtures and two synthetic patients, starts the latency proxy and the black hole, the
service (``g2250-cds serve``) and the bare Flask baseline under the same gunicorn settings, drives load from a
separate process, prints one table of side-by-side ratios, and stops everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import requests

from cds_service.cli import load_fixtures
from fhir_fixtures.sekmet import free_port, sekmet_binary, start_sekmet
from hooks import SERVICES
from hooks.gather import ENCOUNTER_AGE_MARGIN, ESTABLISHED_LOOKBACK, fhir_instant

from .history import transaction_bundles
from .procs import BIN, ROOT, Proc, children, cpu_seconds, gunicorn_tree, rss_mb, wait_ready
from .proxy import PROBE_HEADER, BlackHole, LatencyProxy

HOOKS = ("encounter-discharge", "encounter-start", "patient-view", "appointment-book")
REQUESTS_DIR = ROOT / "fhir_fixtures" / "requests"
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
TZ = ZoneInfo("America/New_York")  # the practice zone of the fixtures and of the service's default calendar


def shifted_fixtures(bodies: dict[str, dict[str, Any]], now: datetime
                     ) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, dict[str, Any]], dict[str, int]]:
    """The fixture bundles and the hooks' request bodies, each story moved by whole weeks to just before ``now``
    (``cds_service.fixtures_shift``, its nearest week): the service reads the real clock, and unmoved stories drift
    away from it day by day — after two weeks the discharge's encounter is older than the episode window, and its
    fallback call takes a second wave for the older episode. A body moves with its scenario's bundle (found by its
    patient, encounter and hook), so the FHIR server and the prefetch hold the same dates. Returns the bundles, the
    bodies and each body's shift in days."""
    from cds_service.audit.sources import fixture_bundles
    from cds_service.config import load_config
    from cds_service.fixtures_shift import plan_shift, shift_resource
    from cds_service.rules.calendar import BusinessCalendar
    from cds_service.rules.rules_data import load_rules_data

    config = load_config()
    scenarios = json.loads((ROOT / "fhir_fixtures" / "scenarios.json").read_text("utf-8"))
    plan = plan_shift(fixture_bundles(), scenarios, now, calendar=BusinessCalendar.from_config(config.calendar),
                      rules=load_rules_data(config.raw.get("rules")), strategy="nearest")
    days_of_file = {f.name: f.days for f in plan.files}
    moved: dict[str, dict[str, Any]] = {}
    shifts: dict[str, int] = {}
    for hook, body in bodies.items():
        context = body["context"]
        item = next(i for i in scenarios if i["context"].get("patientId") == context["patientId"]
                    and i["hook"] == body["hook"] and i["context"].get("encounterId") == context.get("encounterId"))
        shifts[hook] = days_of_file[item["file"]]
        moved[hook] = shift_resource(body, shifts[hook], TZ)
    return plan.bundles(), moved, shifts


@dataclass(frozen=True)
class Plan:
    quick: bool
    workers: int | None
    history: int
    load_budget_s: float
    latency_rounds: int
    latency_warmup: int
    latency_max_s: float
    fallback_rounds: int
    fallback_max_s: float
    flat_rounds: int
    flat_max_s: float
    tp_threads: int
    tp_duration: float
    tp_rounds: int
    soak_seconds: float
    rss_interval: float
    deadline_per_hook: int
    deadline_concurrency: int
    delay_s: float = 0.050
    deadline_s: float = 4.0

    @classmethod
    def make(cls, quick: bool, workers: int | None, history: int | None, soak: float | None) -> Plan:
        if quick:
            return cls(quick=True, workers=workers, history=history or 10_000, load_budget_s=45,
                       latency_rounds=120, latency_warmup=15, latency_max_s=20,
                       fallback_rounds=8, fallback_max_s=25, flat_rounds=12, flat_max_s=20,
                       tp_threads=8, tp_duration=6, tp_rounds=1, soak_seconds=soak or 30, rss_interval=3,
                       deadline_per_hook=2, deadline_concurrency=4)
        return cls(quick=False, workers=workers, history=history or 10_000, load_budget_s=150,
                   latency_rounds=500, latency_warmup=30, latency_max_s=60,
                   fallback_rounds=30, fallback_max_s=60, flat_rounds=40, flat_max_s=60,
                   tp_threads=8, tp_duration=10, tp_rounds=2, soak_seconds=soak or 300, rss_interval=10,
                   deadline_per_hook=4, deadline_concurrency=4)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": pct(values, 0.50), "p90": pct(values, 0.90), "p99": pct(values, 0.99),
            "max": max(values) if values else math.nan, "mean": statistics.fmean(values) if values else math.nan}


class Harness:
    def __init__(self, plan: Plan, keep: bool) -> None:
        self.plan = plan
        self.keep = keep
        self.tmp = Path(tempfile.mkdtemp(prefix="g2250-bench-"))
        self.stack = contextlib.ExitStack()
        self.results: dict[str, Any] = {"mode": "quick" if plan.quick else "full", "notes": []}
        self.timings: dict[str, float] = {}
        self.service_ids = {s.hook: s.id for s in SERVICES}
        bodies = {h: json.loads((REQUESTS_DIR / f"{h}.json").read_text("utf-8")) for h in HOOKS}
        self.fixture_bundles, self.bodies, self.shift_days = shifted_fixtures(bodies, datetime.now(TZ))

    # -- set-up --------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        binary = sekmet_binary()
        if binary is None:
            raise SystemExit("SEKMET is not installed: bash tests/run-all.sh installs it in .venv-sekmet "
                             "(or set SEKMET_BIN)")
        t0 = time.monotonic()
        self.sekmet = start_sekmet(binary)
        self.stack.callback(self.sekmet.stop)
        self.timings["sekmet_start_s"] = time.monotonic() - t0
        log(f"SEKMET up at {self.sekmet.base_url} ({self.timings['sekmet_start_s']:.1f} s)")
        t0 = time.monotonic()
        written = load_fixtures(self.sekmet.base_url, self.sekmet.token, bundles=self.fixture_bundles)
        self.timings["fixtures_load_s"] = time.monotonic() - t0
        log(f"fixtures: {written} resources in {self.timings['fixtures_load_s']:.1f} s, each story moved by whole "
            f"weeks to just before now (requests: {self.shift_days} days)")
        # The synthetic history (30,000 resources) is loaded only after the fallback phase: SEKMET's searches get
        # slower as its index grows, and the fallback target is about the service's waves, not SEKMET's index.

        self.proxy = LatencyProxy(self.sekmet.base_url, delay=0.0).start()
        self.stack.callback(self.proxy.stop)
        self.hole = BlackHole().start()
        self.stack.callback(self.hole.stop)

        cfg = self.tmp / "service.yaml"
        workers = self.plan.workers or 2
        threads = 4
        cfg.write_text("\n".join([
            "auth: {required: false}",
            "fhir:",
            f"  allowed_servers: [{self.proxy.base_url}, {self.hole.base_url}, {self.sekmet.base_url}]",
            # Larger than the deadline, so that against the black hole it is the hook deadline that ends the call.
            f"  timeout_seconds: {self.plan.deadline_s + 1:.1f}",
            f"deadline_seconds: {self.plan.deadline_s}",
            f"database_url: sqlite:///{self.tmp / 'cds.db'}",
            f"server: {{workers: {workers}, threads: {threads}}}",
            "logging: {level: INFO, format: json}",
            "",
        ]), "utf-8")
        self.results["config"] = {"workers": workers, "threads": threads, "deadline_seconds": self.plan.deadline_s,
                                  "fhir_timeout_seconds": self.plan.deadline_s + 1, "json": "stdlib json"}
        metrics_dir = self.tmp / "metrics"
        metrics_dir.mkdir()
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), PYTHONUNBUFFERED="1")
        serve = BIN / "g2250-cds"
        serve_cmd = [str(serve)] if serve.exists() else [sys.executable, "-m", "cds_service.cli"]
        svc_port, base_port = free_port(), free_port()
        self.svc_url = f"http://127.0.0.1:{svc_port}"
        self.base_url = f"http://127.0.0.1:{base_port}"
        self.service_log = self.tmp / "service.log"
        self.service = Proc("service", [*serve_cmd, "serve", "--host", "127.0.0.1", "--port", str(svc_port),
                                        "--config", str(cfg), "--workers", str(workers)], self.service_log, env=env)
        self.stack.callback(self.service.stop)
        self.baseline = Proc("baseline", [sys.executable, "-m", "bench.baseline_app", "--config", str(cfg),
                                          "--host", "127.0.0.1", "--port", str(base_port), "--workers",
                                          str(workers)], self.tmp / "baseline.log", env=env)
        self.stack.callback(self.baseline.stop)
        wait_ready(self.service, f"{self.svc_url}/readyz")
        wait_ready(self.baseline, f"{self.base_url}/cds-services/ready", method="POST", body=b"{}")
        self.svc_workers = self._workers(self.service, workers)
        self.base_workers = self._workers(self.baseline, workers)
        self.rss_startup = {"service": {p: rss_mb(p) for p in self.svc_workers},
                            "baseline": {p: rss_mb(p) for p in self.base_workers}}
        log(f"service {self.svc_url} workers {self.svc_workers}; baseline {self.base_url} workers "
            f"{self.base_workers}; {workers} workers x {threads} threads each")

    def _workers(self, proc: Proc, expected: int) -> list[int]:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pids = children(proc.pid)
            if len(pids) >= expected:
                return pids
            time.sleep(0.2)
        raise RuntimeError(f"{proc.name}: expected {expected} gunicorn workers, found {children(proc.pid)}")

    def load_history(self) -> None:
        now = datetime.now(TZ)
        session = requests.Session()
        session.trust_env = False
        self.history: dict[str, dict[str, Any]] = {}
        budget_end = time.monotonic() + self.plan.load_budget_s
        for label, prefix, per_type in (("10", "bench-h10", 10), ("10k", "bench-h10k", self.plan.history)):
            bundles = transaction_bundles(prefix, per_type, now)
            t0 = time.monotonic()
            loaded = 0
            stopped_early = False
            for n, bundle in enumerate(bundles):
                if n > 1 and time.monotonic() > budget_end:
                    stopped_early = True
                    break
                response = session.post(self.sekmet.base_url, data=json.dumps(bundle), headers=self.sekmet.headers(),
                                        timeout=300)
                if response.status_code >= 300:
                    raise RuntimeError(f"loading {prefix}: SEKMET answered {response.status_code}: "
                                       f"{response.text[:500]}")
                if n > 0:
                    loaded += len(bundle["entry"])
            elapsed = time.monotonic() - t0
            per_kind = loaded // 3
            self.history[label] = {"prefix": prefix, "requested_per_type": per_type, "loaded_history": loaded,
                                   "per_type": per_kind, "load_seconds": elapsed, "stopped_early": stopped_early,
                                   "resources_per_second": loaded / elapsed if elapsed else math.nan}
            log(f"history patient {prefix}: {loaded} historical resources ({per_kind} each of Encounter/"
                f"Communication/Media) + episode in {elapsed:.1f} s")
            if stopped_early:
                self.results["notes"].append(
                    f"history load for {prefix} stopped at the {self.plan.load_budget_s:.0f} s budget: "
                    f"{loaded} of {3 * per_type} historical resources loaded (scaled down)")
        session.close()
        self.results["history"] = self.history

    # -- driver --------------------------------------------------------------------------------------------------
    def drive(self, name: str, spec: dict[str, Any], bound: float, sample_rss: list[int] | None = None,
              ) -> dict[str, Any]:
        spec_path, out_path = self.tmp / f"spec-{name}.json", self.tmp / f"out-{name}.json"
        spec_path.write_text(json.dumps(spec), "utf-8")
        proc = Proc(f"driver-{name}", [sys.executable, "-m", "bench.driver", str(spec_path), str(out_path)],
                    self.tmp / f"driver-{name}.log")
        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        try:
            next_sample = started
            while proc.alive():
                if time.monotonic() - started > bound:
                    raise RuntimeError(f"driver {name} exceeded its {bound:.0f} s bound")
                if sample_rss is not None and time.monotonic() >= next_sample:
                    samples.append({"t": round(time.monotonic() - started, 1),
                                    "rss_mb": {p: rss_mb(p) for p in sample_rss}})
                    next_sample += self.plan.rss_interval
                time.sleep(0.05)
        finally:
            proc.stop(grace=2)
        if proc.popen.returncode != 0:
            raise RuntimeError(f"driver {name} failed:\n{proc.log_tail()}")
        out = json.loads(out_path.read_text("utf-8"))
        if sample_rss is not None:
            samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": {p: rss_mb(p) for p in sample_rss}})
            out["rss_samples"] = samples
        return out

    def post(self, url: str, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        return {"method": "POST", "url": url, "body": json.dumps(body, ensure_ascii=False, separators=(",", ":")),
                "headers": {**JSON_HEADERS, "X-Request-Id": request_id}}

    def fallback_body(self, hook: str, fhir_server: str, context: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {k: v for k, v in self.bodies[hook].items() if k != "prefetch"}
        if context is not None:
            body["context"] = context
        body["fhirServer"] = fhir_server
        body["fhirAuthorization"] = {"access_token": self.sekmet.token or "none", "token_type": "Bearer",
                                     "expires_in": 3600, "scope": "patient/*.read user/*.read",
                                     "subject": "g2250-bench"}
        return body

    def service_log_lines(self, prefix: str) -> list[dict[str, Any]]:
        lines = []
        for raw in self.service_log.read_text("utf-8", errors="replace").splitlines():
            if not raw.startswith("{"):
                continue
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if doc.get("event") == "http" and str(doc.get("request_id", "")).startswith(prefix):
                lines.append(doc)
        return lines

    def trace_call(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """One call with the proxy recording: its FHIR requests, grouped into waves (requests in flight together)."""
        self.proxy.record = []
        t0 = time.monotonic()
        response = requests.post(url, data=json.dumps(body), headers={**JSON_HEADERS, "X-Request-Id": "trace"},
                                 timeout=60)
        t1 = time.monotonic()
        records, self.proxy.record = self.proxy.record, None
        waves: list[dict[str, Any]] = []
        for _path, received, answered, sent, _carried in sorted(records, key=lambda rec: rec[1]):
            if waves and received <= waves[-1]["end"]:
                wave = waves[-1]
                wave["end"] = max(wave["end"], sent)
                wave["upstream"].append(answered - received)
            else:
                waves.append({"start": received, "end": sent, "upstream": [answered - received]})
        busy = sum(w["end"] - w["start"] for w in waves)
        return {
            "status": response.status_code, "wall_ms": 1000 * (t1 - t0), "requests": len(records),
            "fhir_in_flight_ms": 1000 * busy, "outside_fhir_ms": 1000 * (t1 - t0 - busy),
            "waves": [{"requests": len(w["upstream"]), "span_ms": 1000 * (w["end"] - w["start"]),
                       "upstream_max_ms": 1000 * max(w["upstream"]),
                       "upstream_mean_ms": 1000 * statistics.fmean(w["upstream"])} for w in waves],
            "paths": [path for rec in records for path in rec[4]],  # a batch stands for its entries
            "batches": sum(len(rec[4]) > 1 or rec[4] != [rec[0]] for rec in records),
        }

    def replay(self, paths: list[str], repeat: int = 3) -> list[dict[str, Any]]:
        """Each FHIR request of a traced call, sent straight to SEKMET one at a time: its time and entry count."""
        origin = self.sekmet.base_url.split("/fhir")[0]
        out = []
        with requests.Session() as session:
            session.trust_env = False
            headers = {"Accept": "application/fhir+json", "Authorization": f"Bearer {self.sekmet.token}"}
            for path in paths:
                times, entries = [], 0
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    response = session.get(origin + path, headers=headers, timeout=60)
                    times.append(1000 * (time.perf_counter() - t0))
                    doc = response.json() if response.status_code == 200 else {}
                    entries = len(doc.get("entry") or ()) if doc.get("resourceType") == "Bundle" else 1
                out.append({"query": _query_shape(path), "ms": statistics.median(times), "entries": entries})
        return out

    # -- phases --------------------------------------------------------------------------------------------------
    def phase_prefetch(self) -> None:
        log("phase 1: prefetch path, sequential latency, service and baseline interleaved")
        groups = {}
        for hook in HOOKS:
            path = f"/cds-services/{self.service_ids[hook]}"
            groups[f"service/{hook}"] = [self.post(self.svc_url + path, self.bodies[hook], f"pf-{hook}")]
            groups[f"baseline/{hook}"] = [self.post(self.base_url + path, self.bodies[hook], f"pf-{hook}")]
        p = self.plan
        out = self.drive("prefetch", {"mode": "latency", "groups": groups, "warmup": p.latency_warmup,
                                      "samples": p.latency_rounds, "max_seconds": p.latency_max_s},
                         bound=p.latency_max_s + 120)
        res: dict[str, Any] = {"rounds": out["rounds"], "per_hook": {}}
        pooled: dict[str, list[float]] = {"service": [], "baseline": []}
        for hook in HOOKS:
            res["per_hook"][hook] = {}
            for side in ("service", "baseline"):
                g = out["groups"][f"{side}/{hook}"]
                pooled[side].extend(g["latencies_ms"])
                res["per_hook"][hook][side] = {**summary(g["latencies_ms"]), "statuses": g["statuses"]}
        res["pooled"] = {side: summary(v) for side, v in pooled.items()}
        res["request_bytes"] = {h: len(json.dumps(self.bodies[h], separators=(",", ":"))) for h in HOOKS}
        self.results["prefetch"] = res

    def phase_fallback(self) -> None:
        p = self.plan
        log(f"phase 2: fallback path (no prefetch), FHIR via the proxy with +{p.delay_s * 1000:.0f} ms per response")
        self.proxy.delay = p.delay_s
        groups = {}
        for hook in HOOKS:
            path = f"/cds-services/{self.service_ids[hook]}"
            groups[f"fallback/{hook}"] = [self.post(self.svc_url + path, self.fallback_body(hook, self.proxy.base_url),
                                                    f"fb-{hook}")]
        lo = datetime.now(TZ) - ESTABLISHED_LOOKBACK - ENCOUNTER_AGE_MARGIN
        groups["rtt"] = [{
            "method": "GET", "url": f"{self.proxy.base_url}/Encounter?patient=s01-pat&date=ge{fhir_instant(lo)}",
            "body": None,
            "headers": {"Accept": "application/fhir+json", "Authorization": f"Bearer {self.sekmet.token}",
                        PROBE_HEADER: "1"},
        }]
        before = self.proxy.requests
        warmup = 2
        out = self.drive("fallback", {"mode": "latency", "groups": groups, "warmup": warmup,
                                      "samples": p.fallback_rounds, "max_seconds": p.fallback_max_s},
                         bound=p.fallback_max_s + 120)
        proxy_count = self.proxy.requests - before
        traces = {}
        for hook in HOOKS:  # three traced calls per hook; the one with the median wall time is reported
            runs = sorted((self.trace_call(self.svc_url + f"/cds-services/{self.service_ids[hook]}",
                                           self.fallback_body(hook, self.proxy.base_url)) for _ in range(3)),
                          key=lambda t: t["wall_ms"])
            trace = runs[1]
            trace.pop("paths")
            traces[hook] = trace
        self.proxy.delay = 0.0
        calls = (warmup + out["rounds"]) * len(HOOKS)
        res: dict[str, Any] = {"rounds": out["rounds"], "delay_ms": p.delay_s * 1000,
                               "rtt": summary(out["groups"]["rtt"]["latencies_ms"]),
                               "proxy_requests": proxy_count, "service_calls": calls, "per_hook": {},
                               "traces": traces}
        logged_total = 0
        for hook in HOOKS:
            g = out["groups"][f"fallback/{hook}"]
            lines = self.service_log_lines(f"fb-{hook}")
            fr = [int(x.get("fhir_requests", 0)) for x in lines]
            waves = [int(x.get("waves", 0)) for x in lines]
            logged_total += sum(fr)
            res["per_hook"][hook] = {**summary(g["latencies_ms"]), "statuses": g["statuses"],
                                     "logged_calls": len(lines),
                                     "fhir_requests": {"min": min(fr, default=0), "max": max(fr, default=0),
                                                       "mean": statistics.fmean(fr) if fr else math.nan},
                                     "waves": {"min": min(waves, default=0), "max": max(waves, default=0)},
                                     "log_status": dict(sorted({str(x.get("status")): 0 for x in lines}.items()))}
            for x in lines:
                res["per_hook"][hook]["log_status"][str(x.get("status"))] += 1
        res["logged_fhir_requests"] = logged_total
        self.results["fallback"] = res

    def phase_flat(self) -> None:
        p = self.plan
        log("phase 3: flat cost with history (encounter-discharge, fallback path, SEKMET direct)")
        t0 = time.monotonic()
        self.load_history()
        self.timings["history_load_s"] = time.monotonic() - t0
        groups = {}
        path = f"/cds-services/{self.service_ids['encounter-discharge']}"
        checks = {}
        for label, info in self.history.items():
            prefix = info["prefix"]
            context = {"patientId": f"{prefix}-pat", "encounterId": f"{prefix}-enc-vr",
                       "userId": "Practitioner/pr-pt-1"}
            body = self.fallback_body("encounter-discharge", self.sekmet.base_url, context)
            groups[f"flat/{label}"] = [self.post(self.svc_url + path, body, f"flat-{label}")]
            response = requests.post(self.svc_url + path, data=json.dumps(body), headers=JSON_HEADERS, timeout=30)
            checks[label] = {"status": response.status_code, "determinations": _determinations(response)}
            # Which FHIR requests does a call make for this patient, and what do they cost SEKMET alone?
            traced = self.trace_call(self.svc_url + path,
                                     self.fallback_body("encounter-discharge", self.proxy.base_url, context))
            checks[label]["trace"] = {k: v for k, v in traced.items() if k != "paths"}
            checks[label]["replay"] = self.replay(traced["paths"])
        out = self.drive("flat", {"mode": "latency", "groups": groups, "warmup": 3, "samples": p.flat_rounds,
                                  "max_seconds": p.flat_max_s}, bound=p.flat_max_s + 120)
        res: dict[str, Any] = {"rounds": out["rounds"], "check": checks}
        # The service's own time: each call through the proxy (no added delay), minus the time its FHIR requests
        # were in flight (SEKMET's share). Interleaved, so both patients meet the same machine.
        own: dict[str, list[float]] = {label: [] for label in self.history}
        in_flight: dict[str, list[float]] = {label: [] for label in self.history}
        for _ in range(p.flat_rounds):
            for label, info in self.history.items():
                context = {"patientId": f"{info['prefix']}-pat", "encounterId": f"{info['prefix']}-enc-vr",
                           "userId": "Practitioner/pr-pt-1"}
                traced = self.trace_call(self.svc_url + path,
                                         self.fallback_body("encounter-discharge", self.proxy.base_url, context))
                own[label].append(traced["outside_fhir_ms"])
                in_flight[label].append(traced["fhir_in_flight_ms"])
        res["own"] = {label: summary(values) for label, values in own.items()}
        res["in_flight"] = {label: summary(values) for label, values in in_flight.items()}
        for label in self.history:
            lines = self.service_log_lines(f"flat-{label}")
            res[label] = {**summary(out["groups"][f"flat/{label}"]["latencies_ms"]),
                          "statuses": out["groups"][f"flat/{label}"]["statuses"],
                          "fhir_requests": max((int(x.get("fhir_requests", 0)) for x in lines), default=0),
                          "waves": max((int(x.get("waves", 0)) for x in lines), default=0)}
        self.results["flat"] = res

    def phase_throughput(self) -> None:
        p = self.plan
        log(f"phase 4: throughput, {p.tp_threads} client threads, {p.tp_rounds} x {p.tp_duration:.0f} s per side "
            "(alternating)")
        groups = {side: [self.post(url + f"/cds-services/{self.service_ids[h]}", self.bodies[h], f"tp-{h}")
                         for h in HOOKS]
                  for side, url in (("service", self.svc_url), ("baseline", self.base_url))}
        trees = {"service": lambda: gunicorn_tree(self.service.pid),
                 "baseline": lambda: gunicorn_tree(self.baseline.pid)}
        acc = {side: {"completed": 0, "duration": 0.0, "cpu": 0.0, "lat": [], "statuses": {}, "driver_cpu": 0.0,
                      "elapsed": 0.0} for side in groups}
        for r in range(p.tp_rounds):
            order = ("baseline", "service") if r % 2 == 0 else ("service", "baseline")
            for side in order:
                pids = trees[side]()
                cpu0 = cpu_seconds(pids)
                out = self.drive(f"tp-{side}-{r}", {"mode": "throughput", "groups": {side: groups[side]},
                                                    "threads": p.tp_threads, "warmup": 1.0,
                                                    "duration": p.tp_duration}, bound=p.tp_duration + 60)
                cpu1 = cpu_seconds(pids)
                a = acc[side]
                a["completed"] += out["completed"]
                a["duration"] += out["duration"]
                a["cpu"] += cpu1 - cpu0
                a["lat"].extend(out["groups"]["all"]["latencies_ms"])
                a["driver_cpu"] += out["driver_cpu_seconds"]
                a["elapsed"] += out["elapsed_seconds"]
                for k, v in out["groups"]["all"]["statuses"].items():
                    a["statuses"][k] = a["statuses"].get(k, 0) + v
        res = {}
        for side, a in acc.items():
            res[side] = {"rps": a["completed"] / a["duration"], "completed": a["completed"],
                         "seconds": a["duration"], "statuses": a["statuses"],
                         "server_cpu_ms_per_request": 1000 * a["cpu"] / max(1, a["completed"]),
                         "driver_cpu_share": a["driver_cpu"] / a["elapsed"] if a["elapsed"] else math.nan,
                         "latency": summary(a["lat"])}
        self.results["throughput"] = res

    def phase_soak(self) -> None:
        p = self.plan
        log(f"phase 5: soak, service under {p.tp_threads} client threads for {p.soak_seconds:.0f} s, "
            f"worker RSS sampled every {p.rss_interval:.0f} s")
        group = [self.post(self.svc_url + f"/cds-services/{self.service_ids[h]}", self.bodies[h], f"soak-{h}")
                 for h in HOOKS]
        workers_before = children(self.service.pid)
        out = self.drive("soak", {"mode": "throughput", "groups": {"service": group}, "threads": p.tp_threads,
                                  "warmup": 1.0, "duration": p.soak_seconds},
                         bound=p.soak_seconds + 90, sample_rss=self.svc_workers)
        workers_after = children(self.service.pid)
        samples = out["rss_samples"]
        per_worker = {}
        for pid in self.svc_workers:
            series = [(s["t"], s["rss_mb"].get(str(pid), s["rss_mb"].get(pid))) for s in samples]
            series = [(t, v) for t, v in series if v is not None]
            # The first sample is taken as the load starts: the "start" value is the first one after the
            # driver's warm-up second, so that RSS reached by the first requests is not counted as growth.
            steady = [v for t, v in series if t >= 2.0] or [v for _, v in series]
            per_worker[str(pid)] = {"startup": self.rss_startup["service"].get(pid),
                                    "soak_start": steady[0] if steady else None,
                                    "soak_end": steady[-1] if steady else None,
                                    "soak_max": max(steady) if steady else None,
                                    "growth_pct": 100 * (steady[-1] - steady[0]) / steady[0] if steady else None,
                                    "series": series}
        self.results["soak"] = {"seconds": p.soak_seconds, "rps": out["rps"], "completed": out["completed"],
                                "statuses": out["groups"]["all"]["statuses"],
                                "latency": summary(out["groups"]["all"]["latencies_ms"]),
                                "workers_before": workers_before, "workers_after": workers_after,
                                "per_worker": per_worker,
                                "baseline_rss_mb": {str(pid): rss_mb(pid) for pid in self.base_workers}}

    def phase_deadline(self) -> None:
        p = self.plan
        log(f"phase 6: deadline, FHIR server that never answers, {p.deadline_per_hook} calls per hook, "
            f"{p.deadline_concurrency} at a time")
        groups = {}
        for hook in HOOKS:
            path = f"/cds-services/{self.service_ids[hook]}"
            body = self.fallback_body(hook, self.hole.base_url)
            groups[f"hole/{hook}"] = [self.post(self.svc_url + path, body, f"dl-{hook}-{i}")
                                      for i in range(p.deadline_per_hook)]
        calls = p.deadline_per_hook * len(HOOKS)
        bound = (calls / p.deadline_concurrency + 2) * (p.deadline_s + 5) + 30
        out = self.drive("deadline", {"mode": "concurrent", "groups": groups,
                                      "concurrency": p.deadline_concurrency, "timeout": p.deadline_s + 20},
                         bound=bound)
        lat = [ms for g in out["groups"].values() for ms in g["latencies_ms"]]
        statuses: dict[str, int] = {}
        for g in out["groups"].values():
            for k, v in g["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        self.results["deadline"] = {"calls": len(lat), "latency": summary(lat), "statuses": statuses,
                                    "per_hook_max_ms": {h: max(out["groups"][f"hole/{h}"]["latencies_ms"])
                                                        for h in HOOKS},
                                    "black_hole_connections": self.hole.connections,
                                    "black_hole_requests": self.hole.requests}

    # -- all -----------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.results["started"] = datetime.now().astimezone().isoformat(timespec="seconds")
        self.results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                                   "loadavg_before": os.getloadavg()}
        try:
            for name, phase in (("setup", self.setup), ("prefetch", self.phase_prefetch),
                                ("fallback", self.phase_fallback), ("flat", self.phase_flat),
                                ("throughput", self.phase_throughput), ("soak", self.phase_soak),
                                ("deadline", self.phase_deadline)):
                t0 = time.monotonic()
                phase()
                self.timings[f"{name}_s"] = time.monotonic() - t0
                if name != "setup":
                    self._check_alive()
            self.results["rss_end"] = {"service": {str(p): rss_mb(p) for p in self.svc_workers},
                                       "baseline": {str(p): rss_mb(p) for p in self.base_workers}}
        finally:
            self.results["timings"] = self.timings
            self.results["total_seconds"] = time.monotonic() - started
            self.stack.close()
            if self.keep:
                log(f"kept {self.tmp} (logs, specs, driver outputs)")
            else:
                import shutil

                shutil.rmtree(self.tmp, ignore_errors=True)
        self.results["machine"]["loadavg_after"] = os.getloadavg()
        return self.results

    def _check_alive(self) -> None:
        for proc in (self.service, self.baseline):
            if not proc.alive():
                raise RuntimeError(f"{proc.name} died:\n{proc.log_tail()}")


def _statuses(r: dict[str, Any]) -> list[tuple[str, dict[str, int]]]:
    """Status counts of every phase where anything but 200 would make the timing meaningless."""
    found = []
    for hook in HOOKS:
        for side in ("service", "baseline"):
            found.append((f"prefetch {side} {hook}", r["prefetch"]["per_hook"][hook][side]["statuses"]))
        found.append((f"fallback {hook}", r["fallback"]["per_hook"][hook]["statuses"]))
    found.extend((f"flat {label}", r["flat"][label]["statuses"]) for label in ("10", "10k"))
    found.extend((f"throughput {side}", r["throughput"][side]["statuses"]) for side in ("service", "baseline"))
    found.append(("soak", r["soak"]["statuses"]))
    return found


def _query_shape(path: str) -> str:
    """``/fhir/Encounter?patient=X&date=geY`` → ``Encounter?patient&date`` (ids and values dropped)."""
    rel = path.split("/fhir/", 1)[-1]
    kind, _, query = rel.partition("?")
    if not query:
        return kind.split("/")[0] + "/{id}"
    keys = [part.split("=", 1)[0] for part in query.split("&")]
    return f"{kind}?{'&'.join(keys)}"


def _determinations(response: requests.Response) -> list[str]:
    try:
        cards = response.json().get("cards", [])
    except ValueError:
        return []
    found = []
    for card in cards:
        det = (card.get("extension") or {}).get("g2250-cds.determination") or {}
        found.append(str(det.get("status", card.get("indicator"))))
    return found


# -- report ------------------------------------------------------------------------------------------------------
def _fmt(v: float | None, unit: str = "ms") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if unit == "ms":
        return f"{v:.1f} ms"
    if unit == "rps":
        return f"{v:.0f}/s"
    if unit == "MB":
        return f"{v:.1f} MB"
    return f"{v:.2f}{unit}"


def build_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(name: str, measured: str, baseline: str, ratio: float | None, target: str, ok: bool | None) -> None:
        rows.append({"row": name, "service": measured, "baseline": baseline,
                     "ratio": None if ratio is None or math.isnan(ratio) else round(ratio, 3),
                     "target": target, "result": "info" if ok is None else ("PASS" if ok else "FAIL")})

    pf = r["prefetch"]
    for q in ("p50", "p99"):
        s, b = pf["pooled"]["service"][q], pf["pooled"]["baseline"][q]
        row(f"1 prefetch path {q} (4 hooks pooled)", _fmt(s), _fmt(b), s / b, "<= 1.5x", s / b <= 1.5)
    for hook in HOOKS:
        s, b = pf["per_hook"][hook]["service"]["p50"], pf["per_hook"][hook]["baseline"]["p50"]
        row(f"  prefetch p50 {hook}", _fmt(s), _fmt(b), s / b, "<= 1.5x", None)

    fb = r["fallback"]
    rtt = fb["rtt"]["p50"]
    for hook in HOOKS:
        s = fb["per_hook"][hook]["p50"]
        base = rtt + pf["per_hook"][hook]["service"]["p50"]
        row(f"2 fallback p50 {hook}", _fmt(s), f"{_fmt(base)} (1 RTT+pf)", s / base, "<= 1.5x", s / base <= 1.5)

    fl = r["flat"]
    big = r["history"]["10k"]["per_type"]
    s, b = fl["own"]["10k"]["p50"], fl["own"]["10"]["p50"]
    row(f"3 flat cost, service's own time p50 ({big}/type vs 10)", _fmt(s), _fmt(b), s / b, "<= 1.2x", s / b <= 1.2)
    s, b = fl["10k"]["p50"], fl["10"]["p50"]
    row("3 flat cost p50, end to end with SEKMET", _fmt(s), _fmt(b), s / b, "<= 1.2x", s / b <= 1.2)
    s, b = fl["10k"]["p99"], fl["10"]["p99"]
    row("  flat cost p99", _fmt(s), _fmt(b), s / b, "<= 1.2x", None)

    rep = {label: sum(q["ms"] for q in fl["check"][label]["replay"]) for label in ("10", "10k")}
    row("  same FHIR queries, SEKMET alone", _fmt(rep["10k"]), _fmt(rep["10"]), rep["10k"] / rep["10"], "-", None)

    tp = r["throughput"]
    s, b = tp["service"]["rps"], tp["baseline"]["rps"]
    row("4 throughput (8 threads)", _fmt(s, "rps"), _fmt(b, "rps"), s / b, ">= 0.70x", s / b >= 0.70)
    s, b = tp["service"]["server_cpu_ms_per_request"], tp["baseline"]["server_cpu_ms_per_request"]
    row("  server CPU per request", _fmt(s), _fmt(b), s / b, "-", None)

    soak = r["soak"]
    growths = [w["growth_pct"] for w in soak["per_worker"].values() if w["growth_pct"] is not None]
    worst = max(growths) if growths else math.nan
    starts = ", ".join(_fmt(w["soak_start"], "MB") for w in soak["per_worker"].values())
    ends = ", ".join(_fmt(w["soak_end"], "MB") for w in soak["per_worker"].values())
    restarted = soak["workers_before"] != soak["workers_after"]
    row(f"4 worker RSS over {soak['seconds']:.0f} s soak", f"end {ends}", f"start {starts}",
        1 + worst / 100 if not math.isnan(worst) else None, "<= 1.05x (flat)",
        (not restarted) and not math.isnan(worst) and worst <= 5.0)

    dl = r["deadline"]
    limit = r["config"]["deadline_seconds"] * 1000 + 100
    worst_dl = dl["latency"]["max"]
    row(f"5 deadline, black hole (max of {dl['calls']})", _fmt(worst_dl), f"{_fmt(limit)} limit", worst_dl / limit,
        "<= 1.0x", worst_dl <= limit)
    return rows


def render(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    out: list[str] = []
    mode = r["mode"]
    cfg = r["config"]
    out.append(f"g2250-cds benchmark ({mode} mode) — {r['started']}, {r['machine']['cpus']} CPUs, Python "
               f"{r['machine']['python']}; gunicorn gthread {cfg['workers']} workers x {cfg['threads']} threads "
               f"for both service and baseline; deadline {cfg['deadline_seconds']} s")
    out.append("")
    headers = ("row", "service", "baseline", "ratio", "target", "result")
    table = [[str(x.get(h) if x.get(h) is not None else "n/a") for h in headers] for x in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    out.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)) for t in table)

    fb = r["fallback"]
    out.append("")
    out.append(f"Fallback path: FHIR via proxy +{fb['delay_ms']:.0f} ms/response; one FHIR round trip (RTT) p50 "
               f"{fb['rtt']['p50']:.1f} ms; {fb['rounds']} calls per hook measured (+2 warm-up)")
    out.append(f"  {'hook':<21}{'fhir_requests':>14}{'waves':>7}{'p50':>10}{'p99':>10}{'RTTs':>7}  "
               "statuses (driver / log)")
    for hook in HOOKS:
        h = fb["per_hook"][hook]
        req = h["fhir_requests"]
        reqs = f"{req['min']}" if req["min"] == req["max"] else f"{req['min']}-{req['max']}"
        waves = f"{h['waves']['min']}" if h["waves"]["min"] == h["waves"]["max"] else \
            f"{h['waves']['min']}-{h['waves']['max']}"
        rtts = (h["p50"] - r["prefetch"]["per_hook"][hook]["service"]["p50"]) / fb["rtt"]["p50"]
        out.append(f"  {hook:<21}{reqs:>14}{waves:>7}{h['p50']:>8.1f}ms{h['p99']:>8.1f}ms{rtts:>7.2f}  "
                   f"{h['statuses']} / {h['log_status']}")
    out.append("  (RTTs = (fallback p50 - prefetch p50 of the hook) / RTT p50: the FHIR part in round trips)")
    out.append(f"  requests counted at the proxy: {fb['proxy_requests']} for {fb['service_calls']} calls "
               f"({fb['proxy_requests'] / max(1, fb['service_calls']):.1f}/call); from the service log: "
               f"{fb['logged_fhir_requests']}")
    out.append("  one traced call per hook (waves as seen at the proxy: requests in flight together; 'SEKMET' = "
               "time from the proxy receiving a request to SEKMET's answer, queueing included):")
    for hook in HOOKS:
        t = fb["traces"][hook]
        waves = "; ".join(f"wave {i + 1}: {w['requests']} req, {w['span_ms']:.0f} ms, SEKMET max "
                          f"{w['upstream_max_ms']:.0f} ms" for i, w in enumerate(t["waves"]))
        out.append(f"    {hook:<20} {t['wall_ms']:.0f} ms = {t['fhir_in_flight_ms']:.0f} ms FHIR in flight + "
                   f"{t['outside_fhir_ms']:.0f} ms outside; {waves}")

    fl, hist = r["flat"], r["history"]
    out.append("")
    out.append("Flat cost: encounter-discharge, no prefetch, SEKMET direct (no added latency)")
    for label in ("10", "10k"):
        h, f = hist[label], fl[label]
        out.append(f"  patient {h['prefix']}-pat: {h['loaded_history']} historical resources ({h['per_type']} "
                   f"Encounter + {h['per_type']} Communication + {h['per_type']} Media) + s01 episode; loaded in "
                   f"{h['load_seconds']:.1f} s ({h['resources_per_second']:.0f}/s); p50 {f['p50']:.1f} ms, "
                   f"p99 {f['p99']:.1f} ms; {f['fhir_requests']} FHIR requests, {f['waves']} waves; "
                   f"statuses {f['statuses']}; determination {fl['check'][label]['determinations']}")

    replays = {label: fl["check"][label]["replay"] for label in ("10", "10k")}
    totals = {label: sum(q["ms"] for q in rep) for label, rep in replays.items()}
    small = {q["query"]: q for q in replays["10"]}
    same_entries = all(small.get(q["query"], {}).get("entries") == q["entries"] for q in replays["10k"])
    out.append(f"  the same FHIR requests sent straight to SEKMET one at a time: {totals['10']:.0f} ms (10) vs "
               f"{totals['10k']:.0f} ms ({hist['10k']['per_type']}/type) in total; entries returned identical: "
               f"{same_entries}; slowest for the large patient:")
    worst = sorted(replays["10k"], key=lambda q: q["ms"], reverse=True)[:4]
    for q in worst:
        before = small.get(q["query"], {})
        out.append(f"    {q['query']:<45} {before.get('ms', math.nan):6.1f} ms -> {q['ms']:6.1f} ms "
                   f"(entries {before.get('entries', '?')} / {q['entries']})")
    own, flight = fl["own"], fl["in_flight"]
    out.append(f"  one call split, through the proxy without added delay (p50 of {own['10']['n']} calls each): "
               f"service's own time {own['10']['p50']:.1f} ms (10) vs {own['10k']['p50']:.1f} ms "
               f"({hist['10k']['per_type']}/type); FHIR in flight {flight['10']['p50']:.1f} vs "
               f"{flight['10k']['p50']:.1f} ms")
    out.append("  (SEKMET 0.1.1 filters each search parameter in its own uncorrelated IN (SELECT ...) and compares "
               "'ge' dates against an unindexed column, so a patient's date-bounded search scans all of that "
               "patient's rows of the type: bench/README.md, 'Flat cost'.)")

    tp = r["throughput"]
    out.append("")
    out.append("Throughput (same 4 example bodies round-robin, 8 client threads, keep-alive, one driver process):")
    for side in ("service", "baseline"):
        t = tp[side]
        out.append(f"  {side:<9}{t['rps']:>8.0f} req/s  {t['completed']} calls in {t['seconds']:.0f} s; latency p50 "
                   f"{t['latency']['p50']:.1f} ms p99 {t['latency']['p99']:.1f} ms; server CPU "
                   f"{t['server_cpu_ms_per_request']:.2f} ms/req; driver used {100 * t['driver_cpu_share']:.0f}% "
                   f"of a core; statuses {t['statuses']}")

    soak = r["soak"]
    out.append("")
    quick_note = " (--quick: shortened from 5 minutes to 30 s)" if mode == "quick" else ""
    out.append(f"Memory per service worker (RSS, /proc), soak {soak['seconds']:.0f} s{quick_note} at "
               f"{soak['rps']:.0f} req/s, statuses {soak['statuses']}:")
    for pid, w in soak["per_worker"].items():
        out.append(f"  worker {pid}: after start-up {_fmt(w['startup'], 'MB')}, soak start "
                   f"{_fmt(w['soak_start'], 'MB')}, soak end {_fmt(w['soak_end'], 'MB')}, "
                   f"max {_fmt(w['soak_max'], 'MB')}, growth "
                   f"{w['growth_pct']:+.1f}%")
    if soak["workers_before"] != soak["workers_after"]:
        out.append(f"  WORKERS RESTARTED during the soak: {soak['workers_before']} -> {soak['workers_after']}")
    base = ", ".join(f"{pid}: {_fmt(v, 'MB')}" for pid, v in soak["baseline_rss_mb"].items())
    out.append(f"  baseline workers (for scale): {base}")

    dl = r["deadline"]
    out.append("")
    out.append(f"Deadline: {dl['calls']} calls against a server that accepts and never answers; latency p50 "
               f"{dl['latency']['p50']:.0f} ms, max {dl['latency']['max']:.0f} ms; statuses {dl['statuses']}; "
               f"black hole saw {dl['black_hole_connections']} connections / {dl['black_hole_requests']} requests")
    out.append(f"  (fhir.timeout_seconds = {cfg['fhir_timeout_seconds']:.1f} > deadline, so the hook deadline is what "
               "ends each call)")

    out.append("")
    t = r["timings"]
    out.append("Timings: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t.items()) +
               f"; total {r['total_seconds']:.0f} s; load average before {r['machine']['loadavg_before'][0]:.2f}, "
               f"after {r['machine']['loadavg_after'][0]:.2f}")
    for where, statuses in _statuses(r):
        if set(statuses) - {"200"}:
            out.append(f"WARNING: responses other than 200 in {where}: {statuses}")
    for note in r["notes"]:
        out.append(f"NOTE: {note}")
    out.append("Ratios are service/baseline measured side by side in this run (interleaved where sequential); "
               "absolute times on this shared 2-core machine are noisy, the ratios less so.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (~2 minutes; 30 s soak instead of 5 min)")
    parser.add_argument("--json", metavar="OUT", help="also write all results as JSON to OUT")
    parser.add_argument("--workers", type=int, help="gunicorn workers for service and baseline (default 2)")
    parser.add_argument("--history", type=int, help="historical resources per type for the large patient "
                                                     "(default 10000)")
    parser.add_argument("--soak-seconds", type=float, help="override the soak duration")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, driver specs and outputs)")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that every process started is stopped by the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = Plan.make(args.quick, args.workers, args.history, args.soak_seconds)
    harness = Harness(plan, keep=args.keep)
    try:
        results = harness.run()
    except (RuntimeError, subprocess.SubprocessError, requests.RequestException) as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1
    rows = build_rows(results)
    results["rows"] = rows
    report = render(results, rows)
    results["report"] = report
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n", "utf-8")
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
