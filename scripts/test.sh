#!/usr/bin/env bash
# The test command: sets up what the tests need (bash scripts/setup.sh: Debian packages,
# the virtualenv, the local control plane and the real node's binaries and images, each
# when missing) and runs the whole suite. Arguments go to pytest:
#
#   bash scripts/test.sh                      # everything
#   bash scripts/test.sh -k eviction -x       # a part
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
bash scripts/setup.sh
use_venv
exec "$VENV_PYTHON" -m pytest "$@"
