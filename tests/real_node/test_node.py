"""The real node itself: what its pods get from the machine, and that stopping it leaves
nothing behind (containers, sandboxes, mounts, cgroups, devices, rules, processes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from k8s_celery.cluster import collection_path, object_path
from k8s_celery.testing import wait_until
from k8s_celery.testing.cluster import LocalCluster
from k8s_celery.testing.realnode import network
from k8s_celery.testing.realnode.hoststate import HostState, processes_mentioning

from .conftest import CONTAINER_SECURITY, POD_SECURITY

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]

PROBE = """
import json, os, socket
def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        return "ok"
    except OSError as exc:
        return type(exc).__name__
print(json.dumps({"uid": os.getuid(), "pid": os.getpid(),
                  "service_host": os.environ["KUBERNETES_SERVICE_HOST"],
                  "service": reach(os.environ["KUBERNETES_SERVICE_HOST"], 443),
                  "secret": open("/etc/probe/key").read()}), flush=True)
open("/dev/termination-log", "w").write("probed")
import time; time.sleep(float(os.environ.get("HOLD", "0")))
"""


def probe_pod(name: str, image: str, hold: float = 0, ports: list | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "securityContext": POD_SECURITY,
                     "containers": [{"name": "probe", "image": image, "imagePullPolicy": "Never",
                                     "command": ["python", "-c", PROBE], "securityContext": CONTAINER_SECURITY,
                                     "env": [{"name": "HOLD", "value": str(hold)}], "ports": ports or [],
                                     "volumeMounts": [{"name": "secret", "mountPath": "/etc/probe"},
                                                      {"name": "scratch", "mountPath": "/tmp"}]}],
                     "volumes": [{"name": "secret", "secret": {"secretName": "probe"}},
                                 {"name": "scratch", "emptyDir": {}}]}}


def start_probe(cluster, namespace: str, pod: dict) -> None:
    cluster.api.create(collection_path("secrets", namespace), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "probe"}, "stringData": {"key": "s3cret"}})
    cluster.api.create(collection_path("pods", namespace), pod)


def pod_phase(cluster, namespace: str, name: str) -> str:
    return cluster.api.get(object_path("pods", namespace, name))["status"].get("phase", "")


def test_pods_run_isolated_and_reach_the_api_through_the_kubernetes_service(real_cluster, real_namespace,
                                                                            taskapp_image):
    start_probe(real_cluster, real_namespace, probe_pod("probe", taskapp_image.name))
    wait_until(lambda: pod_phase(real_cluster, real_namespace, "probe") == "Succeeded", timeout=60,
               message="the probe pod to succeed")
    pod = real_cluster.api.get(object_path("pods", real_namespace, "probe"))
    seen = json.loads(real_cluster.real_node.pod_log(real_namespace, "probe").split(" F ", 1)[1])
    assert seen == {"uid": 1000, "pid": 1, "service_host": "10.0.0.1", "service": "ok", "secret": "s3cret"}
    assert pod["status"]["podIP"].startswith("10.88.")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "probed"
    kubectl = subprocess.run([str(real_cluster.bin_dir / "kubectl"), "--kubeconfig", str(real_cluster.kubeconfig),
                              "-n", real_namespace, "logs", "probe"], capture_output=True, text=True, timeout=60)
    assert json.loads(kubectl.stdout)["secret"] == "s3cret", kubectl.stderr  # API server -> kubelet


def test_forwarding_off_the_pod_bridge_is_dropped(real_cluster):
    node = real_cluster.real_node
    rules = network.run("iptables", "-w", "-t", "mangle", "-S").stdout.splitlines()
    assert rules.index(f"-A FORWARD -j {network.GUARD_CHAIN}") == min(
        i for i, rule in enumerate(rules) if rule.startswith("-A FORWARD"))
    assert f"-A {network.GUARD_CHAIN} -i {node.network.bridge} -j DROP" in rules


def test_stop_removes_everything_the_node_made(k8s_real_node_session, real_cluster, taskapp_image):
    """Runs last (see conftest): the session's node, after every other test, with pods still on it."""
    namespace = real_cluster.create_namespace("leftovers")
    # A running pod (sandbox, netns, veth, volumes, cgroups) with a host port (portmap
    # rules), and a finished one (stopped containers the kubelet keeps).
    start_probe(real_cluster, namespace, probe_pod("running", taskapp_image.name, hold=600,
                                                   ports=[{"containerPort": 8000, "hostPort": 18000}]))
    real_cluster.api.create(collection_path("pods", namespace), probe_pod("done", taskapp_image.name))
    wait_until(lambda: pod_phase(real_cluster, namespace, "running") == "Running"
               and pod_phase(real_cluster, namespace, "done") == "Succeeded", timeout=60, message="the pods")
    node = real_cluster.real_node
    during = node.host_before.leftovers(HostState.capture())
    assert {"links", "addresses", "routes", "mounts", "cgroups", "iptables"} <= set(during), \
        "the snapshot must see what the node made"
    assert processes_mentioning(str(real_cluster.workdir), node.cgroup.name)

    assert k8s_real_node_session.stop() == {}
    assert processes_mentioning(str(real_cluster.workdir), node.cgroup.name) == {}
    assert not real_cluster.workdir.exists()


KILLED_NODE = """
import sys
from k8s_celery.testing import wait_until
from k8s_celery.testing.cluster import LocalCluster
from k8s_celery.testing.cluster import LocalCluster
from k8s_celery.testing.realnode.images import Image

workdir, name, archive = sys.argv[1:]
cluster = LocalCluster(node="real", workdir=workdir).start()
cluster.real_node.import_image(Image(name, archive))
cluster.api.create("/api/v1/namespaces/default/pods", {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "left"},
    "spec": {"containers": [{"name": "c", "image": name, "imagePullPolicy": "Never", "command": ["sleep", "600"]}]}})
wait_until(lambda: cluster.api.get("/api/v1/namespaces/default/pods/left")["status"].get("phase") == "Running",
           timeout=60)
print("running", flush=True)
sys.stdin.read()
"""


def test_a_node_killed_before_its_clean_up_is_cleaned_up_by_the_next(k8s_real_node_session, taskapp_image):
    """Runs last (see conftest): SIGKILL gives a node no chance to clean up; the next one does."""
    k8s_real_node_session.stop()
    before = HostState.capture()
    workdir = Path(tempfile.mkdtemp(prefix="k8s-celery-killed-"))  # short: containerd's socket lives there
    process = subprocess.Popen([sys.executable, "-c", KILLED_NODE, str(workdir), taskapp_image.name,
                                str(taskapp_image.archive)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        assert process.stdout.readline().strip() == "running"
    finally:
        process.kill()
        process.wait()
    left = before.leftovers(HostState.capture())
    assert {"links", "mounts", "cgroups", "iptables", "sysctls"} <= set(left), left
    assert processes_mentioning(f"{workdir}/")

    LocalCluster(node="real").start().stop()
    assert before.leftovers(HostState.capture()) == {}
    assert processes_mentioning(f"{workdir}/", "k8s-celery-node") == {}
    shutil.rmtree(workdir)  # what is left there is files only: nothing mounted, nothing running
