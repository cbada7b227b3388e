"""What a real node can leave behind on this machine, as a comparable snapshot.

A node changes host-wide state: network devices, addresses and routes, iptables
rules, mounts, cgroups, kernel parameters and a few well-known directories. A
:class:`HostState` taken before the node starts and one taken after it stopped must
be equal; :meth:`HostState.leftovers` lists every difference.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

#: Kernel parameters that the kubelet, kube-proxy or the CNI bridge plugin may set.
SYSCTLS = (
    "net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/ipv4/conf/all/route_localnet",
    "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/netfilter/nf_conntrack_max",
    "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables",
)

#: Host directories that a kubelet, containerd or a CNI plugin write to by default.
WELL_KNOWN_DIRS = (
    "/var/log/containers", "/var/log/pods", "/var/lib/kubelet", "/var/lib/containerd", "/run/containerd",
    "/run/containerd/s", "/run/containerd/runc", "/var/lib/cni", "/var/lib/cni/results", "/run/netns",
    "/etc/cni", "/opt/cni", "/opt/containerd", "/etc/kubernetes", "/usr/libexec/kubernetes",
)

_COUNTERS = re.compile(r"\[\d+:\d+\]")
#: A built-in chain with the default policy: ``:INPUT ACCEPT`` (user chains read ``:NAME -``).
_DEFAULT_CHAIN = re.compile(r":[A-Z]+ ACCEPT")
#: The real node's cgroup root, compared in full; elsewhere only top-level cgroups are, as
#: the machine's own tools create and remove nested ones all the time.
NODE_CGROUP = "k8s-celery-node"


def read_sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", name).write_text(value + "\n")


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup (v1 and v2) hierarchy of this mount namespace."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        if after.split()[0] in ("cgroup", "cgroup2"):
            mounts.append(Path(before.split()[4]))
    return mounts


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, in mount order."""
    return [line.split()[4].encode().decode("unicode_escape")
            for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def iptables_rules(command: str) -> list[str]:
    """``iptables-save``/``ip6tables-save`` output without counters or comments."""
    try:
        done = subprocess.run([command], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return []
    return saved_rules(done.stdout)


def saved_rules(saved: str) -> list[str]:
    """The rules and chains of ``iptables-save`` output that someone added.

    A table's header and its built-in chains with the default ACCEPT policy are left
    out: the kernel creates them the first time anything lists or uses the table (on a
    fresh host, the node's first rule) and never removes them; they hold nothing.
    """
    lines = (_COUNTERS.sub("", line).rstrip() for line in saved.splitlines())
    return [line for line in lines if line and not line.startswith(("#", "*"))
            and line != "COMMIT" and not _DEFAULT_CHAIN.fullmatch(line)]


def _ip_json(*args: str) -> list[dict]:
    done = subprocess.run(["ip", "-json", *args], capture_output=True, text=True, timeout=30)
    return json.loads(done.stdout or "[]")


def _listing(path: str) -> str:
    try:
        return " ".join(sorted(os.listdir(path)))
    except FileNotFoundError:
        return "<absent>"
    except NotADirectoryError:
        return "<file>"


@dataclass
class HostState:
    """A snapshot of the host-wide state a node may change."""

    links: set[str] = field(default_factory=set)
    addresses: set[str] = field(default_factory=set)
    routes: set[str] = field(default_factory=set)
    iptables: set[str] = field(default_factory=set)
    mounts: set[str] = field(default_factory=set)
    cgroups: set[str] = field(default_factory=set)
    sysctls: dict[str, str | None] = field(default_factory=dict)
    dirs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def capture(cls) -> HostState:
        state = cls()
        for link in _ip_json("link", "show"):
            state.links.add(link["ifname"])
            for info in _ip_json("addr", "show", "dev", link["ifname"]):
                for address in info.get("addr_info", []):
                    state.addresses.add(f"{link['ifname']} {address['local']}/{address['prefixlen']}")
        for family in ("-4", "-6"):
            for route in _ip_json(family, "route", "show", "table", "all"):
                state.routes.add(" ".join(f"{key}={value}" for key, value in sorted(route.items())
                                          if key in ("dst", "dev", "gateway", "table", "type")))
        for command in ("iptables-save", "ip6tables-save"):
            state.iptables.update(f"{command}: {rule}" for rule in iptables_rules(command))
        state.mounts = set(mount_points())
        for mount in cgroup_mounts():
            for child in mount.iterdir():
                if child.is_dir():
                    state.cgroups.add(str(child))
            for directory, _, _ in os.walk(mount / NODE_CGROUP):
                state.cgroups.add(directory)
        state.sysctls = {name: read_sysctl(name) for name in SYSCTLS}
        state.dirs = {path: _listing(path) for path in WELL_KNOWN_DIRS}
        return state

    def leftovers(self, after: HostState) -> dict[str, list[str]]:
        """What ``after`` has (or lacks) compared with this snapshot, by kind; empty if equal."""
        found: dict[str, list[str]] = {}
        for kind in ("links", "addresses", "routes", "iptables", "mounts", "cgroups"):
            before_items, after_items = getattr(self, kind), getattr(after, kind)
            changes = [f"+ {item}" for item in sorted(after_items - before_items)]
            changes += [f"- {item}" for item in sorted(before_items - after_items)]
            if changes:
                found[kind] = changes
        for kind in ("sysctls", "dirs"):
            before_map, after_map = getattr(self, kind), getattr(after, kind)
            changes = [f"{key}: {before_map.get(key)!r} -> {after_map.get(key)!r}"
                       for key in sorted(set(before_map) | set(after_map))
                       if before_map.get(key) != after_map.get(key)]
            if changes:
                found[kind] = changes
        return found


def processes_mentioning(*fragments: str) -> dict[int, str]:
    """``{pid: command}`` of every process whose command line or cgroups mention a fragment."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cgroups = (entry / "cgroup").read_text()
        except OSError:
            continue
        if any(fragment in argv or fragment in cgroups for fragment in fragments):
            found[int(entry.name)] = argv
    return found
