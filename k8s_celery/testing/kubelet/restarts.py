"""Restart policy: which exited containers restart, and after what back-off."""

from __future__ import annotations


def should_restart(policy: str, exit_code: int) -> bool:
    """Whether the pod's ``restartPolicy`` restarts a container that exited with ``exit_code``."""
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def crash_backoff(restarts: int) -> float:
    """Seconds before the next restart of a container restarted ``restarts`` times: the
    kubelet's 10 s doubling to 5 min (here the first restart is immediate)."""
    return 0.0 if restarts == 0 else min(10.0 * 2 ** (restarts - 1), 300.0)
