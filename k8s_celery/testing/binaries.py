"""Build etcd, kube-apiserver, kube-controller-manager, kubectl and helm from Go modules.

Nothing here downloads a prebuilt binary: the pinned releases are compiled from the
Go module proxy with the machine's Go toolchain into a cache outside the source tree
(``~/.cache/k8s-celery`` or ``$K8S_CELERY_CACHE``). The build is idempotent; point
``K8S_CELERY_BIN_DIR`` at a directory of existing binaries to skip it.

``python -m k8s_celery.testing.binaries`` builds (when needed) and prints the directory.
helm (for the chart's tests) has its own cache directory and ``K8S_CELERY_HELM``.
The real node's kubelet, kube-scheduler and kube-proxy (``--node``) come from the same
pinned module into their own cache directory (or ``K8S_CELERY_NODE_BIN_DIR``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .requirements import MissingRequirement

KUBERNETES_VERSION = "v1.33.13"
#: The etcd server release that the pinned Kubernetes release itself depends on.
ETCD_VERSION = "v3.5.21"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
#: What a real node runs besides containerd and runc (which come from the distribution).
NODE_BINARIES = ("kubelet", "kube-scheduler", "kube-proxy")
HELM_VERSION = "v3.22.0"
#: The Kubernetes minor of the client-go that helm release builds with (its Makefile's default).
HELM_KUBERNETES_MINOR = "37"

ETCD_MAIN = """\
// Command etcd is the upstream etcd server, built from its Go module.
package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""


class BinariesMissing(MissingRequirement):
    """The control-plane binaries are neither built nor pointed at."""


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "k8s-celery"
    return Path(os.environ.get("K8S_CELERY_CACHE", default))


def build_dir() -> Path:
    return cache_root() / f"kubernetes-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}" / "bin"


def binary_dir(build: bool = False) -> Path:
    """The directory holding every control-plane binary, building it if asked to."""
    return _binaries_in("K8S_CELERY_BIN_DIR", build_dir(), BINARIES, build_binaries if build else None,
                        "`python -m k8s_celery.testing.binaries` (or scripts/build-control-plane.sh)")


def _binaries_in(variable: str, default: Path, names, build: Callable[[Path], Path] | None, command: str) -> Path:
    """``$variable`` or ``default`` once it holds every one of ``names``: built there with
    ``build`` when they are missing, else :class:`BinariesMissing` naming ``command``."""
    configured = os.environ.get(variable)
    directory = Path(configured) if configured else default
    missing = [name for name in names if not os.access(directory / name, os.X_OK)]
    if not missing:
        return directory
    if configured:
        raise BinariesMissing(f"{variable}={configured} lacks {', '.join(missing)}")
    if build is None:
        raise BinariesMissing(f"{', '.join(missing)} not built in {directory}; run {command}")
    return build(directory)


def staging_replaces(upstream_gomod: str, kubernetes_version: str = KUBERNETES_VERSION) -> list[str]:
    """``replace`` lines mapping each staging module to its published version.

    ``k8s.io/kubernetes`` replaces its staging modules with ``./staging/...`` paths,
    which do not exist outside its repository; their published tags are
    ``v0.<minor>.<patch>`` for Kubernetes ``v1.<minor>.<patch>``.
    """
    staging_version = "v0." + kubernetes_version.removeprefix("v1.")
    modules = re.findall(r"^\s*(k8s\.io/[^\s]+)\s+=>\s+\./staging/", upstream_gomod, re.MULTILINE)
    return [f"{module} => {module} {staging_version}" for module in modules]


def wrapper_gomod(upstream_gomod: str) -> str:
    replaces = "\n".join(f"\t{line}" for line in staging_replaces(upstream_gomod))
    return (
        "module k8s-celery/control-plane\n\n"
        f"go 1.24\n\n"
        f"require (\n\tk8s.io/kubernetes {KUBERNETES_VERSION}\n"
        f"\tgo.etcd.io/etcd/server/v3 {ETCD_VERSION}\n)\n\n"
        f"replace (\n{replaces}\n)\n"
    )


def _go() -> str:
    go = os.environ.get("GO") or shutil.which("go") or "/usr/local/go/bin/go"
    if not os.access(go, os.X_OK):
        raise BinariesMissing("Go is needed to build the local control plane and none was found: "
                              "put `go` on the PATH or set GO to it")
    return go


def _version_ldflags() -> str:
    major, minor, _ = KUBERNETES_VERSION.removeprefix("v").split(".")
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.gitVersion={KUBERNETES_VERSION}", f"-X {package}.gitMajor={major}",
                  f"-X {package}.gitMinor={minor}", f"-X {package}.gitTreeState=clean"]
    return " ".join(flags)


def build_binaries(target: Path) -> Path:
    """Compile the pinned releases into ``target`` (replaced atomically)."""
    return _build(target, ["./cmd/etcd", "k8s.io/kubernetes/cmd/kube-apiserver",
                           "k8s.io/kubernetes/cmd/kube-controller-manager", "k8s.io/kubernetes/cmd/kubectl"],
                  f"Kubernetes {KUBERNETES_VERSION} and etcd {ETCD_VERSION}")


def node_build_dir() -> Path:
    return cache_root() / f"node-{KUBERNETES_VERSION}" / "bin"


def node_binary_dir(build: bool = False) -> Path:
    """The directory holding kubelet, kube-scheduler and kube-proxy, building it if asked to.

    Built from the same wrapper module as the control plane, so that the node and the
    API server are one Kubernetes release (upstream builds these with CGO off as well).
    """
    return _binaries_in("K8S_CELERY_NODE_BIN_DIR", node_build_dir(), NODE_BINARIES,
                        build_node_binaries if build else None, "`python -m k8s_celery.testing.binaries --node`")


def build_node_binaries(target: Path) -> Path:
    """Build kubelet, kube-scheduler and kube-proxy into ``target``."""
    return _build(target, [f"k8s.io/kubernetes/cmd/{name}" for name in NODE_BINARIES],
                  f"the Kubernetes {KUBERNETES_VERSION} node")


def _build(target: Path, packages: list[str], what: str) -> Path:
    go = _go()
    env = dict(os.environ, GOFLAGS="-mod=mod", CGO_ENABLED="0", GOTOOLCHAIN="local")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="k8s-celery-build-") as work:
        print(f"building {what} in {work}", file=sys.stderr)
        download = subprocess.run(
            [go, "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
            cwd=work, env=env, check=True, capture_output=True, text=True)
        upstream_gomod = Path(json.loads(download.stdout)["GoMod"]).read_text()
        Path(work, "go.mod").write_text(wrapper_gomod(upstream_gomod))
        Path(work, "cmd", "etcd").mkdir(parents=True)
        Path(work, "cmd", "etcd", "main.go").write_text(ETCD_MAIN)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        subprocess.run(
            [go, "build", "-trimpath", "-tags", "selinux,notest", "-ldflags", _version_ldflags(),
             "-o", f"{partial}/", *packages], cwd=work, env=env, check=True)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    size = sum(f.stat().st_size for f in target.iterdir()) / 2**20
    print(f"built in {time.monotonic() - started:.0f}s: {size:.0f} MiB of binaries in {target}",
          file=sys.stderr)
    return target


def helm_binary(build: bool = False) -> Path:
    """The helm binary (``$K8S_CELERY_HELM``, else the cached build), building it if asked to."""
    configured = os.environ.get("K8S_CELERY_HELM")
    helm = Path(configured) if configured else cache_root() / f"helm-{HELM_VERSION}" / "helm"
    if os.access(helm, os.X_OK):
        return helm
    if configured or not build:
        raise BinariesMissing(f"helm not found at {helm}; run `python -m k8s_celery.testing.binaries`")
    started = time.monotonic()
    partial = helm.parent.with_name(helm.parent.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    env = dict(os.environ, GOBIN=str(partial), CGO_ENABLED="0", GOTOOLCHAIN="local", GOFLAGS="-mod=mod")
    ldflags = " ".join(["-s -w", f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"] + [
        f"-X helm.sh/helm/v3/pkg/{package}.k8sVersion{part}={value}"
        for package in ("chartutil", "lint/rules")
        for part, value in (("Major", "1"), ("Minor", HELM_KUBERNETES_MINOR))])
    subprocess.run([_go(), "install", "-trimpath", "-ldflags", ldflags,
                    f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"], env=env, check=True)
    shutil.rmtree(helm.parent, ignore_errors=True)
    partial.rename(helm.parent)
    print(f"built helm {HELM_VERSION} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return helm


def go_module_dir(module: str, version: str) -> Path:
    """The source tree of a Go module version, fetched from the module proxy (read-only)."""
    env = dict(os.environ, GOFLAGS="-mod=mod", GOTOOLCHAIN="local")
    download = subprocess.run([_go(), "mod", "download", "-json", f"{module}@{version}"],
                              cwd=tempfile.gettempdir(), env=env, check=True, capture_output=True, text=True)
    return Path(json.loads(download.stdout)["Dir"])


def main(argv: list[str] | None = None) -> int:
    """``[--node] [--check]``: build (or with ``--check`` only look for) the control plane's
    binaries and helm, or the node's; print their directory."""
    argv = sys.argv[1:] if argv is None else argv
    build = "--check" not in argv
    try:
        if "--node" in argv:
            print(node_binary_dir(build=build))
            return 0
        helm_binary(build=build)
        print(binary_dir(build=build))
    except (BinariesMissing, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
