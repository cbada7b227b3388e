"""The short chaos soak on the real node: its tasks run in real containers while the
kubelet, containerd, the kernel and the node-lifecycle controller make the faults."""

from __future__ import annotations

import pytest

from k8s_celery.testing.chaos import REAL_NODE_FAULTS
from k8s_celery.testing.soak import run_soak

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]


def test_short_real_node_soak(k8s_real_node_session):
    """Runs last (see conftest): the soak's cluster runs a real node of its own, with a lease
    short enough for it to go NotReady in seconds; one real node runs on a machine at a time."""
    k8s_real_node_session.stop()
    report = run_soak(tasks=30, duration=600, seed=11, node="real", rounds=1)
    print(report.line(), report.faults, report.effects)
    assert report.faults == dict.fromkeys(REAL_NODE_FAULTS, 1), "every fault once"
    effects = report.effects
    assert effects["tasks the workers reported OOM-killed"] >= 1, effects
    assert effects["pods deleted while their node was NotReady"] >= 1, effects
    assert "node never went NotReady" not in effects
    assert effects["container processes SIGKILLed"] >= 1
    assert report.lost == 0
    assert report.worker_exits == 0
    # 30, the OOM task, and one more for each fault that found every task done.
    assert report.completed + report.never_received == report.tasks >= 31
    assert report.never_received <= 1, "the broker's pop-to-record window is microseconds wide"
    assert report.duplicate_runs == 0
    assert report.leftover_jobs == 0
    assert report.leftover_secrets == 0
