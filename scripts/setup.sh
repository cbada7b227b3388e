#!/usr/bin/env bash
# The one installer. Sets up, when missing, everything the tests (default) or the demo need;
# idempotent, and quiet once done. scripts/test.sh, scripts/demo.sh, scripts/test-matrix.sh
# and scripts/celery-suite.sh set up through it; .ci/run adds nothing to it.
#
#   bash scripts/setup.sh                      # what the tests need
#   bash scripts/setup.sh --demo               # what the demo needs
#   bash scripts/setup.sh --demo --real-node   # what the demo on a real node needs
#
# 1. Debian packages (apt-get, as root): redis-server; for the tests also rabbitmq-server and
#    postgresql; for the real node containerd, runc, containernetworking-plugins, iptables,
#    and what builds its images: mmdebstrap, buildah, gcc and libc6-dev.
# 2. The virtualenv .venv with k8s-celery and its test extras.
# 3. The local control plane (etcd, kube-apiserver, kube-controller-manager, kubectl, helm)
#    and Kueue's manager, built from the upstream Go modules once, cached in ~/.cache/k8s-celery.
# 4. When this machine can run a real node: its kubelet, kube-proxy and kube-scheduler, and
#    the pod images (built here from Debian packages, PyPI and deploy/docker/Dockerfile).
#
# A part this machine cannot have (no root for apt-get, no cgroups, no Go) is named in one
# line and set-up goes on; the tests that need it fail with that same line.
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"

demo=false real_node=true
for arg in "$@"; do
    case "$arg" in
        --demo) demo=true real_node=false ;;
        --real-node) real_node=true ;;
        *) echo "usage: bash scripts/setup.sh [--demo [--real-node]]" >&2; exit 2 ;;
    esac
done

say() { echo "setup: $*" >&2; }
# Standard library only: these run before the virtualenv exists.
requirements() { PYTHONPATH="$REPO_ROOT" "$(base_python)" -m k8s_celery.testing.requirements "$@"; }
log="$(PYTHONPATH="$REPO_ROOT" "$(base_python)" -c \
       'from k8s_celery.testing.binaries import cache_root; print(cache_root())')/setup.log"
mkdir -p "$(dirname "$log")"

# -- 1. Debian packages (k8s_celery/testing/requirements.py lists them) --------------------
if ! $demo; then
    sets=(tests)
elif $real_node; then
    sets=(demo real-node)
else
    sets=(demo)
fi
read -ra missing <<<"$(requirements --missing-packages "${sets[@]}")"
if (( ${#missing[@]} )); then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]} (apt-get; log: $log)"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                   --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}"; } >>"$log" 2>&1; then
            tail -n 30 "$log" >&2
            say "apt-get failed; the tests that need ${missing[*]} fail until they are installed"
        fi
    else
        say "missing Debian packages: ${missing[*]} (as root: apt-get install ${missing[*]});" \
            "the tests that need them fail until then"
    fi
fi

# -- 2. the virtualenv --------------------------------------------------------------------
use_venv

# -- 3 and 4. builds, each once; its output goes to a log, and only a failure shows it -----
build() {  # build <what> <python module and arguments...>
    local what="$1"
    shift
    if "$VENV_PYTHON" -m "$@" --check >/dev/null 2>&1; then
        return 0
    fi
    say "building $what; log: $log"
    if ! "$VENV_PYTHON" -m "$@" >>"$log" 2>&1; then
        tail -n 30 "$log" >&2
        say "building $what failed; the tests that need it fail until it is built"
        return 1
    fi
}
build "the local control plane (about 5 minutes on 2 cores)" k8s_celery.testing.binaries || true
build "Kueue's manager (about 4 minutes on 2 cores)" k8s_celery.testing.kueue || true
if $real_node; then
    if unavailable="$(requirements --real-node 2>&1)"; then
        build "the real node's kubelet, kube-proxy and kube-scheduler (about 30 seconds)" \
            k8s_celery.testing.binaries --node &&
            build "the pod images (about 1 minute the first time)" k8s_celery.testing.realnode.images || true
    else
        say "$unavailable"
    fi
fi
