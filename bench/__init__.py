"""Benchmark harness for the g2250-cds service: ``python -m bench.run [--quick] [--json OUT]``.

Everything runs on 127.0.0.1 and stops by itself: SEKMET (FHIR test server), a latency-injecting proxy and a
black-hole server in front of it, the service under gunicorn, a bare Flask baseline under the same gunicorn
settings, and a load driver in a separate process. See ``bench/README.md``.
"""
