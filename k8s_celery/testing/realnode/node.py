"""A real Kubernetes node for :class:`~k8s_celery.testing.cluster.LocalCluster`.

The kubelet and kube-proxy of the pinned release (built from its Go module, like the
control plane), Debian's containerd and runc, a CNI bridge, and a cgroup subtree of
its own. :class:`RealNode` is driven by ``LocalCluster(node="real")`` in phases:

1. :meth:`prepare_host` (before the API server starts): takes the machine-wide lock,
   snapshots the host state, creates the node address, the pod network guard and the
   cgroup root.
2. :meth:`start` (once the control plane is up): containerd with the pause image,
   kubelet, kube-proxy; waits until the node is Ready and the ``kubernetes`` Service
   is translated to the API server.
3. :meth:`stop` then :meth:`release_host`: every pod, container, mount, cgroup,
   device, iptables rule and kernel parameter the node made is removed or restored;
   :meth:`leftovers` compares the host with the snapshot of step 1.

Only one real node can run on a machine at a time (its addresses, device names and
kube-proxy's iptables chains are machine-wide): a second one waits up to ``lock_timeout``
seconds for the first to stop.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import time
from pathlib import Path

from ...cluster import ApiError, collection_path, object_path
from .. import binaries
from ..requirements import require_real_node
from ..server import ManagedProcess, free_port
from . import certs as node_certs
from . import cleanup, components, images, network
from .cgroups import CgroupRoot
from .containerd import Containerd
from .hoststate import NODE_CGROUP, HostState, processes_mentioning, read_sysctl, write_sysctl

log = logging.getLogger(__name__)


class RealNodeError(RuntimeError):
    """The real node could not start (a missing package, another real node, a failure)."""


class RealNode:
    """kubelet + containerd/runc + kube-proxy on this machine, for one local cluster."""

    def __init__(self, workdir: Path, *, node_name: str = "real-node", node_address: str = "10.99.0.1",
                 pod_cidr: str = "10.88.0.0/16", service_cidr: str = "10.0.0.0/24",
                 bin_dir: str | Path | None = None, build: bool = True, startup_timeout: float = 120.0,
                 lock_timeout: float = 900.0, node_lease_seconds: int | None = None):
        require_real_node()
        self.workdir = workdir
        self.node_name = node_name
        self.node_address = node_address
        self.service_cidr = service_cidr
        self.bin_dir = Path(bin_dir) if bin_dir else binaries.node_binary_dir(build=build)
        self.startup_timeout = startup_timeout
        self.lock_timeout = lock_timeout
        #: The kubelet's lease, and the time the node-lifecycle controller waits for its renewal
        #: before it marks the node NotReady (``None``: Kubernetes' defaults, 40 s and 50 s).
        self.node_lease_seconds = node_lease_seconds
        self.network = network.HostNetwork(workdir / "network", node_address=node_address, pod_cidr=pod_cidr,
                                           service_cidr=service_cidr, device="k8scel-node0", bridge="k8scel-br0")
        self.cgroup = CgroupRoot(NODE_CGROUP)
        self.pause = images.pause_image()
        self.containerd = Containerd(workdir / "containerd", sandbox_image=self.pause.name,
                                     cni_conf_dir=self.network.cni_conf_dir, cni_bin_dir=network.CNI_BIN_DIR)
        self.tokens = {name: secrets.token_hex(16) for name in ("kubelet", "kube-proxy", "kube-scheduler")}
        self.processes: dict[str, ManagedProcess] = {}
        self.kubelet_port = free_port()
        self.ca_cert: Path | None = None
        self.host_before: HostState | None = None
        self._chains_before: set = set()
        self._lock = cleanup.MachineLock(binaries.cache_root() / "real-node.lock")
        self._record = binaries.cache_root() / "real-node-host.json"

    # -- phase 1: the host ---------------------------------------------------------------

    def token_lines(self) -> list[str]:
        """Lines for the API server's token file: the node's components, as cluster admins."""
        users = {"kubelet": (f"system:node:{self.node_name}", "system:nodes,system:masters"),
                 "kube-proxy": ("system:kube-proxy", "system:masters"),
                 "kube-scheduler": ("system:kube-scheduler", "system:masters")}
        return [f'{self.tokens[name]},{user},{name}-uid,"{groups}"' for name, (user, groups) in users.items()]

    def prepare_host(self) -> None:
        if not self._lock.acquire():
            log.warning("another real node runs on this machine; waiting up to %.0fs for it to stop",
                        self.lock_timeout)
            if not self._lock.acquire(self.lock_timeout):
                raise RealNodeError(f"another real node runs on this machine (lock {self._lock.path} is held)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        self.host_before = HostState.capture()
        # Kept outside the work dir until release_host, so that the next node can restore
        # the machine if this one's process is killed before it cleans up.
        self._record.write_text(json.dumps({"sysctls": self.host_before.sysctls, "dirs": self.host_before.dirs}))
        self._chains_before = network.chains()
        try:
            self.network.setup()
            self.cgroup.create()
        except BaseException:
            self.release_host()
            raise

    def apiserver_flags(self, pki) -> dict[str, str]:
        """What the API server needs for this node: listen on and advertise the node address."""
        node_certs.extend(pki, self.node_address)
        self.ca_cert = pki.ca_cert
        return {"--bind-address": self.node_address, "--advertise-address": self.node_address,
                "--endpoint-reconciler-type": "lease"}

    def scheduler_argv(self, kubeconfig: Path) -> list[str]:
        """kube-scheduler of the same release (a LocalCluster process; the node needs it)."""
        return components.scheduler_argv(self.bin_dir, kubeconfig)

    def controller_manager_flags(self) -> dict[str, str]:
        """How soon the controller manager sees the node stop reporting."""
        if not self.node_lease_seconds:
            return {}
        return {"--node-monitor-grace-period": f"{self.node_lease_seconds}s", "--node-monitor-period": "1s"}

    # -- phase 2: the node ---------------------------------------------------------------

    def start(self, cluster) -> None:
        """Start containerd, the kubelet and kube-proxy; wait until pods can run."""
        for name in ("kubelet", "kube-proxy"):
            cluster.kubeconfig_for_token(self.tokens[name], self.workdir / f"{name}.kubeconfig", user=name)
        self.containerd.start()
        self.import_image(self.pause)
        config = components.kubelet_config(
            node_address=self.node_address, port=self.kubelet_port, ca_cert=self.ca_cert,
            runtime_endpoint=self.containerd.endpoint, cgroup_root=self.cgroup.path, workdir=self.workdir)
        if self.node_lease_seconds:
            config["nodeLeaseDurationSeconds"] = self.node_lease_seconds
        self._spawn("kubelet", components.kubelet_argv(self.bin_dir, self.workdir, config, self.node_name,
                                                       self.node_address))
        self._spawn("kube-proxy", components.proxy_argv(self.bin_dir, self.workdir, self.node_name,
                                                        self.node_address))
        self._wait_for(lambda: self._node_ready(cluster.api), "the node to be Ready")
        self._wait_for(self._service_translated, "kube-proxy to translate the kubernetes Service")

    def import_image(self, image: images.Image) -> None:
        """Make a built image available to pods (``imagePullPolicy: Never``/``IfNotPresent``)."""
        started = time.monotonic()
        self.containerd.import_image(image.archive, image.name)
        log.info("imported %s in %.1fs", image.name, time.monotonic() - started)

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """The current log of a pod's container(s), read from the kubelet's pod log directory."""
        texts = []
        for directory in sorted((self.workdir / "pod-logs").glob(f"{namespace}_{name}_*")):
            for log_file in sorted(directory.glob(f"{container or '*'}/*.log")):
                texts.append(log_file.read_text(errors="replace"))
        return "".join(texts)

    # -- fault hooks -----------------------------------------------------------------------

    def kill_kubelet(self) -> None:
        """SIGKILL the kubelet: its containers run on, unwatched, until :meth:`start_kubelet`."""
        kubelet = self.processes["kubelet"]
        if kubelet.alive:
            kubelet.process.kill()
            kubelet.process.wait()

    def start_kubelet(self) -> None:
        """Start the kubelet again on the same state (it re-syncs the pods it finds)."""
        if not self.processes["kubelet"].alive:
            self.processes["kubelet"].start()

    def restart_containerd(self, downtime: float = 0.0) -> None:
        """Stop containerd (SIGTERM) and start it again; its shims keep the containers running."""
        started_at = self.containerd.started_at
        self.containerd.process.stop(timeout=10)
        time.sleep(downtime)
        self.containerd.start()
        self.containerd.started_at = started_at  # shim sockets of before the restart are its own too

    def container_processes(self, container_id: str) -> set[int]:
        """The processes in a container's cgroup (``containerID`` of a pod's status, without
        its ``containerd://``)."""
        pids: set[int] = set()
        for directory in self.cgroup.directories():
            for path, subdirectories, _ in os.walk(directory):
                if container_id in subdirectories:
                    try:
                        pids.update(int(pid) for pid in Path(path, container_id, "cgroup.procs").read_text().split())
                    except OSError:  # it ended meanwhile
                        pass
                    break
        return pids

    # -- phase 3: stop and clean up ------------------------------------------------------

    def stop(self, api=None) -> None:
        """Stop every pod, container and node process; remove their mounts, chains and cgroups."""
        if not self._lock.held:  # never prepared: what is there belongs to another node
            return
        started = time.monotonic()
        if api is not None and self._alive("kubelet"):
            self._drain(api)
        drained = time.monotonic()
        for name in ("kube-proxy", "kubelet"):
            if name in self.processes:
                self.processes[name].stop(timeout=10)
        if self.containerd.process and self.containerd.process.alive:
            self.containerd.remove_all()
        cleanup.kill(self.cgroup.processes())
        self.containerd.stop()
        problems = [f"still mounted: {mount}" for mount in cleanup.unmount_under(self.workdir)]
        if "kube-proxy" in self.processes:
            subprocess.run([str(self.bin_dir / "kube-proxy"), "--cleanup"], capture_output=True, timeout=60)
        problems += network.remove_chains(network.chains() - self._chains_before)
        problems += self.cgroup.remove()
        cleanup.remove_outside_links(self.workdir, network.NETWORK_NAME)
        for problem in problems:
            log.warning("real node clean-up: %s", problem)
        log.info("real node stopped in %.1fs (pods drained in %.1fs)", time.monotonic() - started,
                 drained - started)

    def release_host(self) -> None:
        """Remove the node's devices and guard, restore kernel parameters, release the lock."""
        if not self._lock.held:
            return
        try:
            for problem in self.network.teardown():
                log.warning("real node clean-up: %s", problem)
            if self.host_before:
                self._restore(self.host_before.sysctls, self.host_before.dirs)
                self._record.unlink(missing_ok=True)
        finally:
            self._lock.release()

    def leftovers(self) -> dict[str, list[str]]:
        """Differences between the host now and before :meth:`prepare_host` (empty: clean)."""
        return self.host_before.leftovers(HostState.capture()) if self.host_before else {}

    # -- internals -----------------------------------------------------------------------

    def _remove_stale(self) -> None:
        """What a real node killed before its clean-up left (the lock says none is running)."""
        # Its kubelet, kube-proxy, kube-scheduler, containerd and shims, found by their paths,
        # and its cluster's control plane, found by the API server on the node address.
        processes = processes_mentioning(f"{self.bin_dir}/", f"/node/containerd/{Containerd.CONFIG_NAME}",
                                         f"/node/containerd/{Containerd.SOCKET_NAME}")
        for command in processes_mentioning(f"--advertise-address={self.node_address} ").values():
            cert_dir = next((arg.split("=", 1)[1] for arg in command.split() if arg.startswith("--cert-dir=")), None)
            if cert_dir:
                processes.update(processes_mentioning(f"{Path(cert_dir).parent}/"))
        devices = [name for name in (self.network.device, self.network.bridge) if network.link_exists(name)]
        mounted = cleanup.stale_node_dirs()
        cgroups = [str(d) for d in self.cgroup.directories() if d.exists()]
        if processes or devices or mounted or cgroups:
            log.warning("removing what an earlier real node left: %s",
                        [*processes.values(), *devices, *map(str, mounted), *cgroups])
            cleanup.kill(processes)
            cleanup.kill(self.cgroup.processes())
            for node_dir in mounted:
                cleanup.unmount_under(node_dir)
            self.network.teardown()
            self.cgroup.remove()
            network.remove_chains(network.chains())
        if self._record.exists():
            record = json.loads(self._record.read_text())
            log.warning("restoring the kernel parameters an earlier real node changed")
            self._restore(record["sysctls"], record["dirs"])
            self._record.unlink()

    @staticmethod
    def _restore(sysctls: dict[str, str | None], dirs: dict[str, str]) -> None:
        """Kernel parameters as they were; directories the node's components created, removed."""
        for name, value in sysctls.items():
            if value is not None and read_sysctl(name) != value:
                write_sysctl(name, value)
        cleanup.remove_created_dirs(dirs)

    def _spawn(self, name: str, argv: list[str]) -> None:
        process = ManagedProcess(name, argv, self.workdir / f"{name}.log")
        self.processes[name] = process
        process.start()

    def _alive(self, name: str) -> bool:
        return name in self.processes and self.processes[name].alive

    def _wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not condition():
            for process in [*self.processes.values(), self.containerd.process]:
                if process and not process.alive:
                    raise RealNodeError(f"{process.name} exited while waiting for {what}:\n{process.log_tail(40)}")
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.log_tail(15)}" for p in self.processes.values())
                raise RealNodeError(f"timed out after {self.startup_timeout}s waiting for {what}\n{tails}")
            time.sleep(0.2)

    def _node_ready(self, api) -> bool:
        try:
            node = api.request_once("GET", object_path("nodes", None, self.node_name))
        except ApiError:
            return False
        conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        # The node-lifecycle controller removes the not-ready taint the API server added.
        return conditions.get("Ready") == "True" and not node.get("spec", {}).get("taints")

    def _service_translated(self) -> bool:
        kubernetes_service = self.service_cidr.split("/")[0].rsplit(".", 1)[0] + ".1"
        rules = network.run("iptables", "-w", "-t", "nat", "-S", "KUBE-SERVICES", check=False).stdout
        return f"-d {kubernetes_service}/32" in rules

    def _drain(self, api, timeout: float = 20.0) -> None:
        """Delete the node's pods at once and let the kubelet tear their sandboxes down (CNI DEL)."""
        try:
            pods, _ = api.list(collection_path("pods", None), field_selector=f"spec.nodeName={self.node_name}")
            for pod in pods:
                meta = pod["metadata"]
                api.delete(object_path("pods", meta["namespace"], meta["name"]), grace_period=0)
        except ApiError as exc:
            log.warning("could not delete the node's pods: %s", exc)
            return
        netns_dir = self.containerd.workdir / "state" / "io.containerd.grpc.v1.cri" / "netns"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not (netns_dir.is_dir() and any(netns_dir.iterdir())):
                return
            time.sleep(0.2)
