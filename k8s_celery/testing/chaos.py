"""The faults the chaos soak injects, and what each did.

On the process kubelet the faults are its own: a pod "evicted" or "crashed" is a few
lines of Python. On a real node (:data:`REAL_NODE_FAULTS`) the kubelet, containerd and
the kernel make them (:mod:`.realnode.faults`): an eviction through the Eviction API, a
task container's processes SIGKILLed in their cgroup, a real OOM kill (a task that fills
more memory than its pod may have, once), the kubelet SIGKILLed and started again,
containerd restarted under running containers, and a node that stops reporting until its
pods are deleted. Worker, API-server, etcd and Redis faults are common to both.
"""

from __future__ import annotations

import collections
import random
import signal
import time
from typing import Callable

from .realnode import faults as node_faults

COMMON_FAULTS = ("kill_worker", "restart_apiserver", "compact_etcd", "restart_redis")
PROCESS_FAULTS = ("evict", "crash", *COMMON_FAULTS)
REAL_NODE_FAULTS = ("evict", *COMMON_FAULTS, "oom", "kill_container", "kill_kubelet", "restart_containerd",
                    "node_not_ready")
#: What an OOM task's first attempt fills: well past the soak's pod memory limit.
OOM_MEGABYTES = 512


class Chaos:
    """Injects faults by name (:meth:`inject`) into one soak's cluster, Redis and workers.

    :attr:`killed_pods` are the pods a fault ended (a task may run again after its work was
    done in one of them, as acks-late allows); :attr:`effects` counts what the faults did.
    ``publish(oom_mb)`` sends one more task to the soak's queue.
    """

    def __init__(self, rng: random.Random, cluster, redis_server, workers: list, namespace: str,
                 publish: Callable[[int], None]):
        self.rng, self.cluster, self.redis_server = rng, cluster, redis_server
        self.workers, self.namespace, self.publish = workers, namespace, publish
        self.killed_pods: set[str] = set()
        self.effects: collections.Counter = collections.Counter()

    def inject(self, fault: str) -> bool:
        """Inject ``fault``; ``False`` when it could not be (no pod running to hit)."""
        try:
            injected = getattr(self, fault)() is not False
        except LookupError:  # the pod ended meanwhile
            return False
        if injected and self.cluster.real_node:
            # A kubelet slow to come back can make the node NotReady for a moment too, and
            # the taint manager then deletes its pods: whatever fault ended them, they count.
            self.killed_pods |= node_faults.disrupted_pods(self.cluster.api, self.namespace)
        return injected

    # -- common ------------------------------------------------------------------------

    def kill_worker(self) -> None:
        worker = self.rng.choice(self.workers)
        worker.kill(signal.SIGKILL)
        time.sleep(self.rng.uniform(0.5, 3))
        worker.start()

    def restart_apiserver(self) -> None:
        self.cluster.restart_apiserver(downtime=self.rng.uniform(0, 2))

    def compact_etcd(self) -> None:
        self.cluster.compact_etcd()

    def restart_redis(self) -> None:
        self.redis_server.restart(downtime=self.rng.uniform(0, 1))

    # -- pods --------------------------------------------------------------------------

    def evict(self) -> bool:
        if self.cluster.kubelet:
            return self._process_pod_fault("evict")
        pod = self._running_pod()
        if pod is None:
            return False
        # 0 s: SIGKILL at once; 2 s: the runner's SIGTERM handling has a moment.
        node_faults.evict(self.cluster.api, self.namespace, pod["metadata"]["name"],
                          grace_period=self.rng.choice((0, 2)))
        self.killed_pods.add(pod["metadata"]["name"])
        self.effects["pods evicted"] += 1
        return True

    def crash(self) -> bool:
        return self._process_pod_fault("crash")

    def _process_pod_fault(self, fault: str) -> bool:
        pods = [p for p in self.cluster.kubelet.running_pods() if p[0] == self.namespace]
        if not pods:
            return False
        pod = self.rng.choice(pods)
        self.killed_pods.add(pod[1])
        getattr(self.cluster.kubelet, fault)(*pod)
        return True

    def _running_pod(self) -> dict | None:
        pods = node_faults.running_pods(self.cluster.api, self.namespace)
        return self.rng.choice(pods) if pods else None

    # -- the real node -----------------------------------------------------------------

    def oom(self) -> None:
        self.publish(OOM_MEGABYTES)
        self.effects["tasks published to be OOM-killed once"] += 1

    def kill_container(self) -> bool:
        pod = self._running_pod()
        if pod is None:
            return False
        pids = node_faults.kill_container(self.cluster.real_node, pod)
        self.killed_pods.add(pod["metadata"]["name"])
        self.effects["container processes SIGKILLed"] += len(pids)
        return True

    # The node's faults wait for a task pod to run: each must hit a running task.

    def kill_kubelet(self) -> bool:
        running = node_faults.running_pods(self.cluster.api, self.namespace)
        if not running:
            return False
        node = self.cluster.real_node
        node.kill_kubelet()
        time.sleep(self.rng.uniform(0, 3))
        node.start_kubelet()
        node_faults.wait_ready(self.cluster.api, node.node_name)
        self.effects["pods running while the kubelet was killed"] += len(running)
        return True

    def restart_containerd(self) -> bool:
        running = node_faults.running_pods(self.cluster.api, self.namespace)
        if not running:
            return False
        self.cluster.real_node.restart_containerd(downtime=self.rng.uniform(0, 2))
        self.effects["pods running while containerd restarted"] += len(running)
        return True

    def node_not_ready(self) -> bool:
        if not node_faults.running_pods(self.cluster.api, self.namespace):
            return False
        seen = node_faults.stop_reporting(self.cluster, self.namespace)
        self.killed_pods.update(seen["deleted"])
        self.effects["pods deleted while their node was NotReady"] += len(seen["deleted"])
        if seen["not_ready_after"] is None:
            self.effects["node never went NotReady"] += 1
        else:
            self.effects["seconds until NotReady (sum)"] += round(seen["not_ready_after"])
        return True
