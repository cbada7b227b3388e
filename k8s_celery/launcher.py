"""Create or adopt a delivery's Job, and hand the task's payload to it.

A first delivery creates its Job at once (one request). A redelivered message, or
one whose Job name is taken, looks for what earlier deliveries of the same message
left: a running Job is adopted, a finished one reports its outcome, lost attempts
are counted and a new attempt started (every such decision is logged with its
reason). Nothing here decides when to launch or what an outcome means to Celery:
that is the reconciler's and the reporter's job.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
from datetime import datetime, timezone
from typing import Any

from celery.backends.base import DisabledBackend

from . import metrics
from . import outcome as outcomes
from .cluster import ApiError, KubeApi, collection_path, object_path
from .config import ManifestStore, Settings
from .deliveries import Delivery, redelivered
from .manifest import (LABEL_ATTEMPT, build_job, build_secret, check_inline_payload, delivery_selector, kept,
                       payload_inline, payload_secret_name, task_overrides)

log = logging.getLogger("k8s_celery.pool")

CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
#: The pod annotation whose update makes the kubelet start a container it could not start
#: before the payload Secret existed.
ANNOTATION_PAYLOAD_READY = "k8s-celery.io/payload-ready"
#: Seconds between two wakes of one delivery's pod (the status may lag the first one).
WAKE_INTERVAL = 5.0


class QuotaExceeded(Exception):
    """A ResourceQuota refused the Job or its Secret; it may fit later."""


class Launcher:
    """Turns a delivery into a tracked Job (created or adopted), or into a known outcome."""

    def __init__(self, api: KubeApi, namespace: str, settings: Settings, manifests: ManifestStore,
                 app: Any, app_name: str, counters: dict[str, int]):
        self.api = api
        self.namespace = namespace
        self.settings = settings
        self.manifests = manifests
        self.app = app
        self.app_name = app_name
        self.counters = counters
        #: Jobs this worker found lost: never adopted again, whatever their state says.
        self.lost_jobs: BoundedSet = BoundedSet(10000)
        #: Jobs whose outcome this worker handed to Celery in a way Celery may requeue (a
        #: time limit, a Reject with requeue): their delivery coming back runs again.
        self.requeued_jobs: BoundedSet = BoundedSet(10000)
        #: Cleared at the first 403: the kubelet's own back-off then starts such pods.
        self.may_patch_pods = True

    def launch(self, delivery: Delivery) -> outcomes.Outcome | None:
        """Create or adopt the delivery's Job; ``None`` once a Job is to be tracked, or the
        outcome an earlier delivery already reached (or a final loss)."""
        spec = delivery.spec
        template = self.manifests.load(spec.queue)
        spec.overrides = task_overrides(self.app.tasks.get(spec.name))
        # Fail oversized payloads before creating anything.
        if payload_inline(template):
            check_inline_payload(spec)
        else:
            build_secret(spec, self.namespace)
        if not redelivered(spec.request):
            if self._create(delivery, template, exclusive=True):
                return None
            log.info("%s[%s]: Job %s exists already; looking at the earlier deliveries of this message",
                     spec.name, spec.task_id, spec.job_name)
        return self._resume(delivery, template, self.jobs_of(delivery))

    def jobs_of(self, delivery: Delivery) -> list[dict]:
        """Every Job of this delivery (all its attempts), oldest attempt first."""
        jobs, _ = self.api.list(collection_path("jobs", self.namespace),
                                label_selector=delivery_selector(delivery.key))
        return sorted(jobs, key=attempt_of)

    def current_job(self, delivery: Delivery) -> dict | None:
        """The delivery's Job as the API server has it now (``None``: gone or replaced)."""
        try:
            job = self.api.get(object_path("jobs", self.namespace, delivery.job_name))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise
        return job if job["metadata"]["uid"] == delivery.job_uid else None

    def latest_pod(self, job: dict) -> dict | None:
        pods, _ = self.api.list(collection_path("pods", self.namespace),
                                label_selector=f"{CONTROLLER_UID_LABEL}={job['metadata']['uid']}")
        return max(pods, key=lambda p: p["metadata"]["creationTimestamp"], default=None)

    def ensure_secret(self, delivery: Delivery, job: dict) -> None:
        """Create the payload Secret the Job's pods read, owned by the Job (none for a Job
        whose payload is inline)."""
        spec = delivery.spec
        if payload_inline(job):
            return
        spec.secret_name = payload_secret_name(job) or spec.secret_name or spec.job_name
        spec.launched_at = spec.launched_at or job["metadata"].get("creationTimestamp")
        secret = build_secret(spec, self.namespace, job_uid=job["metadata"]["uid"])
        try:
            self.api.create(collection_path("secrets", self.namespace), secret)
        except ApiError as exc:
            if exc.quota_exceeded:
                raise QuotaExceeded(str(exc)) from exc
            if not exc.conflict:  # 409: created by us (a retried request) or by an earlier delivery
                raise
        delivery.secret_missing = False

    def wake_pod(self, delivery: Delivery, pod: dict) -> None:
        """The pod's container could not start because its payload Secret came after it
        (created late, or by a redelivery): update the pod, so that the kubelet tries again
        now instead of after its back-off. At most every :data:`WAKE_INTERVAL` seconds."""
        now = time.monotonic()
        if not self.may_patch_pods or now - delivery.pod_woken_at < WAKE_INTERVAL:
            return
        delivery.pod_woken_at = now
        name = pod["metadata"]["name"]
        stamp = datetime.now(timezone.utc).isoformat()  # a new value: an equal one changes nothing
        try:
            self.api.patch(object_path("pods", self.namespace, name),
                           {"metadata": {"annotations": {ANNOTATION_PAYLOAD_READY: stamp}}})
        except ApiError as exc:
            if exc.status == 403:
                self.may_patch_pods = False
                log.warning("the worker may not patch pods in namespace %s (see `k8s-celery check`): a pod "
                            "whose payload Secret came after it starts after the kubelet's back-off",
                            self.namespace)
            elif not exc.not_found:
                log.warning("cannot wake pod %s for its payload Secret: %s", name, exc)
            return
        log.info("woke pod %s of %s[%s]: its payload Secret is there now", name, delivery.spec.name,
                 delivery.task_id)

    # -- decisions on redelivery -------------------------------------------------------

    def _resume(self, delivery: Delivery, template: dict, jobs: list[dict]) -> outcomes.Outcome | None:
        spec = delivery.spec
        running = next((job for job in reversed(jobs) if not outcomes.job_finished(job)
                        and job["metadata"]["uid"] not in self.lost_jobs
                        and job["metadata"]["uid"] not in self.requeued_jobs), None)
        if running is not None:
            log.info("adopting running Job %s for %s[%s]", running["metadata"]["name"], spec.name, spec.task_id)
            self._track(delivery, running)
            self.ensure_secret(delivery, running)
            self.counters["adopted"] += 1
            return None
        lost: list[str] = []
        for job in jobs:
            pod = self.latest_pod(job)
            result = outcomes.classify(job, pod)
            if job["metadata"]["uid"] in self.requeued_jobs or \
                    (kept(job) and (result is None or result.state != outcomes.LOST)):
                # Celery had this outcome (kept for a post-mortem once it had acked or
                # rejected it): the message is back because Celery requeued it, so the
                # task runs again.
                continue
            self._track(delivery, job)
            if result is not None and (result.state != outcomes.LOST or result.job_completed):
                log.info("%s[%s] already ran in Job %s (%s); reporting that outcome", spec.name,
                         spec.task_id, job["metadata"]["name"], result.state if not result.job_completed
                         else "completed, outcome gone")
                if pod is not None:
                    delivery.pod_name = pod["metadata"]["name"]
                return result
            lost.append(f"attempt {attempt_of(job)} ({job['metadata']['name']}): "
                        f"{result.reason if result else 'ended without an outcome'}")
        if not jobs:
            done = self.stored_success(delivery)
            if done is not None:
                return done
        delivery.lost_before = len(lost)
        spec.attempt = attempt_of(jobs[-1]) + 1 if jobs else 1
        if delivery.lost_before >= self.settings.max_lost_attempts:
            return outcomes.Outcome(outcomes.LOST, reason=lost[-1])
        why = "; ".join(lost) if lost else "no Job of this delivery exists and the result backend holds no success"
        log.info("starting attempt %d of %s[%s] (delivery %s): %s", spec.attempt, spec.name, spec.task_id,
                 delivery.key, why)
        self._create(delivery, template, exclusive=False)
        return None

    def stored_success(self, delivery: Delivery) -> outcomes.Outcome | None:
        """The success the result backend holds for a redelivered task whose Jobs are gone.

        That happens when the broker redelivers a message whose ack it never got
        after the Job was cleaned up; like Celery's ``worker_deduplicate_successful_tasks``,
        trust the result backend. Without one (or when it cannot answer), run the task.
        """
        spec = delivery.spec
        backend = self.app.backend
        if isinstance(backend, DisabledBackend) or not getattr(backend, "persistent", True) \
                or spec.request.get("ignore_result"):
            return None
        meta = outcomes.stored_meta(self.app, spec.task_id, log)
        if meta.get("status") != outcomes.SUCCESS:
            return None
        log.info("%s[%s] redelivered after it succeeded; not running it again", spec.name, spec.task_id)
        return outcomes.stored_success(meta)

    # -- creating ----------------------------------------------------------------------

    def _create(self, delivery: Delivery, template: dict, exclusive: bool) -> bool:
        """Create the delivery's Job and payload Secret; ``False`` if ``exclusive`` and the
        Job exists (without ``exclusive``, an existing Job of that name is adopted)."""
        spec = delivery.spec
        spec.secret_name = f"{spec.job_name}-{secrets.token_hex(3)}"
        spec.launched_at = datetime.now(timezone.utc).isoformat()
        job = build_job(template, spec, self.namespace, app=self.app_name,
                        runner_command=self.settings.runner_command, ttl_seconds=self.settings.job_ttl)
        try:
            created = self.api.create(collection_path("jobs", self.namespace), job)
        except ApiError as exc:
            if exc.quota_exceeded:
                raise QuotaExceeded(str(exc)) from exc
            if not exc.conflict:
                raise
            if exclusive:
                return False
            created = self.api.get(object_path("jobs", self.namespace, spec.job_name))
        self._track(delivery, created)
        metrics.JOBS_LAUNCHED.labels(spec.queue, spec.name).inc()
        metrics.LAUNCH_SECONDS.observe(time.monotonic() - delivery.received)
        self.counters["launched"] += 1
        log.info("task %s[%s] -> Job %s/%s", spec.name, spec.task_id, self.namespace, spec.job_name)
        try:
            self.ensure_secret(delivery, created)
        except (QuotaExceeded, ApiError) as exc:  # the pod waits for it; retried while pending
            log.warning("cannot create the payload Secret of Job %s yet: %s", spec.job_name, exc)
            delivery.secret_missing = True
        return True

    def _track(self, delivery: Delivery, job: dict) -> None:
        delivery.spec.attempt = attempt_of(job)
        delivery.job_uid = job["metadata"]["uid"]
        delivery.job_uids.add(delivery.job_uid)
        delivery.job_seen_at = time.monotonic()


class BoundedSet:
    """A set that forgets its oldest members beyond ``size``."""

    def __init__(self, size: int):
        self.size = size
        self._members: collections.OrderedDict[str, None] = collections.OrderedDict()

    def add(self, member: str) -> None:
        self._members[member] = None
        self._members.move_to_end(member)
        while len(self._members) > self.size:
            self._members.popitem(last=False)

    def __contains__(self, member: object) -> bool:
        return member in self._members


def attempt_of(job: dict) -> int:
    try:
        return int((job["metadata"].get("labels") or {}).get(LABEL_ATTEMPT, "1"))
    except ValueError:
        return 1
