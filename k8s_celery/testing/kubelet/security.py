"""Security contexts: who a container runs as, and the configurations the kubelet refuses."""

from __future__ import annotations


def security_context(pod_spec: dict, container: dict) -> dict:
    """What the container runs as: the pod's securityContext overlaid by the container's.

    The "image" here runs as root unless told otherwise, so ``uid`` defaults to 0.
    """
    pod_level = pod_spec.get("securityContext") or {}
    own = container.get("securityContext") or {}

    def pick(key: str, default=None):
        return own.get(key, pod_level.get(key, default))
    groups = [g for g in [pod_level.get("fsGroup"), *(pod_level.get("supplementalGroups") or [])]
              if g is not None]
    return {"uid": pick("runAsUser", 0), "gid": pick("runAsGroup", 0), "groups": groups,
            "runAsNonRoot": bool(pick("runAsNonRoot", False)),
            "readOnlyRootFilesystem": bool(own.get("readOnlyRootFilesystem", False)),
            "noNewPrivileges": own.get("allowPrivilegeEscalation") is False}


def security_error(pod_spec: dict, container: dict) -> str | None:
    """The kubelet's refusal to start a container, as CreateContainerConfigError says it."""
    security = security_context(pod_spec, container)
    if security["runAsNonRoot"] and security["uid"] == 0:
        if "runAsUser" in (container.get("securityContext") or {}) or \
                "runAsUser" in (pod_spec.get("securityContext") or {}):
            return "container's runAsUser breaks non-root policy"
        return "container has runAsNonRoot and image will run as root"
    return None


def volume_owner(pod_spec: dict) -> tuple[int, int]:
    """Who owns volume files: the pod's runAsUser, group fsGroup (-1: leave as is)."""
    pod_level = pod_spec.get("securityContext") or {}
    return pod_level.get("runAsUser", -1), pod_level.get("fsGroup", -1)
