#!/usr/bin/env bash
# The Celery version matrix of tox.ini: the unit tests and the core end-to-end subset on
# each pinned Celery (celery55: 5.5.3 with kombu 5.5.4 and billiard 4.2.1; celery56: 5.6.3;
# celery57: 5.7.0), and Nautobot's end-to-end tests (nautobot: Nautobot from PyPI on its own
# Celery 5.6). tox itself lives in a virtualenv of its own under ~/.cache/k8s-celery, and so
# do its environments (tox recreates one when its deps change): a fresh clone installs
# the package into them, not every dependency again.
#
#   bash scripts/test-matrix.sh                 # celery55 and celery57
#   bash scripts/test-matrix.sh celery55 -k rabbit -x    # one leg; further arguments go to pytest
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
bash scripts/setup.sh
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/k8s-celery/tox-venv"
[[ -x "$TOOLS/bin/tox" ]] || { "$(base_python)" -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q --disable-pip-version-check "tox>=4"; }
WORK="${XDG_CACHE_HOME:-$HOME/.cache}/k8s-celery/tox-envs"
envs="${1:-celery55,celery57}"
shift || true
if (( $# )); then
    exec "$TOOLS/bin/tox" --workdir "$WORK" -e "$envs" -- "$@"
fi
exec "$TOOLS/bin/tox" --workdir "$WORK" -e "$envs"
