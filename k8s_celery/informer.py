"""One watch per kind feeding a cache of the worker's Jobs and pods (client-go's informer).

The watches (:class:`~k8s_celery.cluster.Watcher`: list, watch, relist on 410 and
periodically) update :class:`ObjectCache`; after each change the informer calls
``on_change(job_name)`` and nothing else: deciding what a change means is the
reconciler's job. Objects are keyed by uid, so a Job deleted and created again under
the same name is never confused with its predecessor, and a deletion is only ever
concluded from an object the cache saw (a Job created after a list snapshot is not
"missing" from that list).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .cluster import KubeApi, collection_path
from .kueue import slim_workload
from .manifest import ANNOTATION_KEEP_UNTIL, ANNOTATION_TASK_ID, LABEL_DELIVERY, MANAGED_SELECTOR
from .watch import Watcher

JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
#: How long the last state of a deleted object is remembered.
TOMBSTONE_TTL = 600.0

KEPT_METADATA = ("name", "uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")


def slim_job(job: dict) -> dict:
    """What the worker reads of a Job: identity, its delivery and task, whether it is
    suspended (queued by Kueue, or preempted) or kept for a post-mortem, and status conditions."""
    status, spec = job.get("status") or {}, job.get("spec") or {}
    metadata = job.get("metadata") or {}
    slim = {"metadata": _metadata(job),
            "status": {key: status[key] for key in ("conditions", "startTime") if key in status}}
    delivery = (metadata.get("labels") or {}).get(LABEL_DELIVERY)
    if delivery:
        slim["metadata"]["labels"] = {LABEL_DELIVERY: delivery}
    annotations = {key: value for key, value in (metadata.get("annotations") or {}).items()
                   if key in (ANNOTATION_KEEP_UNTIL, ANNOTATION_TASK_ID)}
    if annotations:
        slim["metadata"]["annotations"] = annotations
    kept_spec = {key: spec[key] for key in ("suspend", "ttlSecondsAfterFinished") if spec.get(key)}
    if kept_spec:
        slim["spec"] = kept_spec
    return slim


def slim_pod(pod: dict) -> dict:
    """What :mod:`.outcome` reads of a pod: its task container's name, phase, reason,
    the PodScheduled and DisruptionTarget conditions, and each container's state."""
    status = pod.get("status") or {}
    slim_status = {key: status[key] for key in ("phase", "reason", "message") if key in status}
    conditions = [c for c in status.get("conditions") or []
                  if c.get("type") in ("PodScheduled", "DisruptionTarget")]
    if conditions:
        slim_status["conditions"] = conditions
    if status.get("containerStatuses"):
        slim_status["containerStatuses"] = [{"name": c.get("name"), "state": c.get("state") or {}}
                                            for c in status["containerStatuses"]]
    containers = (pod.get("spec") or {}).get("containers") or []
    return {"metadata": {**_metadata(pod), "ownerUid": owner_uid(pod), "jobName": job_name_of(pod)},
            "spec": {"containers": [{"name": c.get("name")} for c in containers[:1]]},
            "status": slim_status}


def _delivery_of(slim_job: dict) -> str | None:
    return slim_job["metadata"].get("labels", {}).get(LABEL_DELIVERY)


def _metadata(obj: dict) -> dict:
    metadata = obj.get("metadata") or {}
    return {key: metadata[key] for key in KEPT_METADATA if key in metadata}


def owner_uid(pod: dict) -> str | None:
    """The uid of the Job that controls ``pod``."""
    for reference in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if reference.get("kind") == "Job" and reference.get("controller"):
            return reference.get("uid")
    return None


def job_name_of(pod: dict) -> str | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return next((labels[key] for key in JOB_NAME_LABELS if key in labels), None)


class ObjectCache:
    """The latest state of every managed Job and pod, and the last state of deleted ones."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, dict] = {}                     # uid -> slim Job
        self._jobs_by_delivery: dict[str, dict[str, None]] = {}  # delivery key -> live Job uids
        self._deleted_jobs: dict[str, tuple[dict, float]] = {}
        self._pods: dict[str, dict] = {}                     # uid -> slim pod (live or deleted)
        self._deleted_pods: dict[str, float] = {}            # uid -> when deleted
        self._pods_by_job: dict[str, set[str]] = {}          # Job uid -> pod uids
        self._workloads: dict[str, dict] = {}                # Job uid -> slim Kueue Workload

    # -- reads -------------------------------------------------------------------------

    def job(self, uid: str) -> tuple[dict | None, bool]:
        """``(Job, deleted)``: the Job as last seen, and whether it was seen deleted."""
        with self._lock:
            if uid in self._jobs:
                return self._jobs[uid], False
            if uid in self._deleted_jobs:
                return self._deleted_jobs[uid][0], True
            return None, False

    def latest_pod(self, job_uid: str) -> dict | None:
        """The newest pod of a Job (a deleted pod in its last state), or ``None``."""
        with self._lock:
            pods = [self._pods[uid] for uid in self._pods_by_job.get(job_uid, ()) if uid in self._pods]
        return max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), default=None)

    def workload(self, job_uid: str) -> dict | None:
        """The Kueue Workload of a Job (:func:`~k8s_celery.kueue.slim_workload`), if any."""
        with self._lock:
            return self._workloads.get(job_uid)

    def pod_deleted(self, uid: str) -> bool:
        with self._lock:
            return uid in self._deleted_pods

    def jobs_of_delivery(self, delivery: str) -> list[dict]:
        """The live Jobs (every attempt) labelled with ``delivery``'s key."""
        with self._lock:
            return [self._jobs[uid] for uid in self._jobs_by_delivery.get(delivery, ())]

    def jobs(self) -> list[dict]:
        """Every live Job of the worker's namespace, as the watch last showed it."""
        with self._lock:
            return list(self._jobs.values())

    def job_uids(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    # -- writes (from the watches) -----------------------------------------------------

    def put_job(self, job: dict) -> None:
        slim = slim_job(job)
        uid = slim["metadata"]["uid"]
        with self._lock:
            self._jobs[uid] = slim
            delivery = _delivery_of(slim)
            if delivery:
                self._jobs_by_delivery.setdefault(delivery, {})[uid] = None

    def delete_job(self, job: dict) -> None:
        slim = slim_job(job)
        uid = slim["metadata"]["uid"]
        with self._lock:
            self._jobs.pop(uid, None)
            self._deleted_jobs[uid] = (slim, self._clock())
            delivery = _delivery_of(slim)
            uids = self._jobs_by_delivery.get(delivery)
            if uids is not None:
                uids.pop(uid, None)
                if not uids:
                    del self._jobs_by_delivery[delivery]

    def replace_jobs(self, jobs: list[dict]) -> set[str]:
        """A fresh list: Jobs the cache held and the list lacks were deleted meanwhile.
        Returns the names of the Jobs that changed."""
        listed = {job["metadata"]["uid"]: job for job in jobs}
        with self._lock:
            gone = [self._jobs[uid] for uid in self._jobs if uid not in listed]
        for slim in gone:
            self.delete_job(slim)
        for job in jobs:
            self.put_job(job)
        return {job["metadata"]["name"] for job in jobs} | {slim["metadata"]["name"] for slim in gone}

    def put_pod(self, pod: dict, deleted: bool = False) -> None:
        slim = slim_pod(pod)
        uid, job_uid = slim["metadata"]["uid"], slim["metadata"]["ownerUid"]
        with self._lock:
            self._pods[uid] = slim
            if deleted:
                self._deleted_pods[uid] = self._clock()
            if job_uid:
                self._pods_by_job.setdefault(job_uid, set()).add(uid)

    def replace_pods(self, pods: list[dict]) -> set[str]:
        """A fresh list of pods; returns the names of the Jobs whose pods changed."""
        listed = {pod["metadata"]["uid"] for pod in pods}
        with self._lock:
            gone = [self._pods[uid] for uid in self._pods
                    if uid not in listed and uid not in self._deleted_pods]
            for slim in gone:
                self._deleted_pods[slim["metadata"]["uid"]] = self._clock()
        for pod in pods:
            self.put_pod(pod)
        return {job_name_of(pod) for pod in pods} | {slim["metadata"]["jobName"] for slim in gone}

    def put_workload(self, workload: dict, deleted: bool = False) -> str | None:
        """Keep (or forget) a Workload under its Job's uid; returns the Job's name."""
        slim = slim_workload(workload)
        if not slim["jobUid"]:
            return None
        with self._lock:
            if deleted:
                self._workloads.pop(slim["jobUid"], None)
            else:
                self._workloads[slim["jobUid"]] = slim
        return slim["jobName"]

    def replace_workloads(self, workloads: list[dict]) -> set[str]:
        """A fresh list of Workloads; returns the names of their Jobs."""
        with self._lock:
            self._workloads.clear()
        return {name for name in map(self.put_workload, workloads) if name}

    def prune(self, older_than: float = TOMBSTONE_TTL) -> None:
        """Forget deleted objects after a while, and the pods of forgotten Jobs."""
        cutoff = self._clock() - older_than
        with self._lock:
            for uid in [uid for uid, (_, when) in self._deleted_jobs.items() if when < cutoff]:
                del self._deleted_jobs[uid]
            for uid in [uid for uid, when in self._deleted_pods.items() if when < cutoff]:
                del self._deleted_pods[uid]
                pod = self._pods.pop(uid, None)
                owner = pod and pod["metadata"]["ownerUid"]
                if owner in self._pods_by_job:
                    self._pods_by_job[owner].discard(uid)
                    if not self._pods_by_job[owner]:
                        del self._pods_by_job[owner]


class Informer:
    """Watches the namespace's managed Jobs and pods into an :class:`ObjectCache`, and
    Kueue's Workloads when ``workloads_path`` names them."""

    def __init__(self, api: KubeApi, namespace: str, on_change: Callable[[str], None],
                 resync_period: float = 300.0, workloads_path: str | None = None):
        self.cache = ObjectCache()
        self.on_change = on_change
        self._watchers = [
            Watcher(api, collection_path("jobs", namespace), self._on_job_event, self._on_job_sync,
                    label_selector=MANAGED_SELECTOR, resync_period=resync_period,
                    name="k8s-celery job watch"),
            Watcher(api, collection_path("pods", namespace), self._on_pod_event, self._on_pod_sync,
                    label_selector=MANAGED_SELECTOR, resync_period=resync_period,
                    name="k8s-celery pod watch"),
        ]
        if workloads_path:  # Kueue's Workloads carry no label of ours: the whole namespace
            self._watchers.append(Watcher(api, workloads_path, self._on_workload_event, self._on_workload_sync,
                                          resync_period=resync_period, name="k8s-celery Kueue workload watch"))

    def start(self) -> Informer:
        for watcher in self._watchers:
            watcher.start()
        return self

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(watcher.wait_synced(max(0.0, deadline - time.monotonic())) for watcher in self._watchers)

    def stop(self, timeout: float = 1.0) -> None:
        for watcher in self._watchers:
            watcher.stop(timeout)

    def _on_job_event(self, event_type: str, job: dict) -> None:
        if event_type == "DELETED":
            self.cache.delete_job(job)
        else:
            self.cache.put_job(job)
        self.on_change(job["metadata"]["name"])

    def _on_job_sync(self, jobs: list[dict]) -> None:
        for name in self.cache.replace_jobs(jobs):
            self.on_change(name)

    def _on_pod_event(self, event_type: str, pod: dict) -> None:
        self.cache.put_pod(pod, deleted=event_type == "DELETED")
        name = job_name_of(pod)
        if name:
            self.on_change(name)

    def _on_pod_sync(self, pods: list[dict]) -> None:
        for name in self.cache.replace_pods(pods):
            if name:
                self.on_change(name)

    def _on_workload_event(self, event_type: str, workload: dict) -> None:
        name = self.cache.put_workload(workload, deleted=event_type == "DELETED")
        if name:
            self.on_change(name)

    def _on_workload_sync(self, workloads: list[dict]) -> None:
        for name in self.cache.replace_workloads(workloads):
            self.on_change(name)
