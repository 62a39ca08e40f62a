#!/usr/bin/env bash
# Refresh the pinned versions every install uses:
#   constraints.txt               the project, its test extra, pip and the build backend (setuptools)
#   tests/sekmet-constraints.txt  SEKMET's own venv (the FHIR test server; its own FastAPI/pydantic stack)
# Each comes from a clean resolve in a throw-away venv: the newest versions pyproject.toml (or sekmet-fhir==0.1.1)
# allows today. Run it with the Python CI and the image use (3.11), then review the diff, run
# `bash tests/run-all.sh` (it installs the new pins into .venv and .venv-sekmet) and commit both files.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
version="$("$PYTHON" -c 'import platform, sys; print(f"CPython {sys.version_info[0]}.{sys.version_info[1]}, {platform.system()} {platform.machine()}")')"
today="$(date -u +%Y-%m-%d)"

# $1 venv, $2 output file, $3 what it pins, $4 how it is used
freeze() {
  {
    echo "# Pinned versions of $3, resolved together on $version on $today."
    echo "# $4"
    echo "# Do not edit by hand: refresh with \`bash tests/refresh-constraints.sh\` (a clean resolve), then run the suite."
    "$1/bin/python" -m pip freeze --all --exclude-editable | grep -v -i -E '^(wheel|distribute)=='
  } > "$2.new"
  mv "$2.new" "$2"
}

"$PYTHON" -m venv "$work/app"
"$work/app/bin/python" -m pip install --quiet --upgrade pip 'setuptools>=77'  # the build backend's version too
"$work/app/bin/python" -m pip install --quiet -e '.[test]'
"$work/app/bin/python" -m pip check
freeze "$work/app" constraints.txt "everything \`pip install -e '.[test]'\` installs, pip, and the build backend" \
  "Used by tests/run-all.sh (so .ci/run), the README's set-up and deploy/Dockerfile: pip install --constraint constraints.txt --build-constraint constraints.txt ..."

"$PYTHON" -m venv "$work/sekmet"
"$work/sekmet/bin/python" -m pip install --quiet --upgrade pip
"$work/sekmet/bin/python" -m pip install --quiet 'sekmet-fhir==0.1.1'
"$work/sekmet/bin/python" -m pip check
freeze "$work/sekmet" tests/sekmet-constraints.txt "SEKMET's venv (.venv-sekmet: sekmet-fhir==0.1.1 and its stack, pip)" \
  "Used by tests/run-all.sh: pip install --constraint tests/sekmet-constraints.txt 'sekmet-fhir==0.1.1'"
# The venv's bundled setuptools is nobody's dependency here: not pinned.
sed -i -E '/^setuptools==/d' tests/sekmet-constraints.txt

git --no-pager diff --stat -- constraints.txt tests/sekmet-constraints.txt 2>/dev/null || true
