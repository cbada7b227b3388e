"""The local control plane and process kubelet behave like Kubernetes."""

from __future__ import annotations

import base64
import os
import subprocess
import threading
import time

import pytest

from k8s_celery.cluster import ApiError, collection_path, object_path
from k8s_celery.testing import wait_for_condition, wait_until
from k8s_celery.testing.cluster import LocalCluster

pytestmark = pytest.mark.cluster


def job(name: str, script: str, **spec) -> dict:
    pod_spec = {"restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script]}]}
    pod_spec.update(spec.pop("pod", {}))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}, **spec}}


def job_end(api, namespace: str, name: str) -> dict:
    """The Job's Complete or Failed condition, once the Job controller has written it."""
    return wait_for_condition(api, object_path("jobs", namespace, name), ("Complete", "Failed"))


def pods_of(api, namespace: str, job_name: str) -> list[dict]:
    pods, _ = api.list(collection_path("pods", namespace), label_selector=f"job-name={job_name}")
    return pods


def running_pod(api, namespace: str, job_name: str) -> dict:
    return wait_until(lambda: next((p for p in pods_of(api, namespace, job_name)
                                    if p["status"].get("phase") == "Running"), None),
                      message=f"a running pod of {job_name}")


def terminated(pod: dict) -> dict:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def test_job_completes_with_termination_message(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    api.create(collection_path("jobs", k8s_namespace),
               job("hello", "echo done > /dev/termination-log"))
    condition = job_end(api, k8s_namespace, "hello")
    assert condition["type"] == "Complete"
    [pod] = pods_of(api, k8s_namespace, "hello")
    assert pod["status"]["phase"] == "Succeeded"
    state = terminated(pod)
    assert state["exitCode"] == 0 and state["reason"] == "Completed"
    assert state["message"].strip() == "done"


def test_security_context_user_groups_and_read_only_root(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    api.create(collection_path("secrets", k8s_namespace), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "private"},
        "data": {"key": base64.b64encode(b"k").decode()}})
    script = ('echo "$(id -u):$(id -g):$(id -G | tr " " ,):$(cat /etc/private/key)" > /dev/termination-log; '
              'touch /etc/k8s-celery-written 2>/dev/null && echo root-writable >> /dev/termination-log; '
              'touch /scratch/ok && echo scratch-writable >> /dev/termination-log')
    api.create(collection_path("jobs", k8s_namespace), job("restricted", script, pod={
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
        "volumes": [{"name": "private", "secret": {"secretName": "private", "defaultMode": 0o440}},
                    {"name": "scratch", "emptyDir": {}}],
        "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script],
                        "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
                        "volumeMounts": [{"name": "private", "mountPath": "/etc/private", "readOnly": True},
                                         {"name": "scratch", "mountPath": "/scratch"}]}]}))
    job_end(api, k8s_namespace, "restricted")
    [pod] = pods_of(api, k8s_namespace, "restricted")
    # The group-readable (0440) Secret is readable through fsGroup; the root filesystem is not writable.
    assert terminated(pod)["message"].split() == ["1000:1000:1000,2000:k", "scratch-writable"]
    assert not os.path.exists("/etc/k8s-celery-written")


def test_run_as_non_root_refuses_a_root_container(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    api.create(collection_path("jobs", k8s_namespace), job(
        "rootful", "true", pod={"securityContext": {"runAsNonRoot": True}}))
    waiting = wait_until(lambda: next((
        c["state"].get("waiting") for p in pods_of(api, k8s_namespace, "rootful")
        for c in p["status"].get("containerStatuses") or []
        if (c["state"].get("waiting") or {}).get("reason") == "CreateContainerConfigError"), None),
        message="CreateContainerConfigError")
    assert waiting["message"] == "container has runAsNonRoot and image will run as root"


def test_secret_env_and_volume(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    api.create(collection_path("secrets", k8s_namespace), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
        "data": {"password": base64.b64encode(b"s3cret").decode()}})
    api.create(collection_path("jobs", k8s_namespace), job(
        "reader", 'echo "$PASSWORD:$(cat /etc/creds/password)" > /dev/termination-log',
        pod={"volumes": [{"name": "creds", "secret": {"secretName": "creds"}}],
             "containers": [{"name": "main", "image": "busybox",
                             "command": ["sh", "-c", 'echo "$PASSWORD:$(cat /etc/creds/password)"'
                                                     ' > /dev/termination-log'],
                             "env": [{"name": "PASSWORD", "valueFrom": {
                                 "secretKeyRef": {"name": "creds", "key": "password"}}}],
                             "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds",
                                               "readOnly": True}]}]}))
    job_end(api, k8s_namespace, "reader")
    [pod] = pods_of(api, k8s_namespace, "reader")
    assert terminated(pod)["message"].strip() == "s3cret:s3cret"
    assert not os.path.exists("/etc/creds/password"), "the mount leaked out of the pod's namespace"


def test_pod_waits_for_a_secret_that_appears_later(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    api.create(collection_path("jobs", k8s_namespace), job(
        "waiter", "cat /payload/data > /dev/termination-log",
        pod={"volumes": [{"name": "payload", "secret": {"secretName": "late"}}],
             "containers": [{"name": "main", "image": "busybox",
                             "command": ["sh", "-c", "cat /payload/data > /dev/termination-log"],
                             "volumeMounts": [{"name": "payload", "mountPath": "/payload"}]}]}))
    pod = wait_until(lambda: next(iter(pods_of(api, k8s_namespace, "waiter")), None))
    created = time.monotonic()
    wait_until(lambda: (api.get(object_path("pods", k8s_namespace, pod["metadata"]["name"]))
                        ["status"].get("containerStatuses") or [{}])[0]
               .get("state", {}).get("waiting", {}).get("reason") == "ContainerCreating",
               message="ContainerCreating")
    time.sleep(2)
    assert api.get(object_path("pods", k8s_namespace, pod["metadata"]["name"]))["status"]["phase"] == "Pending"
    api.create(collection_path("secrets", k8s_namespace), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late"},
        "stringData": {"data": "arrived"}})
    job_end(api, k8s_namespace, "waiter")
    [pod] = pods_of(api, k8s_namespace, "waiter")
    assert terminated(pod)["message"] == "arrived"
    assert time.monotonic() - created >= 2


def test_owned_secret_is_garbage_collected_with_its_job(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    created = api.create(collection_path("jobs", k8s_namespace), job("owner", "sleep 30"))
    api.create(collection_path("secrets", k8s_namespace), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": "owner",
            "uid": created["metadata"]["uid"]}]}, "stringData": {"a": "b"}})
    running_pod(api, k8s_namespace, "owner")
    api.delete(object_path("jobs", k8s_namespace, "owner"), propagation="Background")

    def gone(kind: str, name: str) -> bool:
        try:
            api.get(object_path(kind, k8s_namespace, name))
            return False
        except ApiError as exc:
            return exc.not_found
    wait_until(lambda: gone("secrets", "owned"), message="secret GC")
    wait_until(lambda: not pods_of(api, k8s_namespace, "owner"), message="pod GC")


def test_ttl_after_finished_removes_the_job(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    api.create(collection_path("jobs", k8s_namespace), job("short", "true", ttlSecondsAfterFinished=1))
    wait_until(lambda: not api.list(collection_path("jobs", k8s_namespace))[0], timeout=60,
               message="TTL controller to delete the job")


@pytest.mark.parametrize("fault, reason", [("evict", "Evicted"), ("oom_kill", "OOMKilled"),
                                           ("crash", "Error"), ("eviction_api", None)])
def test_faults_fail_the_pod_and_count_in_the_job(k8s_cluster, k8s_namespace, fault, reason):
    api = k8s_cluster.api
    api.create(collection_path("jobs", k8s_namespace),
               job("victim", "echo should-not-be-seen > /dev/termination-log; sleep 60"))
    pod = running_pod(api, k8s_namespace, "victim")
    name = pod["metadata"]["name"]
    if fault == "eviction_api":
        api.create(object_path("pods", k8s_namespace, name, "eviction"), {
            "apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": name, "namespace": k8s_namespace}})
    else:
        getattr(k8s_cluster.kubelet, fault)(k8s_namespace, name)
    condition = job_end(api, k8s_namespace, "victim")
    assert condition["type"] == "Failed"
    status = api.get(object_path("jobs", k8s_namespace, "victim"))["status"]
    assert status.get("failed") == 1
    if fault == "eviction_api":  # graceful deletion: the pod is gone once terminated
        return
    pod = api.get(object_path("pods", k8s_namespace, name))
    assert pod["status"]["phase"] == "Failed"
    state = terminated(pod)
    if fault == "evict":
        assert pod["status"]["reason"] == "Evicted"
        assert any(c["type"] == "DisruptionTarget" and c["status"] == "True"
                   for c in pod["status"]["conditions"])
    else:
        assert state["reason"] == reason
        assert state["exitCode"] == 137
    if fault == "crash":
        assert "message" not in state


def test_eviction_api_terminates_the_pod_gracefully(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    api.create(collection_path("jobs", k8s_namespace), job(
        "graceful", "trap 'echo got-term > /dev/termination-log; exit 143' TERM; echo trap-set; "
                    "while true; do sleep 0.1; done"))
    pod = running_pod(api, k8s_namespace, "graceful")
    name = pod["metadata"]["name"]
    # "Running" comes as the process starts: evict only once the shell has its trap.
    wait_until(lambda: "trap-set" in k8s_cluster.kubelet.pod_log(k8s_namespace, name), message="trap set")
    seen: list[dict] = []
    stop = threading.Event()

    def watch_pod():
        while not stop.is_set():
            try:
                seen.append(api.get(object_path("pods", k8s_namespace, name)))
            except ApiError:
                return
            time.sleep(0.05)
    watcher = threading.Thread(target=watch_pod)
    watcher.start()
    api.create(object_path("pods", k8s_namespace, name, "eviction"), {
        "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": k8s_namespace}})
    job_end(api, k8s_namespace, "graceful")
    stop.set()
    watcher.join()
    final = [p for p in seen if p["status"].get("phase") == "Failed"]
    assert final, "the pod never reported Failed before it was removed"
    assert terminated(final[-1])["message"].strip() == "got-term"
    assert any(c["type"] == "DisruptionTarget" for c in final[-1]["status"]["conditions"])


def test_watch_from_compacted_resource_version_gets_410(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    _, old_version = api.list(collection_path("configmaps", k8s_namespace))
    for index in range(3):
        api.create(collection_path("configmaps", k8s_namespace), {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm{index}"}})
    k8s_cluster.compact_etcd()
    with pytest.raises(ApiError) as raised:
        for _ in api.watch(collection_path("configmaps", k8s_namespace), old_version, read_timeout=10):
            pass
    assert raised.value.status == 410


def test_rbac_refuses_a_service_account_without_create_jobs(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    api.create(collection_path("serviceaccounts", k8s_namespace), {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}})
    api.create(collection_path("roles", k8s_namespace), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "read-jobs"},
        "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch"]}]})
    api.create(collection_path("rolebindings", k8s_namespace), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-jobs"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": k8s_namespace}]})
    reader = k8s_cluster.api_for_token(k8s_cluster.service_account_token(k8s_namespace, "reader"))
    wait_until(lambda: _allowed(lambda: reader.list(collection_path("jobs", k8s_namespace))),
               message="the role binding to take effect")
    with pytest.raises(ApiError) as raised:
        reader.create(collection_path("jobs", k8s_namespace), job("forbidden", "true"))
    assert raised.value.status == 403


def test_kubectl_works_with_the_kubeconfig(k8s_cluster, k8s_namespace):
    kubectl = k8s_cluster.bin_dir / "kubectl"
    out = subprocess.run([str(kubectl), "--kubeconfig", str(k8s_cluster.kubeconfig), "get", "nodes",
                          "-o", "name"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "node/local-node"


def _allowed(call) -> bool:
    try:
        call()
        return True
    except ApiError as exc:
        if exc.status == 403:
            return False
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_no_process_remains_after_the_cluster_exits():
    with LocalCluster() as cluster:
        workdir = cluster.workdir
        cluster.api.create(collection_path("jobs", "default"), job("lingering", "sleep 300"))
        running_pod(cluster.api, "default", "lingering")
        pids = [p.process.pid for p in cluster.processes.values()] + cluster.kubelet.processes()
        assert len(pids) == 4
    assert not any(_alive(pid) for pid in pids)
    survivors = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if _alive(pid) and _process_group(pid) in pids]
    assert not survivors, f"processes of the cluster's groups still alive: {survivors}"
    assert not workdir.exists()


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_simulated_pods_run_no_process_and_end_on_command():
    with LocalCluster(kubelet_options={"simulate": True}) as cluster:
        cluster.api.create(collection_path("jobs", "default"), job("simulated", "exit 3"))
        pod = running_pod(cluster.api, "default", "simulated")
        assert cluster.kubelet.processes() == []
        log_path = object_path("pods", "default", pod["metadata"]["name"], "log")
        assert b"".join(cluster.api.stream(log_path, {})) == b""  # running, nothing written yet
        cluster.kubelet.finish("default", pod["metadata"]["name"], exit_code=0, message="done",
                               output=b"what the task printed\n")
        condition = job_end(cluster.api, "default", "simulated")
        assert condition["type"] == "Complete"
        [pod] = pods_of(cluster.api, "default", "simulated")
        assert terminated(pod)["message"] == "done"
        assert b"".join(cluster.api.stream(log_path, {})) == b"what the task printed\n"  # served as a process's
