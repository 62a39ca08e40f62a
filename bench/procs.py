"""Process management: start servers in their own process groups, wait until ready, read /proc, always stop.

Every process the harness starts is a :class:`Proc` (its own session, so the whole gunicorn tree — master and
workers — is signalled by process group, never by name).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class Proc:
    """A child process in its own process group, with stdout+stderr in ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.popen = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=str(cwd or ROOT), start_new_session=True,
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text("utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL to the group after ``grace`` seconds."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        # Whatever is left of the group (a worker that outlived its master) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


def interpreter() -> str:
    """The Python running the benchmark, and so the servers it starts (``sys.executable``): version, path, and
    whether it was configured with profile-guided and link-time optimization. Ratios to the echo depend on it:
    the service's work is Python code, most of the echo's is the C of the json module, and a build with PGO
    and LTO runs Python code about a fifth faster (issue 13: 1.60x on this machine's default pyenv build, 1.52x
    on Debian's /usr/bin/python3 in one quick run). The container image's CPython (python:3.11-slim) is built
    with --enable-optimizations --with-lto; a distribution's python3 may be too without saying so here."""
    import platform
    import sysconfig

    args = sysconfig.get_config_var("CONFIG_ARGS") or ""
    flags = [flag for flag in ("--enable-optimizations", "--with-lto") if flag in args]
    built = ", ".join(flags) if flags else "neither --enable-optimizations nor --with-lto in its configure arguments"
    return f"{platform.python_implementation()} {platform.python_version()} of {sys.base_prefix} ({built})"


def wait_ready(proc: Proc, url: str, *, method: str = "GET", body: bytes | None = None,
               timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with requests.Session() as session:
        session.trust_env = False
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.log_tail()}")
            try:
                response = session.request(method, url, data=body, timeout=2,
                                           headers={"Content-Type": "application/json"})
                if response.status_code < 500:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not become ready within {timeout:.0f} s:\n{proc.log_tail()}")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (gunicorn's workers of its master), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat_fields(int(entry))
        if stat is not None and int(stat[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...] (field 3 onwards of proc(5))."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / CLK_TCK


def gunicorn_tree(master: int) -> list[int]:
    return [master, *children(master)]
