#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, every version pinned (constraints.txt,
# tests/sekmet-constraints.txt), then runs ruff and pytest with the integration tests required (real FHIR server
# SEKMET, PostgreSQL, Redis). This is the README's test command, and .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
# Every version installed is pinned (constraints.txt; its header says how to refresh it): pip itself first, then
# the project with its test extra, and the build backend that builds the editable install (--build-constraint).
# An existing venv is brought to the pinned versions too.
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --constraint constraints.txt pip
.venv/bin/python -m pip install --quiet --constraint constraints.txt --build-constraint constraints.txt -e '.[test]'
.venv/bin/python -m pip check

# SEKMET pins its own FastAPI/pydantic/fhir.resources: it lives in a venv of its own, with its own pins
# (tests/sekmet-constraints.txt). Not needed when FHIR_BASE_URL or SEKMET_BIN names another server.
if [ -z "${FHIR_BASE_URL:-}" ] && [ -z "${SEKMET_BIN:-}" ]; then
  if [ ! -x .venv-sekmet/bin/python ]; then
    "$PYTHON" -m venv .venv-sekmet
  fi
  .venv-sekmet/bin/python -m pip install --quiet --constraint tests/sekmet-constraints.txt pip
  .venv-sekmet/bin/python -m pip install --quiet --constraint tests/sekmet-constraints.txt 'sekmet-fhir==0.1.1'
  .venv-sekmet/bin/python -m pip check
fi
# The worklist's browser tests: the test OpenID provider (panva's oidc-provider) and axe-core, at the versions of
# tests/support/oidc_provider/package-lock.json. Without Node.js (or Debian's chromium) those tests skip, saying
# why — unless G2250_REQUIRE_BROWSER=1 (.ci/run sets it), when they fail.
if command -v npm >/dev/null 2>&1; then
  npm ci --prefix tests/support/oidc_provider --no-audit --no-fund --loglevel=error >/dev/null
fi
export SEKMET_BIN="${SEKMET_BIN:-$PWD/.venv-sekmet/bin/sekmet}"
export G2250_REQUIRE_INTEGRATION="${G2250_REQUIRE_INTEGRATION:-1}"

.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
