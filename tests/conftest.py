"""Shared fixtures: the real worker process (the shim) against Redis and the local cluster."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k8s_celery.testing import wait_until

TESTS = Path(__file__).parent
APPS = TESTS / "apps"
IMAGE = "registry.local/taskapp:dev"
#: The labels of a namespace that enforces Pod Security's "restricted" profile.
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}


@pytest.fixture(scope="session")
def broker_url(redis_server):
    url = f"{redis_server.url}/0"
    os.environ["CELERY_BROKER_URL"] = url
    os.environ["CELERY_RESULT_BACKEND"] = url
    return url


@pytest.fixture
def taskapp(broker_url, redis_server):
    """The test app, its broker flushed for this test."""
    redis_server.client().flushall()
    if str(APPS) not in sys.path:
        sys.path.insert(0, str(APPS))
    module = importlib.import_module("taskapp")
    yield module
    module.app.control.purge()


def write_manifest(directory: Path, queue: str, broker_url: str, image: str = IMAGE,
                   extra_env: list | None = None, sidecars: list | None = None,
                   job_labels: dict | None = None, job_annotations: dict | None = None, **pod_spec) -> Path:
    """A queue's Job manifest running the test app; ``sidecars`` are more containers
    after the task's (later in the list, whatever their names)."""
    manifest = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"labels": {"app": "taskapp", **(job_labels or {})},
                     **({"annotations": job_annotations} if job_annotations else {})},
        "spec": {"template": {"spec": {
            "containers": [{
                "name": "task", "image": image,
                "env": [{"name": "CELERY_BROKER_URL", "value": broker_url},
                        {"name": "CELERY_RESULT_BACKEND", "value": broker_url},
                        {"name": "PYTHONPATH", "value": str(APPS)}] + (extra_env or []),
            }] + (sidecars or []), **pod_spec}}},
    }
    path = directory / queue / "manifest.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest))
    return path


def deployment_manifest(directory: Path, queue: str, app_label: str, env: dict[str, str], **container) -> Path:
    """A queue's Job manifest for a test deployment (Django, RabbitMQ, Nautobot): its task
    container gets the deployment's environment, and ``container``'s other fields."""
    manifest = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"labels": {"app": app_label}},
                "spec": {"template": {"spec": {"containers": [
                    {"name": "task", "image": IMAGE, "env": [{"name": k, "value": v} for k, v in env.items()],
                     **container}]}}}}
    path = directory / queue / "manifest.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest))
    return path


class Shim:
    """A `k8s-celery worker` process."""

    def __init__(self, cluster, namespace: str, manifests: Path, log_dir: Path, broker_url: str,
                 queues: str = "kubernetes", max_jobs: int = 5, env: dict | None = None,
                 args: tuple = (), plain_celery: bool = False, app_name: str = "taskapp",
                 kubeconfig: Path | None = None):
        self.hostname = f"shim-{secrets.token_hex(3)}@local"
        self.log_path = log_dir / f"{self.hostname}.log"
        self.argv = [sys.executable, "-m", "k8s_celery", "worker", "-A", app_name, "-Q", queues,
                     "--manifests", str(manifests), "--namespace", namespace,
                     "--kubeconfig", str(kubeconfig or cluster.kubeconfig), "--max-jobs", str(max_jobs),
                     "-l", "INFO", "-n", self.hostname, "--without-mingle", "--without-gossip",
                     *args]
        if plain_celery:  # the stock `celery worker` with the pool selected by -P custom
            self.argv = [sys.executable, "-m", "celery", "-A", app_name, "worker", "-P", "custom",
                         "-Q", queues, "-c", str(max_jobs), "--prefetch-multiplier", "1", "-E",
                         "-l", "INFO", "-n", self.hostname, "--without-mingle", "--without-gossip", *args]
            env = {"CELERY_CUSTOM_WORKER_POOL": "k8s_celery.pool:KubernetesPool",
                   "K8S_CELERY_MANIFESTS_DIR": str(manifests), "K8S_CELERY_NAMESPACE": namespace,
                   "KUBECONFIG": str(cluster.kubeconfig), **(env or {})}
        self.env = {**os.environ, "PYTHONPATH": str(APPS), "CELERY_BROKER_URL": broker_url,
                    "CELERY_RESULT_BACKEND": broker_url, "K8S_CELERY_PENDING_TIMEOUT": "20",
                    "C_FORCE_ROOT": "1", **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, app=None, wait: bool = True) -> "Shim":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        if wait:
            wait_until(lambda: self._ready(app), timeout=60, interval=0.3,
                       message=f"worker {self.hostname} to answer ping")
        return self

    def _ready(self, app) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
        if app is None:
            return "ready." in self.log()
        return bool(app.control.ping(destination=[self.hostname], timeout=0.5))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = 30) -> None:
        if self.process and self.process.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def manifests(tmp_path, broker_url):
    directory = tmp_path / "manifests"
    write_manifest(directory, "kubernetes", broker_url)
    return directory


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate ``process``; kill it if it is still there after ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_all(shims: list, processes: list[tuple[str, subprocess.Popen, Path]], failed: bool) -> None:
    """Stop a deployment's shims and other processes (``(name, process, log path)``); print
    their logs if the test failed."""
    for shim in shims:
        shim.stop()
    for _, process, _ in processes:
        stop_process(process)
    if failed:
        for shim in shims:
            print(f"---- {shim.hostname} log ----\n{shim.log()[-20000:]}")
        for name, _, path in processes:
            print(f"---- {name} log ----\n{path.read_text(errors='replace')[-8000:]}")


def call_failed(request) -> bool:
    """Did the call phase of the requesting test fail (set by ``pytest_runtest_makereport``)?"""
    report = getattr(request.node, "rep_call", None)
    return report is not None and report.failed


@contextlib.contextmanager
def shims_started(cluster, namespace: str, manifests: Path, tmp_path, broker_url, taskapp, request):
    """A ``start(wait=True, **options)`` that starts `k8s-celery worker` processes; all
    are stopped on exit, and their logs printed if the test failed."""
    shims: list[Shim] = []

    def start(wait: bool = True, **options) -> Shim:
        options.setdefault("manifests", manifests)
        shim = Shim(cluster, namespace, log_dir=tmp_path, broker_url=broker_url, **options)
        shims.append(shim)
        return shim.start(taskapp.app, wait=wait)

    yield start
    for shim in shims:
        shim.stop()
    if call_failed(request):
        for shim in shims:
            print(f"---- {shim.hostname} log ----\n{shim.log()[-20000:]}")


@pytest.fixture
def start_shim(k8s_cluster, k8s_namespace, manifests, tmp_path, broker_url, taskapp, request):
    """Start `k8s-celery worker` processes; all are stopped after the test."""
    with shims_started(k8s_cluster, k8s_namespace, manifests, tmp_path, broker_url, taskapp, request) as start:
        yield start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


#: The pod's app refuses pickle while the worker's takes it, as when the worker's image is newer
#: than the pods' (``tests/apps/taskapp.py``).
POD_REFUSES_PICKLE = [{"name": "TASKAPP_ACCEPT", "value": "json"}]


def jobs_in(cluster, namespace: str) -> list[dict]:
    from k8s_celery.cluster import collection_path

    jobs, _ = cluster.api.list(collection_path("jobs", namespace),
                               label_selector="app.kubernetes.io/managed-by=k8s-celery")
    return jobs


def label_namespace(cluster, namespace: str, labels: dict) -> None:
    """Set (or, with ``None`` values, remove) labels of a namespace: Pod Security's, say."""
    from k8s_celery.cluster import object_path

    cluster.api.patch(object_path("namespaces", None, namespace), {"metadata": {"labels": labels}},
                      strategy="merge-patch")


def without_security_contexts(pod_spec: dict) -> dict:
    """``pod_spec`` without its pod's and its first container's securityContext (in place)."""
    pod_spec.pop("securityContext", None)
    pod_spec["containers"][0].pop("securityContext", None)
    return pod_spec


def payload_secret_of(cluster, namespace: str, task_id: str, timeout: float = 30) -> str:
    """The name of a task's payload Secret, once the worker has created it."""
    from k8s_celery.cluster import collection_path
    from k8s_celery.manifest import ANNOTATION_TASK_ID, MANAGED_SELECTOR
    from k8s_celery.testing import wait_until

    def created() -> str | None:
        secrets, _ = cluster.api.list(collection_path("secrets", namespace), label_selector=MANAGED_SELECTOR)
        return next((s["metadata"]["name"] for s in secrets
                     if s["metadata"]["annotations"].get(ANNOTATION_TASK_ID) == task_id), None)
    return wait_until(created, timeout=timeout, message=f"the payload Secret of task {task_id}")


def live_jobs(cluster, namespace: str) -> list[dict]:
    """The worker's Jobs but those kept for a post-mortem (a failed or lost attempt's)."""
    from k8s_celery.postmortem import kept

    return [job for job in jobs_in(cluster, namespace) if not kept(job)]


def only_kept_jobs(cluster, namespace: str, count: int = 1, timeout: float = 60) -> list[dict]:
    """Wait until the worker's Jobs are ``count`` Jobs, all kept for a post-mortem; return them.

    A failed attempt's Job is marked kept after Celery's ack, while another task's
    clean-up may delete its own Job first: wait for the mark, not only for the count.
    """
    from k8s_celery.postmortem import kept

    def settled():
        jobs = jobs_in(cluster, namespace)
        return jobs if len(jobs) == count and all(kept(job) for job in jobs) else None

    return wait_until(settled, timeout=timeout, message=f"{count} kept Job(s) left, no other")


def running_pod_of(cluster, namespace: str, task_id: str, timeout: float = 60) -> dict:
    """Wait for a Running pod of the task; return it."""
    from k8s_celery.cluster import collection_path
    from k8s_celery.manifest import task_selector

    def find():
        pods, _ = cluster.api.list(collection_path("pods", namespace), label_selector=task_selector(task_id))
        return next((p for p in pods if p["status"].get("phase") == "Running"), None)
    return wait_until(find, timeout=timeout, message=f"a running pod for {task_id}")


class JobRecorder:
    """Samples the namespace's Jobs in the background: which Job names each task id had."""

    def __init__(self, cluster, namespace: str):
        import threading

        self.cluster, self.namespace = cluster, namespace
        self.jobs: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "JobRecorder":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import time

        from k8s_celery.manifest import ANNOTATION_TASK_ID

        while not self._stop.is_set():
            try:
                for job in jobs_in(self.cluster, self.namespace):
                    task_id = job["metadata"]["annotations"][ANNOTATION_TASK_ID]
                    self.jobs.setdefault(task_id, set()).add(job["metadata"]["name"])
            except Exception:
                pass  # the API server may be restarting
            time.sleep(0.1)


def run_check(cluster, namespace: str, account: str, manifests: Path, work_dir: Path) -> subprocess.CompletedProcess:
    """`k8s-celery check` of the test app's `kubernetes` queue, as ServiceAccount ``account``."""
    kubeconfig = cluster.kubeconfig_for_token(cluster.service_account_token(namespace, account),
                                              work_dir / f"{account}.kubeconfig", namespace=namespace)
    env = {**os.environ, "PYTHONPATH": str(APPS), "CELERY_BROKER_URL": "memory://"}
    return subprocess.run([sys.executable, "-m", "k8s_celery", "check", "-A", "taskapp", "-Q", "kubernetes",
                           "--manifests", str(manifests), "--namespace", namespace,
                           "--kubeconfig", str(kubeconfig)], capture_output=True, text=True, env=env, timeout=60)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The samples of a worker's /metrics: (name, sorted labels) -> value."""
    import urllib3
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib3.PoolManager().request("GET", f"http://127.0.0.1:{port}/metrics", timeout=10).data.decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape_settled(port: int, acks: int, timeout: float = 30) -> dict[tuple[str, tuple], float]:
    """The worker's samples once it counted ``acks`` acks and holds no Job in flight.

    The results come from the pods; the worker's acks (and counts) follow within moments,
    and each slot is freed once its Job is deleted, after the ack.
    """
    def settled(samples):
        done = samples.get(("k8s_celery_ack_seconds_count", ())) == acks
        return samples if done and samples.get(("k8s_celery_jobs_in_flight", ())) == 0 else None

    return wait_until(lambda: settled(scrape(port)), timeout=timeout,
                      message=f"{acks} acks counted, no Job in flight")


class EventRecorder:
    """Records the task events the workers send (``task-*``), per task id, in order."""

    def __init__(self, app):
        import threading

        self.app = app
        self.events: dict[str, list[dict]] = {}
        self._receiver = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="event recorder")
        self._ready = threading.Event()

    def __enter__(self) -> "EventRecorder":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(connection, handlers={"*": self._on_event})
            self._ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_event(self, event: dict) -> None:
        if event.get("type", "").startswith("task-") and event.get("uuid"):
            self.events.setdefault(event["uuid"], []).append(event)

    def types(self, task_id: str) -> list[str]:
        """The event types of one task, ``task-sent`` (the producer's) left out."""
        return [e["type"] for e in self.events.get(task_id, []) if e["type"] != "task-sent"]


def dump_json(obj) -> str:
    return json.dumps(obj, indent=1, default=str)


# -- RabbitMQ as broker (tests marked `rabbitmq`) --------------------------------------------

@pytest.fixture
def rabbit_setup(rabbitmq_server, redis_server, k8s_cluster, k8s_namespace, tmp_path, request):
    """Make :class:`rabbit_setup.RabbitSetup` objects (a fresh vhost each, results in Redis):
    ``rabbit_setup(app_env={...}, server=other_rabbitmq)``; all are closed after the test."""
    from rabbit_setup import RabbitSetup

    made = []

    def make(app_env: dict | None = None, server=None) -> RabbitSetup:
        made.append(RabbitSetup(server or rabbitmq_server, redis_server, k8s_cluster, k8s_namespace,
                                tmp_path, app_env=app_env))
        return made[-1]

    yield make
    failed = call_failed(request)
    for setup in made:
        setup.close(failed=failed)


@pytest.fixture
def rabbit(rabbit_setup):
    """RabbitMQ (a fresh vhost of the session's node) as broker, Redis as result backend."""
    return rabbit_setup()


# -- A Django project on PostgreSQL (tests marked `django`) ----------------------------------

@pytest.fixture
def django_project(postgres_server, redis_server, k8s_cluster, k8s_namespace, tmp_path, request):
    """tests/django_project deployed for one test (see tests/django_setup.py): its own
    database, migrated; Redis as broker; django-celery-results as result backend."""
    from django_setup import DjangoSetup

    setup = DjangoSetup(postgres_server, redis_server, k8s_cluster, k8s_namespace, tmp_path)
    setup.migrate()
    yield setup
    setup.close(failed=call_failed(request))


# -- a task's output ---------------------------------------------------------------


def relayed(shim, task_id: str) -> list[str]:
    """The worker's log lines that relay the task's pod output."""
    return [line for line in shim.log().splitlines() if re.search(rf"\] taskapp\.\w+\[{task_id}\] pod ", line)]


def relay_done(shim, task_id: str, last: str) -> list[str]:
    """The relayed lines of the task, once one of them holds ``last``."""
    return wait_until(lambda: (lambda lines: lines if any(last in line for line in lines) else None)(
        relayed(shim, task_id)), timeout=60, message=f"the relay of {task_id} to reach {last!r}")


def logs_command(cluster, namespace: str, *args: str) -> subprocess.CompletedProcess:
    """`k8s-celery logs *args` against the cluster, as a user runs it (it prints the pods'
    bytes as they are: what is not UTF-8 reads as escapes here)."""
    return subprocess.run([sys.executable, "-m", "k8s_celery", "logs", *args, "--namespace", namespace,
                           "--kubeconfig", str(cluster.kubeconfig)], capture_output=True, text=True,
                          errors="backslashreplace", timeout=120, env={**os.environ, "PYTHONPATH": str(APPS)})
