"""Faults: the kubelet itself ending a pod's containers."""

from __future__ import annotations


class PodFault:
    """Why the kubelet itself ended a pod's containers.

    The fault hooks of :class:`~k8s_celery.testing.kubelet.ProcessKubelet` set one of
    the kinds ``evict``, ``oom``, ``crash`` or ``lost``; the pod's runtime sets
    ``deadline`` when ``activeDeadlineSeconds`` passes. ``reason`` and ``message`` are
    what the pod status reports for the kinds that fail the pod (``evict``, ``deadline``).
    """

    def __init__(self, kind: str, reason: str, message: str = "", exit_code: int = 137):
        self.kind = kind
        self.reason = reason
        self.message = message
        self.exit_code = exit_code
