"""Faults as a real node makes them, for the fault tests and the chaos soak.

Each is made by the part that makes it in production: the Eviction API (what
``kubectl drain`` posts), the kernel (a container's processes SIGKILLed in their cgroup,
an OOM kill), the node's own processes (the kubelet SIGKILLed, containerd restarted),
and the node-lifecycle controller (a node that stops reporting goes NotReady, and its
pods are deleted as their tolerations say while nothing on the node can end them).
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time

from ...cluster import ApiError, collection_path, object_path
from ...outcome import container_status


def evict(api, namespace: str, name: str, grace_period: int) -> None:
    """What `kubectl drain --grace-period` does: POST an Eviction for the pod."""
    api.create(object_path("pods", namespace, name, "eviction"), {
        "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace},
        "deleteOptions": {"gracePeriodSeconds": grace_period}})


def running_pods(api, namespace: str) -> list[dict]:
    """The namespace's pods whose task container runs and that nobody is deleting."""
    pods, _ = api.list(collection_path("pods", namespace))
    return [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")
            and (pod.get("status") or {}).get("phase") == "Running"
            and "running" in (container_status(pod).get("state") or {})]


def kill_container(node, pod: dict) -> set[int]:
    """SIGKILL every process of the pod's task container, found in its cgroup, as the kernel
    or an operator would: the kubelet sees the container exit with 137. Returns the pids."""
    container_id = (container_status(pod).get("containerID") or "").rpartition("://")[2]
    pids = node.container_processes(container_id) if container_id else set()
    if not pids:
        raise LookupError(f"no process of {pod['metadata']['name']}'s task container")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def disrupted_pods(api, namespace: str) -> set[str]:
    """The namespace's pods Kubernetes is ending for a disruption (their ``DisruptionTarget``
    condition: an eviction, the taint manager's deletion on a node NotReady)."""
    pods, _ = api.list(collection_path("pods", namespace))
    return {pod["metadata"]["name"] for pod in pods
            if any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                   for c in (pod.get("status") or {}).get("conditions") or [])}


def node_ready(api, node_name: str) -> bool:
    try:
        node = api.request_once("GET", object_path("nodes", None, node_name))
    except ApiError:
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions") or [])


class StandbyNode:
    """A second Node that stays Ready: an object whose Lease and status this keeps fresh, tainted so that
    nothing is scheduled on it.

    With every node of a cluster NotReady the node-lifecycle controller assumes that the
    control plane lost them, not that they failed, and evicts nothing ("master disruption
    mode"); a cluster of one real node needs this one for its pods to be deleted when it
    stops reporting, as they are in a cluster of several. Use as a context manager.
    """

    TAINT = {"key": "k8s-celery.io/standby", "value": "true", "effect": "NoSchedule"}

    def __init__(self, api, name: str = "standby-node", lease_seconds: int = 40, renew_every: float = 2.0):
        self.api, self.name = api, name
        self.lease_seconds, self.renew_every = lease_seconds, renew_every
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease of {name}", daemon=True)

    def __enter__(self) -> StandbyNode:
        self.api.create(collection_path("nodes", None), {
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name},
            "spec": {"taints": [self.TAINT]}})
        self.api.create(collection_path("leases", "kube-node-lease"), {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": self.name},
            "spec": {"holderIdentity": self.name, "leaseDurationSeconds": self.lease_seconds,
                     "renewTime": _now(micro=True)}})
        self._report()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped.set()
        self._thread.join(10)

    def _report(self) -> None:
        """Renew the lease and post a Ready status, as a kubelet does: the node-lifecycle
        controller marks a node Ready again (after an API-server outage, say) only on a status."""
        now = _now()
        self.api.request_once("PATCH", object_path("leases", "kube-node-lease", self.name),
                              body={"spec": {"renewTime": _now(micro=True)}},
                              content_type="application/merge-patch+json")
        self.api.request_once("PATCH", object_path("nodes", None, self.name, "status"), body={"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "a standby node: nothing runs here", "lastHeartbeatTime": now}]}},
            content_type="application/strategic-merge-patch+json")

    def _renew(self) -> None:
        while not self._stopped.wait(self.renew_every):
            try:
                self._report()
            except Exception:  # the API server is restarting: the next report will do
                pass


def _now(micro: bool = False) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def stop_reporting(cluster, namespace: str, timeout: float = 90.0) -> dict:
    """Stop the node's kubelet until the controller manager has marked the node NotReady and
    deleted the namespace's running pods (their ``NoExecute`` tolerations decide when), then
    start it again and wait until the node is Ready. Pods are deleted only if another node is
    Ready (:class:`StandbyNode`).

    The pods' containers run on meanwhile: only the returning kubelet ends them. Returns what
    happened: ``not_ready_after`` seconds, the ``deleted`` pods' names, ``ready_after`` seconds.
    """
    node = cluster.real_node
    before = {pod["metadata"]["name"] for pod in running_pods(cluster.api, namespace)}
    started = time.monotonic()
    node.kill_kubelet()
    deleted: set[str] = set()
    not_ready_after = None
    try:
        while time.monotonic() - started < timeout:
            if not_ready_after is None and not node_ready(cluster.api, node.node_name):
                not_ready_after = time.monotonic() - started
            if not_ready_after is not None:
                pods, _ = cluster.api.list(collection_path("pods", namespace))
                deleted = {pod["metadata"]["name"] for pod in pods if pod["metadata"].get("deletionTimestamp")}
                gone = before - {pod["metadata"]["name"] for pod in pods}  # ended before, and deleted
                if before <= deleted | gone:
                    break
            time.sleep(0.5)
    finally:
        node.start_kubelet()
    returned = time.monotonic()
    wait_ready(cluster.api, node.node_name, timeout)
    return {"not_ready_after": not_ready_after, "deleted": sorted(deleted & before),
            "ready_after": time.monotonic() - returned}


def wait_ready(api, node_name: str, timeout: float = 90.0) -> bool:
    """Wait until the node is Ready (its kubelet back); ``False`` if it is not by ``timeout``."""
    deadline = time.monotonic() + timeout
    while not node_ready(api, node_name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True
