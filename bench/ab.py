"""A/B of two versions of the service on realistic records, served, interleaved with the echo (issue 13).

    .venv/bin/python -m bench.ab                        # this working tree against HEAD, about 2 minutes
    .venv/bin/python -m bench.ab --base 1a0a176 --rounds 500 --hooks encounter-discharge
    .venv/bin/python -m bench.ab --base HEAD~3 --json out.json

Why: ``bench.realistic`` measures one version against the echo; two of its runs minutes apart differ by about
8 % on these shared machines, more than most single changes. Here both versions run at once — the base from a
``git worktree`` of ``--base``, the new one from this checkout — each as ``g2250-cds serve`` with the same config,
beside ``bench/baseline_app.py``; every round sends one new patient's body to all three in a random order. The
paired ratio (new ÷ base for the same body) cancels the machine's drift; its quartiles say how noisy it was.

Also reported per version: the view's own time (the log lines' ``duration_ms``, p50) and the CPU every process of
its tree used per request (/proc), so a change that only moves work (to a thread, to after the answer) shows.
Loopback only; no FHIR server (every request is self-contained, prefetch only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from .procs import ROOT, Proc, children, cpu_seconds, interpreter, wait_ready
from .realistic import JSON_HEADERS, pct, service_config, shifted_text
from .records import HOOKS, SIZES, TZ, instantiate

DEFAULT_HOOKS = ("encounter-discharge", "appointment-book", "patient-view")
# Warm-up: imports, caches of master data, and each version's log writer child started (at its first batch) and
# settled, so that neither side pays a start-up inside the measured rounds.
WARMUP_ROUNDS = 30


def log(message: str) -> None:
    print(f"[ab {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def paired(base: list[float], new: list[float]) -> dict[str, float]:
    """Quartiles of new ÷ base over requests paired by body (the same index in both lists)."""
    if len(base) != len(new) or not base:
        raise ValueError("paired samples must be non-empty lists of one length")
    ratios = sorted(n / b for b, n in zip(base, new, strict=True))
    return {"q25": pct(ratios, 0.25), "median": pct(ratios, 0.5), "q75": pct(ratios, 0.75), "n": len(ratios)}


def view_ms(log_path: Path) -> list[float]:
    """``duration_ms`` of the hook calls' log lines (JSON lines; gunicorn's own lines are skipped)."""
    found = []
    for line in log_path.read_text("utf-8", errors="replace").splitlines():
        if '"duration_ms"' not in line or '"hook"' not in line:
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            found.append(float(json.loads(line)["duration_ms"]))
    return found


def _tree(pid: int) -> list[int]:
    return [pid, *(p for child in children(pid) for p in _tree(child))]


def _start(name: str, code: Path, directory: Path, echo: bool) -> tuple[Proc, str]:
    from fhir_fixtures.sekmet import free_port

    config = service_config(directory)
    (directory / "metrics").mkdir()
    port = free_port()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory / "metrics"), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(code))  # this version's packages before the editable install's
    module = ["-m", "bench.baseline_app"] if echo else ["-m", "cds_service.cli", "serve"]
    proc = Proc(name, [sys.executable, *module, "--host", "127.0.0.1", "--port", str(port), "--config", str(config)],
                directory / "log", env=env, cwd=code)
    url = f"http://127.0.0.1:{port}"
    return proc, url


def run(args: argparse.Namespace) -> dict[str, Any]:
    hooks = args.hooks.split(",")
    unknown = sorted(set(hooks) - set(HOOKS))
    if unknown:
        raise SystemExit(f"--hooks: unknown hook(s) {', '.join(unknown)}; known: {', '.join(HOOKS)}")
    if args.size not in SIZES:
        raise SystemExit(f"--size: unknown record size {args.size!r}; known: {', '.join(SIZES)}")
    tmp = Path(tempfile.mkdtemp(prefix="g2250-ab-"))
    worktree = tmp / "base"
    stack = contextlib.ExitStack()
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(worktree), args.base],
                       check=True)
        stack.callback(subprocess.run, ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                       check=False)
        sides = {"base": worktree, "new": ROOT}
        procs: dict[str, Proc] = {}
        urls: dict[str, str] = {}
        for name, code in [*sides.items(), ("echo", ROOT)]:
            directory = tmp / name
            directory.mkdir(exist_ok=True)
            procs[name], urls[name] = _start(name, code, directory, echo=name == "echo")
            stack.callback(procs[name].stop)
        for name, proc in procs.items():
            if name == "echo":
                wait_ready(proc, f"{urls[name]}/cds-services/ready", method="POST", body=b"{}")
            else:
                wait_ready(proc, f"{urls[name]}/readyz")
        log(f"base {args.base} and this checkout, echo; hooks {hooks}; {args.rounds} rounds (+{WARMUP_ROUNDS})")
        from hooks import SERVICES

        paths = {s.hook: f"/cds-services/{s.id}" for s in SERVICES}
        texts = {h: shifted_text(h, args.size, datetime.now(TZ)) for h in hooks}
        names = list(urls)
        sessions = {name: requests.Session() for name in names}
        for session in sessions.values():
            session.trust_env = False
        ms: dict[str, dict[str, list[float]]] = {h: {name: [] for name in names} for h in hooks}
        rng = random.Random(args.seed)
        patient = 30_000_000
        cpu0: dict[str, float] = {}
        for r in range(WARMUP_ROUNDS + args.rounds):
            if r == WARMUP_ROUNDS:
                time.sleep(1.0)  # the warm-up's journal batches written
                cpu0 = {name: cpu_seconds(_tree(procs[name].pid)) for name in names}
            for hook in hooks:
                patient += 1
                body = instantiate(texts[hook], patient).encode("utf-8")
                order = names[:]
                rng.shuffle(order)
                for name in order:
                    t0 = time.perf_counter()
                    response = sessions[name].post(urls[name] + paths[hook], data=body, headers=JSON_HEADERS,
                                                   timeout=60)
                    elapsed = 1000 * (time.perf_counter() - t0)
                    if response.status_code != 200:
                        raise RuntimeError(f"{name} answered {response.status_code}: {response.text[:300]}")
                    if r >= WARMUP_ROUNDS:
                        ms[hook][name].append(elapsed)
        measured = args.rounds * len(hooks)
        # Trees now: a log writer child started during the run counts from its start.
        cpu = {name: (cpu_seconds(_tree(procs[name].pid)) - cpu0[name]) * 1000 / measured for name in names}
        for session in sessions.values():
            session.close()
        for proc in procs.values():
            proc.stop()
        result: dict[str, Any] = {"base": args.base, "rounds": args.rounds, "size": args.size, "per_hook": {},
                                  "cpu_ms_per_request": cpu, "interpreter": interpreter()}
        for hook in hooks:
            echo = statistics.median(ms[hook]["echo"])
            result["per_hook"][hook] = {
                name: {"p50": statistics.median(ms[hook][name]), "p90": pct(ms[hook][name], 0.9),
                       "x_echo": statistics.median(ms[hook][name]) / echo}
                for name in names}
        everything = {name: [x for hook in hooks for x in ms[hook][name]] for name in names}
        result["pooled"] = {name: statistics.median(values) for name, values in everything.items()}
        result["pooled_p99"] = {name: pct(values, 0.99) for name, values in everything.items()}
        result["paired"] = paired(everything["base"], everything["new"])
        result["view_ms_p50"] = {name: statistics.median(v) if (v := view_ms(procs[name].log_path)) else None
                                 for name in sides}
        if args.json:
            Path(args.json).write_text(json.dumps({**result, "ms": ms}, indent=1), "utf-8")
        return result
    finally:
        stack.close()


def report(result: dict[str, Any]) -> str:
    lines = [f"A/B against {result['base']}: {result['rounds']} rounds, size {result['size']}, a new patient per "
             "round, random order; ms are round trips over loopback",
             f"interpreter: {result.get('interpreter', 'not recorded')}", ""]
    for hook, sides in result["per_hook"].items():
        cells = "  ".join(f"{name} {v['p50']:.2f} / {v['p90']:.2f} ({v['x_echo']:.3f}x)" for name, v in sides.items())
        lines.append(f"{hook:<22}{cells}")
    pooled = result["pooled"]
    lines.append(f"{'pooled p50':<22}" + "  ".join(f"{name} {value:.2f} ({value / pooled['echo']:.3f}x)"
                                                  for name, value in pooled.items()))
    if "pooled_p99" in result:
        tail = result["pooled_p99"]
        lines.append(f"{'pooled p99':<22}" + "  ".join(f"{name} {value:.2f} ({value / tail['echo']:.3f}x)"
                                                      for name, value in tail.items()))
    p = result["paired"]
    lines.append(f"paired new/base: median {p['median']:.3f} (quartiles {p['q25']:.3f}-{p['q75']:.3f}, n={p['n']})")
    views = result["view_ms_p50"]
    lines.append("view duration_ms p50: " + "  ".join(f"{name} {v:.2f}" for name, v in views.items() if v is not None))
    lines.append("CPU per request, whole process tree (ms): "
                 + "  ".join(f"{name} {v:.2f}" for name, v in result["cpu_ms_per_request"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git ref of the base version (default HEAD)")
    parser.add_argument("--rounds", type=int, default=300, help="measured rounds (default 300)")
    parser.add_argument("--hooks", default=",".join(DEFAULT_HOOKS), help="comma-separated hooks")
    parser.add_argument("--size", default="33", help="record size of bench/records.py (default 33)")
    parser.add_argument("--seed", type=int, default=13, help="seed of the order of the three servers per round")
    parser.add_argument("--json", metavar="OUT", help="also write every latency as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    print(report(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
