"""Measurement 7: a no-op task through the shim on a real node, against bare Jobs of the same image.

A real node (``LocalCluster(node="real")``: kubelet, containerd, runc, CNI bridge) runs every
pod from one image built here: k8s-celery's Dockerfile on the Debian-made Python image, plus
the bench app in ``/app``. In each round, one task or Job at a time, in a rotating order:

* ``shim``: ``noop.apply_async().get()`` through ``k8s-celery worker`` (its Job and payload
  Secret, ``k8s-celery run-task`` in the pod, the result through the result backend);
* ``floor``: a bare Job of the same image and pod spec whose container runs the image's Python
  with a no-op, created with the official client's ``create_namespaced_job`` and watched to its
  ``Complete`` condition with the official client's watch: the bare pod lifecycle.

To tell where a difference between the two goes, more bare Jobs are created and watched the
same way: ``start`` (``date``: the pod's start-up before any Python), ``import`` (Python
importing Celery and the bench app), ``secret`` (the no-op given the payload Secret as the
shim's Job gives it, in its environment, created after the Job as the shim creates it),
``mounted`` (the same with the Secret mounted as a volume, as for a payload over 64 KiB) and
``runner`` (the shim's very Job and Secret,
``k8s-celery run-task`` of a no-op, without Celery's delivery). The containers that print their
end time give it through the kubelet's log of them; the runner gives it as the result's
``date_done``. Every sample starts once the previous one's pod is gone. The samples of every
run are written to ``samples.json`` in the work directory (kept with ``--keep``).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

import yaml

from k8s_celery.cluster import KubeApi, collection_path
from k8s_celery.manifest import (PAYLOAD_DIR, PAYLOAD_ENV, PAYLOAD_VOLUME, TaskSpec, build_job, build_secret,
                                 payload_secret_name)
from k8s_celery.testing.cluster import LocalCluster
from k8s_celery.testing.realnode.images import Image, ImageBuilder
from k8s_celery.testing.redis import RedisServer
from k8s_celery.watch import Watcher

from .harness import (JOB_NAME_LABEL, QUEUE, RAW_NAMESPACE, ROOT, Environment, Shim, bench_app, prepared,
                      wait_for)
from .measure import MS, Plan, Row, no_op_spec, verdict
from .stats import Spread, percentile, ratios

#: The bench app as the image holds it: ``/app/benchapp.py``, on the image's ``PYTHONPATH``.
POD_APP = "benchapp"
IMAGE_KIND = "bench-app"
#: The pods run as the Helm chart runs task pods: non-root (``fsGroup`` lets it read the 0440
#: payload Secret), read-only root filesystem, no capabilities, no service-account token.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}

SHIM, FLOOR, START, IMPORT, SECRET, MOUNTED, RUNNER = ("shim", "floor", "start", "import", "secret", "mounted",
                                                       "runner")
VARIANTS = (SHIM, FLOOR, START, IMPORT, SECRET, MOUNTED, RUNNER)
#: What each bare Job's container runs (``None``: the shim's runner command); each prints
#: ``time.time()`` (or ``date``'s equivalent) as its last act.
COMMANDS = {
    FLOOR: ["python3", "-c", "import time; print(time.time())"],
    START: ["date", "+%s.%N"],
    IMPORT: ["python3", "-c", f"import celery, {POD_APP}, time; print(time.time())"],
    SECRET: ["python3", "-c", "import time; print(time.time())"],
    MOUNTED: ["python3", "-c", "import time; print(time.time())"],
    RUNNER: None,
}
#: Bare Jobs given the payload Secret (created right after the Job, as the shim does).
WITH_SECRET = (SECRET, MOUNTED, RUNNER)
JOB_TIMEOUT = 180.0


# -- pure helpers ------------------------------------------------------------------------


def printed_time(log: str) -> float | None:
    """The number on the last stdout line of a container log in the CRI format
    (``<RFC 3339 time> stdout F <text>``), or ``None`` when there is none."""
    for line in reversed(log.splitlines()):
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[1] == "stdout":
            try:
                return float(parts[3].strip())
            except ValueError:
                return None
    return None


def terminal_condition(conditions: Sequence[tuple[str, str]]) -> str | None:
    """``Complete`` or ``Failed`` when a Job's ``(type, status)`` conditions say it ended."""
    for kind, status in conditions:
        if kind in ("Complete", "Failed") and status == "True":
            return kind
    return None


def containers_terminated(status: dict) -> bool:
    """Whether a pod's status reports every container terminated."""
    containers = status.get("containerStatuses") or []
    return bool(containers) and all("terminated" in (c.get("state") or {}) for c in containers)


def rotation(variants: Sequence[str], round_index: int) -> list[str]:
    """The order of one round: each round starts one variant later, so that none always
    follows the same one."""
    shift = round_index % len(variants)
    return [*variants[shift:], *variants[:shift]]


def epoch(value: str | datetime) -> float:
    """``time.time()`` of a result's ``date_done`` (ISO 8601 with an offset, or a datetime)."""
    return (datetime.fromisoformat(value) if isinstance(value, str) else value).timestamp()


@dataclass
class Sample:
    """One task or Job, in this machine's ``time.time()``.

    ``started``: before ``apply_async`` or the create; ``done``: ``.get()`` returned, or the
    official client's watch saw ``Complete``; ``ended``: the container's printed end time, or
    the result's ``date_done``; ``stored``: the Job created (the bench's Job watch saw the shim's;
    the create returned for a bare one); ``terminated`` and ``pod_ended``: the bench's pod watch
    saw the pod's containers terminated (what the shim acts on), then its terminal phase (what
    the Job controller acts on); ``acked``: the shim's ``task-succeeded`` event (sent after the ack).
    """

    variant: str
    started: float
    done: float
    ended: float
    stored: float
    terminated: float
    pod_ended: float
    acked: float | None = None

    @property
    def total(self) -> float:
        return self.done - self.started

    @property
    def to_end(self) -> float:
        return self.ended - self.started

    @property
    def tail(self) -> float:
        return self.done - self.ended

    @property
    def to_terminated(self) -> float:
        return self.terminated - self.started

    @property
    def to_pod_end(self) -> float:
        return self.pod_ended - self.started

    @property
    def dispatch(self) -> float:
        return self.stored - self.started

    @property
    def to_ack(self) -> float:
        return (self.acked if self.acked is not None else float("nan")) - self.started


def p50s(runs: Sequence[Sequence[Sample]], variant: str, figure: str) -> list[float]:
    """Per run, the median in ms of one figure (a :class:`Sample` property) of one variant."""
    return [percentile([getattr(s, figure) * MS for s in run if s.variant == variant], 50) for run in runs]


def spread(runs: Sequence[Sequence[Sample]], variant: str, figure: str) -> Spread:
    return Spread.of(p50s(runs, variant, figure))


def difference(runs: Sequence[Sequence[Sample]], a: tuple[str, str], b: tuple[str, str]) -> Spread:
    """``a`` minus ``b`` (each ``(variant, figure)``), p50 against p50 within each run."""
    return Spread.of(x - y for x, y in zip(p50s(runs, *a), p50s(runs, *b)))


#: The difference between the shim and the floor at p50, as a sum of differences of p50s
#: within each run (they telescope: the parts add up to the whole, run by run).
GAP_PARTS = (
    ("dispatch (apply_async → the shim's Job and Secret, against the official client's creates)",
     (SHIM, "to_end"), (RUNNER, "to_end")),
    ("`run-task` beyond importing (the payload from its Secret, Celery's tracer, the result backend)",
     (RUNNER, "to_end"), (IMPORT, "to_end")),
    ("importing Celery and the app", (IMPORT, "to_end"), (FLOOR, "to_end")),
    ("result stored → `.get()` returns", (SHIM, "tail"), None),
    ("minus the floor's process end → Complete seen, which the result does not wait for", None, (FLOOR, "tail")),
)


def gap_parts(runs: Sequence[Sequence[Sample]]) -> list[tuple[str, Spread]]:
    """The shim's p50 minus the floor's, split into :data:`GAP_PARTS` (signed, in ms)."""
    parts = []
    for name, plus, minus in GAP_PARTS:
        added = p50s(runs, *plus) if plus else [0.0] * len(runs)
        taken = p50s(runs, *minus) if minus else [0.0] * len(runs)
        parts.append((name, Spread.of(x - y for x, y in zip(added, taken))))
    return parts


# -- the environment ---------------------------------------------------------------------


def bench_image() -> Image:
    """The bench app's image (cached by content, like the tests' images)."""
    return ImageBuilder().app(IMAGE_KIND, ROOT / "bench", ["benchapp.py"])


def write_node_manifest(directory: Path, broker_url: str, image: str) -> Path:
    """The queue's Job manifest: the bench image, never pulled, run as the chart runs tasks."""
    manifest = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"labels": {"app": "bench"}},
                "spec": {"template": {"spec": {
                    "securityContext": POD_SECURITY, "automountServiceAccountToken": False,
                    "containers": [{
                        "name": "task", "image": image, "imagePullPolicy": "Never",
                        "securityContext": CONTAINER_SECURITY,
                        "env": [{"name": "CELERY_BROKER_URL", "value": broker_url},
                                {"name": "CELERY_RESULT_BACKEND", "value": broker_url}]}]}}}}
    path = directory / QUEUE / "manifest.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest))
    return directory


@contextmanager
def node_environment(workdir: Path, redis: RedisServer) -> Iterator[Environment]:
    """A local cluster with a real node running the bench image, Redis reachable from its pods
    (on the node's address), and the shim's identity, manifest and observers."""
    workdir.mkdir(parents=True, exist_ok=True)
    image = bench_image()
    app, app_environ = bench_app(redis)
    with LocalCluster(node="real", watch_cache=True, workdir=workdir / "cluster") as cluster:
        node = cluster.real_node
        node.import_image(image)
        client = redis.client()
        bind = client.config_get("bind")["bind"]
        client.config_set("bind", f"{bind} {node.node_address}")
        pod_broker = f"redis://{node.node_address}:{redis.port}/0"
        manifests = write_node_manifest(workdir / "manifests", pod_broker, image.name)
        try:
            with prepared(cluster, workdir, redis, app, app_environ, manifests) as env:
                yield env
        finally:
            client.config_set("bind", bind)


# -- observers and runners ---------------------------------------------------------------


class PodWatch:
    """Each Job's pod (any namespace), as a watch of this process sees it: its name, when the
    kubelet reported its containers terminated, then its terminal phase, and its deletion."""

    def __init__(self, api: KubeApi):
        self.names: dict[str, tuple[str, str]] = {}
        self.terminated: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.deleted: dict[str, float] = {}
        self._lock = threading.Lock()
        self._watcher = Watcher(api, collection_path("pods"), self._on_event, resync_period=3600,
                                name="bench pod watch")

    def __enter__(self) -> PodWatch:
        self._watcher.start().wait_synced(30)
        return self

    def __exit__(self, *exc_info) -> None:
        self._watcher.stop(timeout=0.5)

    def _on_event(self, kind: str, pod: dict) -> None:
        job = (pod["metadata"].get("labels") or {}).get(JOB_NAME_LABEL)
        if job is None:
            return
        now = time.time()
        with self._lock:
            self.names.setdefault(job, (pod["metadata"]["namespace"], pod["metadata"]["name"]))
            status = pod.get("status") or {}
            if containers_terminated(status):
                self.terminated.setdefault(job, now)
            if status.get("phase") in ("Succeeded", "Failed"):
                self.ended.setdefault(job, now)
            if kind == "DELETED":
                self.deleted.setdefault(job, time.time())

    def pod_of(self, job: str, timeout: float = 30) -> tuple[str, str]:
        wait_for(lambda: job in self.names, timeout, f"the pod of Job {job}")
        return self.names[job]

    def wait_gone(self, job: str, timeout: float = 120) -> tuple[float, float]:
        """Wait for the deletion of the Job's pod; when its containers were reported terminated
        and when its terminal phase came."""
        wait_for(lambda: job in self.deleted, timeout, f"the pod of Job {job} to be deleted", interval=0.02)
        return self.terminated.get(job, float("nan")), self.ended.get(job, float("nan"))


def bare_job(template: dict, spec: TaskSpec, variant: str) -> dict:
    """The Job the shim would render for ``spec`` (same manifest), in the raw namespace, with
    the variant's command; without the payload Secret unless the variant is given it, and
    with it mounted for :data:`MOUNTED`."""
    job = build_job(template, spec, RAW_NAMESPACE, app=POD_APP, runner_command=["k8s-celery", "run-task"],
                    ttl_seconds=3600)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if COMMANDS[variant] is not None:
        container["command"] = list(COMMANDS[variant])
    if variant not in WITH_SECRET:
        container["env"] = [e for e in container["env"] if not e["name"].startswith("K8S_CELERY_")]
    if variant == MOUNTED:
        secret_name = payload_secret_name(job)
        container["env"] = [e for e in container["env"] if e["name"] != PAYLOAD_ENV]
        pod["volumes"].append({"name": PAYLOAD_VOLUME, "secret": {"secretName": secret_name, "defaultMode": 0o440}})
        container["volumeMounts"].append({"name": PAYLOAD_VOLUME, "mountPath": PAYLOAD_DIR, "readOnly": True})
    return job


class Runner:
    """Runs one sample of each variant: the shim's task, or a bare Job with the official client."""

    def __init__(self, env: Environment, pods: PodWatch):
        from kubernetes import client, config, watch

        self.env = env
        self.pods = pods
        self.node = env.cluster.real_node
        self.template = yaml.safe_load((env.manifests / QUEUE / "manifest.yaml").read_text())
        api_client = config.new_client_from_config(str(env.shim_kubeconfig))
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.watch = watch

    def run(self, variant: str) -> Sample:
        sample = self.shim_task() if variant == SHIM else self.bare(variant)
        time.sleep(0.2)  # the node settles after the pod's deletion
        return sample

    def shim_task(self) -> Sample:
        noop = self.env.app.tasks["bench.noop"]
        task_id = str(uuid.uuid4())
        started = time.time()
        noop.apply_async(task_id=task_id).get(timeout=JOB_TIMEOUT)
        done = time.time()
        job = self.env.jobs.names_of([task_id], 30)[0]
        ended = self.result_stored(task_id)
        self.env.events.wait([task_id], 60)
        self.env.jobs.wait_deleted([job], 60)
        terminated, pod_ended = self.pods.wait_gone(job)
        return Sample(SHIM, started, done, ended, self.env.jobs.added[job], terminated, pod_ended,
                      self.env.events.succeeded[task_id])

    def bare(self, variant: str) -> Sample:
        spec = no_op_spec(self.env.app)
        job = bare_job(self.template, spec, variant)
        name = job["metadata"]["name"]
        started = time.time()
        created = self.batch.create_namespaced_job(RAW_NAMESPACE, job)
        stored = time.time()
        if variant in WITH_SECRET:
            self.core.create_namespaced_secret(RAW_NAMESPACE, build_secret(spec, RAW_NAMESPACE, created.metadata.uid))
        done = self.watch_complete(name, created.metadata.resource_version)
        if variant == RUNNER:
            ended = self.result_stored(spec.task_id)
        else:
            namespace, pod = self.pods.pod_of(name)
            wait_for(lambda: printed_time(self.node.pod_log(namespace, pod)) is not None, 10,
                     f"the end time printed by {pod}")
            ended = printed_time(self.node.pod_log(namespace, pod))
        self.batch.delete_namespaced_job(name, RAW_NAMESPACE, propagation_policy="Background")
        return Sample(variant, started, done, ended, stored, *self.pods.wait_gone(name))

    def watch_complete(self, name: str, resource_version: str) -> float:
        """When the official client's watch of the Job sees it ``Complete``."""
        watch = self.watch.Watch()
        for event in watch.stream(self.batch.list_namespaced_job, RAW_NAMESPACE,
                                  field_selector=f"metadata.name={name}", resource_version=resource_version,
                                  timeout_seconds=int(JOB_TIMEOUT)):
            at = time.time()
            status = getattr(event["object"], "status", None)
            state = terminal_condition([(c.type, c.status) for c in (status.conditions or [])] if status else [])
            if state:
                watch.stop()
                if state != "Complete":
                    raise RuntimeError(f"bare Job {name} failed: {status}")
                return at
        raise TimeoutError(f"bare Job {name} not complete within {JOB_TIMEOUT:.0f}s")

    def result_stored(self, task_id: str) -> float:
        """When the pod stored the task's result (its ``date_done``, this machine's clock)."""
        meta = self.env.app.backend.get_task_meta(task_id)
        if meta.get("status") != "SUCCESS" or not meta.get("date_done"):
            raise RuntimeError(f"no success stored for {task_id}: {meta}")
        return epoch(meta["date_done"])


# -- the measurement ---------------------------------------------------------------------


def measure(env: Environment, plan: Plan) -> list[Row]:
    """``plan.node_runs`` runs of ``plan.node_samples`` rounds, every variant once a round."""
    load_before = os.getloadavg()[0]
    runs: list[list[Sample]] = []
    # The worker imports the app as the pods do (``benchapp``), so that it tells them that name.
    path = os.pathsep.join([str(ROOT / "bench"), env.app_environ["PYTHONPATH"]])
    with PodWatch(env.cluster.api) as pods, Shim(env, max_jobs=2, app=POD_APP, settings={"PYTHONPATH": path}):
        runner = Runner(env, pods)
        for variant in VARIANTS:  # untimed: the first pod of each kind warms caches
            runner.run(variant)
        for _ in range(plan.node_runs):
            run: list[Sample] = []
            for index in range(plan.node_samples):
                run += [runner.run(variant) for variant in rotation(VARIANTS, index)]
            runs.append(run)
    (env.workdir / "samples.json").write_text(json.dumps([[asdict(s) for s in run] for run in runs], indent=1))
    return rows(runs, load_before, os.getloadavg()[0])


def rows(runs: list[list[Sample]], load_before: float, load_after: float) -> list[Row]:
    """The table's rows of measurement 7."""
    def p50(variant: str, figure: str, digits: int = 0) -> str:
        return spread(runs, variant, figure).format(digits)

    ratio = ratios(p50s(runs, SHIM, "total"), p50s(runs, IMPORT, "to_end"))
    complete_ratio = ratios(p50s(runs, SHIM, "total"), p50s(runs, FLOOR, "total"))
    terminated_ratio = ratios(p50s(runs, SHIM, "to_terminated"), p50s(runs, FLOOR, "to_terminated"))
    end_ratio = ratios(p50s(runs, SHIM, "to_end"), p50s(runs, FLOOR, "to_end"))
    samples = len([s for s in runs[0] if s.variant == SHIM])
    parts = "; ".join(f"{name} {part.format(0)}" for name, part in gap_parts(runs))
    return [
        Row(f"7. no-op `apply_async` → result, real node ({len(runs)} run(s) of {samples} of each, interleaved; "
            f"load average {load_before:.1f} → {load_after:.1f}) (ms)",
            f"p50 {p50(SHIM, 'total')}; of which apply_async → Job stored {p50(SHIM, 'dispatch', 1)}",
            f"bare Job (same image and pod spec, no Secret), official client: create → "
            f"`python3 -c 'import celery, benchapp'` ends, p50 {p50(IMPORT, 'to_end')}",
            f"{ratio.format(2)}×", "p50 ≤ 1.3× the floor", verdict(ratio.median <= 1.3)),
        Row("7. the same, to the pod's end (ms, p50)",
            f"→ result stored by the pod {p50(SHIM, 'to_end')}; → container terminated seen "
            f"{p50(SHIM, 'to_terminated')}; → task acked (task-succeeded) {p50(SHIM, 'to_ack')}; → pod Succeeded "
            f"seen {p50(SHIM, 'to_pod_end')}",
            f"bare Job, Python no-op: → its process end {p50(FLOOR, 'to_end')}; → container terminated seen "
            f"{p50(FLOOR, 'to_terminated')}; → pod Succeeded seen {p50(FLOOR, 'to_pod_end')}; → Complete seen "
            f"{p50(FLOOR, 'total')}",
            f"{end_ratio.format(2)}× (result stored / process end); {terminated_ratio.format(2)}× (container "
            f"terminated); {complete_ratio.format(2)}× (result / Complete seen)", "–", "–"),
        Row("7. bare Jobs of the same image, create → (ms, p50)", "–",
            f"`date` runs {p50(START, 'to_end')}; Python no-op ends {p50(FLOOR, 'to_end')}; the no-op with "
            f"the payload Secret in its environment (as the shim gives it) ends {p50(SECRET, 'to_end')}, "
            f"mounted (payloads over 64 KiB) {p50(MOUNTED, 'to_end')}; `import celery, benchapp` ends "
            f"{p50(IMPORT, 'to_end')}; `k8s-celery run-task` (the shim's Job and Secret) has stored the result "
            f"{p50(RUNNER, 'to_end')}, Complete {p50(RUNNER, 'total')}",
            "–", "–", "–"),
        Row("7. shim − the bare no-op Job seen Complete, at p50, by part (ms)",
            f"{difference(runs, (SHIM, 'total'), (FLOOR, 'total')).format(0)}",
            f"{parts}; the Secret alone (no-op with it − without) "
            f"{difference(runs, (SECRET, 'to_end'), (FLOOR, 'to_end')).format(0)} in the environment, "
            f"{difference(runs, (MOUNTED, 'to_end'), (FLOOR, 'to_end')).format(0)} mounted", "–", "–", "–"),
    ]
