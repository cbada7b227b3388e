"""A scheduler for the one node: binds Pending pods to it, up to a pod capacity."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ...cluster import ApiError, KubeApi, object_path
from .objects import now, pod_key

log = logging.getLogger(__package__)

#: What the default scheduler says of a pod that fits on no node of a one-node cluster.
TOO_MANY_PODS = ("0/1 nodes are available: 1 Too many pods. "
                 "preemption: 0/1 nodes are available: 1 No preemption victims found "
                 "for incoming pod.")


def awaits_scheduling(pod: dict) -> bool:
    """Whether the default scheduler is to bind the pod: unbound and not being deleted."""
    return (not pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp")
            and pod["spec"].get("schedulerName", "default-scheduler") == "default-scheduler")


class Scheduler:
    """Binds unscheduled pods to ``node_name`` through ``pods/binding``, oldest first.

    ``snapshot()`` returns every pod known to the cluster and how many are active on
    the node, taken together. With a ``capacity``, pods beyond it stay Pending with the
    ``PodScheduled=False`` (Unschedulable) condition.
    """

    def __init__(self, api: KubeApi, node_name: str,
                 snapshot: Callable[[], tuple[list[dict], int]], capacity: int | None = None):
        self.api = api
        self.node_name = node_name
        self.capacity = capacity
        self.wakeup = threading.Event()
        self._snapshot = snapshot

    def run(self, stop: threading.Event) -> None:
        """Schedule whenever woken (see :meth:`wake`), and every second, until ``stop``."""
        while not stop.is_set():
            self.wakeup.wait(1.0)
            self.wakeup.clear()
            try:
                self.schedule_pending()
            except Exception:
                log.exception("kubelet scheduler pass failed")

    def wake(self) -> None:
        """Schedule soon: pods or capacity changed."""
        self.wakeup.set()

    def schedule_pending(self) -> None:
        """Bind the pods awaiting scheduling while there is room; mark the rest Unschedulable."""
        pods, active = self._snapshot()
        pending = sorted(filter(awaits_scheduling, pods), key=lambda p: p["metadata"]["creationTimestamp"])
        free = None if self.capacity is None else self.capacity - active
        for pod in pending:
            namespace, name = pod_key(pod)
            if free is not None and free <= 0:
                self._mark_unschedulable(pod)
                continue
            try:
                self.api.create(object_path("pods", namespace, name, "binding"), {
                    "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}})
            except ApiError as exc:
                if not (exc.not_found or exc.conflict):
                    log.warning("binding %s/%s failed: %s", namespace, name, exc)
                continue
            if free is not None:
                free -= 1

    def _mark_unschedulable(self, pod: dict) -> None:
        conditions = pod.get("status", {}).get("conditions") or []
        if any(c["type"] == "PodScheduled" and c["status"] == "False" for c in conditions):
            return
        namespace, name = pod_key(pod)
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "lastTransitionTime": now(), "message": TOO_MANY_PODS}
        try:
            self.api.patch(object_path("pods", namespace, name, "status"),
                           {"status": {"conditions": [condition]}})
        except ApiError:
            pass
