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


def wait_for_condition(api, path: str, types: str | tuple[str, ...], timeout: float = 60.0,
                       status: str = "True") -> dict:
    """Read the object at ``path`` until one of its conditions ``types`` has ``status``.

    Returns that condition. An object its controller has not written a status for yet
    (``kubectl wait`` fails at once on a missing ``.status.conditions``), or one not
    created yet, is waited for; a timeout names the last status seen.
    """
    from ..cluster import ApiError

    wanted = (types,) if isinstance(types, str) else types
    last: dict = {"status": "never read"}

    def condition() -> dict | None:
        try:
            last["status"] = api.get(path).get("status", {})
        except ApiError as exc:
            if not exc.not_found:
                raise
            last["status"] = "not found"
            return None
        return next((c for c in last["status"].get("conditions") or []
                     if c.get("type") in wanted and c.get("status") == status), None)

    return wait_until(condition, timeout=timeout, interval=0.2,
                      message=lambda: f"{' or '.join(wanted)}={status} on {path}; last status: {last['status']}")


_LAZY = {"LocalCluster": ".cluster", "ProcessKubelet": ".kubelet", "RedisServer": ".redis",
         "RabbitMQServer": ".rabbitmq", "PostgresServer": ".postgres"}


def __getattr__(name: str):
    # Lazy, so that importing wait_until does not need the testing extras.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)


__all__ = [*_LAZY, "wait_for_condition", "wait_until"]
