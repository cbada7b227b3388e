"""The task's outcome: written by the pod as its termination message, read by the shim.

The pod's runner writes one compact JSON document (at most 4096 bytes, the kubelet's
limit) to its termination-message file. The shim reads it from the pod status and,
together with the Job's conditions, decides what happened: :func:`classify` is a
pure function of the Job and pod objects.
"""

from __future__ import annotations

import json
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
                   traceback=doc.get("tb", ""), requeue=bool(doc.get("rq")), when=doc.get("w"))


def job_condition(job: dict) -> dict | None:
    """The Job's terminal condition (Complete or Failed), if it has one."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition
    return None


def container_state(pod: dict) -> dict:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return statuses[0].get("state", {}) if statuses else {}


def pod_outcome(pod: dict) -> Outcome | None:
    """The outcome a terminated pod reported, or ``None`` if it reported none."""
    if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
        return None
    return decode(container_state(pod).get("terminated", {}).get("message"))


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


def classify(job: dict | None, pod: dict | None, job_deleted: bool = False) -> Outcome | None:
    """Decide the attempt's outcome from its Job and pod, or ``None`` if it is not over.

    A pod's own outcome wins (it is what the task reported). Without one, the Job's
    terminal condition decides: DeadlineExceeded is the hard time limit, anything
    else means the pod was lost.
    """
    reported = pod_outcome(pod) if pod else None
    if reported:
        return reported
    condition = job_condition(job) if job else None
    if condition and condition.get("reason") == "DeadlineExceeded":
        return Outcome(TIME_LIMIT, reason=condition.get("message", "DeadlineExceeded"))
    if condition or job_deleted:
        reason = lost_reason(pod)
        if condition and condition["type"] == "Complete":
            reason = "the pod exited successfully without reporting an outcome"
        elif job_deleted and pod is None:
            reason = "the Job was deleted"
        return Outcome(LOST, reason=reason)
    return None
