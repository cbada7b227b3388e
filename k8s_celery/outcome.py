"""The task's outcome: written by the pod as its termination message, read by the shim.

The pod's runner writes one compact JSON document (at most 4096 bytes, the kubelet's
limit) to its termination-message file. The shim reads it from the pod status and,
together with the Job's conditions, decides what happened: :func:`classify` is a
pure function of the Job and pod objects.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

MESSAGE_LIMIT = 4096

SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
RETRY = "RETRY"
REJECTED = "REJECTED"
IGNORED = "IGNORED"
LOST = "LOST"
TIME_LIMIT = "TIME_LIMIT"

TASK_STATES = (SUCCESS, FAILURE, RETRY, REJECTED, IGNORED)


@dataclass
class Outcome:
    """What became of one task attempt."""

    state: str
    runtime: float = 0.0
    result: str = ""
    exc_type: str | None = None
    exc_module: str | None = None
    exc_args: list | None = None
    traceback: str = ""
    requeue: bool = False
    when: str | None = None
    reason: str = ""
    #: The runner could not run the task at all (unknown task, unreadable payload,
    #: the app failed to import): nothing reached the result backend.
    not_run: bool = False
    #: The task hit its soft time limit (``SoftTimeLimitExceeded`` was raised in it).
    soft_limit_hit: bool = False
    #: LOST only: the Job completed (its pod exited 0) but the pod and its outcome are gone.
    job_completed: bool = False

    @property
    def exception(self) -> dict | None:
        if self.exc_type is None:
            return None
        return {"exc_type": self.exc_type, "exc_module": self.exc_module,
                "exc_message": self.exc_args or []}


def encode(outcome: Outcome, limit: int = MESSAGE_LIMIT) -> str:
    """Compact JSON for the termination message, cut to fit ``limit`` bytes.

    The result and exception text get at most a quarter of the room each; the
    traceback gets the rest, cut from the top (its last lines say the most).
    """
    doc: dict[str, Any] = {"v": 1, "s": outcome.state, "rt": round(outcome.runtime or 0.0, 6)}
    if outcome.result:
        doc["r"] = _clip(outcome.result, limit // 4)
    if outcome.exc_type:
        args = outcome.exc_args or []
        if len(_dumps(args).encode()) > limit // 4:
            args = [_clip(" ".join(map(str, args)), limit // 4)]
        doc["e"] = {"t": outcome.exc_type, "m": outcome.exc_module, "a": args}
    if outcome.requeue:
        doc["rq"] = True
    if outcome.when:
        doc["w"] = outcome.when
    if outcome.not_run:
        doc["nr"] = True
    if outcome.soft_limit_hit:
        doc["sl"] = True
    if outcome.traceback:
        room = limit - len(_dumps({**doc, "tb": ""}).encode())
        doc["tb"] = _clip_head(outcome.traceback, room)
    text = _dumps(doc)
    if len(text.encode()) > limit:  # pathological: keep only the state
        text = _dumps({"v": 1, "s": outcome.state, "rt": doc["rt"]})
    return text


def _fits(text: str, size: int) -> bool:
    return len(_dumps(text).encode()) <= size


def _clip(text: str, size: int) -> str:
    """At most ``size`` bytes of JSON-escaped text, keeping the start."""
    if _fits(text, size):
        return text
    low, high = 0, len(text)  # the longest prefix that fits
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if _fits(text[:middle] + "…", size) else (low, middle - 1)
    return text[:low] + "…"


def _clip_head(text: str, size: int) -> str:
    """At most ``size`` bytes of JSON-escaped text, keeping the end."""
    if _fits(text, size):
        return text
    low, high = 0, len(text)  # the earliest start whose suffix fits
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if _fits("…" + text[middle:], size) else (middle + 1, high)
    return "…" + text[low:] if _fits("…" + text[low:], size) else ""


def _dumps(doc: dict) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=repr)


def decode(message: str | None) -> Outcome | None:
    """Parse a termination message; ``None`` when it is not one of ours."""
    if not message:
        return None
    try:
        doc = json.loads(message)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("v") != 1 or doc.get("s") not in TASK_STATES:
        return None
    exc = doc.get("e") or {}
    return Outcome(state=doc["s"], runtime=float(doc.get("rt") or 0.0), result=doc.get("r", ""),
                   exc_type=exc.get("t"), exc_module=exc.get("m"), exc_args=exc.get("a"),
                   traceback=doc.get("tb", ""), requeue=bool(doc.get("rq")), when=doc.get("w"),
                   not_run=bool(doc.get("nr")), soft_limit_hit=bool(doc.get("sl")))


def job_condition(job: dict) -> dict | None:
    """The Job's terminal condition (Complete or Failed), if it has one."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition
    return None


def job_suspended(job: dict | None) -> bool:
    """Is the Job suspended: waiting for admission (Kueue), or preempted and waiting to
    be admitted again? Its pods are gone or going; none is started until it is resumed."""
    return bool(((job or {}).get("spec") or {}).get("suspend"))


def preempted(job: dict | None, pod: dict | None, preempted_pods: set[str]) -> bool:
    """Was ``pod`` stopped by its Job's suspension (Kueue's preemption) rather than lost? A pod
    that reported no outcome and that the Job had when it was seen suspended, or that was
    created before the Job was last resumed: its end may be seen after the resumption."""
    if pod is None or pod_outcome(pod) is not None:
        return False
    if pod["metadata"].get("uid") in preempted_pods:
        return True
    resumed = next((c.get("lastTransitionTime") for c in (job or {}).get("status", {}).get("conditions") or []
                    if c.get("type") == "Suspended" and c.get("status") == "False"), None)
    created = pod["metadata"].get("creationTimestamp")
    return bool(resumed and created and created < resumed)


def job_finished(job: dict) -> bool:
    """Has the Job ended or begun to (``FailureTarget``/``SuccessCriteriaMet``: the Job
    controller is removing its pods)? Such a Job is never adopted as running."""
    return any(c.get("type") in ("Complete", "Failed", "FailureTarget", "SuccessCriteriaMet")
               and c.get("status") == "True" for c in (job.get("status") or {}).get("conditions") or [])


def deadline_exceeded(job: dict | None) -> dict | None:
    """The Job's DeadlineExceeded condition: ``FailureTarget`` comes first (the Job
    controller then kills the pods), ``Failed`` once they are gone."""
    for condition in ((job or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("FailureTarget", "Failed") and condition.get("status") == "True" \
                and condition.get("reason") == "DeadlineExceeded":
            return condition
    return None


def task_container_name(pod: dict) -> str | None:
    """The task's container: the first of the pod spec's ``containers``."""
    containers = (pod.get("spec") or {}).get("containers") or []
    return containers[0].get("name") if containers else None


def container_status(pod: dict) -> dict:
    """The task container's status, found by name: the kubelet sorts ``containerStatuses``
    by container name, so a sidecar may come first."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    name = task_container_name(pod)
    if name is None:
        return statuses[0] if statuses else {}
    return next((status for status in statuses if status.get("name") == name), {})


def container_state(pod: dict) -> dict:
    return container_status(pod).get("state") or {}


def pod_outcome(pod: dict) -> Outcome | None:
    """The outcome the task container reported once it terminated, or ``None``.

    Read as soon as the task container has terminated, not when the pod has: a
    sidecar that is an ordinary container keeps the pod running after the task ended.
    """
    return decode(container_state(pod).get("terminated", {}).get("message"))


def task_terminated(pod: dict | None) -> bool:
    """Has the task container ended (restartPolicy Never: it will not run again)?"""
    if not pod:
        return False
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return True
    return bool(container_state(pod).get("terminated"))


def lost_reason(pod: dict | None) -> str:
    """Why a pod ended without an outcome, in words a user can act on."""
    if pod is None:
        return "the pod disappeared (deleted, or its node was lost)"
    status = pod.get("status") or {}
    terminated = container_state(pod).get("terminated") or {}
    parts = []
    if status.get("reason"):
        parts.append(f"pod {status['reason']}: {status.get('message', '').strip()}".rstrip(": "))
    if terminated:
        parts.append(f"container {terminated.get('reason', 'terminated')} "
                     f"(exit code {terminated.get('exitCode')})")
    disruption = next((c for c in status.get("conditions") or []
                       if c.get("type") == "DisruptionTarget" and c.get("status") == "True"), None)
    if disruption and not status.get("reason"):
        parts.append(f"disrupted: {disruption.get('reason')} {disruption.get('message', '')}".strip())
    if pod.get("metadata", {}).get("deletionTimestamp") and not parts:
        parts.append("the pod was deleted")
    return "; ".join(parts) or f"the pod ended ({status.get('phase', 'unknown phase')}) without an outcome"


def pending_reason(pod: dict | None) -> str:
    """Why a pod is not running yet: waiting reason, or the scheduler's message."""
    if pod is None:
        return "no pod was created for the Job"
    waiting = container_state(pod).get("waiting") or {}
    if waiting.get("reason") and waiting.get("reason") != "ContainerCreating" or waiting.get("message"):
        return f"{waiting.get('reason')}: {waiting.get('message', '')}".rstrip(": ")
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{condition.get('reason')}: {condition.get('message', '')}".rstrip(": ")
    if waiting.get("reason"):
        return waiting["reason"]
    return f"pod {(pod.get('status') or {}).get('phase', 'Pending')}"


def waits_for_secret(pod: dict | None, name: str) -> bool:
    """Has the kubelet failed to start the pod's container for want of the Secret ``name``
    (read into its environment)? It then tries again only after a back-off of 10 s or more."""
    waiting = (container_state(pod).get("waiting") or {}) if pod else {}
    return waiting.get("reason") == "CreateContainerConfigError" \
        and f'secret "{name}" not found' in (waiting.get("message") or "")


def classify(job: dict | None, pod: dict | None, job_deleted: bool = False) -> Outcome | None:
    """Decide the attempt's outcome from its Job and pod, or ``None`` if it is not over.

    A pod's own outcome wins (it is what the task reported). A Job past its
    ``activeDeadlineSeconds`` (or a pod past its own) is the hard time limit. A pod that
    ended without an outcome while its Job is suspended was preempted, not lost: the Job
    runs again when it is resumed. A task container that ended without an outcome, a
    failed or deleted Job: the pod was lost.
    """
    reported = pod_outcome(pod) if pod else None
    if reported:
        return reported
    deadline = deadline_exceeded(job)
    if deadline:
        return Outcome(TIME_LIMIT, reason=deadline.get("message", "DeadlineExceeded"))
    if pod and (pod.get("status") or {}).get("reason") == "DeadlineExceeded":
        return Outcome(TIME_LIMIT, reason=(pod.get("status") or {}).get("message", "DeadlineExceeded"))
    condition = job_condition(job) if job else None
    if job_suspended(job) and not (condition or job_deleted):
        return None  # preempted (or queued): the same Job gets a new pod once it is resumed
    if condition or job_deleted or task_terminated(pod):
        reason = lost_reason(pod)
        completed = bool(condition and condition["type"] == "Complete")
        if completed and pod is None:
            reason = "the Job completed, but its pod and the outcome it reported are gone"
        elif completed:
            reason = "the pod exited successfully without reporting an outcome"
        elif job_deleted and pod is None:
            reason = "the Job was deleted"
        return Outcome(LOST, reason=reason, job_completed=completed and pod is None)
    return None


def stored_meta(app: Any, task_id: str, log: logging.Logger | None = None) -> dict:
    """The task's state in ``app``'s result backend; ``{}`` when the backend cannot answer
    (logged on ``log``, if given): every reader then does what it does without a backend."""
    try:
        return app.backend.get_task_meta(task_id)
    except Exception as exc:
        if log is not None:
            log.warning("cannot read the state of %s from the result backend: %s", task_id, exc)
        return {}


def stored_success(meta: dict) -> Outcome:
    """The success a result backend holds, as an outcome to report."""
    from celery.utils.saferepr import saferepr

    return Outcome(SUCCESS, result=saferepr(meta.get("result")))
