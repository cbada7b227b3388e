"""A local Kubernetes (and Redis) for tests and demos of k8s-celery.

``LocalCluster`` runs a real etcd, kube-apiserver and kube-controller-manager built
from the upstream Go modules, plus ``ProcessKubelet``, which runs each container as
a local process, or a real node (``LocalCluster(node="real")``). ``RedisServer``,
``RabbitMQServer`` and ``PostgresServer`` start real servers on free loopback ports.
The pytest plugin (installed with the package) provides the ``k8s_cluster``,
``k8s_namespace``, ``k8s_real_cluster``, ``redis_server``, ``rabbitmq_server`` and
``postgres_server`` fixtures.
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


_LAZY = {"LocalCluster": ".cluster", "ProcessKubelet": ".kubelet", "RedisServer": ".redis",
         "RabbitMQServer": ".rabbitmq", "PostgresServer": ".postgres"}


def __getattr__(name: str):
    # Lazy, so that importing wait_until does not need the testing extras.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)


__all__ = [*_LAZY, "wait_until"]
