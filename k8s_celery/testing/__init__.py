"""A local Kubernetes (and Redis) for tests and demos of k8s-celery.

``LocalCluster`` runs a real etcd, kube-apiserver and kube-controller-manager built
from the upstream Go modules, plus ``ProcessKubelet``, which runs each container as
a local process. The pytest plugin (installed with the package) provides the
``k8s_cluster``, ``k8s_namespace`` and ``redis_server`` fixtures.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.1,
               message: str | Callable[[], str] = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; return that value.

    ``message`` (or what it returns, when callable) describes what was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def __getattr__(name: str):
    # Lazy, so that importing wait_until does not need the testing extras.
    if name == "LocalCluster":
        from .cluster import LocalCluster
        return LocalCluster
    if name == "ProcessKubelet":
        from .kubelet import ProcessKubelet
        return ProcessKubelet
    if name == "RedisServer":
        from .redis import RedisServer
        return RedisServer
    raise AttributeError(name)


__all__ = ["LocalCluster", "ProcessKubelet", "RedisServer", "wait_until"]
