"""Exceptions k8s-celery raises or reports as task failures."""

from __future__ import annotations


class K8sCeleryError(Exception):
    """Base class of every k8s-celery error."""


class ConfigError(K8sCeleryError):
    """Invalid configuration; raised at start-up with the file, field and reason."""

    def __init__(self, reason: str, source: str | None = None, field: str | None = None):
        self.reason = reason
        self.source = source
        self.field = field
        where = ", ".join(part for part in (source, f"field {field}" if field else None) if part)
        super().__init__(f"{where}: {reason}" if where else reason)


class ManifestError(ConfigError):
    """A queue's Job manifest is missing, unreadable or not a valid Job."""


class TaskLaunchError(K8sCeleryError):
    """A task could not be turned into a Job; the task fails with this error."""


class PayloadTooLarge(TaskLaunchError):
    """The task's payload does not fit in a Kubernetes Secret (1 MiB)."""


class WorkloadDeactivated(TaskLaunchError):
    """Kueue deactivated the task's Workload: its Job will not be admitted again."""


class PodPendingTimeout(K8sCeleryError):
    """The task's pod never started running; carries the pod's reason."""


class TaskLostError(K8sCeleryError):
    """The task's pod was lost (evicted, OOM-killed, node lost, deleted) too many times."""
