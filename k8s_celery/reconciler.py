"""The one place that decides, per delivery, what happens next.

Watch events, launches, revokes, time checks and resyncs only enqueue a delivery's
key (:mod:`.workqueue`); :meth:`Reconciler.reconcile` then compares what is (the
Job and pod in the informer's cache) with what the delivery needs, and acts: launch,
accept, report the outcome, time out, terminate, clean up. A key is never reconciled
by two threads at once, so these decisions cannot race each other.
"""

from __future__ import annotations

import logging
import signal
import time
from datetime import datetime
from typing import Callable

from . import outcome as outcomes
from .cluster import ApiError, KubeApi, object_path
from .config import Settings
from .deliveries import Delivery, DeliveryTable, Phase
from .errors import ConfigError, TaskLaunchError
from .hub import LAUNCH_FAILED, PENDING_TIMEOUT, REQUEUE, TERMINATED, LoopBridge, Reporter
from .informer import ObjectCache
from .kueue import Admission, task_error
from .launcher import Launcher, QuotaExceeded
from .postmortem import PostMortem

log = logging.getLogger("k8s_celery.pool")

#: A Job the watch has not shown this long after it was created is looked up directly.
UNSEEN_JOB_GRACE = 30.0


class Reconciler:
    """Drives each delivery from launch to clean-up."""

    def __init__(self, table: DeliveryTable, cache: ObjectCache, launcher: Launcher, api: KubeApi,
                 namespace: str, settings: Settings, bridge: LoopBridge, reporter: Reporter,
                 enqueue: Callable[[str], None], enqueue_after: Callable[[str, float], None],
                 on_slot_freed: Callable[[], None], post_mortem: PostMortem):
        self.table = table
        self.cache = cache
        self.launcher = launcher
        self.api = api
        self.namespace = namespace
        self.settings = settings
        self.bridge = bridge
        self.reporter = reporter
        self.enqueue = enqueue
        self.enqueue_after = enqueue_after
        self.on_slot_freed = on_slot_freed
        self.post_mortem = post_mortem
        self.admission = Admission(cache.workload, settings.admission_timeout)

    def reconcile(self, key: str) -> None:
        delivery = self.table.get(key)
        if delivery is None:
            return
        if delivery.phase is Phase.ENDED:
            self._clean_up(delivery)
        elif delivery.cancelled:
            self._forget_cancelled(delivery)
        elif delivery.terminate_signal is not None:
            self._terminate(delivery)
        elif delivery.phase is Phase.LAUNCHING:
            self._launch(delivery)
        elif delivery.phase is Phase.TRACKING:
            self._observe(delivery)

    # -- launching ---------------------------------------------------------------------

    def _launch(self, delivery: Delivery) -> None:
        spec = delivery.spec
        self.table.bind_job(delivery)  # events of the Job may come before the create returns
        try:
            result = self.launcher.launch(delivery)
        except QuotaExceeded as exc:
            self._wait_for_quota(delivery, str(exc))
            return
        except (ConfigError, TaskLaunchError) as exc:
            self._fail_launch(delivery, exc)
            return
        except ApiError as exc:
            if exc.retryable:
                log.error("cannot reach Kubernetes for %s[%s] (%s); requeueing the task",
                          spec.name, spec.task_id, exc)
                self._end(delivery, outcomes.Outcome(REQUEUE, reason=str(exc)))
            else:
                self._fail_launch(delivery, TaskLaunchError(f"Kubernetes refused the Job: {exc}"))
            return
        except Exception as exc:  # never let one task take the worker down
            log.exception("unexpected error launching %s[%s]", spec.name, spec.task_id)
            self._fail_launch(delivery, TaskLaunchError(f"unexpected error launching the Job: {exc!r}"))
            return
        self.table.bind_job(delivery)  # the attempt may have changed the name
        delivery.launch_blocked_since = None
        if result is not None:
            self._end(delivery, self._resolve(delivery, result))
            return
        delivery.phase = Phase.TRACKING
        self._observe(delivery)

    def _wait_for_quota(self, delivery: Delivery, reason: str) -> None:
        """A ResourceQuota is full: keep the slot and try again with back-off, as the
        Job controller does for its pods, until the pending timeout."""
        now = time.monotonic()
        delivery.launch_blocked_since = delivery.launch_blocked_since or now
        delivery.launch_attempts += 1
        if now - delivery.launch_blocked_since > self.settings.pending_timeout:
            log.error("task %s[%s]: quota still exceeded after %.0fs: %s", delivery.spec.name,
                      delivery.task_id, self.settings.pending_timeout, reason)
            self._end(delivery, outcomes.Outcome(PENDING_TIMEOUT, reason=reason))
            return
        delay = min(2.0 ** delivery.launch_attempts, 30.0)
        log.warning("task %s[%s] waits for quota (%s); trying again in %.0fs", delivery.spec.name,
                    delivery.task_id, reason, delay)
        self.enqueue_after(delivery.key, delay)

    def _fail_launch(self, delivery: Delivery, exc: Exception) -> None:
        log.error("task %s[%s] cannot run as a Job: %s", delivery.spec.name, delivery.task_id, exc)
        self._end(delivery, outcomes.Outcome(LAUNCH_FAILED, reason=str(exc)), error=exc)

    # -- tracking ----------------------------------------------------------------------

    def _observe(self, delivery: Delivery) -> None:
        job, job_deleted = self.cache.job(delivery.job_uid)
        pod = self.cache.latest_pod(delivery.job_uid)
        if pod is not None and outcomes.job_suspended(job):
            delivery.preempted_pods.add(pod["metadata"]["uid"])
        if outcomes.preempted(job, pod, delivery.preempted_pods):
            pod = None  # its end comes after the Job's resumption: the task runs again in a new pod
        if job is None and not job_deleted:
            job_deleted = self._unseen_job_is_gone(delivery)
        if pod is not None:
            delivery.pod_name = pod["metadata"]["name"]
            delivery.pod_phase = (pod.get("status") or {}).get("phase")
        if delivery.pod_phase == "Running" and not delivery.accepted:
            delivery.accepted = True
            for request in list(delivery.requests):
                self.bridge.call(self.reporter.accept, delivery, request)
        if delivery.secret_missing and not job_deleted:
            self._retry_secret(delivery, job)
        if not delivery.secret_missing and outcomes.waits_for_secret(pod, delivery.spec.secret_name):
            self.launcher.wake_pod(delivery, pod)
        result = outcomes.classify(job, pod, job_deleted)
        if result is None:
            self._check_clocks(delivery, job, pod)
            return
        if result.state == outcomes.LOST and not result.job_completed and not delivery.lost_confirmed:
            # The Job watch can report the end before the pod watch brings the pod's last
            # status, and the pod watch a preempted pod's end before the Job watch brings
            # its suspension: read both before calling the attempt lost.
            delivery.lost_confirmed = True
            latest_job, latest = self._read_now(delivery)
            if latest_job is not None:
                self.cache.put_job(latest_job)
            if latest is not None:
                self.cache.put_pod(latest)
            if latest is not None or latest_job is not None:
                self.enqueue(delivery.key)
                return
        self._end(delivery, self._resolve(delivery, result))

    def _unseen_job_is_gone(self, delivery: Delivery) -> bool:
        """A Job created or adopted a while ago that the watch never showed may have come
        and gone while the watch was down: ask the API server."""
        if delivery.job_seen_at is None or time.monotonic() - delivery.job_seen_at < UNSEEN_JOB_GRACE:
            return False
        try:
            job = self.api.get(object_path("jobs", self.namespace, delivery.job_name))
        except ApiError as exc:
            return exc.not_found
        if job["metadata"]["uid"] != delivery.job_uid:
            return True
        self.cache.put_job(job)
        delivery.job_seen_at = time.monotonic()
        return False

    def _retry_secret(self, delivery: Delivery, job: dict | None) -> None:
        try:
            self.launcher.ensure_secret(delivery, job or {"metadata": {"uid": delivery.job_uid},
                                                          "spec": {}})
        except (QuotaExceeded, ApiError) as exc:
            log.warning("payload Secret of Job %s still missing: %s", delivery.job_name, exc)

    def _check_clocks(self, delivery: Delivery, job: dict | None, pod: dict | None) -> None:
        now = time.monotonic()
        if outcomes.job_suspended(job):
            result = self.admission.waiting(delivery, now)
            if result is not None:
                result = self.post_mortem.explain(delivery, result)
                log.error("task %s[%s]: %s; deleting Job %s", delivery.spec.name, delivery.task_id,
                          result.reason, delivery.job_name)
                self._delete_job(delivery.job_name, delivery.job_uid)
                self._end(delivery, result, error=task_error(result))
            return
        self.admission.admitted(delivery, now)
        if not delivery.accepted and delivery.job_seen_at is not None \
                and now - delivery.job_seen_at > self.settings.pending_timeout:
            reason = self.post_mortem.explain(
                delivery, outcomes.Outcome(PENDING_TIMEOUT, reason=outcomes.pending_reason(pod))).reason
            log.error("task %s[%s]: pod not running after %.0fs (%s); deleting Job %s", delivery.spec.name,
                      delivery.task_id, self.settings.pending_timeout, reason, delivery.job_name)
            self._delete_job(delivery.job_name, delivery.job_uid)
            self._end(delivery, outcomes.Outcome(PENDING_TIMEOUT, reason=reason))
            return
        overdue = _terminating_overdue(pod)
        if overdue is not None and overdue > self.settings.terminating_timeout:
            reason = (f"pod {delivery.pod_name} still terminating {overdue:.0f}s after its grace "
                      "period (its node may be lost)")
            self._end(delivery, outcomes.Outcome(outcomes.LOST, reason=reason))

    def _read_now(self, delivery: Delivery) -> tuple[dict | None, dict | None]:
        """The delivery's Job and its newest pod as the API server has them now."""
        try:
            return (self.launcher.current_job(delivery),
                    self.launcher.latest_pod({"metadata": {"uid": delivery.job_uid}}))
        except ApiError as exc:
            log.warning("cannot read Job %s or its pod: %s", delivery.job_name, exc)
            return None, None

    def _resolve(self, delivery: Delivery, result: outcomes.Outcome) -> outcomes.Outcome:
        """A completed Job whose pod is gone: the result backend says what the task did."""
        if result.state != outcomes.LOST or not result.job_completed:
            return result
        meta = outcomes.stored_meta(self.launcher.app, delivery.task_id)
        # The pod exited 0: the task succeeded, retried or was ignored, and stored as much.
        if meta.get("status") == outcomes.RETRY:
            return outcomes.Outcome(outcomes.RETRY, result="retried (read from the result backend)")
        return outcomes.stored_success(meta)

    # -- revoke, cancel ----------------------------------------------------------------

    def _terminate(self, delivery: Delivery) -> None:
        if delivery.phase is Phase.TRACKING:
            log.info("terminating %s[%s]: deleting Job %s", delivery.spec.name, delivery.task_id,
                     delivery.job_name)
            # SIGKILL skips the pod's grace period; any other signal lets it exit as a
            # prefork child would on SIGTERM.
            self._delete_job(delivery.job_name, delivery.job_uid,
                             grace_period=0 if delivery.terminate_signal == signal.SIGKILL else None)
        self._end(delivery, outcomes.Outcome(TERMINATED))

    def _forget_cancelled(self, delivery: Delivery) -> None:
        """Celery cancelled the request (connection lost, cold shutdown): its message goes
        back unacknowledged and its redelivery adopts the Job, which keeps running."""
        if delivery.job_uid:
            log.info("%s[%s] cancelled by the worker; Job %s keeps running for the redelivered message",
                     delivery.spec.name, delivery.task_id, delivery.job_name)
        delivery.phase = Phase.ENDED
        if self.table.remove(delivery):
            self.on_slot_freed()

    # -- ending ------------------------------------------------------------------------

    def _end(self, delivery: Delivery, result: outcomes.Outcome, error: Exception | None = None) -> None:
        """Report the outcome on Celery's loop and relay the pod's output; then remove the
        Jobs (after the acks and the relay's read) or, for a lost attempt that is
        requeued, keep them: they count the attempts."""
        if result.state == outcomes.LOST and delivery.phase is not Phase.ENDED:
            result = self.post_mortem.explain(delivery, result)
        with self.table.lock:
            if delivery.phase is Phase.ENDED:
                return
            if delivery.terminate_signal is not None and result.state != TERMINATED:
                result = outcomes.Outcome(TERMINATED)
            delivery.phase = Phase.ENDED
            delivery.outcome = result
            delivery.ended_at = time.monotonic()
            requeued = result.state == REQUEUE or (
                result.state == outcomes.LOST and not self.reporter.final_loss(delivery))
            if result.state == outcomes.LOST and delivery.job_uid:
                self.launcher.lost_jobs.add(delivery.job_uid)
            if delivery.job_uid and (result.state == outcomes.TIME_LIMIT or
                                     (result.state == outcomes.REJECTED and result.requeue)):
                self.launcher.requeued_jobs.add(delivery.job_uid)
            if requeued:
                slot_freed = self.table.remove(delivery)
        self.post_mortem.begin(delivery, result, on_read=lambda: self.enqueue(delivery.key))
        self.bridge.call(self.reporter.report, delivery, result, error)
        if requeued:
            if slot_freed:
                self.on_slot_freed()
        else:
            # After the acks (same FIFO): a Job deleted before its message is acked
            # could let a redelivery run the task again.
            self.bridge.call(self._reported, delivery)

    def _reported(self, delivery: Delivery) -> None:
        delivery.reported = True
        self.enqueue(delivery.key)

    def _clean_up(self, delivery: Delivery) -> None:
        """Delete the delivery's Jobs (their pods and Secrets go with them), free its slot.

        Every Job of the delivery in the informer's cache is looked at: a redelivery may
        have adopted a later attempt created by a worker that died. A running Job of the
        same delivery that this one never tracked belongs to a concurrent delivery and
        stays, and so does a Job kept for a post-mortem (the sweeper or its TTL removes
        it). Jobs that fail to go are removed by their TTL.
        """
        if not delivery.reported or not self.post_mortem.read_over(delivery):
            return  # the ack and the log read each enqueue the delivery again
        jobs = self.cache.jobs_of_delivery(delivery.key) if delivery.job_uids else []
        if delivery.job_uid and self.cache.job(delivery.job_uid) == (None, False):
            # Created or read a moment ago, not seen by the watch yet: it goes all the same.
            jobs.append({"metadata": {"name": delivery.job_name, "uid": delivery.job_uid}})
        for job in jobs:
            uid = job["metadata"]["uid"]
            requeued = uid in self.launcher.requeued_jobs  # an earlier attempt, ended
            if self.post_mortem.keep_reported(delivery, job, requeued):
                continue
            if uid in delivery.job_uids or requeued or outcomes.job_condition(job) is not None:
                self._delete_job(job["metadata"]["name"], uid)
        if self.table.remove(delivery):
            self.on_slot_freed()

    def _delete_job(self, name: str, uid: str | None, grace_period: int | None = None) -> None:
        try:
            self.api.delete(object_path("jobs", self.namespace, name), propagation="Background",
                            grace_period=grace_period, uid=uid)
        except ApiError as exc:
            log.warning("cannot delete Job %s: %s", name, exc)


def _terminating_overdue(pod: dict | None) -> float | None:
    """Seconds a terminating pod is past its deletion deadline, or ``None``."""
    deleted_at = ((pod or {}).get("metadata") or {}).get("deletionTimestamp")
    if not deleted_at:
        return None
    deadline = datetime.fromisoformat(deleted_at).timestamp()
    return time.time() - deadline
