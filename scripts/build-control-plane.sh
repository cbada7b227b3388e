#!/usr/bin/env bash
# Build (once) the pinned etcd, kube-apiserver, kube-controller-manager, kubectl and helm
# from their Go modules; prints the directory holding them (`--node`: the real node's
# kubelet, kube-proxy and kube-scheduler). See k8s_celery/testing/binaries.py for the
# versions and the cache location. Needs only the standard library (tox runs it too).
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
exec env PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$(base_python)" -m k8s_celery.testing.binaries "$@"
