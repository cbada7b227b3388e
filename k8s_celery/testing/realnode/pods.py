"""How the tests' and the soak's task pods run on the real node: as the chart runs them."""

from __future__ import annotations

#: Non-root, with the payload readable through ``fsGroup``: Pod Security "restricted".
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}}
#: A read-only root and nothing extra.
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
