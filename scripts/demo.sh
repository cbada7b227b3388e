#!/usr/bin/env bash
# The demo, end to end on this machine: installs Redis and RabbitMQ (Debian) if missing, sets up
# the virtualenv, builds the local control plane once, runs examples/demo.py.
# --real-node: the tasks run in containers of a real node (kubelet, containerd, runc) from an
# image built here; installs what that needs and builds the node's binaries and images once.
set -euo pipefail
cd "$(dirname "$0")/.."
demo_args=()
[[ "${1:-}" == "--real-node" ]] && demo_args=(--real-node)
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || missing+=(rabbitmq-server)  # the RabbitMQ tests' broker
if (( ${#missing[@]} )); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
PYTHON=.venv/bin/python bash scripts/build-control-plane.sh >/dev/null
if (( ${#demo_args[@]} )); then
    bash scripts/install-real-node.sh
    .venv/bin/python -m k8s_celery.testing.binaries --node >/dev/null
fi
exec .venv/bin/python examples/demo.py "${demo_args[@]}"
