"""The short chaos soak: zero lost, zero duplicates, zero leftovers, measured."""

from __future__ import annotations

import itertools
import os
import time

import pytest

from k8s_celery.testing.soak import FAULTS, run_soak, wait_to_settle

pytestmark = pytest.mark.cluster


def test_short_chaos_soak(broker_url):
    # broker_url exports the session's Redis as CELERY_BROKER_URL and CELERY_RESULT_BACKEND,
    # as it does for every test run before this one in a full session.
    report = run_soak(tasks=200, duration=90, seed=7, fault_interval=1.5)
    print(report.line(), report.faults)
    # The workers' sweepers and redelivery checks read the store their pods write to (the
    # inherited CELERY_RESULT_BACKEND once kept every CI soak from sweeping: Jobs that only
    # the sweeper removes were left over), and the soak hands the environment back.
    assert report.result_backends == [report.broker] != [broker_url]
    assert os.environ["CELERY_RESULT_BACKEND"] == os.environ["CELERY_BROKER_URL"] == broker_url
    assert set(report.faults) == set(FAULTS), f"every kind of fault must be injected: {report.faults}"
    # Every task a worker received completed; a message the Redis transport dropped between
    # its pop and its unacked record (a worker SIGKILLed at that instant) never reached one.
    assert report.lost == 0
    assert report.completed + report.never_received == report.tasks == 200
    assert report.never_received <= 1, "the broker's pop-to-record window is microseconds wide"
    assert report.duplicate_runs == 0
    # A worker that exits on its own is started again by the soak, which once hid Celery 5.7's
    # exit on a Redis restart (tests/test_brokers_redis.py).
    assert report.worker_exits == 0
    assert report.leftover_jobs == 0
    assert report.leftover_secrets == 0


def settles_after(seconds: float):
    done_at = time.monotonic() + seconds
    return lambda: time.monotonic() >= done_at


def test_settling_waits_past_its_patience_while_work_progresses():
    # A fixed window of 0.3 s would have given up: the work is still moving.
    counter = itertools.count()
    assert wait_to_settle(settles_after(1.0), lambda: next(counter), patience=0.3, limit_factor=10,
                          interval=0.05)


def test_settling_gives_up_after_its_patience_without_progress():
    started = time.monotonic()
    assert not wait_to_settle(lambda: False, lambda: "stuck", patience=0.3, interval=0.05)
    assert 0.3 <= time.monotonic() - started < 1.0


def test_settling_gives_up_at_its_limit_even_while_something_changes():
    counter = itertools.count()
    started = time.monotonic()
    assert not wait_to_settle(lambda: False, lambda: next(counter), patience=0.2, limit_factor=3,
                              interval=0.05)
    assert 0.6 <= time.monotonic() - started < 1.5
