"""What Kueue says about a task's Job, and the clock of a Job waiting in its queue.

Kueue keeps a Job's queueing state on the Workload it makes for the Job, not on the
Job: a Job suspended by Kueue is waiting for admission or was preempted, and only its
Workload says whether it will ever run (``spec.active: false``: deactivated after its
requeue limit, its maximum execution time, or by an operator) or why it has not yet
(``QuotaReserved`` False: no such LocalQueue, no quota left). The informer watches the
namespace's Workloads when the API server serves them (:func:`workloads_path`) and
keeps them slim (:func:`slim_workload`); :class:`Admission` reads them.
"""

from __future__ import annotations

import logging
from typing import Callable

from . import outcome as outcomes
from .cluster import ApiError, KubeApi
from .deliveries import Delivery
from .errors import PodPendingTimeout, WorkloadDeactivated
from .hub import LAUNCH_FAILED, PENDING_TIMEOUT

log = logging.getLogger("k8s_celery.pool")

GROUP = "kueue.x-k8s.io"
QUEUE_LABEL = f"{GROUP}/queue-name"
KEPT_CONDITIONS = ("QuotaReserved", "Admitted", "Evicted", "DeactivationTarget")


def workloads_path(api: KubeApi, namespace: str) -> str | None:
    """The Workloads of ``namespace`` in the version Kueue prefers, or ``None`` when the
    API server does not serve Kueue's group (no Kueue in this cluster)."""
    try:
        group = api.get(f"/apis/{GROUP}")
    except ApiError as exc:
        if exc.not_found:
            return None
        raise
    version = (group.get("preferredVersion") or {}).get("version")
    return f"/apis/{GROUP}/{version}/namespaces/{namespace}/workloads" if version else None


def watched_workloads(api: KubeApi, namespace: str) -> str | None:
    """The Workloads the worker watches: Kueue's in ``namespace`` when the cluster runs
    Kueue and the worker may list and watch them (else it says so once, and goes on)."""
    from .check import allowed  # check imports the whole configuration

    try:
        path = workloads_path(api, namespace)
        if path and not all(allowed(api, namespace, GROUP, "workloads", verb) for verb in ("list", "watch")):
            log.warning("this cluster runs Kueue but the worker may not list and watch its Workloads in "
                        "namespace %s (see `k8s-celery check`): a task whose Workload Kueue deactivates "
                        "fails only at K8S_CELERY_ADMISSION_TIMEOUT", namespace)
            return None
        return path
    except ApiError as exc:
        log.warning("cannot tell whether this cluster runs Kueue (%s): not watching its Workloads", exc)
        return None


def local_queue_problem(api: KubeApi, namespace: str, manifest: dict) -> str | None:
    """What is wrong with the LocalQueue a queue's Job manifest names, or ``None`` (it names
    none, or it exists). Raises :class:`ApiError` when the API server cannot tell."""
    name = ((manifest.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
    if not name:
        return None
    workloads = workloads_path(api, namespace)
    if workloads is None:
        return f"the Jobs name LocalQueue {name}, but this cluster does not run Kueue: they would run unqueued"
    try:
        api.get(f"{workloads.rsplit('/', 1)[0]}/localqueues/{name}")
    except ApiError as exc:
        if exc.not_found:
            return (f"LocalQueue {name} does not exist in namespace {namespace}: Kueue would hold the "
                    "Jobs suspended")
        raise
    return None


def warn_of_local_queues(api: KubeApi, namespace: str, manifests: dict[str, dict]) -> None:
    """Say at start-up, once per queue, what :func:`local_queue_problem` finds."""
    for queue, manifest in manifests.items():
        try:
            problem = local_queue_problem(api, namespace, manifest)
        except ApiError as exc:
            problem = f"cannot read its LocalQueue ({exc})"
        if problem:
            log.warning("queue %s: %s (see `k8s-celery check`)", queue, problem)


def slim_workload(workload: dict) -> dict:
    """What the worker reads of a Workload: its Job, whether it is active, and the
    conditions that say why it waits or was stopped."""
    metadata = workload.get("metadata") or {}
    job = next((ref for ref in metadata.get("ownerReferences") or []
                if ref.get("kind") == "Job" and ref.get("controller")), {})
    conditions = [{key: c[key] for key in ("type", "status", "reason", "message") if key in c}
                  for c in (workload.get("status") or {}).get("conditions") or []
                  if c.get("type") in KEPT_CONDITIONS]
    return {"name": metadata.get("name"), "uid": metadata.get("uid"), "jobUid": job.get("uid"),
            "jobName": job.get("name"), "active": (workload.get("spec") or {}).get("active", True) is not False,
            "conditions": conditions}


def _condition(workload: dict, kind: str) -> dict:
    return next((c for c in workload["conditions"] if c.get("type") == kind), {})


def deactivation(workload: dict | None) -> str | None:
    """Kueue's reason for deactivating the Workload, or ``None`` while it is active."""
    if workload is None or workload["active"]:
        return None
    evicted, target = _condition(workload, "Evicted"), _condition(workload, "DeactivationTarget")
    # Its reason is "Deactivated", or "DeactivatedDueTo<cause>" when Kueue deactivated it.
    if evicted.get("reason", "").startswith("Deactivated") and evicted.get("message"):
        why = evicted["message"]
    elif target.get("message"):  # Kueue's own deactivation, before its eviction is written
        why = f"The workload is deactivated due to {target['message']}"
    else:
        why = None
    return f"Kueue deactivated Workload {workload['name']}" + (f": {why}" if why else "")


def waiting_reason(workload: dict | None) -> str | None:
    """Why Kueue has not admitted the Workload (yet), as Kueue says it."""
    if workload is None:
        return None
    reserved = _condition(workload, "QuotaReserved")
    if reserved.get("status") == "False" and reserved.get("message"):
        return f"Kueue: {reserved['message']}"
    return None


def inadmissible(workload: dict | None) -> bool:
    """Whether Kueue says the Workload cannot be admitted as things are (reason
    ``Inadmissible``: its LocalQueue or ClusterQueue missing, inactive or stopped), rather
    than that it waits its turn for quota (``Pending``), as queued Jobs do by design."""
    return workload is not None and _condition(workload, "QuotaReserved").get("reason") == "Inadmissible"


class Admission:
    """The clock of a delivery whose Job waits suspended in Kueue's queue.

    No pending timeout runs while the Job is suspended, only ``K8S_CELERY_ADMISSION_TIMEOUT``
    if set; the pending timeout starts again at each admission. A deactivated Workload
    ends the wait at once: Kueue will not admit the Job again.
    """

    def __init__(self, workload_of: Callable[[str], dict | None], admission_timeout: float):
        self.workload_of = workload_of
        self.admission_timeout = admission_timeout

    def admitted(self, delivery: Delivery, now: float) -> None:
        """The Job is not (or no longer) suspended."""
        if delivery.queued_since is not None:
            delivery.queued_since, delivery.job_seen_at = None, now
            log.info("task %s[%s]: Job %s admitted", delivery.spec.name, delivery.task_id, delivery.job_name)

    def waiting(self, delivery: Delivery, now: float) -> outcomes.Outcome | None:
        """The Job is suspended: ``None`` while it may still be admitted, else the
        task's failure (:func:`task_error` gives its exception)."""
        if delivery.queued_since is None:
            delivery.queued_since, delivery.lost_confirmed = now, False  # a preemption: confirm again
            log.info("task %s[%s]: Job %s suspended, waiting to be admitted", delivery.spec.name,
                     delivery.task_id, delivery.job_name)
        workload = self.workload_of(delivery.job_uid) if delivery.job_uid else None
        deactivated = deactivation(workload)
        if deactivated:
            return outcomes.Outcome(LAUNCH_FAILED, reason=deactivated)
        reason = waiting_reason(workload)
        if reason and reason != delivery.admission_note:
            delivery.admission_note = reason
            # A thousand Jobs may wait for quota: that is the queue working, not a problem.
            log.log(logging.WARNING if inadmissible(workload) else logging.INFO,
                    "task %s[%s]: Job %s not admitted yet; %s", delivery.spec.name, delivery.task_id,
                    delivery.job_name, reason)
        waited = now - delivery.queued_since
        if not self.admission_timeout or waited <= self.admission_timeout:
            return None
        message = (f"Job {delivery.job_name} not admitted (still suspended) after {waited:.0f}s "
                   f"(K8S_CELERY_ADMISSION_TIMEOUT){'; ' + reason if reason else ''}")
        return outcomes.Outcome(PENDING_TIMEOUT, reason=message)


def task_error(result: outcomes.Outcome) -> Exception:
    """The exception a task ended by :meth:`Admission.waiting` fails with."""
    if result.state == PENDING_TIMEOUT:
        return PodPendingTimeout(result.reason)
    return WorkloadDeactivated(result.reason)
