"""bench/ab.py's arithmetic and log reading (the harness itself starts servers: run by hand, bench/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.ab import paired, view_ms


def test_paired_ratios_are_taken_per_body_and_summarised_by_quartiles() -> None:
    base = [2.0, 4.0, 1.0, 10.0]
    new = [1.0, 4.0, 2.0, 30.0]  # ratios 0.5, 1, 2, 3
    assert paired(base, new) == {"q25": 0.5, "median": 1.0, "q75": 2.0, "n": 4}
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        paired([], [])


def test_view_ms_reads_the_hook_calls_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "log"
    lines = [
        "[2026-12-04 15:00:00 +0000] [1] [INFO] Booting worker with pid: 2",  # gunicorn's own
        json.dumps({"event": "http", "route": "/healthz", "status": 200, "duration_ms": 0.3}),  # not a hook call
        json.dumps({"event": "http", "hook": "patient-view", "status": 200, "duration_ms": 2.5}),
        json.dumps({"event": "http", "hook": "patient-view", "status": 200, "duration_ms": "x"}),  # unreadable
        '{"hook": "encounter-start", "duration_ms": 1.5',  # cut off
        json.dumps({"event": "http", "hook": "encounter-start", "status": 412, "duration_ms": 4.0}),
    ]
    log.write_text("\n".join(lines), "utf-8")
    assert view_ms(log) == [2.5, 4.0]


def test_the_interpreter_line_names_the_build_and_its_optimization_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import sysconfig

    from bench.procs import interpreter

    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: "'--prefix=/x' '--enable-optimizations' '--with-lto'"
                        if name == "CONFIG_ARGS" else None)
    assert interpreter().endswith(f"of {sys.base_prefix} (--enable-optimizations, --with-lto)")
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: None)
    assert "neither --enable-optimizations nor --with-lto" in interpreter()
