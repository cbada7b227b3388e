"""A task's output on a real node: the real kubelet serves the container logs (CRI log
files written by containerd), the API server proxies ``pods/log`` to it, the worker relays
them; failed Jobs are kept; ``k8s-celery logs`` reads every attempt."""

from __future__ import annotations

import pytest
import yaml

from conftest import logs_command, only_kept_jobs, relay_done, running_pod_of
from k8s_celery.testing import wait_until

from .conftest import write_real_manifest
from k8s_celery.testing.realnode.faults import evict

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]


def test_output_failures_and_logs_on_a_real_node(start_real_shim, taskapp, real_cluster, real_namespace):
    shim = start_real_shim(env={"K8S_CELERY_POD_LOGS": "all"})
    running = taskapp.chatty.delay("real-running", sleep=4)
    running_pod_of(real_cluster, real_namespace, running.id, timeout=120)
    followed = logs_command(real_cluster, real_namespace, running.id, "--follow")
    assert followed.returncode == 0, followed.stderr
    assert "phase Running" in followed.stdout.splitlines()[0]
    assert "printed real-running" in followed.stdout and "last line of real-running" in followed.stdout
    assert running.get(timeout=60) == "real-running"
    lines = relay_done(shim, running.id, "last line of real-running")
    assert "INFO/MainProcess" in lines[0] and "attempt 1 succeeded; its output:" in lines[0]
    assert any(line.endswith("] logged real-running") for line in lines)

    failed = taskapp.chatty.delay("real-broken", fail=True, binary=True)
    with pytest.raises(ValueError):
        failed.get(timeout=120)
    lines = relay_done(shim, failed.id, "last line of real-broken")
    assert "WARNING/MainProcess" in lines[0] and "failed (ValueError: chatty real-broken failed)" in lines[0]
    assert any(line.endswith("| raw \\xff\\xfe \\x1b[31mred\\x1b[0m end") for line in lines)
    only_kept_jobs(real_cluster, real_namespace)  # the failed task's
    done = logs_command(real_cluster, real_namespace, failed.id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("==> attempt 1: pod ")
    assert "node " + real_cluster.real_node.node_name in done.stdout.splitlines()[0]
    assert "exit code 1 (Error)" in done.stdout.splitlines()[0]
    assert "printed real-broken" in done.stdout
    finished = logs_command(real_cluster, real_namespace, running.id)
    assert finished.returncode == 1 and "no Job of task" in finished.stdout


def test_oom_killed_and_evicted_attempts_are_relayed_with_their_reasons(start_real_shim, taskapp, real_cluster,
                                                                        real_namespace, tmp_path, pod_broker_url,
                                                                        taskapp_image):
    manifests = tmp_path / "limited"
    write_real_manifest(manifests, "kubernetes", pod_broker_url, taskapp_image.name,
                        resources={"requests": {"memory": "64Mi"}, "limits": {"memory": "160Mi"}})
    shim = start_real_shim(manifests=manifests, env={"K8S_CELERY_POD_LOGS": "all"})
    oom = taskapp.lost_once.delay("real-oom", megabytes=512)
    assert oom.get(timeout=180) == 2
    lines = relay_done(shim, oom.id, "attempt 2 of real-oom ends")
    first = [line for line in lines if " attempt 1" in line.split("]", 2)[-1][:80]]
    assert "attempt 1 was lost (" in first[0] and "OOMKilled" in first[0], first[0]
    assert any(line.endswith("] attempt 1 of real-oom starts") for line in first)
    assert any("attempt 2 succeeded; its output:" in line for line in lines)

    evicted = taskapp.lost_once.delay("real-evicted", sleep=60)
    pod = running_pod_of(real_cluster, real_namespace, evicted.id, timeout=120)
    wait_until(lambda: "attempt 1 of real-evicted starts" in logs_command(
        real_cluster, real_namespace, evicted.id).stdout, timeout=60, message="the first attempt to print")
    evict(real_cluster.api, real_namespace, pod["metadata"]["name"], grace_period=1)
    assert evicted.get(timeout=120) == 2
    lines = relay_done(shim, evicted.id, "attempt 2 of real-evicted ends")
    assert any("attempt 1 was lost (" in line and "EvictionByEvictionAPI" in line for line in lines), lines[:3]
    assert any(line.endswith("] attempt 1 of real-evicted starts") for line in lines)
    every = logs_command(real_cluster, real_namespace, evicted.id, "--all-attempts")
    # The Eviction API deleted the first attempt's pod (its Job is kept); the second's Job went
    # with its success.
    assert every.returncode == 0, every.stdout + every.stderr
    [first] = [line for line in every.stdout.splitlines() if line.startswith("==> attempt 1: ")]
    assert "its pod is gone" in first and "Failed" in first, every.stdout


def test_a_pod_that_never_runs_fails_with_what_kubernetes_said(start_real_shim, taskapp, tmp_path, pod_broker_url,
                                                               taskapp_image):
    manifests = tmp_path / "never-running"
    write_real_manifest(manifests, "unschedulable", pod_broker_url, taskapp_image.name,
                        nodeSelector={"k8s-celery.io/no-such-pool": "none"})
    path = write_real_manifest(manifests, "unmountable", pod_broker_url, taskapp_image.name)
    manifest = yaml.safe_load(path.read_text())
    pod = manifest["spec"]["template"]["spec"]
    pod["volumes"].append({"name": "settings", "secret": {"secretName": "never-created"}})
    pod["containers"][0].setdefault("volumeMounts", []).append({"name": "settings", "mountPath": "/etc/settings"})
    path.write_text(yaml.safe_dump(manifest))
    start_real_shim(manifests=manifests, queues="unschedulable,unmountable",
                    env={"K8S_CELERY_PENDING_TIMEOUT": "10"})
    unschedulable = taskapp.add.apply_async((1, 2), queue="unschedulable")
    unmountable = taskapp.add.apply_async((1, 2), queue="unmountable")
    # What the real kube-scheduler and kubelet recorded as Events, in the task's error.
    for result, said in ((unschedulable, "FailedScheduling: 0/1 nodes are available: 1 node(s) didn't match "
                                         "Pod's node affinity/selector"),
                         (unmountable, 'FailedMount: MountVolume.SetUp failed for volume "settings" : '
                                       'secret "never-created" not found')):
        with pytest.raises(Exception) as raised:
            result.get(timeout=120)
        assert type(raised.value).__name__ == "PodPendingTimeout"
        assert "; Kubernetes said: " in str(raised.value) and said in str(raised.value), str(raised.value)
