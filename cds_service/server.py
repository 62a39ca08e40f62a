"""Production WSGI serving with gunicorn (never the Flask debug server).

Workers are ``gthread``: a hook call mostly waits on the FHIR server, so threads overlap that waiting cheaply.
The app is built in each worker after the fork (no preload), so thread pools and database connections are never
shared across processes; the master only creates the schema and warms the FHIR model imports before forking.
SIGTERM drains in-flight requests for ``graceful_timeout`` seconds.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication

from .config import Config


class GunicornApp(BaseApplication):
    """Gunicorn with ``options`` (from :func:`gunicorn_options`) serving the WSGI app ``load()`` returns; ``load``
    runs in each worker after the fork. The benchmark's baseline runs on this same class."""

    def __init__(self, options: dict[str, Any], load: Callable[[], Any]) -> None:
        self._options = options
        self._load = load
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._load()


def _service(config: Config) -> Any:
    from .app import create_app

    return create_app(config)


def gunicorn_options(config: Config, host: str, port: int, workers: int | None = None) -> dict[str, Any]:
    server = config.server
    return {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers or int(server["workers"]),
        "worker_class": "gthread",
        "threads": int(server["threads"]),
        # A hook call never legitimately outlives its deadline; the worker timeout is a last resort.
        "timeout": max(30, int(config.deadline_seconds * 4)),
        "graceful_timeout": max(10, int(config.deadline_seconds * 2)),
        "keepalive": 5,
        "accesslog": None,  # our own structured log line per request; gunicorn's would print query strings
        "errorlog": "-",
        "loglevel": "warning",
        "proc_name": "g2250-cds",
        "limit_request_line": 8190,
        "limit_request_fields": 100,
    }


def _child_exit(_server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def run_gunicorn(config: Config, config_path: str | None, *, host: str, port: int,
                 workers: int | None = None) -> None:
    options = gunicorn_options(config, host, port, workers)
    # Create the database tables once, in the master, before the workers fork and race to do it.
    from .store import FeedbackStore

    store = FeedbackStore(config.database_url)
    try:
        store.create_schema()
    finally:
        store.dispose()
    # Import fhir.resources' element models once, here, rather than in every worker's first calls.
    from .fhir.parse import warm_up

    warm_up()
    # Metrics from every worker, aggregated at scrape time (prometheus_client multiprocess mode).
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="g2250-metrics-")
    options["child_exit"] = _child_exit
    GunicornApp(options, lambda: _service(config)).run()
