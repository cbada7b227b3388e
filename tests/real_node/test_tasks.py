"""Tasks through the worker on a real node: the pods run the Dockerfile-built image as
uid 1000 on a read-only root filesystem, with the payload and termination message as
the kubelet and runc really provide them."""

from __future__ import annotations

import pytest

from conftest import jobs_in
from k8s_celery import outcome
from k8s_celery.testing import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]


def test_success_runs_in_a_real_container(start_real_shim, taskapp, real_cluster, real_namespace, pod_recorder):
    start_real_shim()
    result = taskapp.add.delay(2, 3)
    assert result.get(timeout=120) == 5
    [state] = wait_until(lambda: pod_recorder.terminated(result.id), message="the pod's end")
    assert (state["reason"], state["exitCode"]) == ("Completed", 0)
    assert state["containerID"].startswith("containerd://")
    assert outcome.decode(state["message"]).state == outcome.SUCCESS  # the real terminationMessagePath
    wait_until(lambda: not jobs_in(real_cluster, real_namespace), timeout=60, message="the Job deleted after the ack")


def test_failure_keeps_exception_type_and_traceback(start_real_shim, taskapp, redis_server, pod_recorder):
    start_real_shim()
    result = taskapp.fail.delay("boom")
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=120)
    assert result.state == "FAILURE"
    assert "raise ValueError(message)" in result.traceback
    [state] = wait_until(lambda: pod_recorder.terminated(result.id), message="the pod's end")
    assert (state["reason"], state["exitCode"]) == ("Error", 1)
    wait_until(lambda: redis_server.client().hlen("unacked") == 0, message="the message to be acked")


def test_retry_runs_a_second_pod(start_real_shim, taskapp, pod_recorder):
    start_real_shim()
    result = taskapp.retry_once.delay("real-retry")
    assert result.get(timeout=120) == "retried"
    assert int(taskapp.store().get("attempts:real-retry")) == 2
    wait_until(lambda: len({state["pod"] for state in pod_recorder.terminated(result.id)}) == 2,
               message="two pods ended", timeout=30)


def test_chord(start_real_shim, taskapp):
    from celery import chord

    start_real_shim(max_jobs=5)
    assert chord([taskapp.add.s(i, i) for i in range(4)])(taskapp.tsum.s()).get(timeout=180) == 12
