"""Wait until a URL answers 2xx, then exit 0; exit 1 when the time runs out (standard library only).

The compose trial uses it as the one-shot ``hapi-ready`` service: the HAPI FHIR image is distroless (no shell, no
curl), so compose cannot health-check it from inside; this waiter, run from the g2250-cds image, plays that part
and ``load-fixtures`` starts only once it has completed successfully.

    python wait_for_http.py http://hapi:8080/fhir/metadata --timeout 300
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request


def wait(url: str, timeout: float, interval: float) -> bool:
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            with urllib.request.urlopen(url, timeout=min(10.0, max(interval, 1.0))) as response:
                if 200 <= response.status < 300:
                    print(f"{url}: HTTP {response.status} after {attempt} attempt(s)", flush=True)
                    return True
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            reason = type(getattr(exc, "reason", exc)).__name__
        if time.monotonic() + interval > deadline:
            print(f"{url}: not ready after {timeout:g} s ({reason})", file=sys.stderr, flush=True)
            return False
        if attempt == 1 or attempt % 10 == 0:
            print(f"{url}: waiting ({reason})", flush=True)
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait in all (default 300)")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between attempts (default 3)")
    args = parser.parse_args(argv)
    return 0 if wait(args.url, args.timeout, args.interval) else 1


if __name__ == "__main__":
    sys.exit(main())
