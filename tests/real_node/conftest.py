"""Fixtures of the real-node tests: the session's real node with the test-app image
imported, Redis reachable from pods, the test app's Job manifest and the worker (on this
machine, talking to the cluster through its kubeconfig)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import shims_started
from k8s_celery.cluster import collection_path
from k8s_celery.watch import Watcher
from k8s_celery.manifest import LABEL_TASK_HASH, task_hash
from k8s_celery.testing.realnode.images import Image, ImageBuilder
from k8s_celery.testing.realnode.pods import CONTAINER_SECURITY, POD_SECURITY



#: Tests that stop the session's real node: they run after every other test, in this order
#: (the soak starts a real node of its own).
STOPS_THE_NODE = ("test_stop_removes_everything_the_node_made",
                  "test_a_node_killed_before_its_clean_up_is_cleaned_up_by_the_next",
                  "test_short_real_node_soak")


def pytest_collection_modifyitems(config, items):
    """The tests that start Kueue on the session's node run after the others (its webhook
    then sees every Job), and those that stop the node last of all."""
    real = [item for item in items if "real_node" in item.nodeid]
    kueue = [item for item in real if "real_kueue" in getattr(item, "fixturenames", ())]
    last = sorted((item for item in real if item.originalname in STOPS_THE_NODE),
                  key=lambda item: STOPS_THE_NODE.index(item.originalname))
    items[:] = [item for item in items if item not in kueue and item not in last] + kueue + last


@pytest.fixture(scope="session")
def taskapp_image() -> Image:
    """The test app's image (k8s-celery's Dockerfile on a Debian-made base), cached by content."""
    return ImageBuilder().taskapp()


@pytest.fixture
def real_cluster(k8s_real_cluster, taskapp_image):
    """The session's real-node cluster, with the test-app image imported into its containerd."""
    node = k8s_real_cluster.real_node
    if taskapp_image.name not in node.containerd.images():
        node.import_image(taskapp_image)
    return k8s_real_cluster


@pytest.fixture
def real_namespace(real_cluster, k8s_real_namespace):
    return k8s_real_namespace


@pytest.fixture
def pod_broker_url(real_cluster, redis_server) -> str:
    """The session's Redis as pods reach it: on the node's address (it listens there too)."""
    address = real_cluster.real_node.node_address
    client = redis_server.client()
    bound = client.config_get("bind")["bind"].split()
    if address not in bound:
        client.config_set("bind", " ".join(bound + [address]))
    return f"redis://{address}:{redis_server.port}/0"


def task_container(image: str, broker_url: str, name: str = "task", **fields) -> dict:
    return {"name": name, "image": image, "imagePullPolicy": "Never",
            "env": [{"name": "CELERY_BROKER_URL", "value": broker_url},
                    {"name": "CELERY_RESULT_BACKEND", "value": broker_url}],
            "securityContext": CONTAINER_SECURITY,
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}], **fields}


def write_real_manifest(directory: Path, queue: str, broker_url: str, image: str, *,
                        resources: dict | None = None, sidecars: list | None = None,
                        annotations: dict | None = None, extra_env: list | None = None, **pod_spec) -> Path:
    """A queue's Job manifest running the test app's image; ``sidecars`` follow the task container,
    ``annotations`` go on the Job, ``extra_env`` on the task container."""
    container = task_container(image, broker_url, **({"resources": resources} if resources else {}))
    container["env"] += extra_env or []
    metadata = {"labels": {"app": "taskapp"}, **({"annotations": annotations} if annotations else {})}
    manifest = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
        "spec": {"template": {"spec": {
            "securityContext": POD_SECURITY, "automountServiceAccountToken": False,
            "containers": [container] + (sidecars or []),
            "volumes": [{"name": "tmp", "emptyDir": {}}], **pod_spec}}},
    }
    path = directory / queue / "manifest.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest))
    return path


@pytest.fixture
def real_manifests(tmp_path, pod_broker_url, taskapp_image) -> Path:
    directory = tmp_path / "manifests"
    write_real_manifest(directory, "kubernetes", pod_broker_url, taskapp_image.name)
    return directory


@pytest.fixture
def start_real_shim(real_cluster, real_namespace, real_manifests, tmp_path, broker_url, taskapp, request):
    """Start `k8s-celery worker` processes against the real node; stopped after the test."""
    with shims_started(real_cluster, real_namespace, real_manifests, tmp_path, broker_url, taskapp,
                       request) as start:
        yield start
        print(f"---- kubelet log ----\n{real_cluster.real_node.processes['kubelet'].log_tail(60)}")


class PodRecorder:
    """Every pod event of a namespace, as seen by a watch: statuses over time and deletions."""

    def __init__(self, cluster, namespace: str):
        self.events: list[tuple[float, str, dict]] = []
        self._lock = threading.Lock()
        self._watcher = Watcher(cluster.api, collection_path("pods", namespace), self._on_event,
                                read_timeout=30, name=f"pods of {namespace}")

    def __enter__(self) -> PodRecorder:
        self._watcher.start()
        self._watcher.wait_synced(30)
        return self

    def __exit__(self, *exc_info) -> None:
        self._watcher.stop()

    def _on_event(self, event_type: str, pod: dict) -> None:
        with self._lock:
            self.events.append((time.monotonic(), event_type, pod))

    def of_task(self, task_id: str) -> list[tuple[float, str, dict]]:
        """The events of the pods of a task (of any of its Jobs), in order."""
        with self._lock:
            return [e for e in self.events if e[2]["metadata"].get("labels", {}).get(LABEL_TASK_HASH)
                    == task_hash(task_id)]

    def terminated(self, task_id: str) -> list[dict]:
        """Every distinct terminated container state the task's pods reported."""
        seen, states = set(), []
        for _, _, pod in self.of_task(task_id):
            for status in pod.get("status", {}).get("containerStatuses") or []:
                state = status.get("state", {}).get("terminated")
                key = (pod["metadata"]["name"], status["name"])
                if state and key not in seen:
                    seen.add(key)
                    states.append({"pod": key[0], "container": key[1], **state})
        return states

    def first(self, task_id: str, predicate) -> tuple[float, dict] | None:
        """When the first event of the task's pods matching ``predicate(type, pod)`` came."""
        return next(((at, pod) for at, kind, pod in self.of_task(task_id) if predicate(kind, pod)), None)

    def dump(self, task_id: str) -> str:
        return json.dumps([(round(at, 2), kind, pod.get("status")) for at, kind, pod in self.of_task(task_id)],
                          indent=1, default=str)[-12000:]


@pytest.fixture
def pod_recorder(real_cluster, real_namespace):
    with PodRecorder(real_cluster, real_namespace) as recorder:
        yield recorder
