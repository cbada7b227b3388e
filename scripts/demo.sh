#!/usr/bin/env bash
# The demo, end to end on this machine: sets up what it needs (bash scripts/setup.sh --demo:
# Redis, the virtualenv and the local control plane, each when missing) and runs
# examples/demo.py. --real-node: the tasks run in containers of a real node (kubelet,
# containerd, runc) from an image built here; sets up that node and its images as well.
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
demo_args=()
[[ "${1:-}" == "--real-node" ]] && demo_args=(--real-node)
bash scripts/setup.sh --demo "${demo_args[@]}"
use_venv
exec "$VENV_PYTHON" examples/demo.py "${demo_args[@]}"
