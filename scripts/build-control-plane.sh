#!/usr/bin/env bash
# Build (once) the pinned etcd, kube-apiserver, kube-controller-manager, kubectl and helm
# from their Go modules; prints the directory holding them. See
# k8s_celery/testing/binaries.py for the versions and the cache location.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m k8s_celery.testing.binaries
