"""What every measurement shares: the environment, the shim process and the bench's observers.

All times are ``time.time()`` taken in this process, except the ``task-succeeded``
events, which carry the shim's own ``time.time()`` (same machine, same clock).
"""

from __future__ import annotations

import heapq
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import yaml

from k8s_celery import outcome
from k8s_celery.check import REQUIRED_ACCESS
from k8s_celery.cluster import KubeApi, collection_path
from k8s_celery.watch import Watcher
from k8s_celery.manifest import ANNOTATION_TASK_ID, TaskSpec, build_job
from k8s_celery.testing.cluster import LocalCluster
from k8s_celery.testing.redis import RedisServer

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "bench"          # the shim's Jobs
RAW_NAMESPACE = "bench-raw"  # Jobs the bench creates itself (the floor and the ceiling)
QUEUE = "kubernetes"
ACCOUNT = "k8s-celery"
SHIM_USER = f"system:serviceaccount:{NAMESPACE}:{ACCOUNT}"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
SUCCESS_MESSAGE = outcome.encode(outcome.Outcome(outcome.SUCCESS, result="None"))


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def pace(rate: float, count: int) -> Iterator[int]:
    """Yield 0..count-1 at ``rate`` per second on a fixed schedule (open loop)."""
    start = time.monotonic()
    for index in range(count):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield index


# -- observers ---------------------------------------------------------------------------


class JobWatch:
    """When each Job (any namespace) was first seen ADDED and DELETED by a watch of this process."""

    def __init__(self, api: KubeApi):
        self.added: dict[str, float] = {}
        self.deleted: dict[str, float] = {}
        self.by_task: dict[str, str] = {}  # task id -> name of its first Job
        self._watcher = Watcher(api, collection_path("jobs"), self._on_event, resync_period=3600,
                                name="bench job watch")

    def start(self) -> JobWatch:
        self._watcher.start().wait_synced(30)
        return self

    def stop(self) -> None:
        self._watcher.stop(timeout=0.5)

    def _on_event(self, kind: str, job: dict) -> None:
        now = time.time()
        name = job["metadata"]["name"]
        if kind == "ADDED":
            self.added.setdefault(name, now)
            task_id = (job["metadata"].get("annotations") or {}).get(ANNOTATION_TASK_ID)
            if task_id:
                self.by_task.setdefault(task_id, name)
        elif kind == "DELETED":
            self.deleted.setdefault(name, now)

    def names_of(self, task_ids: list[str], timeout: float) -> list[str]:
        """The Job names of these tasks (each delivery's name is only known once created)."""
        wait_for(lambda: all(t in self.by_task for t in task_ids), timeout, f"{len(task_ids)} Jobs created")
        return [self.by_task[t] for t in task_ids]

    def wait_added(self, names: list[str], timeout: float) -> None:
        wait_for(lambda: all(n in self.added for n in names), timeout, f"{len(names)} Jobs created")

    def wait_deleted(self, names: list[str], timeout: float) -> None:
        wait_for(lambda: all(n in self.deleted for n in names), timeout, f"{len(names)} Jobs deleted")


class SimulatedPods:
    """Plays the tasks in the simulating kubelet: ends each pod ``hold`` seconds after it runs.

    ``hold = None`` keeps pods running until :meth:`finish_all`. Records, per Job,
    when its watch first saw the pod running (``since``) and when the bench ended
    the pod's container (``ended``).
    """

    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster
        self.hold: float | None = 0.0
        self.output = b""  # what each pod's container writes before it ends
        self.running: dict[str, tuple[str, str]] = {}
        self.since: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self._due: list[tuple[float, str]] = []
        self._wake = threading.Condition()
        self._stop = False
        self._watcher = Watcher(cluster.api, collection_path("pods"), self._on_event, resync_period=3600,
                                name="bench pod watch")
        self._thread = threading.Thread(target=self._run, name="bench pod ender", daemon=True)

    def start(self) -> SimulatedPods:
        self._thread.start()
        self._watcher.start().wait_synced(30)
        return self

    def stop(self) -> None:
        self._watcher.stop(timeout=0.5)
        with self._wake:
            self._stop = True
            self._wake.notify()

    def held(self, namespace: str) -> int:
        """Pods of ``namespace`` running and not yet ended."""
        return sum(1 for job, (ns, _) in self.running.copy().items()  # copy(): atomic, unlike list()
                   if ns == namespace and job not in self.ended)

    def finish_all(self) -> None:
        for job in [job for job in self.running.copy() if job not in self.ended]:
            self._end(job)

    def _on_event(self, kind: str, pod: dict) -> None:
        now = time.time()
        job = (pod["metadata"].get("labels") or {}).get(JOB_NAME_LABEL)
        phase = (pod.get("status") or {}).get("phase")
        if job is None or kind == "DELETED":
            return
        if phase == "Running" and job not in self.running:
            self.running[job] = (pod["metadata"]["namespace"], pod["metadata"]["name"])
            self.since[job] = now
            if self.hold is not None:
                with self._wake:
                    heapq.heappush(self._due, (now + self.hold, job))
                    self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and (not self._due or self._due[0][0] > time.time()):
                    self._wake.wait(self._due[0][0] - time.time() if self._due else None)
                if self._stop:
                    return
                _, job = heapq.heappop(self._due)
            self._end(job)

    def _end(self, job: str) -> None:
        namespace, pod = self.running[job]
        self.ended.setdefault(job, time.time())
        try:
            self.cluster.kubelet.finish(namespace, pod, exit_code=0, message=SUCCESS_MESSAGE, output=self.output)
        except LookupError:
            pass  # deleted meanwhile


class TaskEvents:
    """``task-received`` and ``task-succeeded`` events of every worker: task id -> the event's
    timestamp (the sender's clock)."""

    def __init__(self, app):
        self.app = app
        self.received: dict[str, float] = {}
        self.succeeded: dict[str, float] = {}
        self._receiver = None
        self._thread = threading.Thread(target=self._run, name="bench events", daemon=True)

    def start(self) -> TaskEvents:
        self._thread.start()
        wait_for(lambda: self._receiver is not None, 30, "the event receiver")
        time.sleep(0.5)  # let it subscribe
        return self

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(connection, handlers={
                "task-received": lambda event: self.received.setdefault(event["uuid"], event["timestamp"]),
                "task-succeeded": lambda event: self.succeeded.setdefault(event["uuid"], event["timestamp"])})
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def wait(self, task_ids: list[str], timeout: float) -> None:
        wait_for(lambda: all(t in self.succeeded for t in task_ids), timeout,
                 f"{len(task_ids)} task-succeeded events")

    def wait_received(self, task_ids: list[str], timeout: float) -> None:
        wait_for(lambda: all(t in self.received for t in task_ids), timeout,
                 f"{len(task_ids)} task-received events")


class AuditLog:
    """The API server's audit log (one JSON record per request stage), read between two marks."""

    def __init__(self, path: Path):
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size

    def records(self, start: int, end: int) -> Iterator[dict]:
        with open(self.path, "rb") as handle:
            handle.seek(start)
            data = handle.read(end - start)
        for line in data.split(b"\n"):
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a line cut by a mark

    def count(self, start: int, end: int, user: str) -> Counter:
        """Requests ``user`` started between the marks: ``{(verb, resource): n}``, the
        resource with its subresource (``pods/log``).

        Each request is counted once, at its RequestReceived stage (a watch's
        ResponseComplete comes only when it ends, maybe after ``end``).
        """
        return Counter((record["verb"], _resource(record.get("objectRef") or {}))
                       for record in self.records(start, end)
                       if record.get("stage") == "RequestReceived"
                       and record.get("user", {}).get("username") == user)


def _resource(ref: dict) -> str:
    return "/".join(filter(None, (ref.get("resource", ""), ref.get("subresource"))))


def timestamp(text: str) -> float:
    """``time.time()`` of an audit timestamp (RFC 3339, microseconds)."""
    return datetime.fromisoformat(text).timestamp()


# -- the shim process --------------------------------------------------------------------


@dataclass
class Usage:
    """What the kernel says about a process at one moment (CPU: all threads, and the main one)."""

    rss_kb: int
    cpu_seconds: float
    main_thread_cpu_seconds: float
    api_connections: int


def process_usage(pid: int, api_port: int) -> Usage:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return Usage(rss, cpu_seconds(Path(f"/proc/{pid}/stat")),
                 cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat")), established_connections(pid, api_port))


def cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds from a ``/proc`` ``stat`` file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def established_connections(pid: int, remote_port: int) -> int:
    """TCP connections of ``pid`` in state ESTABLISHED to ``remote_port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            port = int(parts[2].rsplit(":", 1)[1], 16)
            if parts[3] == "01" and port == remote_port and parts[9] in inodes:
                count += 1
    return count


class Shim:
    """A ``k8s-celery worker`` process for the bench app (``app``: the module the worker and its
    pods import it as; ``settings``: more environment variables)."""

    def __init__(self, env: Environment, max_jobs: int, settings: dict[str, str] | None = None,
                 queue: str = QUEUE, app: str = "bench.benchapp"):
        self.env = env
        self.queue = queue
        self.hostname = f"shim-{uuid.uuid4().hex[:6]}@bench"
        self.log_path = env.workdir / f"{self.hostname}.log"
        self.argv = [sys.executable, "-m", "k8s_celery", "worker", "-A", app, "-Q", queue,
                     "--manifests", str(env.manifests), "--namespace", NAMESPACE,
                     "--kubeconfig", str(env.shim_kubeconfig), "--max-jobs", str(max_jobs),
                     "-l", "INFO", "-n", self.hostname, "--without-mingle", "--without-gossip"]
        self.environ = {**os.environ, **env.app_environ, "C_FORCE_ROOT": "1", **(settings or {})}
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Shim:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> Shim:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.environ, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_for(self._answers_ping, 60, f"worker {self.hostname}", interval=0.3)
        return self

    def _answers_ping(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.hostname} exited with {self.process.returncode}; see {self.log_path}")
        return bool(self.env.app.control.ping(destination=[self.hostname], timeout=0.5))

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def usage(self) -> Usage:
        return process_usage(self.process.pid, self.env.cluster.port)

    def consume(self, on: bool) -> None:
        """Start or stop consuming the queue (Celery remote control)."""
        control = self.env.app.control
        command = control.add_consumer if on else control.cancel_consumer
        if not command(self.queue, destination=[self.hostname], reply=True, timeout=5):
            raise RuntimeError(f"{self.hostname} did not answer {command.__name__}")


# -- the environment ---------------------------------------------------------------------


@dataclass
class Environment:
    """Redis, a local cluster, the shim's identity and manifests, and the bench's observers."""

    workdir: Path
    redis: RedisServer
    cluster: LocalCluster
    app: object
    app_environ: dict[str, str]
    manifests: Path
    shim_kubeconfig: Path
    jobs: JobWatch
    events: TaskEvents
    pods: SimulatedPods | None
    audit: AuditLog | None

    def raw_job(self, spec: TaskSpec, namespace: str = RAW_NAMESPACE) -> dict:
        """The Job the shim would render for ``spec`` (same manifest), in ``namespace``."""
        template = yaml.safe_load((self.manifests / QUEUE / "manifest.yaml").read_text())
        return build_job(template, spec, namespace, app="bench.benchapp",
                         runner_command=["k8s-celery", "run-task"], ttl_seconds=3600)

    def clear_raw_jobs(self, timeout: float = 300) -> None:
        """Delete the raw namespace's Jobs, their pods (at once) and Secrets; wait until all are gone."""
        api = self.cluster.api
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        api.request("DELETE", collection_path("jobs", RAW_NAMESPACE), options)
        api.request("DELETE", collection_path("pods", RAW_NAMESPACE), {**options, "gracePeriodSeconds": 0})
        kinds = ("jobs", "pods", "secrets")
        wait_for(lambda: not any(api.list(collection_path(kind, RAW_NAMESPACE))[0] for kind in kinds),
                 timeout, "the raw Jobs, pods and Secrets to be gone", interval=1.0)


#: The LocalQueue of the bench's Jobs when it runs Kueue (``environment(kueue=True)``).
LOCAL_QUEUE = "bench"


def write_manifest(directory: Path, broker_url: str, kueue: bool = False) -> Path:
    """The bench queue's manifest; with ``kueue``, its Jobs go to Kueue's LocalQueue
    :data:`LOCAL_QUEUE` and ask for 1 CPU each."""
    labels = {"app": "bench", **({"kueue.x-k8s.io/queue-name": LOCAL_QUEUE} if kueue else {})}
    container = {"name": "task", "image": "registry.local/bench:1",
                 "env": [{"name": "CELERY_BROKER_URL", "value": broker_url},
                         {"name": "CELERY_RESULT_BACKEND", "value": broker_url},
                         {"name": "PYTHONPATH", "value": str(ROOT)}]}
    if kueue:
        container["resources"] = {"requests": {"cpu": "1"}}
    manifest = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"labels": labels},
                "spec": {"template": {"spec": {"containers": [container]}}}}
    path = directory / QUEUE / "manifest.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest))
    return directory


def grant_shim_access(cluster: LocalCluster, namespaces: tuple[str, ...]) -> None:
    """The shim's ServiceAccount with exactly the rights ``k8s-celery check`` asks for."""
    api = cluster.api
    rules: dict[tuple[str, str], list[str]] = {}
    for group, resource, verb, _ in REQUIRED_ACCESS:
        rules.setdefault((group, resource), []).append(verb)
    api.create(collection_path("serviceaccounts", NAMESPACE),
               {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": ACCOUNT}})
    for namespace in namespaces:
        api.create(collection_path("roles", namespace), {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": ACCOUNT},
            "rules": [{"apiGroups": [group], "resources": [resource], "verbs": verbs}
                      for (group, resource), verbs in rules.items()]})
        api.create(collection_path("rolebindings", namespace), {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": ACCOUNT},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NAMESPACE}]})


def bench_app(redis: RedisServer):
    """Import the bench app against this Redis; return it and the environment its processes need."""
    url = f"{redis.url}/0"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    environ = {"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url, "PYTHONPATH": path}
    os.environ.update(environ)
    from bench.benchapp import app

    return app, environ


@contextmanager
def prepared(cluster: LocalCluster, workdir: Path, redis: RedisServer, app, app_environ: dict[str, str],
             manifests: Path, simulate: bool = False) -> Iterator[Environment]:
    """A started cluster made ready for the bench: its namespaces, the shim's identity (a
    ServiceAccount with exactly the rights ``k8s-celery check`` asks for, and a kubeconfig
    with its token) and the observers, stopped on exit. ``simulate``: the bench ends the
    pods of the simulating kubelet and reads the API server's audit log."""
    for namespace in (NAMESPACE, RAW_NAMESPACE):
        cluster.create_namespace(namespace)
    grant_shim_access(cluster, (NAMESPACE, RAW_NAMESPACE))
    token = cluster.service_account_token(NAMESPACE, ACCOUNT, expiration=4 * 3600)
    kubeconfig = cluster.kubeconfig_for_token(token, workdir / "shim.kubeconfig", user=ACCOUNT, namespace=NAMESPACE)
    env = Environment(workdir=workdir, redis=redis, cluster=cluster, app=app, app_environ=app_environ,
                      manifests=manifests, shim_kubeconfig=kubeconfig, jobs=JobWatch(cluster.api).start(),
                      events=TaskEvents(app).start(), pods=SimulatedPods(cluster).start() if simulate else None,
                      audit=AuditLog(cluster.audit_log_path) if simulate else None)
    try:
        yield env
    finally:
        for observer in (env.jobs, env.events, env.pods):
            if observer is not None:
                observer.stop()


@contextmanager
def environment(workdir: Path, redis: RedisServer, simulate: bool, kueue: bool = False) -> Iterator[Environment]:
    """A fresh local cluster with the bench's namespaces, identity and observers.

    ``simulate=True``: the kubelet runs no processes (the bench ends the pods) and
    the API server keeps an audit log; otherwise pods really run ``k8s-celery run-task``.
    The API server serves watches from its watch cache, as production ones do.
    ``kueue=True``: the cluster runs Kueue, and the bench queue's Jobs go to its
    LocalQueue :data:`LOCAL_QUEUE` (which the measurement creates).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    app, app_environ = bench_app(redis)
    manifests = write_manifest(workdir / "manifests", app_environ["CELERY_BROKER_URL"], kueue=kueue)
    with LocalCluster(audit_log=simulate, kubelet_options={"simulate": simulate}, watch_cache=True,
                      workdir=workdir / "cluster", kueue=kueue) as cluster:
        with prepared(cluster, workdir, redis, app, app_environ, manifests, simulate) as env:
            yield env
