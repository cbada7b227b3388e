"""Resolving what a pod's spec refers to: environment variables and volume contents.

:class:`PodResolver` reads the Secrets, ConfigMaps and service-account tokens that
``env``, ``envFrom`` and the volumes name; the functions below resolve what the pod
object itself holds (downward API ``fieldRef``/``resourceFieldRef``) and expand
``$(VAR)`` references.
"""

from __future__ import annotations

import base64
import os
import re

from ...cluster import ApiError, KubeApi, object_path
from .objects import NODE_IP, all_containers

#: A volume's files: path relative to the volume -> (content, mode).
VolumeFiles = dict[str, tuple[bytes, int]]


class PodResolver:
    """Resolves a pod's environment and volume files against the API server.

    ``base_env`` is every container's environment before its own ``env``/``envFrom``.
    """

    def __init__(self, api: KubeApi, base_env: dict[str, str]):
        self.api = api
        self.base_env = base_env

    def object_exists(self, kind: str, namespace: str, name: str) -> bool:
        """Whether the object (``secrets``, ``configmaps``...) exists."""
        try:
            self.api.get(object_path(kind, namespace, name))
            return True
        except ApiError as exc:
            if exc.not_found:
                return False
            raise

    def data(self, kind: str, namespace: str, name: str, optional: bool = False) -> dict[str, bytes]:
        """The decoded ``data`` and ``binaryData`` of a Secret or ConfigMap (empty if an
        ``optional`` one is missing)."""
        try:
            obj = self.api.get(object_path(kind, namespace, name))
        except ApiError as exc:
            if exc.not_found and optional:
                return {}
            raise
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()} \
            if kind == "secrets" else {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def container_env(self, pod: dict, container: dict) -> dict[str, str]:
        """The container's environment: the base, ``HOSTNAME``, ``envFrom``, then ``env``."""
        namespace = pod["metadata"]["namespace"]
        env = dict(self.base_env, HOSTNAME=pod["metadata"]["name"])
        for env_from in container.get("envFrom") or []:
            for kind, key in (("secrets", "secretRef"), ("configmaps", "configMapRef")):
                ref = env_from.get(key)
                if ref:
                    values = self.data(kind, namespace, ref["name"], ref.get("optional", False))
                    prefix = env_from.get("prefix", "")
                    env.update({prefix + k: v.decode(errors="replace") for k, v in values.items()})
        for var in container.get("env") or []:
            value = self._env_value(pod, container, var, env)
            if value is not None:
                env[var["name"]] = value
        return env

    def _env_value(self, pod: dict, container: dict, var: dict, env: dict[str, str]) -> str | None:
        if "valueFrom" not in var:
            return expand(var.get("value", ""), env)
        source = var["valueFrom"]
        namespace = pod["metadata"]["namespace"]
        for kind, key in (("secrets", "secretKeyRef"), ("configmaps", "configMapKeyRef")):
            if key in source:
                ref = source[key]
                data = self.data(kind, namespace, ref["name"], ref.get("optional", False))
                value = data.get(ref["key"])
                return value.decode(errors="replace") if value is not None else None
        if "fieldRef" in source:
            return field_value(pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return resource_value(container, source["resourceFieldRef"])
        return None

    def volume_files(self, pod: dict, volume: dict) -> VolumeFiles:
        """The files (relative path -> data, mode) of a secret, configMap, downwardAPI,
        projected or emptyDir volume."""
        namespace = pod["metadata"]["namespace"]
        if "secret" in volume:
            source = volume["secret"]
            return project(self.data("secrets", namespace, source["secretName"],
                                     source.get("optional", False)),
                           source.get("items"), source.get("defaultMode", 0o644))
        if "configMap" in volume:
            source = volume["configMap"]
            return project(self.data("configmaps", namespace, source["name"],
                                     source.get("optional", False)),
                           source.get("items"), source.get("defaultMode", 0o644))
        if "downwardAPI" in volume:
            source = volume["downwardAPI"]
            return downward_files(pod, source.get("items") or [], source.get("defaultMode", 0o644))
        if "projected" in volume:
            return self._projected_files(pod, volume["projected"])
        return {}  # emptyDir and anything else: an empty directory

    def _projected_files(self, pod: dict, projected: dict) -> VolumeFiles:
        namespace = pod["metadata"]["namespace"]
        mode = projected.get("defaultMode", 0o644)
        files: VolumeFiles = {}
        for source in projected.get("sources") or []:
            if "serviceAccountToken" in source:
                token = self._service_account_token(pod, source["serviceAccountToken"])
                files[source["serviceAccountToken"]["path"]] = (token.encode(), 0o600)
            elif "secret" in source:
                ref = source["secret"]
                files.update(project(self.data("secrets", namespace, ref["name"],
                                               ref.get("optional", False)), ref.get("items"), mode))
            elif "configMap" in source:
                ref = source["configMap"]
                files.update(project(self.data("configmaps", namespace, ref["name"],
                                               ref.get("optional", False)), ref.get("items"), mode))
            elif "downwardAPI" in source:
                files.update(downward_files(pod, source["downwardAPI"].get("items") or [], mode))
        return files

    def _service_account_token(self, pod: dict, source: dict) -> str:
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [source["audience"]] if source.get("audience") else None,
            "expirationSeconds": source.get("expirationSeconds", 3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}}
        if request["spec"]["audiences"] is None:
            del request["spec"]["audiences"]
        answer = self.api.create(object_path("serviceaccounts", meta["namespace"], account, "token"), request)
        return answer["status"]["token"]


def required_objects(pod: dict) -> set[tuple[str, str, str]]:
    """The Secrets and ConfigMaps, as ``(kind, namespace, name)``, that the pod's
    volumes and containers need (those not marked ``optional``)."""
    namespace = pod["metadata"]["namespace"]
    refs: set[tuple[str, str, str]] = set()

    def add(kind: str, source: dict | None, name_key: str = "name") -> None:
        if source and not source.get("optional"):
            refs.add((kind, namespace, source[name_key]))

    for volume in pod["spec"].get("volumes") or []:
        add("secrets", volume.get("secret"), "secretName")
        add("configmaps", volume.get("configMap"))
        for source in (volume.get("projected") or {}).get("sources") or []:
            add("secrets", source.get("secret"))
            add("configmaps", source.get("configMap"))
    for container in all_containers(pod):
        for env in container.get("env") or []:
            add("secrets", (env.get("valueFrom") or {}).get("secretKeyRef"))
            add("configmaps", (env.get("valueFrom") or {}).get("configMapKeyRef"))
        for env_from in container.get("envFrom") or []:
            add("secrets", env_from.get("secretRef"))
            add("configmaps", env_from.get("configMapRef"))
    return refs


def project(data: dict[str, bytes], items: list[dict] | None, mode: int) -> VolumeFiles:
    """A Secret's or ConfigMap's ``data`` as volume files: every key, or the ``items``
    (key -> path, optional mode) whose keys exist."""
    if not items:
        return {key: (value, mode) for key, value in data.items()}
    return {item["path"]: (data[item["key"]], item.get("mode", mode)) for item in items if item["key"] in data}


def downward_files(pod: dict, items: list[dict], mode: int) -> VolumeFiles:
    """The files of downward-API ``items`` (each a ``fieldRef`` or ``resourceFieldRef``)."""
    files = {}
    for item in items:
        if "fieldRef" in item:
            value = field_value(pod, item["fieldRef"]["fieldPath"])
        else:
            container = next(c for c in pod["spec"]["containers"]
                             if c["name"] == item["resourceFieldRef"].get("containerName"))
            value = resource_value(container, item["resourceFieldRef"])
        files[item["path"]] = (value.encode(), item.get("mode", mode))
    return files


_LABEL_FIELD = re.compile(r"metadata\.(labels|annotations)\['(.+)'\]")


def field_value(pod: dict, path: str) -> str:
    """Value of a downward-API ``fieldRef`` path."""
    meta = pod["metadata"]
    match = _LABEL_FIELD.fullmatch(path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        values = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
              "metadata.uid": meta.get("uid", ""), "spec.nodeName": pod["spec"].get("nodeName", ""),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
              "status.podIP": NODE_IP, "status.hostIP": NODE_IP, "status.podIPs": NODE_IP,
              "status.hostIPs": NODE_IP}
    if path not in simple:
        raise ValueError(f"unsupported fieldRef {path!r}")
    return simple[path]


def resource_value(container: dict, ref: dict) -> str:
    """Value of a ``resourceFieldRef`` (the declared value, or the node's size)."""
    kind, _, name = ref["resource"].partition(".")
    declared = (container.get("resources") or {}).get(kind, {}).get(name)
    if declared is not None:
        return str(declared)
    return str(os.cpu_count() or 1) if name == "cpu" else str(16 * 2**30)


_VAR_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Expand ``$(VAR)`` references like the kubelet (``$$`` escapes, unknown stays)."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VAR_REFERENCE.sub(replace, value)
