"""Waiting for a `g2250-cds serve` subprocess started by a test to answer."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests


def wait_ready(process: subprocess.Popen[bytes], url: str, *, timeout: float, log: Callable[[], str]) -> None:
    """Until ``url`` answers 200; fails the test with the server's ``log()`` when it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"service exited: {log()[-3000:]}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    pytest.fail(f"service did not become ready: {log()[-3000:]}")


def stop_process_group(process: subprocess.Popen[Any], *, grace: float = 20.0) -> None:
    """SIGTERM to a server started in its own session (``start_new_session=True``: gunicorn's master and workers,
    a Node.js provider), then SIGKILL to the group after ``grace`` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
