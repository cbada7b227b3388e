"""Periodic work of the pool: time checks, broker reservations, the sweep of leftovers.

:class:`Maintenance` runs in its own thread. Every second it enqueues the deliveries
whose clocks may have run out (pods not started within the pending timeout, pods
stuck terminating, Jobs the watch never showed) for the reconciler, refreshes the
broker's reservations when due, and now and then sweeps Jobs that no delivery needs.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Callable

from celery import states

from . import outcome as outcomes
from .brokers import Broker
from .cluster import ApiError, KubeApi, object_path
from .config import Settings
from .deliveries import DeliveryTable, Phase
from .informer import ObjectCache
from .manifest import ANNOTATION_TASK_ID, kept

log = logging.getLogger("k8s_celery.pool")

#: Running deliveries are looked at this often (pods stuck terminating, Jobs gone unseen).
RUNNING_CHECK_INTERVAL = 10.0


class Maintenance:
    """The pool's periodic duties, on one background thread."""

    def __init__(self, table: DeliveryTable, cache: ObjectCache, broker: Broker, sweeper: Sweeper,
                 enqueue: Callable[[str], None], settings: Settings):
        self.table = table
        self.cache = cache
        self.broker = broker
        self.sweeper = sweeper
        self.enqueue = enqueue
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="k8s-celery maintenance", daemon=True)

    def start(self) -> Maintenance:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        now = time.monotonic()
        next_refresh = next_sweep = now
        next_running_check = now + RUNNING_CHECK_INTERVAL
        while not self._stop.wait(1.0):
            now = time.monotonic()
            check_running = now >= next_running_check
            if check_running:
                next_running_check = now + RUNNING_CHECK_INTERVAL
            self._enqueue_due(check_running, now)
            if now >= next_refresh:
                requests = [r for d in self.table for r in d.requests if not d.ended]
                next_refresh = now + self.broker.refresh_reservations(requests)
            if now >= next_sweep:
                next_sweep = now + self.settings.sweep_interval
                self._sweep()

    def _enqueue_due(self, check_running: bool, now: float) -> None:
        """Every second the deliveries whose pods have not run yet (the pending timeout);
        every :data:`RUNNING_CHECK_INTERVAL` the others too. Not a Job waiting in Kueue's
        queue: it has no pod, the watches bring each change of it or of its Workload (and
        their relists one they missed), and its one clock, the admission timeout, is due
        only at its end. Hundreds of them may wait for hours."""
        timeout = self.settings.admission_timeout
        for delivery in self.table:
            if delivery.phase is not Phase.TRACKING:
                continue
            if delivery.queued_since is not None:
                if timeout and now - delivery.queued_since > timeout:
                    self.enqueue(delivery.key)
            elif check_running or not delivery.accepted:
                self.enqueue(delivery.key)

    def _sweep(self) -> None:
        try:
            self.sweeper.sweep({uid for d in self.table for uid in d.job_uids})
            self.cache.prune()
        except Exception:  # the API or the backend is away: next time
            log.exception("sweeping leftover Jobs failed")


class Sweeper:
    """Deletes finished Jobs that no live delivery needs any more.

    A worker killed between the ack and its clean-up leaves its Job behind. Such a
    Job is deleted once it has been finished for the grace period *and* the result
    backend holds the task's final state; a Job of a task still to be retried (a lost
    attempt) stays, since it counts the attempts, and so does a Job kept for a
    post-mortem until its time is up. The TTL controller removes whatever is left
    after ``job_ttl``. The Jobs are those of the informer's cache: listing them all
    each time would cost the API server, and this worker's CPU, in proportion to the
    Jobs in flight (a thousand waiting in Kueue's queue, say).
    """

    def __init__(self, api: KubeApi, namespace: str, app, settings: Settings, cache: ObjectCache):
        self.api = api
        self.namespace = namespace
        self.app = app
        self.settings = settings
        self.cache = cache

    def sweep(self, owned_uids: set[str]) -> None:
        cutoff = time.time() - self.settings.sweep_grace
        for job in self.cache.jobs():
            metadata = job["metadata"]
            condition = outcomes.job_condition(job)
            if metadata["uid"] in owned_uids or condition is None or kept(job):
                continue
            if _timestamp(condition.get("lastTransitionTime")) > cutoff:
                continue
            task_id = (metadata.get("annotations") or {}).get(ANNOTATION_TASK_ID)
            if task_id and self._final_state(task_id):
                log.info("sweeping Job %s of finished task %s", metadata["name"], task_id)
                try:
                    self.api.delete(object_path("jobs", self.namespace, metadata["name"]),
                                    propagation="Background", uid=metadata["uid"])
                except ApiError as exc:
                    log.warning("cannot delete Job %s: %s", metadata["name"], exc)

    def _final_state(self, task_id: str) -> bool:
        # No result backend, or one that cannot answer: the TTL controller removes the Job.
        return outcomes.stored_meta(self.app, task_id).get("status") in states.READY_STATES


def _timestamp(value: str | None) -> float:
    if not value:
        return time.time()
    return datetime.fromisoformat(value).timestamp()
