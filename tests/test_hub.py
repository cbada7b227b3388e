"""Outcomes to Celery's callbacks, as billiard calls them for a pool process (pure logic)."""

from __future__ import annotations

import pytest
from billiard.exceptions import WorkerLostError
from celery import Celery
from celery.exceptions import Reject, Retry, Terminated, TimeLimitExceeded

from k8s_celery import outcome as o
from k8s_celery.config import Settings
from k8s_celery.deliveries import CeleryRequest, Delivery
from k8s_celery.hub import LAUNCH_FAILED, TERMINATED, LoopBridge, Reporter, exception_info
from k8s_celery.manifest import TaskSpec


class Calls(CeleryRequest):
    """Records the callbacks in the order they are called."""

    def __init__(self):
        self.log: list[tuple] = []
        super().__init__(lambda *a: self.log.append(("accept", *a)), lambda r: self.log.append(("success", r)),
                         lambda e: self.log.append(("error", e)), lambda **kw: self.log.append(("timeout", kw)))

    def names(self) -> list[str]:
        return [entry[0] for entry in self.log]


@pytest.fixture
def reporter():
    app = Celery("unit", broker="memory://", backend="cache+memory://")
    return Reporter(app, Settings(max_lost_attempts=2), {k: 0 for k in ("succeeded", "failed", "lost", "requeued")})


def delivery(calls: Calls, **spec) -> Delivery:
    return Delivery(TaskSpec(task_id="t", name="proj.task", queue="q", request={}, body=b"", content_type=None,
                             content_encoding=None, delivery="d", **spec), calls, lambda d, s: None)


def test_success_is_accepted_then_reported(reporter):
    calls = Calls()
    reporter.report(delivery(calls), o.Outcome(o.SUCCESS, result="5", runtime=0.1))
    assert calls.names() == ["accept", "success"] and calls.log[1][1] == (0, "5", 0.1)


def test_task_exceptions_go_through_the_success_callback_like_the_tracers(reporter):
    calls = Calls()
    reporter.report(delivery(calls), o.Outcome(o.FAILURE, exc_type="ValueError", exc_module="builtins",
                                               exc_args=["bad"], traceback="Traceback (pod)"))
    failed, einfo, _ = calls.log[-1][1]
    assert failed == 1 and type(einfo.exception) is ValueError and einfo.traceback == "Traceback (pod)"


def test_a_task_that_never_ran_fails_through_the_error_callback(reporter):
    calls = Calls()
    reporter.report(delivery(calls), o.Outcome(o.FAILURE, exc_type="NotRegistered", exc_module="celery.exceptions",
                                               exc_args=["x"], not_run=True))
    assert calls.names() == ["accept", "error"] and type(calls.log[-1][1].exception).__name__ == "NotRegistered"


def test_hard_time_limit_calls_error_then_timeout_as_billiard(reporter):
    calls = Calls()
    reporter.report(delivery(calls, time_limit=2), o.Outcome(o.TIME_LIMIT, reason="DeadlineExceeded"))
    assert calls.names() == ["accept", "error", "timeout"]
    assert isinstance(calls.log[1][1].exception, TimeLimitExceeded)
    assert calls.log[2][1] == {"soft": False, "timeout": 2}


def test_soft_time_limit_is_announced_before_the_outcome(reporter):
    calls = Calls()
    reporter.report(delivery(calls, soft_time_limit=1), o.Outcome(o.SUCCESS, soft_limit_hit=True))
    assert calls.names() == ["accept", "timeout", "success"] and calls.log[1][1] == {"soft": True, "timeout": 1}


def test_lost_attempts_requeue_until_the_last(reporter):
    calls = Calls()
    entry = delivery(calls)
    reporter.report(entry, o.Outcome(o.LOST, reason="evicted"))
    assert isinstance(calls.log[-1][1].exception, WorkerLostError)
    entry.lost_before = 1
    assert reporter.final_loss(entry)
    reporter.report(entry, o.Outcome(o.LOST, reason="evicted"))
    assert type(calls.log[-1][1].exception).__name__ == "TaskLostError"


def test_terminated_and_launch_failures(reporter):
    calls = Calls()
    entry = delivery(calls)
    entry.terminate_signal = 9
    reporter.report(entry, o.Outcome(TERMINATED))
    assert isinstance(calls.log[-1][1].exception, Terminated)
    reporter.report(entry, o.Outcome(LAUNCH_FAILED, reason="no"), error=ValueError("bad manifest"))
    assert str(calls.log[-1][1].exception) == "bad manifest"


def test_every_joined_request_gets_the_outcome(reporter):
    first, second = Calls(), Calls()
    entry = delivery(first)
    entry.requests.append(second)
    reporter.report(entry, o.Outcome(o.SUCCESS))
    assert first.names() == second.names() == ["accept", "success"]


def test_task_exceptions_are_rebuilt(reporter):
    retry = reporter.task_exception(o.Outcome(o.RETRY, result="again", exc_type="KeyError",
                                              exc_module="builtins", exc_args=["k"]))
    assert isinstance(retry, Retry) and isinstance(retry.exc, KeyError)
    reject = reporter.task_exception(o.Outcome(o.REJECTED, requeue=True))
    assert isinstance(reject, Reject) and reject.requeue is True
    unknown = reporter.task_exception(o.Outcome(o.FAILURE, exc_type="Gone", exc_module="no.such.module",
                                                exc_args=["x"]))
    assert type(unknown).__name__ == "Gone"


def test_exception_info_carries_the_pods_traceback():
    einfo = exception_info(WorkerLostError("lost"), "Traceback from the pod")
    assert type(einfo.exception) is WorkerLostError and einfo.traceback == "Traceback from the pod"


def test_the_bridge_runs_functions_on_the_loop_in_order():
    class Hub:
        def __init__(self):
            self.readers = {}

        def add_reader(self, fd, callback):
            self.readers[fd] = callback

        def remove_reader(self, fd):
            self.readers.pop(fd, None)

    bridge, hub, seen = LoopBridge(), Hub(), []
    bridge.call(seen.append, 0)  # no loop yet: at once
    bridge.attach(hub)
    for index in (1, 2, 3):
        bridge.call(seen.append, index)
    assert seen == [0]
    next(iter(hub.readers.values()))()  # the loop finds the pipe readable
    assert seen == [0, 1, 2, 3]
    bridge.close()
    bridge.call(seen.append, 4)
    assert seen[-1] == 4 and not hub.readers
