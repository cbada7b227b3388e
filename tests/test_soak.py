"""The short chaos soak: zero lost, zero duplicates, zero leftovers, measured."""

from __future__ import annotations

import pytest

from k8s_celery.testing.soak import FAULTS, run_soak

pytestmark = pytest.mark.cluster


def test_short_chaos_soak():
    report = run_soak(tasks=200, duration=90, seed=7, fault_interval=1.5)
    print(report.line(), report.faults)
    assert set(report.faults) == set(FAULTS), f"every kind of fault must be injected: {report.faults}"
    # Every task a worker received completed; a message the Redis transport dropped between
    # its pop and its unacked record (a worker SIGKILLed at that instant) never reached one.
    assert report.lost == 0
    assert report.completed + report.never_received == report.tasks == 200
    assert report.never_received <= 1, "the broker's pop-to-record window is microseconds wide"
    assert report.duplicate_runs == 0
    assert report.leftover_jobs == 0
    assert report.leftover_secrets == 0
