"""What is left for a post-mortem of a failed or lost attempt.

:class:`JobKeeper` keeps the Jobs (with their pods and payload Secrets) of failed
tasks and lost attempts for ``K8S_CELERY_KEEP_FAILED_JOBS`` seconds, so that
``kubectl describe``/``kubectl logs`` and ``k8s-celery logs`` still work on them; the
reconciler's clean-up and the sweeper leave a kept Job alone until then, and the
Job's ``ttlSecondsAfterFinished`` removes it at last. :func:`pod_events` tells what
Kubernetes said about a pod that never ran or was lost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Callable

from . import outcome as outcomes
from .cluster import ApiError, KubeApi, collection_path, object_path
from .config import Settings
from .deliveries import Delivery
from .hub import PENDING_TIMEOUT
from .informer import ObjectCache
from .manifest import ANNOTATION_KEEP_UNTIL, kept
from .podlogs import LogRelay

log = logging.getLogger("k8s_celery.pool")

#: Outcomes whose Jobs are kept.
KEPT_STATES = frozenset({outcomes.FAILURE, outcomes.TIME_LIMIT, outcomes.LOST, outcomes.REJECTED})

#: Event reasons that say why a pod did not start or did not finish.
RELEVANT_EVENTS = ("FailedScheduling", "FailedMount", "FailedAttachVolume", "FailedCreatePodSandBox",
                   "Failed", "BackOff", "ErrImagePull", "ImagePullBackOff", "InspectFailed",
                   "OOMKilling", "Evicted", "Preempting", "NodeNotReady", "TaintManagerEviction",
                   "FailedKillPod", "FailedCreate")


class PostMortem:
    """The reconciler's part in an ended attempt's post-mortem: relay its output, keep
    its Job if it failed, and name what Kubernetes said about a pod that was lost."""

    def __init__(self, api: KubeApi, namespace: str, settings: Settings, cache: ObjectCache):
        self.api = api
        self.namespace = namespace
        self.cache = cache
        self.relay = LogRelay(api, namespace, settings.pod_logs, settings.pod_log_bytes)
        self.keeper = JobKeeper(api, namespace, settings.keep_failed_jobs)

    def check_access(self) -> None:
        """Say once, at start-up, what the worker's Role leaves out: that part stays off."""
        from .check import allowed  # check imports the whole configuration

        try:
            if self.relay.enabled and not allowed(self.api, self.namespace, "", "pods/log", "get"):
                self.relay.disable(f"the worker may not get pods/log in namespace {self.namespace} "
                                   "(see `k8s-celery check`)")
            if self.keeper.enabled and not allowed(self.api, self.namespace, "batch", "jobs", "patch"):
                self.keeper.disable(f"the worker may not patch Jobs in namespace {self.namespace} "
                                    "(see `k8s-celery check`)")
        except ApiError as exc:
            log.warning("cannot review the worker's access to pods/log and Job patches: %s", exc)

    def explain(self, delivery: Delivery, result: outcomes.Outcome) -> outcomes.Outcome:
        """A lost attempt's or a pending timeout's reason, with the pod's last Events."""
        if result.state not in (outcomes.LOST, PENDING_TIMEOUT):
            return result
        if delivery.pod_name:
            events = pod_events(self.api, self.namespace, "Pod", delivery.pod_name)
        else:
            events = pod_events(self.api, self.namespace, "Job", delivery.job_name)
        if not events or events in result.reason:
            return result
        return replace(result, reason=f"{result.reason}; Kubernetes said: {events}")

    def begin(self, delivery: Delivery, result: outcomes.Outcome, on_read: Callable[[], None]) -> None:
        """Start relaying the attempt's output (``on_read`` runs when the read is over);
        mark a lost attempt's Job to be kept (it stays anyway: it counts the attempts)."""
        if not delivery.job_uid:
            return
        delivery.log_read = self.relay.relay(
            f"{delivery.spec.name}[{delivery.task_id}]", self.cache.latest_pod(delivery.job_uid),
            delivery.pod_name, delivery.spec.attempt, result, on_read)
        if result.state == outcomes.LOST and self.keeper.wanted(result):
            job, _ = self.cache.job(delivery.job_uid)
            self.keeper.keep(delivery.job_name, delivery.job_uid, job)

    def keep_reported(self, delivery: Delivery, job: dict, requeued: bool = False) -> bool:
        """At clean-up, after Celery acked or rejected the message: keep a failed
        attempt's Job (``True``: do not delete it). ``job`` is the delivery's own attempt,
        or (``requeued``) an earlier attempt of it whose outcome Celery requeued.

        Only after the report: a kept Job that is not a lost attempt's then always means
        "Celery has dealt with this outcome", so a redelivery (a requeue on purpose: a
        time limit with ``acks_on_failure_or_timeout=False``) runs the task again
        instead of taking the kept Job for its outcome (see ``Launcher``).
        """
        if kept(job):
            return True
        uid = job["metadata"]["uid"]
        if uid == delivery.job_uid:
            result = delivery.outcome
        elif requeued:
            result = outcomes.classify(job, self.cache.latest_pod(uid))
        else:
            return False
        if result is None or not self.keeper.wanted(result):
            return False
        return self.keeper.keep(job["metadata"]["name"], uid, job)

    @staticmethod
    def read_over(delivery: Delivery) -> bool:
        """Has the relay read the attempt's log (so its Job may go)?"""
        return delivery.log_read is None or delivery.log_read.done()

    def stop(self, timeout: float = 5.0) -> None:
        self.relay.shutdown(timeout)


class JobKeeper:
    """Marks the Jobs of failed and lost attempts to be kept for a while."""

    def __init__(self, api: KubeApi, namespace: str, keep_seconds: float):
        self.api = api
        self.namespace = namespace
        self.keep_seconds = keep_seconds
        self.enabled = keep_seconds > 0

    def wanted(self, result: outcomes.Outcome) -> bool:
        # Not a rejection that requeues: the task asked to run again, it did not fail.
        return self.enabled and result.state in KEPT_STATES and not result.requeue

    def disable(self, reason: str) -> None:
        if self.enabled:
            self.enabled = False
            log.warning("failed tasks' Jobs are deleted at once, not kept: %s", reason)

    def keep(self, job_name: str, job_uid: str, job: dict | None) -> bool:
        """Annotate the Job with the time it is kept until and stretch its TTL to it.

        Returns whether the Job is kept; when the API refuses (RBAC, conflict), the
        Job is deleted as a success's would be.
        """
        until = time.time() + self.keep_seconds
        spec = (job or {}).get("spec") or {}
        ttl = max(int(self.keep_seconds), int(spec.get("ttlSecondsAfterFinished") or 0))
        patch = {"metadata": {"uid": job_uid, "annotations": {ANNOTATION_KEEP_UNTIL: _iso(until)}},
                 "spec": {"ttlSecondsAfterFinished": ttl}}
        try:
            self.api.patch(object_path("jobs", self.namespace, job_name), patch, strategy="merge-patch")
        except ApiError as exc:
            if exc.status in (401, 403):
                self.disable(f"patching Jobs is not allowed ({exc})")
            elif not exc.not_found:
                log.warning("cannot keep Job %s for a post-mortem: %s", job_name, exc)
            return False
        log.info("keeping Job %s of a failed attempt until %s (K8S_CELERY_KEEP_FAILED_JOBS)",
                 job_name, _iso(until))
        return True


def pod_events(api: KubeApi, namespace: str, kind: str, name: str | None, limit: int = 3) -> str:
    """An object's last relevant Events as ``reason: message`` (newest last), or ``""``."""
    if not name:
        return ""
    try:
        events, _ = api.list(collection_path("events", namespace),
                             field_selector=f"involvedObject.kind={kind},involvedObject.name={name}")
    except ApiError as exc:
        log.debug("cannot read the Events of %s %s: %s", kind, name, exc)
        return ""
    return summarize_events(events, limit)


def summarize_events(events: list[dict], limit: int = 3) -> str:
    """The last ``limit`` distinct relevant Events, oldest first, in one line."""
    # Only the reasons that explain a pod's fate: a node's routine warnings (MissingClusterDNS,
    # say) would bury them.
    relevant = [e for e in events if e.get("reason") in RELEVANT_EVENTS]
    relevant.sort(key=_event_time)
    seen: dict[tuple[str, str], None] = {}
    for event in relevant:
        key = (event.get("reason") or "", " ".join((event.get("message") or "").split()))
        seen.pop(key, None)
        seen[key] = None
    return "; ".join(f"{reason}: {message}".rstrip(": ") for reason, message in list(seen)[-limit:])


def _event_time(event: dict) -> str:
    return (event.get("lastTimestamp") or event.get("eventTime") or
            (event.get("metadata") or {}).get("creationTimestamp") or "")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
