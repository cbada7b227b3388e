#!/usr/bin/env bash
# The test command: set up a virtualenv with the package and its test extras, build
# (once) the local control plane, and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
PYTHON=.venv/bin/python bash scripts/build-control-plane.sh
exec .venv/bin/python -m pytest "$@"
