#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, then runs ruff and pytest with the
# integration tests required (real FHIR server SEKMET, PostgreSQL, Redis). This is the README's test command,
# and .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

# SEKMET pins its own FastAPI/pydantic/fhir.resources: it lives in a venv of its own.
if [ -z "${FHIR_BASE_URL:-}" ] && [ ! -x .venv-sekmet/bin/sekmet ]; then
  "$PYTHON" -m venv .venv-sekmet
  .venv-sekmet/bin/python -m pip install --quiet --upgrade pip
  .venv-sekmet/bin/python -m pip install --quiet 'sekmet-fhir==0.1.1'
fi
export SEKMET_BIN="${SEKMET_BIN:-$PWD/.venv-sekmet/bin/sekmet}"
export G2250_REQUIRE_INTEGRATION="${G2250_REQUIRE_INTEGRATION:-1}"

.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
