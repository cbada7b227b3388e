#!/usr/bin/env bash
# The demo, end to end on this machine: installs Redis (Debian) if missing, sets up
# the virtualenv, builds the local control plane once, runs examples/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
PYTHON=.venv/bin/python bash scripts/build-control-plane.sh >/dev/null
exec .venv/bin/python examples/demo.py
