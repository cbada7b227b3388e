"""Chaos soak: tasks keep completing exactly once while everything around them fails.

``python -m k8s_celery.testing.soak --tasks 200 --duration 120`` starts Redis (with
persistence), the local cluster and two workers, publishes the tasks (each sleeps a
random time, then counts its completed runs in Redis) and, until every task is done
or the duration is over, injects faults at random: evict and crash task pods,
SIGKILL and restart a worker, restart the API server, compact etcd, restart Redis.
It then waits for the workers to settle and prints the measured counts::

    tasks=200 completed=200 lost=0 never_received=0 duplicate_runs=0 reruns_after_kill=0 leftover_jobs=0 ...

Its work directory keeps each worker's log, ``node.log`` (every fault injected, and
what the kubelet logged) and ``cluster/`` (the control plane's logs); a Job or Secret
left over is printed with its labels, conditions and pods.

``lost`` counts tasks a worker received and that never completed: the shim's failures.
``duplicate_runs`` counts extra runs of a task to its end that the shim should have
prevented. ``reruns_after_kill`` counts the extra runs that acks-late allows: the
soak killed (crash, evict) the pod of an earlier run after the task's work was done
but before its outcome was stored, so the task ran again, as it would under any
Celery worker with ``acks_late`` whose process dies at that instant.
``never_received`` counts tasks no worker ever logged: kombu's Redis transport pops a
message (BRPOP) before it records it as unacknowledged, so a worker killed, or Redis
restarted, between the two loses that message before any worker sees it — as with
every Celery worker on Redis (celery/celery#7950, kombu#1836).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from celery import Celery

from ..cluster import collection_path
from ..manifest import MANAGED_SELECTOR, kept
from .chaos import PROCESS_FAULTS, REAL_NODE_FAULTS, Chaos
from .cluster import NODES, LocalCluster
from .redis import RedisServer

logger = logging.getLogger("k8s_celery.testing.soak")  # also when run as __main__

NAMESPACE = "soak"
FAULTS = PROCESS_FAULTS
#: The real node's kubelet lease, and how long the controller manager waits for its renewal:
#: a node that stops reporting is NotReady in seconds rather than Kubernetes' 50.
NODE_LEASE_SECONDS = 12


@dataclass
class SoakReport:
    tasks: int
    completed: int
    lost: int
    never_received: int
    duplicate_runs: int
    reruns_after_kill: int
    leftover_jobs: int
    leftover_secrets: int
    #: Jobs of failed or lost attempts kept for a post-mortem (K8S_CELERY_KEEP_FAILED_JOBS):
    #: meant to be there, so not leftovers; their Secrets are not counted either.
    kept_jobs: int = 0
    #: Workers that exited on their own (not killed by the soak): each was started again.
    worker_exits: int = 0
    faults: dict = field(default_factory=dict)
    #: What the faults did (pods evicted, processes killed, OOM kills seen...).
    effects: dict = field(default_factory=dict)
    leftovers: list = field(default_factory=list)
    broker: str = ""
    #: What the workers' banners name as their result backend: the soak's Redis, or
    #: their sweepers and redelivery checks read some other store.
    result_backends: list = field(default_factory=list)
    duplicated: list = field(default_factory=list)
    work_dir: str = ""

    def line(self) -> str:
        return (f"tasks={self.tasks} completed={self.completed} lost={self.lost} "
                f"never_received={self.never_received} "
                f"duplicate_runs={self.duplicate_runs} reruns_after_kill={self.reruns_after_kill} "
                f"leftover_jobs={self.leftover_jobs} "
                f"leftover_secrets={self.leftover_secrets} kept_jobs={self.kept_jobs} "
                f"worker_exits={self.worker_exits}")


class Worker:
    def __init__(self, name: str, cluster: LocalCluster, manifests: Path, env: dict, log_dir: Path):
        self.name, self.cluster, self.manifests, self.env = name, cluster, manifests, env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "k8s_celery", "worker", "-A", "k8s_celery.testing.soak_app",
                "-Q", "kubernetes", "--manifests", str(self.manifests), "--namespace", NAMESPACE,
                "--kubeconfig", str(self.cluster.kubeconfig), "--max-jobs", "8", "-l", "INFO",
                "-n", f"{self.name}@soak", "--without-mingle", "--without-gossip"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signum)
            self.process.wait(30)


def run_soak(tasks: int = 200, duration: float = 120.0, seed: int | None = None,
             fault_interval: float = 2.0, log=print, node: str = "process", rounds: int | None = None) -> SoakReport:
    """Run the soak; see the module's docstring.

    ``node="real"`` runs the task pods as real containers and injects
    :data:`~.chaos.REAL_NODE_FAULTS`. ``rounds`` injects every kind of fault that many
    times, in random order, and publishes the tasks along the way (a few after each
    fault, and one more whenever all are done while a fault still needs a pod to hit);
    without it, faults drawn at random hit the tasks published at the start until they
    are all done.
    """
    rng = random.Random(seed)
    work_dir = Path(tempfile.mkdtemp(prefix="k8s-celery-soak-"))
    with _node_log(work_dir / "node.log"), _servers(node, work_dir) as (redis_server, cluster, pod_spec), \
            _celery_environ(f"{redis_server.url}/0") as celery_env:
        broker = celery_env["CELERY_BROKER_URL"]
        cluster.create_namespace(NAMESPACE)
        manifests = work_dir / "manifests"
        (manifests / "kubernetes").mkdir(parents=True)
        (manifests / "kubernetes" / "manifest.yaml").write_text(yaml.safe_dump({
            "apiVersion": "batch/v1", "kind": "Job", "spec": {"template": {"spec": pod_spec}}}))
        env = {**os.environ, "C_FORCE_ROOT": "1",
               "K8S_CELERY_MAX_LOST_ATTEMPTS": "20", "K8S_CELERY_SWEEP_GRACE": "10",
               "K8S_CELERY_SWEEP_INTERVAL": "5",
               # A real node's faults hold pods back for a while (a kubelet or containerd away):
               # the default, so that they do not fail tasks whose pods would have started.
               "K8S_CELERY_PENDING_TIMEOUT": "120" if node == "process" else "300",
               "K8S_CELERY_DRAIN_TIMEOUT": "0"}
        workers = [Worker(f"soak-{i}", cluster, manifests, env, work_dir) for i in range(2)]
        for worker in workers:
            worker.start()

        # An app of this run's own: the soak app's module is imported once per process, with
        # the broker of the first soak it ran.
        publisher = Celery("soak-publisher", broker=broker, backend=broker, set_as_current=False)

        client = redis_server.client()
        # States are read straight from the backend's keys: the result consumer of this
        # process does not survive the Redis restarts the soak injects.
        results: list[TaskState] = []
        longest = 3.0 if node == "process" else 6.0  # real pods: long enough to be hit

        def publish(oom_mb: int = 0) -> None:
            options = {"oom_mb": oom_mb} if oom_mb else {}
            results.append(TaskState(publisher.send_task(
                "soak.work", (round(rng.uniform(0.2, longest), 2),), options, queue="kubernetes").id, client))

        kinds = REAL_NODE_FAULTS if node == "real" else PROCESS_FAULTS
        chaos = Chaos(rng, cluster, redis_server, workers, NAMESPACE, publish)
        plan = [kind for _ in range(rounds) for kind in rng.sample(kinds, len(kinds))] if rounds else None
        batch = -(-tasks // len(plan)) if plan else tasks
        published = 0

        def publish_batch() -> None:
            nonlocal published
            for _ in range(min(batch, tasks - published)):
                publish()
                published += 1

        publish_batch()
        log(f"published {published} of {tasks} tasks; injecting faults for up to {duration:.0f}s "
            f"(logs in {work_dir})")
        faults: collections.Counter = collections.Counter()
        worker_exits = 0
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline and (plan or plan is None):
            if all(_ready(r) for r in results):
                if plan is None:
                    break  # nothing left to hit
                if published < tasks:
                    publish_batch()  # nothing running: the next tasks now
                else:
                    publish()  # every task is done while a fault still needs a pod to hit: one more
            fault = plan[0] if plan else rng.choice(kinds)
            if chaos.inject(fault):
                faults[fault] += 1
                logger.info("injected %s", fault)
                if plan:
                    plan.pop(0)
                    publish_batch()
            elif plan:  # no pod running to hit: later
                plan.append(plan.pop(0))
            time.sleep(rng.uniform(0.5, 2 * fault_interval))
            worker_exits += restart_exited(workers, log)
        while published < tasks:
            publish_batch()
        worker_exits += restart_exited(workers, log)  # every worker up, so that everything settles
        log(f"faults injected: {dict(faults)}; waiting for the workers to settle")

        state: dict = {}

        def settled() -> bool:
            try:
                jobs, _ = cluster.api.list(collection_path("jobs", NAMESPACE), label_selector=MANAGED_SELECTOR)
                secrets, _ = cluster.api.list(collection_path("secrets", NAMESPACE),
                                              label_selector=MANAGED_SELECTOR)
                jobs, secrets, _ = without_kept(jobs, secrets)
                # A message the broker lost before any worker saw it never completes.
                pending = [r for r in results if not _ready(r)]
                received = received_task_ids(work_dir) if pending else set()
                state.update(pending_results=sum(1 for r in pending if r.id in received),
                             unacked=client.hlen("unacked"), queued=client.llen("kubernetes"), jobs=len(jobs),
                             secrets=len(secrets))
                # Seconds left on kombu's restore lock, when a worker holds it (or died holding it).
                state["restore_lock_ttl"] = max(0, client.ttl("unacked_mutex"))
            except Exception as exc:
                state["error"] = repr(exc)
                return False
            return not any(state.values())
        def progress() -> tuple:
            return tuple(value for key, value in sorted(state.items()) if key != "restore_lock_ttl")

        if not wait_to_settle(settled, progress, patience=max(120.0, duration)):
            log(f"did not settle in time ({state}); counting what is there")
        completed = sum(1 for r in results if _state(r) == "SUCCESS")
        pods = [sorted(m.decode() for m in client.smembers(f"soak:runs:{r.id}")) for r in results]
        runs = [len(p) for p in pods]
        # An extra run is inherent when every other pod that ran the task was killed by the soak.
        inherent = [max(0, len(names) - 1) if len(names) > 1 and
                    sum(1 for name in names if name not in chaos.killed_pods) <= 1 else 0 for names in pods]
        for result, names, expected in zip(results, pods, inherent):
            if len(names) > 1:
                why = "earlier pods killed after the work was done" if expected else "NOT explained by a kill"
                log(f"task {result.id} ran to its end in {len(names)} pods: {names} ({why})")
        jobs, _ = cluster.api.list(collection_path("jobs", NAMESPACE), label_selector=MANAGED_SELECTOR)
        secrets, _ = cluster.api.list(collection_path("secrets", NAMESPACE), label_selector=MANAGED_SELECTOR)
        jobs, secrets, kept_jobs = without_kept(jobs, secrets)
        leftovers = describe_leftovers(cluster, jobs, secrets)
        for line in leftovers:
            log(f"left over: {line}")
        received = received_task_ids(work_dir)
        never_received = [r.id for r, n in zip(results, runs) if n == 0 and r.id not in received]
        for result, n in zip(results, runs):
            if n == 0 and result.id in received:
                log(f"task {result.id} was received but never ran to its end: {_state(result)}")
        for task_id in never_received:
            log(f"task {task_id} never reached a worker: the broker lost it before delivery")
        chaos.effects["tasks the workers reported OOM-killed"] = oom_killed_tasks(work_dir)
        report = SoakReport(tasks=len(results), completed=completed, broker=broker,
                            result_backends=sorted(worker_result_backends(work_dir)),
                            lost=sum(1 for r, n in zip(results, runs) if n == 0 and r.id in received),
                            never_received=len(never_received),
                            duplicate_runs=sum(max(0, n - 1) for n in runs) - sum(inherent),
                            reruns_after_kill=sum(inherent),
                            leftover_jobs=len(jobs), leftover_secrets=len(secrets), kept_jobs=len(kept_jobs),
                            faults=dict(faults), effects=dict(chaos.effects), worker_exits=worker_exits,
                            leftovers=leftovers,
                            duplicated=[r.id for r, n in zip(results, runs) if n > 1], work_dir=str(work_dir))
        for worker in workers:
            worker.kill(signal.SIGTERM)
        publisher.close()
    for data in ("etcd", "kubelet", "node"):  # the control plane's logs stay with the workers'
        shutil.rmtree(work_dir / "cluster" / data, ignore_errors=True)
    return report


def restart_exited(workers: list[Worker], log) -> int:
    """Start again every worker that exited on its own; how many did."""
    exited = [worker for worker in workers if worker.process.poll() is not None]
    for worker in exited:
        log(f"worker {worker.name} exited on its own (code {worker.process.returncode}); starting it again")
        worker.start()
    return len(exited)


@contextlib.contextmanager
def _servers(node: str, work_dir: Path):
    """``(redis_server, cluster, pod_spec)``: Redis and the cluster the soak runs on, and the
    pod spec of its task Jobs.

    On the real node the pods run the k8s-celery image (the soak's app is part of it) as
    the chart runs them, with a memory limit the OOM tasks exceed, and reach Redis on the
    node's address, which exists once the cluster has started. A standby node stays Ready
    beside it, so that its pods are deleted when it stops reporting.
    """
    if node == "process":
        with RedisServer(persistence=True) as redis_server, LocalCluster(workdir=work_dir / "cluster") as cluster:
            yield redis_server, cluster, {"containers": [_task_container("registry.local/soak:1", redis_server.url)]}
        return
    from .realnode.faults import StandbyNode
    from .realnode.images import ImageBuilder

    image = ImageBuilder().k8s_celery()
    with LocalCluster(node="real", workdir=work_dir / "cluster",
                      node_options={"node_lease_seconds": NODE_LEASE_SECONDS}) as cluster, \
            StandbyNode(cluster.api):
        address = cluster.real_node.node_address
        cluster.real_node.import_image(image)
        with RedisServer(persistence=True, bind=("127.0.0.1", address)) as redis_server:
            yield redis_server, cluster, _real_pod_spec(image.name, f"redis://{address}:{redis_server.port}")


def _task_container(image: str, redis_url: str, **fields) -> dict:
    return {"name": "task", "image": image, **fields,
            "env": [{"name": name, "value": f"{redis_url}/0"}
                    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")]}


def _real_pod_spec(image: str, redis_url: str) -> dict:
    from .realnode.pods import CONTAINER_SECURITY, POD_SECURITY

    # Deleted as soon as their node is NotReady or unreachable (Kubernetes' default: 300 s).
    tolerations = [{"key": f"node.kubernetes.io/{taint}", "operator": "Exists", "effect": "NoExecute",
                    "tolerationSeconds": 0} for taint in ("not-ready", "unreachable")]
    container = _task_container(image, redis_url, imagePullPolicy="Never", securityContext=CONTAINER_SECURITY,
                                resources={"requests": {"memory": "64Mi"}, "limits": {"memory": "192Mi"}},
                                volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}])
    return {"securityContext": POD_SECURITY, "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 5, "tolerations": tolerations,
            "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {}}]}


@contextlib.contextmanager
def _celery_environ(url: str):
    """Broker and result backend of every Celery app of the soak (this process, its
    workers, their pods) for as long as it runs; the caller's values come back after.

    Celery reads ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` from the
    environment before anything the app passes: one inherited from a test session
    would give the workers another result backend than their pods write to.
    """
    values = {"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield values
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _node_log(path: Path):
    """Write what the process kubelet and the fault injection log to ``path`` while the soak runs."""
    logger = logging.getLogger("k8s_celery.testing")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/%(name)s] %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.close()


def wait_to_settle(settled: Callable[[], bool], progress: Callable[[], Any], patience: float,
                   limit_factor: float = 3.0, interval: float = 1.0) -> bool:
    """Poll ``settled`` until it holds; ``False`` once ``patience`` seconds passed in which
    ``progress()`` did not change, or ``limit_factor`` times that in all.

    Under load the workers may still be working through the queue when a fixed window
    ends (tasks done, their Jobs not yet cleaned up): while they make progress they get
    the time they need; a soak that is stuck still ends after ``patience``.
    """
    started = last_change = time.monotonic()
    seen = progress()
    while not settled():
        now = time.monotonic()
        current = progress()
        if current != seen:
            seen, last_change = current, now
        if now - last_change > patience or now - started > limit_factor * patience:
            return False
        time.sleep(interval)
    return True


def without_kept(jobs: list[dict], secrets: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """``(jobs, secrets, kept)``: the Jobs and Secrets that are not those of a Job kept for a
    post-mortem, and the kept Jobs."""
    kept_jobs = [job for job in jobs if kept(job)]
    kept_uids = {job["metadata"]["uid"] for job in kept_jobs}
    return ([job for job in jobs if job["metadata"]["uid"] not in kept_uids],
            [secret for secret in secrets
             if not {owner.get("uid") for owner in secret["metadata"].get("ownerReferences") or []} & kept_uids],
            kept_jobs)


def describe_leftovers(cluster: LocalCluster, jobs: list[dict], secrets: list[dict]) -> list[str]:
    """One line per Job or Secret left behind: enough to tell which delivery left it and why."""
    lines = []
    for job in jobs:
        metadata, status = job["metadata"], job.get("status") or {}
        pods, _ = cluster.api.list(collection_path("pods", NAMESPACE),
                                   label_selector=f"batch.kubernetes.io/controller-uid={metadata['uid']}")
        lines.append(json.dumps({
            "job": metadata["name"], "created": metadata.get("creationTimestamp"),
            "deleting": metadata.get("deletionTimestamp"), "labels": metadata.get("labels"),
            "conditions": [(c.get("type"), c.get("reason")) for c in status.get("conditions") or []],
            "active": status.get("active"), "succeeded": status.get("succeeded"), "failed": status.get("failed"),
            "pods": [(p["metadata"]["name"], (p.get("status") or {}).get("phase"),
                      p["metadata"].get("deletionTimestamp")) for p in pods]}))
    for secret in secrets:
        metadata = secret["metadata"]
        lines.append(json.dumps({"secret": metadata["name"], "created": metadata.get("creationTimestamp"),
                                 "owners": [o.get("name") for o in metadata.get("ownerReferences") or []]}))
    return lines


def oom_killed_tasks(log_dir: Path) -> int:
    """How many tasks the workers logged an attempt of as OOM-killed (when the pod's end was
    seen, or by the worker that took the task over)."""
    pattern = re.compile(r"soak\.work\[([^\]]+)\].*container OOMKilled")
    return len({match.group(1) for path in log_dir.glob("*.log")
                for match in pattern.finditer(path.read_text(errors="replace"))})


def worker_result_backends(log_dir: Path) -> set[str]:
    """The result backends the workers' startup banners name."""
    pattern = re.compile(r"\.> results:\s+(\S+)")
    return {match.group(1) for path in log_dir.glob("*.log")
            for match in pattern.finditer(path.read_text(errors="replace"))}


def received_task_ids(log_dir: Path) -> set[str]:
    """Ids of the tasks some worker logged as received."""
    pattern = re.compile(r"Task soak\.work\[([^\]]+)\] received")
    return {match.group(1) for path in log_dir.glob("*.log")
            for match in pattern.finditer(path.read_text(errors="replace"))}


@dataclass
class TaskState:
    """A task's state as the result backend (Redis) has it."""

    id: str
    client: object

    @property
    def state(self) -> str:
        raw = self.client.get(f"celery-task-meta-{self.id}")
        return json.loads(raw)["status"] if raw else "PENDING"


def _state(result: TaskState) -> str:
    try:
        return result.state
    except Exception:  # Redis is restarting
        return "UNKNOWN"


def _ready(result) -> bool:
    return _state(result) in ("SUCCESS", "FAILURE", "REVOKED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k8s_celery.testing.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of fault injection at most")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--fault-interval", type=float, default=2.0, help="mean seconds between faults / 2")
    parser.add_argument("--node", choices=NODES, default="process",
                        help="real: task pods are real containers, faults include the node's (needs root)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="inject every kind of fault this many times, publishing the tasks along the way")
    args = parser.parse_args(argv)
    report = run_soak(args.tasks, args.duration, args.seed, fault_interval=args.fault_interval, node=args.node,
                      rounds=args.rounds)
    if report.duplicated:
        print(f"ran more than once: {report.duplicated} (logs in {report.work_dir})")
    print(f"faults: {report.faults}")
    print(f"effects: {report.effects}")
    print(report.line())
    return 0 if report.lost == report.duplicate_runs == report.leftover_jobs == report.leftover_secrets \
        == report.worker_exits == 0 \
        and report.completed == report.tasks else 1


if __name__ == "__main__":
    sys.exit(main())
