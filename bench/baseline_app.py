"""The baseline: a bare Flask endpoint that only parses the request body and serialises it back.

Same stack as the service: Flask under gunicorn gthread, started with the service's own ``gunicorn_options`` for
the same config file (so workers, threads, keep-alive and limits are identical), stdlib ``json`` with the
service's dump settings. The route has the service's URL shape, ``POST /cds-services/<service_id>``.
``--decoder orjson`` decodes the body with orjson instead (the service's own fast path since issue 13), for a
baseline that reads JSON as fast as the service does; the stdlib is the default, as when the targets were set.

    python -m bench.baseline_app --config FILE --host 127.0.0.1 --port PORT [--workers N] [--decoder orjson]
"""

from __future__ import annotations

import argparse
import json

from flask import Flask, Response, request

app = Flask(__name__)
_loads = json.loads


@app.post("/cds-services/<service_id>")
def echo(service_id: str) -> Response:
    document = _loads(request.get_data(cache=False))
    return Response(json.dumps(document, ensure_ascii=False, separators=(",", ":")), status=200,
                    mimetype="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--decoder", choices=("json", "orjson"), default="json")
    args = parser.parse_args()
    if args.decoder == "orjson":
        import orjson

        global _loads
        _loads = orjson.loads
    from cds_service.config import load_config
    from cds_service.server import GunicornApp, gunicorn_options

    options = gunicorn_options(load_config(args.config), args.host, args.port, args.workers)
    options["proc_name"] = "g2250-bench-baseline"
    GunicornApp(options, lambda: app).run()


if __name__ == "__main__":
    main()
