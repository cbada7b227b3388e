"""One entry per message delivery: its identity, its state and the Celery requests it answers.

A message is a delivery, not a task id: Celery sends a *new* message with the same
task id for ``self.retry()`` (``retries`` + 1), ``Task.replace()`` (another task name,
``replaced_task_nesting`` + 1) and ``celery.chord_unlock``; each of those must run.
A *redelivery* of the same message (``redelivered``: a visibility timeout, a
connection lost before the ack, a requeued lost attempt) must find the Job of the
earlier delivery instead. :func:`delivery_key` tells them apart; Job names and
labels carry it (:mod:`.manifest`).

:class:`DeliveryTable` indexes the deliveries in flight by key and by Job name,
holds the pool's slots (one per Job that may exist) and the deliveries waiting for
one.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import json
import threading
import time
from typing import Any, Callable, Iterator

from .manifest import TaskSpec
from .outcome import Outcome


def delivery_key(task_id: str, name: str, request: dict, body: bytes) -> str:
    """A digest that is the same for every delivery of one message, different for another.

    It covers what Celery changes when it sends a new message under the same id
    (task name, ``retries``, ``replaced_task_nesting``, ``eta``) and the body. Redis
    (kombu's virtual transports) gives each published message a ``delivery_tag``
    that its redeliveries keep, which tells apart even two identical messages.
    """
    properties = request.get("properties") or {}
    tag = properties.get("delivery_tag")
    identity = [task_id, name, request.get("retries") or 0, request.get("replaced_task_nesting") or 0,
                request.get("eta"), tag if isinstance(tag, str) else None,
                hashlib.sha256(bytes(body)).hexdigest()]
    return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:20]


def redelivered(request: dict) -> bool:
    return bool((request.get("delivery_info") or {}).get("redelivered"))


class CeleryRequest:
    """The callbacks Celery passed with one message (one ``Request``)."""

    def __init__(self, accept: Callable | None, success: Callable | None, error: Callable | None,
                 timeout: Callable | None):
        self.accept = accept
        self.success = success
        self.error = error
        self.timeout = timeout
        self.accepted = False

    @property
    def request(self) -> Any:
        """Celery's ``Request`` these callbacks belong to (``None`` outside a worker)."""
        return getattr(self.success, "__self__", None)

    @property
    def message(self) -> Any:
        return getattr(self.request, "message", None)


class Phase(enum.Enum):
    WAITING = "Queued"        # no slot yet
    LAUNCHING = "Launching"   # has a slot; its Job is to be created or adopted
    TRACKING = "Pending"      # has a Job; its pod's end is awaited
    ENDED = "Ended"           # outcome reported to Celery; its Jobs are to be removed


class Delivery:
    """A task delivery in the pool: from ``apply_async`` until its Job is gone.

    Returned by :meth:`KubernetesPool.apply_async`; Celery keeps a weak reference
    and calls :meth:`terminate` on ``revoke(terminate=True)`` (and on cancel).
    """

    def __init__(self, spec: TaskSpec, request: CeleryRequest,
                 on_terminate: Callable[[Delivery, int | None], None]):
        self.spec = spec
        self.requests = [request]
        self._on_terminate = on_terminate
        self.phase = Phase.WAITING
        self.received = time.monotonic()
        self.has_slot = False
        self.job_uid: str | None = None
        self.job_uids: set[str] = set()   # every Job this delivery created, adopted or read
        self.bound_jobs: set[str] = set()  # Job names whose events reach this delivery
        self.job_seen_at: float | None = None  # when a Job was created, adopted or admitted
        self.queued_since: float | None = None  # since when its Job waits suspended (Kueue's queue)
        self.preempted_pods: set[str] = set()  # pods its Job had when it was suspended (preempted)
        self.admission_note: str | None = None  # what Kueue last said of why it is not admitted
        self.secret_missing = False
        self.pod_woken_at = float("-inf")  # when its pod was last woken for its payload Secret
        self.accepted = False
        self.pod_name: str | None = None
        self.pod_phase: str | None = None
        self.lost_before = 0
        self.terminate_signal: int | None = None
        self.cancelled = False
        self.outcome: Outcome | None = None
        self.lost_confirmed = False
        self.launch_blocked_since: float | None = None
        self.launch_attempts = 0
        self.ended_at: float | None = None
        self.reported = False  # the outcome has been reported (acked) on Celery's loop
        self.log_read: Any = None  # the Future of the relay's read of the pod's log

    @property
    def key(self) -> str:
        return self.spec.delivery

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def job_name(self) -> str:
        return self.spec.job_name

    @property
    def ended(self) -> bool:
        return self.phase is Phase.ENDED

    def terminate(self, signal: int | None = None) -> None:
        """Celery's ``revoke(terminate=True)`` (or a cancel): see the pool."""
        self._on_terminate(self, signal)

    def info(self) -> dict:
        if self.queued_since is not None:
            phase = "Suspended"  # its Job waits in Kueue's queue, admitted or not yet
        elif self.phase is Phase.TRACKING:
            phase = self.pod_phase or Phase.TRACKING.value
        else:
            phase = self.phase.value
        return {"id": self.task_id, "name": self.spec.name, "queue": self.spec.queue,
                "job": self.job_name if self.job_uid else None, "pod": self.pod_name,
                "phase": phase, "attempt": self.spec.attempt, "delivery": self.key}

    def __repr__(self) -> str:
        return f"<Delivery {self.spec.name}[{self.task_id}] {self.key} {self.phase.name}>"


class DeliveryTable:
    """The deliveries in flight, indexed by delivery key and by Job name; the slots.

    A slot is held from launch until the delivery's Job is gone, so that at most
    ``limit`` Jobs of this worker exist at once. Every method takes :attr:`lock`.
    """

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.lock = threading.RLock()
        self._by_key: dict[str, Delivery] = {}
        self._by_job: dict[str, Delivery] = {}
        self._waiting: collections.deque[Delivery] = collections.deque()
        self._slots_used = 0

    def __len__(self) -> int:
        with self.lock:
            return len(self._by_key)

    def __iter__(self) -> Iterator[Delivery]:
        with self.lock:
            return iter(list(self._by_key.values()))

    @property
    def slots_used(self) -> int:
        return self._slots_used

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def get(self, key: str) -> Delivery | None:
        with self.lock:
            return self._by_key.get(key)

    def by_job(self, job_name: str) -> Delivery | None:
        with self.lock:
            return self._by_job.get(job_name)

    def find_pod(self, pod_name: str) -> Delivery | None:
        with self.lock:
            return next((d for d in self._by_key.values() if d.pod_name == pod_name), None)

    def add(self, delivery: Delivery) -> Delivery:
        """Add a new delivery; a message already in flight here joins its delivery instead.

        Returns the delivery that answers the message.
        """
        with self.lock:
            current = self._by_key.get(delivery.key)
            if current is not None and not current.ended and not current.cancelled:
                current.requests.extend(delivery.requests)
                return current
            self._by_key[delivery.key] = delivery
            if self._slots_used < self.limit and not self._waiting:
                self._take_slot(delivery)
            else:
                self._waiting.append(delivery)
            return delivery

    def next_waiting(self) -> Delivery | None:
        """The next waiting delivery if a slot is free (the slot is taken for it)."""
        with self.lock:
            if not self._waiting or self._slots_used >= self.limit:
                return None
            delivery = self._waiting.popleft()
            self._take_slot(delivery)
            return delivery

    def drop_waiting(self, delivery: Delivery) -> bool:
        """Remove a delivery that never got a slot; ``True`` if it was waiting."""
        with self.lock:
            if delivery in self._waiting:
                self._waiting.remove(delivery)
                self._forget(delivery)
                return True
            return False

    def clear_waiting(self) -> list[Delivery]:
        with self.lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            for delivery in waiting:
                self._forget(delivery)
            return waiting

    def bind_job(self, delivery: Delivery) -> None:
        """Route events of ``delivery.job_name`` to ``delivery``."""
        with self.lock:
            self._by_job[delivery.job_name] = delivery
            delivery.bound_jobs.add(delivery.job_name)

    def remove(self, delivery: Delivery) -> bool:
        """Forget a delivery and free its slot; ``True`` if a slot was freed."""
        with self.lock:
            self._forget(delivery)
            return self.release_slot(delivery)

    def release_slot(self, delivery: Delivery) -> bool:
        with self.lock:
            if delivery.has_slot:
                delivery.has_slot = False
                self._slots_used -= 1
                return True
            return False

    def resize(self, limit: int) -> None:
        with self.lock:
            self.limit = max(1, limit)

    def _take_slot(self, delivery: Delivery) -> None:
        self._slots_used += 1
        delivery.has_slot = True
        delivery.phase = Phase.LAUNCHING

    def _forget(self, delivery: Delivery) -> None:
        if self._by_key.get(delivery.key) is delivery:
            del self._by_key[delivery.key]
        for name in delivery.bound_jobs:
            if self._by_job.get(name) is delivery:
                del self._by_job[name]
