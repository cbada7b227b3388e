"""Restart policy and crash-loop back-off of the process kubelet."""

from __future__ import annotations

import pytest

from k8s_celery.testing.kubelet.restarts import crash_backoff, should_restart


def test_crash_backoff_doubles_from_10_seconds_to_5_minutes_after_an_immediate_restart():
    assert [crash_backoff(n) for n in range(8)] == [0.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]


@pytest.mark.parametrize("policy, exit_code, restarts", [
    ("Always", 0, True), ("Always", 1, True),
    ("OnFailure", 0, False), ("OnFailure", 137, True),
    ("Never", 0, False), ("Never", 1, False),
])
def test_should_restart(policy, exit_code, restarts):
    assert should_restart(policy, exit_code) is restarts
