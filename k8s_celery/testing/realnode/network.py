"""The node's network on this machine, made by the cluster and removed with it.

- A dummy interface (ifb where the kernel has no dummy) holds the node's address. The API server listens there and
  advertises it as the ``kubernetes`` Service's endpoint (the API server's endpoint
  reconciler refuses loopback addresses); kubelet, pods and kube-proxy reach it there.
  The Service range is routed into the same interface, so that a Service address
  kube-proxy has not (yet) translated is dropped on this machine instead of leaving it.
- Pods get a CNI bridge (Debian's ``bridge`` + ``host-local`` + ``portmap``; containerd
  adds ``loopback``) with their own address range and no masquerading. The bridge
  plugin turns on IP forwarding, so a guard chain drops anything a pod sends that would
  be forwarded off the bridge: pods reach addresses of this machine only.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

GUARD_CHAIN = "K8S-CELERY-GUARD"
NETWORK_NAME = "k8s-celery"
DEVICE_KINDS = ("dummy", "ifb")
CNI_BIN_DIR = "/usr/lib/cni"


class NetworkError(RuntimeError):
    """A network device, route or rule could not be set up."""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and done.returncode:
        raise NetworkError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def link_exists(name: str) -> bool:
    return run("ip", "link", "show", "dev", name, check=False).returncode == 0


class HostNetwork:
    """The dummy interface, the Service route, the pod bridge's CNI config and the guard."""

    def __init__(self, workdir: Path, *, node_address: str, pod_cidr: str, service_cidr: str,
                 device: str, bridge: str):
        self.workdir = workdir
        self.node_address = node_address
        self.pod_cidr = pod_cidr
        self.service_cidr = service_cidr
        self.device = device
        self.bridge = bridge
        self.cni_conf_dir = workdir / "cni" / "net.d"
        self.ipam_dir = workdir / "cni" / "ipam"

    def setup(self) -> None:
        self._add_blackhole_device()
        run("ip", "addr", "add", f"{self.node_address}/32", "dev", self.device)
        run("ip", "link", "set", self.device, "up")
        run("ip", "route", "add", self.service_cidr, "dev", self.device)
        for iptables in ("iptables", "ip6tables"):
            # In the mangle table, which kube-proxy leaves alone, so that its ACCEPT rules
            # in filter FORWARD cannot come first. Bridged traffic (br_netfilter) between
            # pods passes; nothing else from a pod is forwarded.
            guard = (iptables, "-w", "-t", "mangle")
            run(*guard, "-N", GUARD_CHAIN)
            run(*guard, "-A", GUARD_CHAIN, "-i", self.bridge, "-o", self.bridge, "-j", "RETURN")
            run(*guard, "-A", GUARD_CHAIN, "-i", self.bridge, "-j", "DROP")
            run(*guard, "-I", "FORWARD", "1", "-j", GUARD_CHAIN)
        self.write_cni_config()

    def _add_blackhole_device(self) -> None:
        # A dummy device, or where the kernel lacks it an ifb one: both hold an address
        # and drop whatever is routed into them.
        errors = []
        for kind in DEVICE_KINDS:
            done = run("ip", "link", "add", self.device, "type", kind, check=False)
            if done.returncode == 0:
                return
            errors.append(f"{kind}: {done.stderr.strip()}")
        raise NetworkError(f"cannot create {self.device}: {'; '.join(errors)}")

    def write_cni_config(self) -> Path:
        self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "cniVersion": "1.0.0", "name": NETWORK_NAME,
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.pod_cidr}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.ipam_dir)}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        path = self.cni_conf_dir / "10-k8s-celery.conflist"
        path.write_text(json.dumps(config, indent=2))
        return path

    def teardown(self) -> list[str]:
        """Remove the bridge, the dummy interface (and its route) and the guard; what failed."""
        problems = []
        for device in (self.bridge, self.device):
            if link_exists(device):
                done = run("ip", "link", "delete", device, check=False)
                if done.returncode:
                    problems.append(f"ip link delete {device}: {done.stderr.strip()}")
        for iptables in ("iptables", "ip6tables"):
            guard = (iptables, "-w", "-t", "mangle")
            while run(*guard, "-D", "FORWARD", "-j", GUARD_CHAIN, check=False).returncode == 0:
                pass
            if run(*guard, "-F", GUARD_CHAIN, check=False).returncode == 0:
                done = run(*guard, "-X", GUARD_CHAIN, check=False)
                if done.returncode:
                    problems.append(f"{iptables} -X {GUARD_CHAIN}: {done.stderr.strip()}")
        return problems


TABLES = ("filter", "nat", "mangle", "raw")
#: Chain prefixes of kube-proxy, the kubelet and the CNI plugins.
NODE_CHAIN_PREFIXES = ("KUBE-", "CNI-")


def chains(prefixes: tuple[str, ...] = NODE_CHAIN_PREFIXES) -> set[tuple[str, str, str]]:
    """``(command, table, chain)`` of every chain whose name starts with one of ``prefixes``."""
    found = set()
    for iptables in ("iptables", "ip6tables"):
        for table in TABLES:
            done = run(iptables, "-w", "-t", table, "-S", check=False)
            for line in done.stdout.splitlines():
                if line.startswith("-N ") and line.split()[1].startswith(prefixes):
                    found.add((iptables, table, line.split()[1]))
    return found


def remove_chains(targets: set[tuple[str, str, str]]) -> list[str]:
    """Delete the rules jumping to ``targets``, then the chains themselves; what failed."""
    problems = []
    for iptables, table in {(command, table) for command, table, _ in targets}:
        names = {chain for command, t, chain in targets if (command, t) == (iptables, table)}
        rules = run(iptables, "-w", "-t", table, "-S", check=False).stdout.splitlines()
        for rule in rules:
            words = shlex.split(rule)
            if words[:1] == ["-A"] and words[1] not in names and any(
                    words[i + 1] in names for i, word in enumerate(words[:-1]) if word in ("-j", "-g")):
                run(iptables, "-w", "-t", table, "-D", *words[1:], check=False)
        for chain in names:
            run(iptables, "-w", "-t", table, "-F", chain, check=False)
        for chain in names:
            done = run(iptables, "-w", "-t", table, "-X", chain, check=False)
            if done.returncode and "No chain" not in done.stderr and "does not exist" not in done.stderr:
                problems.append(f"{iptables} -t {table} -X {chain}: {done.stderr.strip()}")
    return problems
