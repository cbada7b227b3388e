"""What the kubelet's modules share about the pods they handle."""

from __future__ import annotations

from datetime import datetime, timezone

TERMINAL_PHASES = ("Succeeded", "Failed")
#: The address of the node, of its pods and of the API server: this machine's loopback.
NODE_IP = "127.0.0.1"


def now() -> str:
    """The current time as the API writes timestamps (UTC, whole seconds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_key(pod: dict) -> tuple[str, str]:
    """A pod's ``(namespace, name)``."""
    return pod["metadata"]["namespace"], pod["metadata"]["name"]


def all_containers(pod: dict) -> list[dict]:
    """A pod's init containers (native sidecars included), then its containers."""
    spec = pod["spec"]
    return (spec.get("initContainers") or []) + spec["containers"]
