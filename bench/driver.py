"""The load driver, run as its own process so that its CPU use never shares a GIL with the servers' harness:

    python -m bench.driver SPEC.json OUT.json

SPEC: ``{"mode": ..., "groups": {name: [request, ...]}, ...}``; a request is
``{"method", "url", "headers", "body"}`` (body a string or null). Each group cycles through its requests.

``latency``     sequential calls on one keep-alive ``requests.Session``: ``warmup`` rounds, then up to ``samples``
                rounds (bounded by ``max_seconds``); a round calls every group once, in an order rotated each
                round, so that the groups compared are measured side by side under the same noise.
``throughput``  ``threads`` client threads (one Session each) on the requests of every group, round-robin, for
                ``warmup`` + ``duration`` seconds; calls finishing inside the measured ``duration`` count.
``concurrent``  every request of every group once, ``concurrency`` at a time (the deadline test).

OUT: per group the latencies (ms) and status counts, plus the driver's own CPU seconds.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
    session.mount("http://", adapter)
    return session


def _call(session: requests.Session, req: dict[str, Any], timeout: float) -> tuple[float, int]:
    body = req.get("body")
    started = time.perf_counter()
    try:
        response = session.request(req["method"], req["url"], headers=req.get("headers") or {},
                                   data=body.encode("utf-8") if body is not None else None, timeout=timeout)
        _ = response.content
        status = response.status_code
    except requests.RequestException:
        status = -1  # transport error (reported as status -1)
    return (time.perf_counter() - started) * 1000, status


def latency(spec: dict[str, Any]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = spec["groups"]
    names = list(groups)
    timeout = float(spec.get("timeout", 30))
    result = {n: {"latencies_ms": [], "statuses": Counter()} for n in names}
    cursor = dict.fromkeys(names, 0)
    session = _session()

    def one(name: str, record: bool) -> None:
        reqs = groups[name]
        req = reqs[cursor[name] % len(reqs)]
        cursor[name] += 1
        ms, status = _call(session, req, timeout)
        if record:
            result[name]["latencies_ms"].append(ms)
            result[name]["statuses"][status] += 1

    for r in range(int(spec.get("warmup", 0))):
        for name in names[r % len(names):] + names[:r % len(names)]:
            one(name, False)
    stop_at = time.monotonic() + float(spec.get("max_seconds", 60))
    rounds = 0
    for r in range(int(spec["samples"])):
        if time.monotonic() > stop_at:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            one(name, True)
        rounds += 1
    session.close()
    return {"groups": result, "rounds": rounds}


def throughput(spec: dict[str, Any]) -> dict[str, Any]:
    reqs = [req for group in spec["groups"].values() for req in group]
    threads = int(spec["threads"])
    warmup = float(spec.get("warmup", 1.0))
    duration = float(spec["duration"])
    timeout = float(spec.get("timeout", 30))
    start = time.monotonic() + 0.2
    window = (start + warmup, start + warmup + duration)
    records: list[list[tuple[float, float, int]]] = [[] for _ in range(threads)]

    def worker(index: int) -> None:
        session = _session()
        i = index
        while time.monotonic() < start:
            time.sleep(0.005)
        while time.monotonic() < window[1]:
            ms, status = _call(session, reqs[i % len(reqs)], timeout)
            records[index].append((time.monotonic(), ms, status))
            i += 1
        session.close()

    pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=duration + warmup + timeout + 5)
    inside = [(ms, st) for rec in records for (end, ms, st) in rec if window[0] <= end <= window[1]]
    return {
        "groups": {"all": {"latencies_ms": [ms for ms, _ in inside], "statuses": Counter(st for _, st in inside)}},
        "completed": len(inside),
        "duration": duration,
        "rps": len(inside) / duration,
    }


def concurrent(spec: dict[str, Any]) -> dict[str, Any]:
    timeout = float(spec.get("timeout", 30))
    jobs = [(name, req) for name, group in spec["groups"].items() for req in group]
    local = threading.local()

    def run(job: tuple[str, dict[str, Any]]) -> tuple[str, float, int]:
        if getattr(local, "session", None) is None:
            local.session = _session()
        ms, status = _call(local.session, job[1], timeout)
        return job[0], ms, status

    result: dict[str, Any] = {}
    with ThreadPoolExecutor(int(spec.get("concurrency", 4))) as pool:
        for name, ms, status in pool.map(run, jobs):
            slot = result.setdefault(name, {"latencies_ms": [], "statuses": Counter()})
            slot["latencies_ms"].append(ms)
            slot["statuses"][status] += 1
    return {"groups": result}


MODES = {"latency": latency, "throughput": throughput, "concurrent": concurrent}


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    started = time.monotonic()
    out = MODES[spec["mode"]](spec)
    times = os.times()
    out["driver_cpu_seconds"] = times.user + times.system
    out["elapsed_seconds"] = time.monotonic() - started
    for group in out["groups"].values():
        group["statuses"] = {str(k): v for k, v in group["statuses"].items()}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
