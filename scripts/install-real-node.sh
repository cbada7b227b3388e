#!/usr/bin/env bash
# Install (with apt, when missing) what the real node and its images need: containerd and
# runc, the CNI plugins, iptables, mmdebstrap and buildah, gcc with a static libc (pause).
# Idempotent and quiet; k8s_celery/testing/realnode says how each is used.
set -euo pipefail
missing=()
need() { [[ -e "$1" ]] || missing+=("$2"); }
need /usr/bin/containerd containerd
need /usr/sbin/runc runc
need /usr/lib/cni/bridge containernetworking-plugins
need /usr/sbin/iptables iptables
need /usr/bin/mmdebstrap mmdebstrap
need /usr/bin/buildah buildah
need /usr/bin/gcc gcc
need "/usr/lib/$(uname -m)-linux-gnu/libc.a" libc6-dev
if (( ${#missing[@]} )); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
