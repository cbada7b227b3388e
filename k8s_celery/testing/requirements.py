"""What the local servers, the cluster and the real node need from this machine.

A missing part raises :class:`MissingRequirement`, whose message is one line saying what
is missing and how to get it; the pytest plugin reports a test that needs it as failed
with exactly that line (never skipped). ``bash scripts/setup.sh`` installs all of it.

``python -m k8s_celery.testing.requirements --real-node`` exits 0 when this machine can
run a real node and its image builds, else prints why and exits 1; ``--missing-packages
tests`` (or ``demo``, ``real-node``) prints the Debian packages of that use not installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

SETUP = "bash scripts/setup.sh"

#: The Debian packages of the test servers: a file (a glob) each one installs.
SERVER_PACKAGES = {
    "redis-server": "/usr/bin/redis-server",
    "rabbitmq-server": "/usr/lib/rabbitmq/bin/rabbitmq-server",
    "postgresql": "/usr/lib/postgresql/*/bin/initdb",
}

#: The Debian packages of the real node and its image builds: a file each one installs.
REAL_NODE_PACKAGES = {
    "containerd": "/usr/bin/containerd",
    "runc": "/usr/sbin/runc",
    "containernetworking-plugins": "/usr/lib/cni/bridge",
    "iptables": "/usr/sbin/iptables",
    "mmdebstrap": "/usr/bin/mmdebstrap",
    "buildah": "/usr/bin/buildah",
    "gcc": "/usr/bin/gcc",
    "libc6-dev": f"/usr/lib/{os.uname().machine}-linux-gnu/libc.a",
}


#: What each use of the machine needs (``scripts/setup.sh`` installs the packages of its choice).
PACKAGE_SETS = {
    "tests": {**SERVER_PACKAGES, **REAL_NODE_PACKAGES},
    "demo": {"redis-server": SERVER_PACKAGES["redis-server"]},
    "real-node": REAL_NODE_PACKAGES,
}


class MissingRequirement(RuntimeError):
    """This machine lacks something a test server, the cluster or the real node needs.

    The message names it and how to get it, in one line.
    """


def missing_packages(files: dict[str, str]) -> list[str]:
    """The packages of ``{package: a file it installs (a glob)}`` that are not installed."""
    return [package for package, pattern in files.items() if not glob.glob(pattern)]


def install_hint(packages: list[str]) -> str:
    return f"`{SETUP}` installs {'it' if len(packages) == 1 else 'them'} (as root: apt-get install {' '.join(packages)})"


def require_package(package: str, file: str) -> str:
    """``file`` (a glob) when Debian's ``package`` installed it, else :class:`MissingRequirement`."""
    found = sorted(glob.glob(file))
    if not found:
        raise MissingRequirement(f"{package} is not installed: {install_hint([package])}")
    return found[-1]


def require_executable(name: str, package: str) -> str:
    """The path of the executable ``name`` (Debian's ``package``), else :class:`MissingRequirement`."""
    path = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)),
                                      None)
    if path is None:
        raise MissingRequirement(f"{name} is not installed: {install_hint([package])}")
    return path


def real_node_problems(need_go: bool = False) -> list[str]:
    """Why this machine cannot run a real node and build its images (empty when it can).

    ``need_go``: the node's binaries are not built yet, so Go must be there to build them.
    """
    problems = []
    if os.geteuid() != 0:
        problems.append("it needs root (containerd, the kubelet and the image builds run as root)")
    if not (Path("/sys/fs/cgroup/memory").is_dir() or Path("/sys/fs/cgroup/cgroup.controllers").exists()):
        problems.append("no cgroup hierarchy is mounted at /sys/fs/cgroup")
    packages = missing_packages(REAL_NODE_PACKAGES)
    if packages:
        problems.append(f"Debian packages missing: {', '.join(packages)}; {install_hint(packages)}")
    if need_go and not (os.environ.get("GO") or shutil.which("go") or os.access("/usr/local/go/bin/go", os.X_OK)):
        problems.append("Go is needed to build the node's kubelet, kube-proxy and kube-scheduler")
    return problems


def require_real_node(need_go: bool = False) -> None:
    """:class:`MissingRequirement` naming every problem of :func:`real_node_problems`."""
    problems = real_node_problems(need_go)
    if problems:
        raise MissingRequirement(unavailable(problems))


def unavailable(problems: list[str]) -> str:
    return f"no real node on this machine: {'; '.join(problems)}"


def real_node_unavailable() -> str | None:
    """Why this machine cannot run a real node (one line), or ``None`` when it can."""
    from . import binaries

    try:
        binaries.node_binary_dir(build=False)
        built = True
    except binaries.BinariesMissing:
        built = False
    problems = real_node_problems(need_go=not built)
    return unavailable(problems) if problems else None


USAGE = """usage: python -m k8s_celery.testing.requirements --real-node
       python -m k8s_celery.testing.requirements --missing-packages {tests,demo,real-node}..."""


def main(argv: list[str]) -> int:
    """``--real-node``: exit 1 with the reason when this machine cannot run a real node.
    ``--missing-packages SET...``: print the Debian packages of those sets not installed."""
    if argv[:1] == ["--missing-packages"] and argv[1:] and set(argv[1:]) <= set(PACKAGE_SETS):
        files = {package: file for name in argv[1:] for package, file in PACKAGE_SETS[name].items()}
        print(" ".join(missing_packages(files)))
        return 0
    if argv != ["--real-node"]:
        print(USAGE, file=sys.stderr)
        return 2
    why = real_node_unavailable()
    if why:
        print(why)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
