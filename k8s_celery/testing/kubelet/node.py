"""The node: :class:`ProcessKubelet`, its Node object and its lease."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from ...cluster import ApiError, KubeApi, collection_path, object_path
from ...watch import Watcher
from .faults import PodFault
from .logserver import LogRequestError, LogServer
from .objects import NODE_IP, TERMINAL_PHASES, all_containers, now, pod_key
from .pod import PodRuntime
from .resolver import PodResolver, VolumeFiles
from .scheduler import Scheduler

log = logging.getLogger(__package__)

LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION = 40
LEASE_RENEW_INTERVAL = 10


class ProcessKubelet:
    """A kubelet and scheduler for one local node that runs containers as processes.

    ``env`` is the base environment of every container (by default this process's
    ``PATH``); the container's own ``env``/``envFrom`` are resolved on top of it.
    ``pod_capacity`` limits the pods bound at once, leaving the rest Pending and
    Unschedulable. ``unpullable_images`` are image-name substrings whose pull fails.
    ``simulate=True`` runs no processes: pods go Running at once and end on
    :meth:`finish` (for benchmarks with many pods). ``log_tls`` (the cluster CA, a
    serving certificate and its key) starts the HTTPS endpoint the API server's
    ``pods/log`` reads the containers' output from (see :mod:`.logserver`).
    """

    def __init__(self, api: KubeApi, root: Path, node_name: str = "local-node",
                 pod_capacity: int | None = None, env: dict[str, str] | None = None,
                 unpullable_images: tuple[str, ...] = ("unpullable",), simulate: bool = False,
                 max_grace_period: float = 30.0, api_server_port: int | None = None,
                 log_tls: tuple[Path, Path, Path] | None = None):
        self.api = api
        self.root = Path(root)
        self.node_name = node_name
        self.unpullable_images = tuple(unpullable_images)
        self.simulate = simulate
        self.max_grace_period = max_grace_period
        # This machine is the "image": its Python (the one running us first) and tools.
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
        self.base_env = {"PATH": path, "LANG": "C.UTF-8", **(env or {})}
        if api_server_port:
            self.base_env.update(KUBERNETES_SERVICE_HOST=NODE_IP,
                                 KUBERNETES_SERVICE_PORT=str(api_server_port))
        self.helper_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.resolver = PodResolver(api, self.base_env)
        self.scheduler = Scheduler(api, node_name, self._scheduling_snapshot, pod_capacity)
        self._pods: dict[str, dict] = {}           # uid -> latest pod object, all nodes
        self._runtimes: dict[str, PodRuntime] = {}  # uid -> runtime, this node
        self._simulated: dict[str, tuple[int, str, bytes]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watcher: Watcher | None = None
        self.log_server = LogServer(self, *log_tls) if log_tls else None

    # -- public API --------------------------------------------------------------------

    def start(self) -> ProcessKubelet:
        """Register the node, watch pods, keep the lease and schedule; return once the
        watch has listed the pods."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.log_server:
            self.log_server.start()
        register_node(self.api, self.node_name, self.pod_capacity,
                      self.log_server.port if self.log_server else None)
        self._watcher = Watcher(self.api, "/api/v1/pods", self._on_event, self._on_sync,
                                resync_period=60, read_timeout=30, name="kubelet pod watch").start()
        for name, target, args in (("kubelet lease", keep_lease, (self.api, self.node_name, self._stop)),
                                   ("kubelet scheduler", self.scheduler.run, (self._stop,))):
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._watcher.wait_synced(30)
        return self

    def stop(self) -> None:
        """Stop watching and kill every container process (the node goes away)."""
        self._stop.set()
        self.scheduler.wake()
        if self._watcher:
            self._watcher.stop(timeout=0.5)  # a daemon thread; its read may be blocked
        with self._lock:
            runtimes = list(self._runtimes.values())
        for runtime in runtimes:
            runtime.deleted.set()
            runtime.kill(signal.SIGKILL)
            runtime.wake.set()
        for runtime in runtimes:
            runtime.thread.join(10)
        for thread in self._threads:
            thread.join(2)
        if self.log_server:
            self.log_server.stop()

    @property
    def pod_capacity(self) -> int | None:
        """How many pods may be bound at once (None: no limit)."""
        return self.scheduler.capacity

    @pod_capacity.setter
    def pod_capacity(self, pods: int | None) -> None:
        self.scheduler.capacity = pods

    def set_capacity(self, pods: int | None) -> None:
        """Change the pod capacity and schedule again."""
        self.pod_capacity = pods
        self.scheduler.wake()

    def evict(self, namespace: str, name: str,
              message: str = "The node was low on resource: memory. ") -> None:
        """Node-pressure eviction: kill the pod, Failed with reason Evicted."""
        self._runtime(namespace, name).inject(PodFault("evict", "Evicted", message))

    def oom_kill(self, namespace: str, name: str) -> None:
        """The kernel's OOM killer: exit 137, container reason OOMKilled."""
        self._runtime(namespace, name).inject(PodFault("oom", "OOMKilled"))

    def lose(self, namespace: str, name: str) -> None:
        """The node loses the pod: its containers die and the kubelet never reports on
        it again, so a deletion leaves it Terminating forever (as on a lost node)."""
        runtime = self._runtime(namespace, name)
        runtime.lost = True
        runtime.inject(PodFault("lost", "NodeLost"))

    def crash(self, namespace: str, name: str) -> None:
        """SIGKILL the containers; no termination message is reported."""
        self._runtime(namespace, name).inject(PodFault("crash", "Error"))

    def finish(self, namespace: str, name: str, exit_code: int = 0, message: str = "",
               output: bytes = b"") -> None:
        """Simulation mode: end a pod's containers with this exit code and termination
        message, each having written ``output``."""
        runtime = self._runtime(namespace, name)
        self._simulated[runtime.uid] = (exit_code, message, output)
        runtime.wake.set()

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """The output of the pod's containers (or of one), every run in order."""
        runtime_dir = self._pod_dir(namespace, name)
        runs = container_runs(runtime_dir, container) if container else \
            sorted(path.parent for path in (runtime_dir / "containers").glob("*/log"))
        return "".join((run / "log").read_text(errors="replace") for run in runs)

    def container_log(self, namespace: str, name: str, container: str, previous: bool = False
                      ) -> tuple[Path, bool]:
        """The run directory whose ``log`` answers a log request for the container, and
        whether that run is still running; :class:`LogRequestError` as the kubelet
        answers when there is none."""
        with self._lock:
            try:
                runtime = self._runtime(namespace, name)
            except LookupError:
                raise LogRequestError(404, f"pod {namespace}/{name} does not exist") from None
            if container not in {c["name"] for c in all_containers(runtime.pod)}:
                raise LogRequestError(404, f"container {container!r} not found in pod {namespace}/{name}")
            runs = container_runs(runtime.dir, container)
            if previous:
                if len(runs) < 2:
                    raise LogRequestError(400, f'previous terminated container "{container}" in pod '
                                               f'"{name}" not found')
                return runs[-2], False
            if not runs:
                raise LogRequestError(400, f'container "{container}" in pod "{name}" is waiting to start: '
                                           "ContainerCreating")
            return runs[-1], self.run_is_running(runs[-1])

    def run_is_running(self, run_dir: Path) -> bool:
        """Whether the container run in ``run_dir`` still has its process running."""
        with self._lock:
            for runtime in self._runtimes.values():
                for run in list(runtime.runs.values()):
                    if run.log_path.parent == run_dir:
                        return run.process is not None and run.exit_code is None \
                            and not runtime.finished.is_set()
        return False

    def running_pods(self) -> list[tuple[str, str]]:
        """``(namespace, name)`` of every pod whose runtime has not finished."""
        with self._lock:
            return [(r.namespace, r.name) for r in self._runtimes.values() if not r.finished.is_set()]

    def processes(self) -> list[int]:
        """Process ids of every container process still alive."""
        with self._lock:
            runs = [run for r in self._runtimes.values() for run in r.runs.values()]
        return [run.process.pid for run in runs if run.process and run.process.poll() is None]

    def is_unpullable(self, image: str) -> bool:
        """Whether pulling ``image`` fails (it contains one of ``unpullable_images``)."""
        return any(marker in image for marker in self.unpullable_images)

    # -- pod resolution, by the resolver ---------------------------------------------

    def object_exists(self, kind: str, namespace: str, name: str) -> bool:
        """See :meth:`PodResolver.object_exists`."""
        return self.resolver.object_exists(kind, namespace, name)

    def container_env(self, pod: dict, container: dict) -> dict[str, str]:
        """See :meth:`PodResolver.container_env`."""
        return self.resolver.container_env(pod, container)

    def volume_files(self, pod: dict, volume: dict) -> VolumeFiles:
        """See :meth:`PodResolver.volume_files`."""
        return self.resolver.volume_files(pod, volume)

    # -- the pod watch -----------------------------------------------------------------

    def _on_sync(self, pods: list[dict]) -> None:
        with self._lock:
            seen = {pod["metadata"]["uid"] for pod in pods}
            for uid in list(self._pods):
                if uid not in seen:
                    self._on_event("DELETED", self._pods[uid])
            for pod in pods:
                self._on_event("MODIFIED", pod)

    def _on_event(self, event_type: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            runtime = self._runtimes.get(uid)
            if event_type == "DELETED":
                self._pods.pop(uid, None)
                self._simulated.pop(uid, None)
                if runtime:
                    runtime.on_deleted()
                    if runtime.finished.is_set():
                        self._discard(runtime)
                self.scheduler.wake()
                return
            self._pods[uid] = pod
            if runtime:
                runtime.update(pod)
            elif pod["spec"].get("nodeName") == self.node_name and not self._stop.is_set():
                self._adopt(pod)
            elif not pod["spec"].get("nodeName"):
                self.scheduler.wake()

    def _adopt(self, pod: dict) -> None:
        phase = pod.get("status", {}).get("phase")
        if phase in TERMINAL_PHASES or phase == "Running":
            # Ran before this kubelet started: its processes are gone; only finish deletions.
            if pod["metadata"].get("deletionTimestamp"):
                threading.Thread(target=self._delete_now, args=(pod,), daemon=True).start()
            return
        runtime = PodRuntime(self, pod)
        self._runtimes[runtime.uid] = runtime
        runtime.thread.start()

    def _delete_now(self, pod: dict) -> None:
        namespace, name = pod_key(pod)
        try:
            self.api.delete(object_path("pods", namespace, name), propagation=None,
                            grace_period=0, uid=pod["metadata"]["uid"])
        except ApiError as exc:
            log.warning("pod %s/%s: delete failed: %s", namespace, name, exc)

    # -- pod runtimes ------------------------------------------------------------------

    def _forget(self, runtime: PodRuntime) -> None:
        """Called by a runtime whose thread ends."""
        with self._lock:
            if runtime.deleted.is_set() or self._stop.is_set():
                self._discard(runtime)
        self.scheduler.wake()

    def _discard(self, runtime: PodRuntime) -> None:
        """Forget a pod that ended and was deleted; remove its files."""
        self._runtimes.pop(runtime.uid, None)
        shutil.rmtree(runtime.dir, ignore_errors=True)

    def _runtime(self, namespace: str, name: str) -> PodRuntime:
        with self._lock:
            for runtime in self._runtimes.values():
                if (runtime.namespace, runtime.name) == (namespace, name):
                    return runtime
        raise LookupError(f"pod {namespace}/{name} is not running on {self.node_name}")

    def _pod_dir(self, namespace: str, name: str) -> Path:
        with self._lock:
            for runtime in self._runtimes.values():
                if (runtime.namespace, runtime.name) == (namespace, name):
                    return runtime.dir
            for pod in self._pods.values():
                if pod_key(pod) == (namespace, name):
                    return self.root / "pods" / pod["metadata"]["uid"]
        raise LookupError(f"pod {namespace}/{name} is unknown to {self.node_name}")

    def _simulated_end(self, uid: str) -> tuple[int, str, bytes] | None:
        """Simulation mode: the ``(exit code, message, output)`` :meth:`finish` set for the pod."""
        return self._simulated.get(uid)

    def _scheduling_snapshot(self) -> tuple[list[dict], int]:
        """Every known pod, and how many pods are active on this node."""
        with self._lock:
            active = sum(1 for r in self._runtimes.values() if r.phase not in TERMINAL_PHASES)
            return list(self._pods.values()), active


def container_runs(pod_dir: Path, container: str) -> list[Path]:
    """The run directories of one container of a pod (``<name>-<restarts>``), oldest first."""
    runs = []
    for path in (pod_dir / "containers").glob(f"{container}-*"):
        base, _, number = path.name.rpartition("-")
        if base == container and number.isdigit():
            runs.append((int(number), path))
    return [path for _, path in sorted(runs)]


def register_node(api: KubeApi, node_name: str, pod_capacity: int | None, kubelet_port: int | None = None) -> None:
    """Create the Node (if new) and post its status: Ready, with this machine's size and
    the port of its kubelet endpoint (where the API server reads logs)."""
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": node_name, "labels": {"kubernetes.io/hostname": node_name,
                                      "kubernetes.io/os": "linux",
                                      "kubernetes.io/arch": "amd64"}}}
    try:
        api.create("/api/v1/nodes", node)
    except ApiError as exc:
        if not exc.conflict:
            raise
    capacity = {"cpu": str(os.cpu_count() or 1), "memory": "16Gi",
                "pods": str(pod_capacity or 1000)}
    api.patch(object_path("nodes", None, node_name, "status"), {"status": {
        "capacity": capacity, "allocatable": capacity,
        "addresses": [{"type": "InternalIP", "address": NODE_IP},
                      {"type": "Hostname", "address": node_name}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "process kubelet is posting ready status",
                        "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
        "nodeInfo": {"kubeletVersion": "v1.33.13-process", "kubeProxyVersion": "",
                     "operatingSystem": "linux", "architecture": "amd64",
                     "containerRuntimeVersion": "process://1", "kernelVersion": os.uname().release,
                     "osImage": "local", "machineID": "", "systemUUID": "", "bootID": ""},
        **({"daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}}} if kubelet_port else {})}})


def keep_lease(api: KubeApi, node_name: str, stop: threading.Event) -> None:
    """Renew the node's Lease every 10 seconds (creating it if missing) until ``stop``."""
    path = object_path("leases", LEASE_NAMESPACE, node_name)
    while not stop.is_set():
        renew = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": node_name, "namespace": LEASE_NAMESPACE},
                 "spec": {"holderIdentity": node_name, "leaseDurationSeconds": LEASE_DURATION,
                          "renewTime": renew}}
        try:
            try:
                api.patch(path, {"spec": lease["spec"]}, strategy="merge-patch")
            except ApiError as exc:
                if not exc.not_found:
                    raise
                api.create(collection_path("leases", LEASE_NAMESPACE), lease)
        except ApiError as exc:
            log.warning("node lease renewal failed: %s", exc)
        stop.wait(LEASE_RENEW_INTERVAL)
