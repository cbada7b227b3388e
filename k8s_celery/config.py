"""Settings and per-queue Job manifests, validated.

Every setting is a Celery configuration key (``k8s_celery_*``) and an environment
variable (``K8S_CELERY_*``); the environment wins, so that a deployment can override
what the app ships. Manifests live at ``<manifests dir>/<queue>/manifest.json`` (or
``.yaml``/``.yml``), or at ``<manifests dir>/<queue>.yaml`` (the shape of a mounted
ConfigMap with one key per queue); ``K8S_CELERY_JOB_MANIFEST`` (a path, or the manifest itself) is
the fallback for every queue without its own file. Manifests are read each time a
Job is launched, so edits apply to the next task.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError, ManifestError
from .manifest import ANNOTATION_PAYLOAD_MODE, PAYLOAD_MODES

MANIFEST_NAMES = ("manifest.json", "manifest.yaml", "manifest.yml")
MANIFEST_SUFFIXES = (".json", ".yaml", ".yml")
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_KUBERNETES_VERSION = "1.33"


def _seconds(value: Any) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _count(value: Any) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _port(value: Any) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise ValueError("must be a TCP port (1-65535)")
    return number


POD_LOG_MODES = ("failed", "all", "none")


def _pod_log_mode(value: Any) -> str:
    mode = str(value).strip().lower()
    if mode not in POD_LOG_MODES:
        raise ValueError(f"must be one of {', '.join(POD_LOG_MODES)}")
    return mode


def _optional_str(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _command(value: Any) -> list[str]:
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else value.split()
    if not value or not all(isinstance(part, str) for part in value):
        raise ValueError("must be a non-empty list of strings")
    return list(value)


@dataclass
class Settings:
    """Everything the shim and the pod runner are configured with."""

    manifests_dir: str = "/etc/k8s-celery/manifests"
    job_manifest: str | None = None
    namespace: str | None = None
    kubeconfig: str | None = None
    kube_context: str | None = None
    app: str | None = None
    pending_timeout: float = 300.0
    admission_timeout: float = 0.0  # 0: a Job may wait for admission (Kueue) as long as it takes
    terminating_timeout: float = 60.0
    max_lost_attempts: int = 3
    job_ttl: float = 3600.0
    drain_timeout: float = 20.0
    runner_command: list[str] = field(default_factory=lambda: ["k8s-celery", "run-task"])
    kubernetes_version: str = DEFAULT_KUBERNETES_VERSION
    watch_resync: float = 300.0
    sweep_interval: float = 60.0
    sweep_grace: float = 60.0
    api_qps: float = 50.0
    api_burst: int = 100
    metrics_port: int | None = None
    liveness_timeout: float = 60.0
    launch_threads: int = 4
    pod_logs: str = "failed"
    pod_log_bytes: int = 64 * 1024
    keep_failed_jobs: float = 3600.0

    @classmethod
    def parsers(cls) -> dict[str, Callable[[Any], Any]]:
        return {
            "manifests_dir": str, "job_manifest": _optional_str, "namespace": _optional_str,
            "kubeconfig": _optional_str, "kube_context": _optional_str, "app": _optional_str,
            "pending_timeout": _seconds, "admission_timeout": _seconds, "terminating_timeout": _seconds, "max_lost_attempts": _count, "job_ttl": _seconds,
            "drain_timeout": _seconds, "runner_command": _command, "kubernetes_version": str,
            "watch_resync": _seconds, "launch_threads": _count, "sweep_interval": _seconds,
            "sweep_grace": _seconds, "api_qps": _seconds, "api_burst": _count,
            "metrics_port": _port, "liveness_timeout": _seconds,
            "pod_logs": _pod_log_mode, "pod_log_bytes": _count, "keep_failed_jobs": _seconds,
        }

    @classmethod
    def load(cls, conf: Any = None, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """Settings from explicit overrides, then ``K8S_CELERY_*``, then ``k8s_celery_*`` keys."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, parse in cls.parsers().items():
            env_name = f"K8S_CELERY_{name.upper()}"
            if overrides.get(name) is not None:
                raw, source = overrides[name], f"option {name}"
            elif env_name in environ:
                raw, source = environ[env_name], f"environment variable {env_name}"
            elif conf is not None and conf.get(f"k8s_celery_{name}") is not None:
                raw, source = conf.get(f"k8s_celery_{name}"), f"Celery setting k8s_celery_{name}"
            else:
                continue
            try:
                values[name] = parse(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"invalid value {raw!r}: {exc}", source=source) from exc
        if "kubeconfig" not in values and environ.get("KUBECONFIG"):
            values["kubeconfig"] = environ["KUBECONFIG"]
        return cls(**values)

    def resolved_namespace(self) -> str:
        """The configured namespace, else the pod's own, else ``default``."""
        if self.namespace:
            return self.namespace
        try:
            return Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip() or "default"
        except OSError:
            return "default"

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ManifestStore:
    """Finds, parses and validates the Job manifest of each queue.

    Manifests are looked at on every :meth:`load` (edits apply to the next task) but
    validated again only when they changed: validating against the OpenAPI schema
    costs about 10 ms of CPU, and the file's inode, size and times tell whether it
    changed.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._validated: dict[str, tuple[Any, dict]] = {}
        self._lock = threading.Lock()

    def path_for(self, queue: str) -> Path | None:
        root = Path(self.settings.manifests_dir)
        candidates = [root / queue / name for name in MANIFEST_NAMES]
        candidates += [root / f"{queue}{suffix}" for suffix in MANIFEST_SUFFIXES]
        return next((path for path in candidates if path.is_file()), None)

    def has_manifest(self, queue: str) -> bool:
        return self.path_for(queue) is not None or bool(self.settings.job_manifest)

    def load(self, queue: str) -> dict:
        """The validated manifest for ``queue``, as it is now (callers must not modify it)."""
        source, text_or_path = self._source(queue)
        stamp = self._stamp(text_or_path)
        with self._lock:
            cached = self._validated.get(queue)
        if cached is not None and stamp is not None and cached[0] == stamp:
            return cached[1]
        try:
            text = text_or_path.read_text() if isinstance(text_or_path, Path) else text_or_path
        except OSError as exc:
            raise ManifestError(f"cannot read: {exc}", source=source) from exc
        manifest = validate_job_manifest(parse_manifest(text, source), source, self.settings.kubernetes_version)
        with self._lock:
            self._validated[queue] = (stamp, manifest)
        return manifest

    def _source(self, queue: str) -> tuple[str, Path | str]:
        """Where ``queue``'s manifest comes from: ``(source name, file or text)``."""
        path = self.path_for(queue)
        if path is not None:
            return str(path), path
        fallback = self.settings.job_manifest
        if not fallback:
            raise ManifestError(
                f"no manifest for queue {queue!r}: expected one of "
                f"{', '.join(MANIFEST_NAMES)} in {Path(self.settings.manifests_dir) / queue}, "
                f"{queue}.yaml in {self.settings.manifests_dir}, or K8S_CELERY_JOB_MANIFEST",
                source=str(Path(self.settings.manifests_dir) / queue))
        if not fallback.lstrip().startswith(("{", "apiVersion", "kind", "---")) and Path(fallback).is_file():
            return fallback, Path(fallback)
        return "K8S_CELERY_JOB_MANIFEST", fallback

    @staticmethod
    def _stamp(text_or_path: Path | str) -> Any:
        if not isinstance(text_or_path, Path):
            return text_or_path
        try:
            stat = text_or_path.stat()
        except OSError as exc:
            raise ManifestError(f"cannot read: {exc}", source=str(text_or_path)) from exc
        return (str(text_or_path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)

    def check(self, queues: list[str]) -> None:
        """Load every queue's manifest now; raise the first problem."""
        for queue in queues:
            self.load(queue)


def parse_manifest(text: str, source: str) -> dict:
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"not valid JSON or YAML: {exc}", source=source) from exc
    if len(documents) != 1:
        raise ManifestError(f"expected exactly one document, found {len(documents)}", source=source)
    if not isinstance(documents[0], dict):
        raise ManifestError("the manifest must be a mapping (a Job object)", source=source)
    return documents[0]


def validate_job_manifest(manifest: dict, source: str, kubernetes_version: str) -> dict:
    """Check that ``manifest`` is a valid batch/v1 Job; return a copy of it."""
    if manifest.get("apiVersion") != "batch/v1" or manifest.get("kind") != "Job":
        raise ManifestError(f"must be apiVersion batch/v1, kind Job; got "
                            f"{manifest.get('apiVersion')!r}, {manifest.get('kind')!r}",
                            source=source, field="kind")
    validate_object(manifest, source, kubernetes_version)
    if (manifest.get("spec") or {}).get("suspend"):
        raise ManifestError("a suspended Job would never run its task: under Kueue, label the Job "
                            "kueue.x-k8s.io/queue-name and Kueue's webhook suspends it until admission",
                            source=source, field="spec.suspend")
    mode = ((manifest.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_PAYLOAD_MODE, "secret")
    if mode not in PAYLOAD_MODES:
        raise ManifestError(f"{mode!r} is not a payload mode: {' or '.join(PAYLOAD_MODES)}", source=source,
                            field=f"metadata.annotations.{ANNOTATION_PAYLOAD_MODE}")
    containers = manifest.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []
    if not containers:
        raise ManifestError("the pod template needs at least one container", source=source,
                            field="spec.template.spec.containers")
    return copy.deepcopy(manifest)


def validate_object(obj: dict, source: str, kubernetes_version: str) -> None:
    """Validate against the Kubernetes OpenAPI schema (strict: unknown fields fail)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path) or "(root)"
        raise ManifestError(exc.message, source=source, field=where) from exc
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
        raise ManifestError(f"cannot validate for Kubernetes {kubernetes_version}: {exc}",
                            source=source) from exc
