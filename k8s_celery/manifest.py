"""Pure functions: a queue's Job template and a task delivery -> the Job and Secret objects.

Job names are deterministic: the same delivery (see :mod:`.deliveries`) and attempt
always give the same name, so a redelivered message finds the Job of its earlier
delivery instead of creating a second one, while a new message that reuses the task
id (``self.retry()``, ``Task.replace()``) gets Jobs of its own. The payload travels
in a Secret owned by the Job; it never appears in the pod spec. The pod reads it from an
environment variable the kubelet fills from the Secret (``secretKeyRef``), or, above
:data:`ENV_PAYLOAD_LIMIT`, from the Secret mounted as a volume: a pod with a volume
starts only once the kubelet's volume manager reports it mounted, about 300 ms later on a
real node, while an environment variable costs nothing measurable.

A queue whose Job manifest is annotated ``k8s-celery.io/payload: inline`` opts out of the
Secret: the payload goes in an annotation of the pod template, which the kubelet hands to
the container through the downward API. One request less per task and no Secret to wait
for, but whoever may read the queue's Jobs or pods reads its payloads.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kombu.utils.json import dumps as json_dumps

from .errors import PayloadTooLarge, TaskLaunchError

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "k8s-celery"
LABEL_QUEUE = "k8s-celery.io/queue"
LABEL_TASK_NAME = "k8s-celery.io/task-name"
LABEL_TASK_HASH = "k8s-celery.io/task-hash"
LABEL_DELIVERY = "k8s-celery.io/delivery"
LABEL_ATTEMPT = "k8s-celery.io/attempt"
ANNOTATION_TASK_ID = "k8s-celery.io/task-id"
ANNOTATION_TASK_NAME = "k8s-celery.io/task-name"
ANNOTATION_QUEUE = "k8s-celery.io/queue"
#: Until when a failed or lost attempt's Job is kept for a post-mortem (ISO 8601, UTC).
ANNOTATION_KEEP_UNTIL = "k8s-celery.io/keep-until"
#: On a queue's Job manifest: how its payloads travel, ``secret`` (the default) or ``inline``.
ANNOTATION_PAYLOAD_MODE = "k8s-celery.io/payload"
PAYLOAD_MODES = ("secret", "inline")
#: On an inline queue's pods: the payload itself.
ANNOTATION_PAYLOAD = "k8s-celery.io/payload-json"

PAYLOAD_KEY = "payload.json"
PAYLOAD_VOLUME = "k8s-celery-payload"
PAYLOAD_DIR = "/var/run/k8s-celery"
#: The runner's environment variable holding the payload itself (from the Secret).
PAYLOAD_ENV = "K8S_CELERY_PAYLOAD_JSON"
#: The largest payload passed in the environment: Linux refuses a single environment
#: string over 128 KiB (``MAX_ARG_STRLEN``) at ``execve``; leave the rest to the user's.
ENV_PAYLOAD_LIMIT = 64 * 1024
#: Kubernetes refuses Secrets over 1 MiB; leave room for metadata and base64.
MAX_PAYLOAD_BYTES = 1024 * 1024
SECRET_LIMIT = 1024 * 1024

#: What a task may override in its pod (declared in code: ``@app.task(kubernetes={...})``).
TASK_OVERRIDE_KEYS = frozenset({"resources", "nodeSelector", "tolerations", "env", "affinity",
                                "annotations", "labels", "priorityClassName", "queueName",
                                "workloadPriorityClass"})
#: Task options that go on the Job for Kueue: its LocalQueue and its WorkloadPriorityClass.
KUEUE_JOB_LABELS = {"queueName": "kueue.x-k8s.io/queue-name",
                    "workloadPriorityClass": "kueue.x-k8s.io/priority-class"}

_NOT_DNS = re.compile(r"[^a-z0-9-]+")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9._-]+")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")


def task_hash(task_id: str) -> str:
    """A label-safe digest of a task id (ids may hold any character)."""
    return hashlib.sha256(task_id.encode()).hexdigest()[:20]


def job_name(task_id: str, delivery: str, attempt: int = 1) -> str:
    """``kc-<task id slug>-<delivery>-<attempt>``: a DNS-1123 label of at most 63 characters."""
    slug = _NOT_DNS.sub("-", task_id.lower()).strip("-")[:30].strip("-") or "task"
    return f"kc-{slug}-{delivery[:10]}-{attempt}"


def label_value(value: str) -> str:
    """A valid label value (63 characters, alphanumeric at both ends)."""
    cleaned = _NOT_LABEL.sub("_", value)[:63]
    return cleaned.strip("._-")


def task_selector(task_id: str) -> str:
    """Label selector of every Job and pod of a task id (all its deliveries)."""
    return f"{MANAGED_BY}={MANAGER},{LABEL_TASK_HASH}={task_hash(task_id)}"


def delivery_selector(delivery: str) -> str:
    """Label selector of the Jobs (every attempt) of one delivery."""
    return f"{MANAGED_BY}={MANAGER},{LABEL_DELIVERY}={delivery}"


MANAGED_SELECTOR = f"{MANAGED_BY}={MANAGER}"


@dataclass
class TaskSpec:
    """What the pool knows about one task delivery."""

    task_id: str
    name: str
    queue: str
    request: dict
    body: bytes
    content_type: str | None
    content_encoding: str | None
    delivery: str = ""
    attempt: int = 1
    soft_time_limit: float | None = None
    time_limit: float | None = None
    overrides: dict = field(default_factory=dict)
    #: The payload Secret's name: unique per Job, so that a Secret left by an earlier
    #: Job of the same name (awaiting garbage collection) is never mistaken for ours.
    secret_name: str = ""
    #: When the attempt's Job was created (ISO 8601, UTC): a pod that finds the task
    #: succeeded since then knows that another pod of the same Job ran it.
    launched_at: str | None = None
    #: What the pod's start-up signals need of the worker: its hostname, log level, queues.
    worker: dict = field(default_factory=dict)

    @property
    def job_name(self) -> str:
        return job_name(self.task_id, self.delivery or task_hash(self.task_id), self.attempt)


def body_bytes(body: bytes | str | memoryview, content_encoding: str | None) -> bytes:
    """The message body as bytes: py-amqp hands text bodies over decoded (``str``)."""
    if isinstance(body, str):
        try:
            return body.encode(content_encoding or "utf-8")
        except LookupError:  # "binary" and other non-codecs
            return body.encode("utf-8")
    return bytes(body)


def payload_bytes(spec: TaskSpec) -> bytes:
    """The JSON document the pod's runner reads."""
    body = body_bytes(spec.body, spec.content_encoding)
    # The pod decodes args and kwargs from the body, as a worker process does; the
    # decoded copies in the request may not even be JSON (pickle serializer).
    request = {k: v for k, v in spec.request.items() if k not in ("args", "kwargs")}
    return json_dumps({
        "version": 1, "task": spec.name, "id": spec.task_id, "queue": spec.queue,
        "request": request, "body": base64.b64encode(body).decode(),
        "content_type": spec.content_type, "content_encoding": spec.content_encoding,
        "soft_time_limit": spec.soft_time_limit, "time_limit": spec.time_limit,
        "attempt": spec.attempt, "delivery": spec.delivery, "launched_at": spec.launched_at,
        "worker": spec.worker,
    }).encode()


def labels_for(spec: TaskSpec) -> dict[str, str]:
    return {MANAGED_BY: MANAGER, LABEL_QUEUE: label_value(spec.queue),
            LABEL_TASK_NAME: label_value(spec.name), LABEL_TASK_HASH: task_hash(spec.task_id),
            LABEL_DELIVERY: spec.delivery or task_hash(spec.task_id), LABEL_ATTEMPT: str(spec.attempt)}


def annotations_for(spec: TaskSpec) -> dict[str, str]:
    return {ANNOTATION_TASK_ID: spec.task_id, ANNOTATION_TASK_NAME: spec.name,
            ANNOTATION_QUEUE: spec.queue}


def build_secret(spec: TaskSpec, namespace: str, job_uid: str | None = None) -> dict:
    """The payload Secret; owned by the Job (when its uid is known) so it is collected with it."""
    payload = payload_bytes(spec)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"task {spec.name}[{spec.task_id}] payload is {len(payload)} bytes; a Kubernetes "
            f"Secret holds at most {MAX_PAYLOAD_BYTES} bytes. Pass large data by reference "
            "(object storage, database) instead of in the task's arguments.")
    metadata: dict[str, Any] = {"name": spec.secret_name or spec.job_name, "namespace": namespace,
                                "labels": labels_for(spec), "annotations": annotations_for(spec)}
    if job_uid:
        metadata["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": spec.job_name,
                                        "uid": job_uid, "controller": True,
                                        "blockOwnerDeletion": False}]
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata,
            "data": {PAYLOAD_KEY: base64.b64encode(payload).decode()}}


def payload_inline(template_or_job: dict) -> bool:
    """Does the queue of this Job manifest (or a Job rendered from it) pass payloads inline?"""
    annotations = (template_or_job.get("metadata") or {}).get("annotations") or {}
    return annotations.get(ANNOTATION_PAYLOAD_MODE) == "inline"


def check_inline_payload(spec: TaskSpec, size: int | None = None) -> None:
    """Refuse a payload too large for an inline queue's pod environment."""
    size = len(payload_bytes(spec)) if size is None else size
    if size > ENV_PAYLOAD_LIMIT:
        raise PayloadTooLarge(
            f"task {spec.name}[{spec.task_id}] payload is {size} bytes; queue {spec.queue!r} passes "
            f"payloads inline ({ANNOTATION_PAYLOAD_MODE}: inline), which holds at most {ENV_PAYLOAD_LIMIT} "
            "bytes. Pass large data by reference, or drop the annotation so that its payloads travel "
            "in Secrets (up to 1 MiB).")


def build_job(template: dict, spec: TaskSpec, namespace: str, *, app: str | None,
              runner_command: list[str], ttl_seconds: float | None) -> dict:
    """Render the queue's Job template for one task delivery."""
    job = copy.deepcopy(template)
    metadata = job.setdefault("metadata", {})
    metadata.pop("generateName", None)
    metadata.update(name=spec.job_name, namespace=namespace)
    metadata["labels"] = {**(metadata.get("labels") or {}), **labels_for(spec)}
    metadata["annotations"] = {**(metadata.get("annotations") or {}), **annotations_for(spec)}

    job_spec = job.setdefault("spec", {})
    job_spec.update(backoffLimit=0, completions=1, parallelism=1)
    job_spec.pop("selector", None)
    job_spec.pop("manualSelector", None)
    if spec.time_limit:
        job_spec["activeDeadlineSeconds"] = max(1, math.ceil(spec.time_limit))
    if ttl_seconds is not None and "ttlSecondsAfterFinished" not in job_spec:
        job_spec["ttlSecondsAfterFinished"] = int(ttl_seconds)

    pod = job_spec.setdefault("template", {})
    pod_meta = pod.setdefault("metadata", {})
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **labels_for(spec)}
    pod_meta["annotations"] = {**(pod_meta.get("annotations") or {}), **annotations_for(spec)}
    pod_spec = pod.setdefault("spec", {})
    pod_spec["restartPolicy"] = "Never"
    container = pod_spec["containers"][0]
    container["command"] = list(runner_command)
    container.pop("args", None)
    container["terminationMessagePolicy"] = "File"
    env = [e for e in container.get("env") or []
           if e.get("name") not in ("K8S_CELERY_APP", "K8S_CELERY_PAYLOAD", PAYLOAD_ENV)]
    if app:
        env.append({"name": "K8S_CELERY_APP", "value": app})
    if container.get("terminationMessagePath"):
        env.append({"name": "K8S_CELERY_TERMINATION_LOG", "value": container["terminationMessagePath"]})
    container["env"] = env
    mounts = [m for m in container.get("volumeMounts") or [] if m.get("name") != PAYLOAD_VOLUME]
    volumes = [v for v in pod_spec.get("volumes") or [] if v.get("name") != PAYLOAD_VOLUME]
    secret_name = spec.secret_name or spec.job_name
    payload = payload_bytes(spec)
    if payload_inline(template):
        check_inline_payload(spec, len(payload))
        pod_meta["annotations"][ANNOTATION_PAYLOAD] = payload.decode()
        env.append({"name": PAYLOAD_ENV, "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{ANNOTATION_PAYLOAD}']"}}})
    elif len(payload) <= ENV_PAYLOAD_LIMIT:
        env.append({"name": PAYLOAD_ENV,
                    "valueFrom": {"secretKeyRef": {"name": secret_name, "key": PAYLOAD_KEY}}})
    else:
        env.append({"name": "K8S_CELERY_PAYLOAD", "value": f"{PAYLOAD_DIR}/{PAYLOAD_KEY}"})
        mounts.append({"name": PAYLOAD_VOLUME, "mountPath": PAYLOAD_DIR, "readOnly": True})
        volumes.append({"name": PAYLOAD_VOLUME, "secret": {"secretName": secret_name, "defaultMode": 0o440}})
    container["volumeMounts"], pod_spec["volumes"] = mounts, volumes
    apply_task_overrides(pod, spec.overrides)
    metadata["labels"].update(kueue_labels(spec.overrides))
    return job


def payload_secret_name(job: dict) -> str | None:
    """The name of the payload Secret a Job's pods read (in their environment or mounted);
    ``None`` for a Job whose payload is inline."""
    pod_spec = job.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod_spec.get("containers") or []:
        for var in container.get("env") or []:
            if var.get("name") == PAYLOAD_ENV:
                return (var.get("valueFrom") or {}).get("secretKeyRef", {}).get("name")
    volume = next((v for v in pod_spec.get("volumes") or [] if v.get("name") == PAYLOAD_VOLUME), None)
    return (volume or {}).get("secret", {}).get("secretName")


def apply_task_overrides(pod_template: dict, overrides: dict) -> None:
    """Merge a task's declared pod overrides onto the rendered pod template.

    ``resources`` and ``affinity`` replace, ``nodeSelector``/``labels``/``annotations``
    merge, ``tolerations`` append, ``env`` entries replace same-named ones.
    """
    if not overrides:
        return
    unknown = set(overrides) - TASK_OVERRIDE_KEYS
    if unknown:
        raise TaskLaunchError(f"unknown pod override(s) {sorted(unknown)} on the task; "
                              f"allowed: {sorted(TASK_OVERRIDE_KEYS)}")
    pod_spec = pod_template["spec"]
    container = pod_spec["containers"][0]
    if "resources" in overrides:
        container["resources"] = copy.deepcopy(overrides["resources"])
    if "affinity" in overrides:
        pod_spec["affinity"] = copy.deepcopy(overrides["affinity"])
    if "priorityClassName" in overrides:
        pod_spec["priorityClassName"] = overrides["priorityClassName"]
    if "nodeSelector" in overrides:
        pod_spec["nodeSelector"] = {**(pod_spec.get("nodeSelector") or {}), **overrides["nodeSelector"]}
    if "tolerations" in overrides:
        pod_spec["tolerations"] = (pod_spec.get("tolerations") or []) + copy.deepcopy(overrides["tolerations"])
    if "env" in overrides:
        names = {e["name"] for e in overrides["env"]}
        container["env"] = [e for e in container.get("env") or [] if e["name"] not in names] \
            + copy.deepcopy(overrides["env"])
    meta = pod_template.setdefault("metadata", {})
    for key in ("labels", "annotations"):
        if key in overrides:
            meta[key] = {**overrides[key], **(meta.get(key) or {})}  # ours win


def kueue_labels(overrides: dict) -> dict[str, str]:
    """The Job labels Kueue reads, from a task's ``queueName``/``workloadPriorityClass`` options."""
    labels = {}
    for option, label in KUEUE_JOB_LABELS.items():
        if option not in overrides:
            continue
        value = overrides[option]
        if not (isinstance(value, str) and _LABEL_VALUE.fullmatch(value)):
            raise TaskLaunchError(f"task option kubernetes={{'{option}': {value!r}}}: Kueue reads it from a "
                                  "label, so it must be a label value (at most 63 letters, digits, '-', '_', '.')")
        labels[label] = value
    return labels


def task_overrides(task: Any) -> dict:
    """The pod overrides a task declares in code (``kubernetes=`` task option)."""
    overrides = getattr(task, "kubernetes", None) or {}
    if not isinstance(overrides, dict):
        raise TaskLaunchError(f"task {getattr(task, 'name', task)}: the kubernetes option must be a dict")
    aliases = {"node_selector": "nodeSelector", "priority_class_name": "priorityClassName",
               "queue_name": "queueName", "workload_priority_class": "workloadPriorityClass"}
    return {aliases.get(key, key): value for key, value in overrides.items()}


def kept(job: dict, now: float | None = None) -> bool:
    """Is ``job`` marked to be kept for a post-mortem beyond ``now``?"""
    value = ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_KEEP_UNTIL)
    if not value:
        return False
    try:
        until = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return False
    return until > (time.time() if now is None else now)
