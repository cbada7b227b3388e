"""Outcomes onto Celery's event loop: the callbacks a prefork worker's pool would call.

Celery's callbacks ack, requeue or reject the message, store states and send the
``task-*`` events; they must run on the worker's event loop, the thread that owns
the broker connection. :class:`LoopBridge` hands functions from the pool's threads
to that loop (a pipe the loop reads wakes it up); :class:`Reporter` turns an
:class:`~k8s_celery.outcome.Outcome` into exactly the calls billiard makes for a
pool process, so Celery does the rest as it does for prefork.
"""

from __future__ import annotations

import collections
import logging
import os
import signal as signals
import time
from typing import Any, Callable

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery.exceptions import Ignore, Reject, Retry, Terminated, TimeLimitExceeded

from . import metrics
from . import outcome as outcomes
from .deliveries import CeleryRequest, Delivery
from .errors import PodPendingTimeout, TaskLaunchError, TaskLostError

log = logging.getLogger("k8s_celery.pool")

# Outcomes decided by the worker itself, beside those a pod reports (outcome.py).
PENDING_TIMEOUT = "PENDING_TIMEOUT"
LAUNCH_FAILED = "LAUNCH_FAILED"
REQUEUE = "REQUEUE"
TERMINATED = "TERMINATED"

OUTCOME_LABELS = {outcomes.SUCCESS: "succeeded", outcomes.FAILURE: "failed", outcomes.RETRY: "retried",
                  outcomes.REJECTED: "rejected", outcomes.IGNORED: "ignored", outcomes.LOST: "lost",
                  outcomes.TIME_LIMIT: "failed", PENDING_TIMEOUT: "failed", LAUNCH_FAILED: "failed",
                  REQUEUE: "requeued", TERMINATED: "revoked"}


class LoopBridge:
    """Runs functions on the worker's event loop, in the order they were handed over."""

    def __init__(self):
        self._ready: collections.deque[tuple[Callable, tuple]] = collections.deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._hub = None
        self._closed = False

    def attach(self, hub) -> None:
        """Called each time Celery's consumer (re)starts its loop."""
        self._hub = hub
        hub.add_reader(self._wake_read, self.drain)

    def call(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the loop (at once when there is no loop, as in unit tests)."""
        if self._hub is None or self._closed:
            call_logged(fn, *args)
            return
        self._ready.append((fn, args))
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass  # the pipe is full: the loop is already due to wake up

    def drain(self) -> None:
        if self._closed:
            return
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        while self._ready:
            fn, args = self._ready.popleft()
            call_logged(fn, *args)

    def close(self) -> None:
        """Run what is left, then stop listening."""
        self.drain()
        self._closed = True
        if self._hub is not None:
            try:
                self._hub.remove_reader(self._wake_read)
            except Exception:  # the loop may already be closed
                pass
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass


class Reporter:
    """Tells Celery what became of a delivery, through the callbacks it gave the pool."""

    def __init__(self, app, settings, counters: dict[str, int]):
        self.app = app
        self.settings = settings
        self.counters = counters

    def accept(self, delivery: Delivery, request: CeleryRequest) -> None:
        """The pod runs: ``task-started``, and the task shows in ``inspect active``."""
        if request.accepted or request.accept is None:
            return
        request.accepted = True
        request.accept(delivery.pod_name or delivery.job_name, time.monotonic())

    def report(self, delivery: Delivery, result: outcomes.Outcome, error: Exception | None = None) -> None:
        for request in delivery.requests:
            self._report(delivery, request, result, error)
        label = OUTCOME_LABELS.get(result.state, "failed")
        if result.state == outcomes.LOST and not self.final_loss(delivery):
            label = "requeued"
        metrics.TASK_OUTCOMES.labels(delivery.spec.queue, delivery.spec.name, label).inc()
        if delivery.ended_at is not None and result.state in outcomes.TASK_STATES:
            metrics.ACK_SECONDS.observe(time.monotonic() - delivery.ended_at)

    def final_loss(self, delivery: Delivery) -> bool:
        """Is a lost attempt of ``delivery`` the last one allowed?"""
        allowed = self.settings.max_lost_attempts
        lost = delivery.lost_before if delivery.lost_before >= allowed else delivery.lost_before + 1
        return lost >= allowed

    def _report(self, delivery: Delivery, request: CeleryRequest, result: outcomes.Outcome,
                error: Exception | None) -> None:
        spec, state = delivery.spec, result.state
        if state in outcomes.TASK_STATES or state == outcomes.TIME_LIMIT:
            self.accept(delivery, request)
        if result.soft_limit_hit and request.timeout and spec.soft_time_limit:
            request.timeout(soft=True, timeout=spec.soft_time_limit)
        where = f"pod {delivery.pod_name}" if delivery.pod_name else f"Job {delivery.job_name}"
        if state == outcomes.SUCCESS:
            self.counters["succeeded"] += 1
            log.info("Task %s[%s] succeeded in %ss: %s", spec.name, spec.task_id, result.runtime, result.result)
            request.success((0, result.result, result.runtime))
        elif state == outcomes.FAILURE and result.not_run:
            # As a pool process that died before the tracer ran: Celery stores the failure.
            self.counters["failed"] += 1
            exc = self.task_exception(result)
            log.error("Task %s[%s] could not run in %s: %r", spec.name, spec.task_id, where, exc)
            request.error(exception_info(exc, result.traceback))
        elif state in (outcomes.FAILURE, outcomes.RETRY, outcomes.REJECTED, outcomes.IGNORED):
            exc = self.task_exception(result)
            if state == outcomes.FAILURE:
                self.counters["failed"] += 1
                log.error("Task %s[%s] raised %r in %s", spec.name, spec.task_id, exc, where)
            else:
                log.info("Task %s[%s] %s in %s", spec.name, spec.task_id, state.lower(), where)
            request.success((1, exception_info(exc, result.traceback), result.runtime))
        elif state == outcomes.TIME_LIMIT:
            self.counters["failed"] += 1
            log.error("Task %s[%s]: hard time limit (%ss) exceeded: %s", spec.name, spec.task_id,
                      spec.time_limit, result.reason)
            # billiard's on_hard_timeout: the job fails with TimeLimitExceeded, then the
            # timeout callback runs; Celery's Request does the rest for its version.
            request.error(exception_info(TimeLimitExceeded(spec.time_limit)))
            if request.timeout:
                request.timeout(soft=False, timeout=spec.time_limit)
        elif state == TERMINATED:
            request.error(exception_info(Terminated(delivery.terminate_signal or signals.SIGTERM)))
        elif state == PENDING_TIMEOUT:
            self.counters["failed"] += 1
            request.error(exception_info(error or PodPendingTimeout(
                f"pod of Job {delivery.job_name} did not start within "
                f"{self.settings.pending_timeout:.0f}s: {result.reason}")))
        elif state == LAUNCH_FAILED:
            self.counters["failed"] += 1
            request.error(exception_info(error or TaskLaunchError(result.reason)))
        elif state == REQUEUE:
            self.counters["requeued"] += 1
            request.error(exception_info(WorkerLostError(f"requeued: {result.reason}")))
        elif state == outcomes.LOST:
            self._report_lost(delivery, request, result, where)

    def _report_lost(self, delivery: Delivery, request: CeleryRequest, result: outcomes.Outcome,
                     where: str) -> None:
        spec = delivery.spec
        self.counters["lost"] += 1
        attempts = self.settings.max_lost_attempts
        if self.final_loss(delivery):
            self.counters["failed"] += 1
            message = f"task lost {attempts} time(s), giving up; last attempt ({where}): {result.reason}"
            log.error("Task %s[%s] %s", spec.name, spec.task_id, message)
            request.error(exception_info(TaskLostError(message)))
        else:
            self.counters["requeued"] += 1
            log.warning("Task %s[%s]: %s lost (%s); requeueing (attempt %d of %d)", spec.name,
                        spec.task_id, where, result.reason, delivery.lost_before + 1, attempts)
            request.error(exception_info(WorkerLostError(f"{where} lost: {result.reason}")))

    def task_exception(self, result: outcomes.Outcome) -> BaseException:
        """The task's exception, rebuilt from the pod's outcome as the result backend would."""
        original = None
        if result.exception:
            try:
                original = self.app.backend.exception_to_python(result.exception)
            except Exception as exc:  # a class we cannot rebuild: keep its text
                original = TaskLaunchError(f"{result.exc_module}.{result.exc_type}: {result.exc_args} ({exc})")
        if result.state == outcomes.RETRY:
            return Retry(message=result.result or None, exc=original, when=result.when)
        if result.state == outcomes.REJECTED:
            return Reject(reason=original, requeue=result.requeue)
        if result.state == outcomes.IGNORED:
            return Ignore()
        return original or RuntimeError("the task failed without an exception")


def exception_info(exc: BaseException, traceback_text: str | None = None) -> ExceptionInfo:
    """An :class:`ExceptionInfo` for ``exc`` (Celery needs one built from a raise)."""
    try:
        raise exc
    except BaseException:
        einfo = ExceptionInfo()
    # As after the trip from a prefork child: the exception itself, not billiard's
    # local wrapper (whose repr would reach events and Flower).
    einfo.exception = exc
    if traceback_text:
        einfo.traceback = traceback_text
    return einfo


def call_logged(fn: Callable, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("k8s-celery callback %s failed", getattr(fn, "__name__", fn))
