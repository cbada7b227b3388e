"""The six measurements of issue 7 (the seventh, on a real node, is in ``realnode``);
each returns rows of the bench's table."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml
from kombu.serialization import dumps

from k8s_celery import outcome
from k8s_celery.cluster import collection_path
from k8s_celery.manifest import ANNOTATION_PAYLOAD_MODE, TaskSpec, build_secret, payload_bytes

from .harness import (NAMESPACE, QUEUE, RAW_NAMESPACE, SHIM_USER, Environment, Shim, Usage, pace,
                      timestamp, wait_for)
from .cpu import OTHER, CpuRecorder, CpuShare, budget_per_job
from .profile import Profile, Sampler
from .stats import Spread, percentile, ratios, spread_of_percentile, steady_rate, steady_window

#: Where a figure is about the shim's own speed rather than about its throttles, the
#: client-side rate limit (default 50 requests/s, bursts of 100: about 16 tasks/s at 3
#: requests a task) is lifted and the launch threads (default 4) match the ceiling's.
LAUNCH_THREADS = 16
RAISED = {"K8S_CELERY_API_QPS": "5000", "K8S_CELERY_API_BURST": "5000",
          "K8S_CELERY_LAUNCH_THREADS": str(LAUNCH_THREADS)}
MS = 1000.0


@dataclass
class Row:
    """One line of the table."""

    measurement: str
    shim: str
    reference: str
    ratio: str
    target: str
    met: str


def verdict(ok: bool) -> str:
    return "yes" if ok else "no"


@dataclass
class Plan:
    """How much to measure: the full run, or ``quick()`` for a smoke run."""

    repeats: int = 3
    rates: tuple[tuple[float, int], ...] = ((1, 15), (10, 100), (50, 250))  # (tasks/s, tasks)
    request_tasks: int = 30
    task_seconds: tuple[float, ...] = (1, 60)
    backlog: int = 1000
    ceiling_threads: int = LAUNCH_THREADS
    pod_runs: int = 5
    node_runs: int = 3      # measurement 7 (real node): runs
    node_samples: int = 8   # … of this many rounds, each with one task or Job of every kind
    burst_size: int = 50    # measurement 9 (real node): tasks (or bare Jobs) at once
    burst_runs: int = 3     # … bursts of each
    queued: int = 1000      # measurement 8 (Kueue): tasks held queued
    queued_window: float = 60.0  # … and how long they wait
    profile: bool = False   # measurement 4: sample the worker with py-spy in the first run

    @classmethod
    def quick(cls) -> Plan:
        return cls(repeats=1, rates=((1, 5), (10, 30), (50, 100)), request_tasks=10, task_seconds=(1, 10),
                   backlog=200, pod_runs=2, node_runs=1, node_samples=2, burst_size=10, burst_runs=1,
                   queued=200, queued_window=15.0)


# -- shared steps -------------------------------------------------------------------------


def publish(env: Environment, count: int, **options) -> list[str]:
    noop = env.app.tasks["bench.noop"]
    return [noop.apply_async(**options).id for _ in range(count)]


def run_through(env: Environment, count: int = 3, timeout: float = 60) -> None:
    """Run a few tasks to their end and clean-up (warms connections and code paths)."""
    hold, env.pods.hold = env.pods.hold, 0.0
    ids = publish(env, count)
    env.events.wait(ids, timeout)
    env.jobs.wait_deleted(env.jobs.names_of(ids, timeout), timeout)
    env.pods.hold = hold


def no_op_spec(app) -> TaskSpec:
    """A new no-op task, as the shim hands it to its pod."""
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, "bench.noop", args=(), kwargs={})
    content_type, encoding, body = dumps(message.body, serializer="json")
    return TaskSpec(task_id=task_id, name="bench.noop", queue=QUEUE,
                    request={**message.headers, "delivery_info": {"routing_key": QUEUE}},
                    body=body.encode() if isinstance(body, str) else body,
                    content_type=content_type, content_encoding=encoding)


def raw_task(env: Environment, suspend: bool = False) -> tuple[TaskSpec, dict]:
    """A made-up task and the Job the shim would render for it, in the raw namespace."""
    spec = TaskSpec(task_id=str(uuid.uuid4()), name="bench.noop", queue=QUEUE, request={},
                    body=b"[[], {}, {}]", content_type="application/json", content_encoding="utf-8")
    job = env.raw_job(spec)
    if suspend:
        job["spec"]["suspend"] = True
    return spec, job


def ms(values: list[float]) -> list[float]:
    return [v * MS for v in values]


# -- 1 and 2: dispatch and completion latency ---------------------------------------------


def latency(env: Environment, plan: Plan) -> list[Row]:
    """Dispatch latency beside the bare-create floor, and completion latency, per rate."""
    from kubernetes import client, config

    batch = client.BatchV1Api(config.new_client_from_config(str(env.shim_kubeconfig)))
    runs: dict[float, dict[str, list]] = {rate: {} for rate, _ in plan.rates}
    env.pods.hold = 0.0
    with Shim(env, max_jobs=200, settings=RAISED):
        run_through(env)
        series(env, batch, 1, 2)  # warm both paths
        for _ in range(plan.repeats):
            for rate, count in plan.rates:
                for name, values in series(env, batch, rate, count).items():
                    runs[rate].setdefault(name, []).append(ms(values))
            env.clear_raw_jobs()
    return [dispatch_row(rate, runs[rate]) for rate, _ in plan.rates] + \
           [completion_row(rate, runs[rate]) for rate, _ in plan.rates]


def series(env: Environment, batch, rate: float, count: int) -> dict[str, list[float]]:
    """``count`` shim tasks and ``count`` bare creates, interleaved, each at ``rate``; in seconds:

    * ``shim``: ``apply_async`` called → the API server stored the task's Job;
    * ``delivery``: ``apply_async`` called → the shim sent ``task-received`` (Redis and Celery's
      consumer, before the pool sees the task);
    * ``floor``: ``create_namespaced_job`` called (as many client threads as the shim's) → the
      API server stored the Job;
    * ``completion``: the API server stored the pod's terminated status → the shim sent
      ``task-succeeded`` (after acking the message);
    * ``from_end``: the bench ended the pod's (simulated) container → the shim sent ``task-succeeded``.

    "Stored" is the request's ResponseComplete in the audit log (microseconds, this
    machine's clock, like the event's own timestamp). The bare creates are suspended
    Jobs: the same object and API path, and they share the load of the shim's tasks
    without adding pods of their own.
    """
    noop = env.app.tasks["bench.noop"]
    jobs = [raw_task(env, suspend=True)[1] for _ in range(count)]
    tasks: dict[str, float] = {}
    creates: dict[str, float] = {}
    start = env.audit.mark()
    with ThreadPoolExecutor(LAUNCH_THREADS) as pool:
        futures = []
        for index in pace(2 * rate, 2 * count):
            if index % 2 == 0:
                task_id = str(uuid.uuid4())
                tasks[task_id] = time.time()
                noop.apply_async(task_id=task_id)
            else:
                job = jobs[index // 2]
                creates[job["metadata"]["name"]] = time.time()
                futures.append(pool.submit(batch.create_namespaced_job, RAW_NAMESPACE, job))
        for future in futures:
            future.result()
    env.events.wait(list(tasks), 60)
    names = dict(zip(tasks, env.jobs.names_of(list(tasks), 60)))
    time.sleep(0.5)  # the last records reach the audit log
    created, status_writes = stored_times(env.audit.records(start, env.audit.mark()))
    succeeded, ended = env.events.succeeded, env.pods.ended

    def terminated(task_id: str) -> float:
        job = names[task_id]
        pod = env.pods.running[job][1]
        return min(stored for received, stored in status_writes[pod] if received >= ended[job])

    return {"shim": [created[names[t]] - at for t, at in tasks.items()],
            "delivery": [env.events.received[t] - at for t, at in tasks.items()],
            "floor": [created[name] - at for name, at in creates.items()],
            "completion": [succeeded[t] - terminated(t) for t in tasks],
            "from_end": [succeeded[t] - ended[names[t]] for t in tasks]}


def stored_times(records) -> tuple[dict[str, float], dict[str, list[tuple[float, float]]]]:
    """From audit records: when each Job's create was stored, and each pod's status writes
    as ``(received, stored)``."""
    created: dict[str, float] = {}
    status_writes: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for record in records:
        ref = record.get("objectRef") or {}
        if record.get("stage") != "ResponseComplete" or record["responseStatus"]["code"] >= 300:
            continue
        if record["verb"] == "create" and ref.get("resource") == "jobs" and not ref.get("subresource"):
            created[ref["name"]] = timestamp(record["stageTimestamp"])
        elif record["verb"] == "patch" and (ref.get("resource"), ref.get("subresource")) == ("pods", "status"):
            status_writes[ref["name"]].append((timestamp(record["requestReceivedTimestamp"]),
                                               timestamp(record["stageTimestamp"])))
    return created, status_writes


def dispatch_row(rate: float, runs: dict) -> Row:
    shim50, floor50 = [percentile(r, 50) for r in runs["shim"]], [percentile(r, 50) for r in runs["floor"]]
    ratio = ratios(shim50, floor50)
    return Row(f"1. dispatch at {rate:g} tasks/s: apply_async → Job stored (ms)",
               f"p50 {Spread.of(shim50).format()}, p99 {spread_of_percentile(runs['shim'], 99).format()}; of "
               f"which apply_async → task-received (Redis, Celery) p50 "
               f"{spread_of_percentile(runs['delivery'], 50).format()}",
               f"bare create_namespaced_job: p50 {Spread.of(floor50).format()}, "
               f"p99 {spread_of_percentile(runs['floor'], 99).format()}",
               f"{ratio.format(2)}×", "p50 ≤ 1.3× the floor", verdict(ratio.median <= 1.3))


def completion_row(rate: float, runs: dict) -> Row:
    completion50 = spread_of_percentile(runs["completion"], 50)
    return Row(f"2. completion at {rate:g} tasks/s: terminated pod status stored → message acked and "
               "task-succeeded sent (ms)",
               f"p50 {completion50.format()}, p99 {spread_of_percentile(runs['completion'], 99).format()}",
               f"from the container's end, with the kubelet's status write: p50 "
               f"{spread_of_percentile(runs['from_end'], 50).format()}, p99 "
               f"{spread_of_percentile(runs['from_end'], 99).format()}", "–", "p50 < 50 ms",
               verdict(completion50.median < 50))


# -- 3: API requests per task ---------------------------------------------------------------


def api_requests(env: Environment, plan: Plan) -> list[Row]:
    """Requests the shim sends per task, counted by the API server's audit log (default settings)."""
    per_length: dict[float, list[RequestRun]] = {}
    with Shim(env, max_jobs=plan.request_tasks):
        run_through(env)
        for seconds in plan.task_seconds:
            env.pods.hold = seconds
            repeats = plan.repeats if seconds < 10 else 1  # long tasks: one run
            per_length[seconds] = [count_requests(env, plan.request_tasks, seconds) for _ in range(repeats)]
        env.pods.hold = plan.task_seconds[0]
        with inline_payloads(env):  # the worker reads the edited manifest at the next task
            run_through(env)
            inline = [count_requests(env, plan.request_tasks, plan.task_seconds[0]) for _ in range(plan.repeats)]
    short = plan.task_seconds[0]
    totals = {s: Spread.of(sum(run.per_task.values()) for run in runs) for s, runs in per_length.items()}
    rows = []
    for seconds, runs in per_length.items():
        reads = max(sum(n for (verb, _), n in run.per_task.items() if verb in READS) for run in runs)
        same = abs(totals[seconds].median - totals[short].median) <= 0.1
        text = f"{totals[seconds].format(2)}: {split([run.per_task for run in runs])}"
        if runs[0].quiet is not None:
            quiet = runs[0].quiet
            text += (f"; while all {plan.request_tasks} ran ({runs[0].quiet_seconds:.0f} s): "
                     f"{sum(quiet.values()):.0f} ({split([quiet], 0) or 'none'})")
        rows.append(Row(f"3. API requests per task, tasks of {seconds:g} s ({len(runs)} run(s) of "
                        f"{plan.request_tasks} tasks)", text, "–",
                        f"{totals[seconds].median / totals[short].median:.2f}× the {short:g} s tasks"
                        if seconds != short else "–",
                        "the same small constant for both; no reads per task",
                        verdict(same and reads <= 0.1)))
    inline_total = Spread.of(sum(run.per_task.values()) for run in inline)
    fewer = totals[short].median - inline_total.median
    rows.append(Row(f"3. API requests per task on a queue with inline payloads (`k8s-celery.io/payload: inline`), "
                    f"tasks of {short:g} s ({len(inline)} run(s) of {plan.request_tasks} tasks)",
                    f"{inline_total.format(2)}: {split([run.per_task for run in inline])}",
                    f"a private payload (the default, same worker): {totals[short].format(2)}",
                    f"{-fewer:+.2f} a task", "one request fewer than a private payload (no Secret)",
                    verdict(abs(fewer - 1.0) <= 0.05)))
    return rows


@contextmanager
def inline_payloads(env: Environment) -> Iterator[None]:
    """The bench queue's manifest annotated for inline payloads, restored on exit."""
    path = env.manifests / QUEUE / "manifest.yaml"
    text = path.read_text()
    manifest = yaml.safe_load(text)
    manifest.setdefault("metadata", {}).setdefault("annotations", {})[ANNOTATION_PAYLOAD_MODE] = "inline"
    path.write_text(yaml.safe_dump(manifest))
    try:
        yield
    finally:
        path.write_text(text)


READS = ("get", "list", "watch")


@dataclass
class RequestRun:
    """The shim's requests in one batch of tasks: per task over the whole batch, and in total
    while all of them were running (for tasks of 10 s or more)."""

    per_task: Counter
    quiet: Counter | None = None
    quiet_seconds: float = 0.0


def count_requests(env: Environment, tasks: int, seconds: float) -> RequestRun:
    """The shim's requests while ``tasks`` tasks of ``seconds`` run and are cleaned up."""
    start = env.audit.mark()
    ids = publish(env, tasks)
    names = env.jobs.names_of(ids, 60)
    quiet, quiet_seconds = None, 0.0
    if seconds >= 10:
        wait_for(lambda: all(n in env.pods.since for n in names), 60, "the tasks' pods running")
        first_end = min(env.pods.since[n] for n in names) + seconds
        time.sleep(1.0)
        quiet_start, began = env.audit.mark(), time.time()
        time.sleep(max(0.0, first_end - 1.0 - time.time()))
        quiet, quiet_seconds = env.audit.count(quiet_start, env.audit.mark(), SHIM_USER), time.time() - began
    env.events.wait(ids, seconds + 120)
    env.jobs.wait_deleted(names, 60)
    time.sleep(1.0)  # the last responses reach the log
    counts = env.audit.count(start, env.audit.mark(), SHIM_USER)
    return RequestRun(Counter({key: n / tasks for key, n in counts.items()}), quiet, quiet_seconds)


def split(runs: list[Counter], digits: int = 2) -> str:
    """``create jobs 1.00, create secrets 1.00, …``: the median of each verb and resource."""
    def median(key: tuple[str, str]) -> float:
        return Spread.of(run.get(key, 0.0) for run in runs).median

    return ", ".join(f"{verb} {resource} {median((verb, resource)):.{digits}f}"
                     for verb, resource in sorted(set().union(*runs)))


# -- 4 and 5: launch throughput and footprint -------------------------------------------------


@dataclass
class BacklogRun:
    """One run of the shim through a backlog: its launch rate and the process's usage."""

    rate: float
    idle: Usage
    full: Usage
    done: Usage
    launch: Launch
    profile: Profile | None = None


def throughput(env: Environment, plan: Plan) -> list[Row]:
    """Jobs/s with a backlog against raw concurrent creates; the shim's footprint at that backlog."""
    jobs_only, pairs, raw_cpu, raw_launches, shim = [], [], [], [], []
    for repeat in range(plan.repeats):
        jobs_only.append(raw_create_rate(env, plan, with_secret=False)[0])
        rate, cpu, launch = raw_create_rate(env, plan, with_secret=True)
        pairs.append(rate)
        raw_cpu.append(cpu * MS)
        raw_launches.append(launch)
        shim.append(backlog_run(env, plan.backlog, profile=plan.profile and repeat == 0))
    rates = [run.rate for run in shim]
    ratio = ratios(rates, pairs)
    return [
        Row(f"4. launch throughput, backlog of {plan.backlog} (Jobs/s)", Spread.of(rates).format(),
            f"ceiling, {plan.ceiling_threads} threads of raw creates: Job + payload Secret "
            f"{Spread.of(pairs).format()}, Jobs alone {Spread.of(jobs_only).format()}",
            f"{ratio.format(2)}× (Job + Secret); {ratios(rates, jobs_only).format(2)}× (Jobs alone)",
            "≥ 0.9× the ceiling", verdict(ratio.median >= 0.9)),
        *footprint_rows(shim, plan.backlog, Spread.of(raw_cpu)),
        *cpu_rows([run.launch for run in shim], raw_launches, Spread.of(pairs).median, plan.backlog),
        *[profile_row(run.profile, plan.backlog) for run in shim if run.profile],
    ]


def profile_row(profile: Profile, backlog: int) -> Row:
    return Row(f"4. the shim's Python work while it launches a backlog of {backlog}, by part (py-spy --gil, "
               "ms a task)", profile.describe(backlog), "–", "–", "–", "–")


def raw_create_rate(env: Environment, plan: Plan, with_secret: bool) -> tuple[float, float, Launch]:
    """Jobs/s of ``plan.backlog`` Jobs (and their payload Secrets) created by concurrent threads,
    the client's CPU seconds per Job, and the launch's pace and CPU until all their pods run.

    The client runs in its own process (``bench.rawcreate``) with the shim's identity.
    """
    env.pods.hold = None
    objects = []
    for spec, job in (raw_task(env) for _ in range(plan.backlog)):
        secret = build_secret(spec, RAW_NAMESPACE, job_uid="set-by-rawcreate") if with_secret else None
        objects.append({"job": job, "secret": secret})
    path = env.workdir / "raw-objects.json"
    path.write_text(json.dumps(objects))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with CpuRecorder(cluster_processes(env)) as recorder:
        client = subprocess.Popen([sys.executable, "-m", "bench.rawcreate", str(env.shim_kubeconfig),
                                   str(plan.ceiling_threads), str(path)], env={**os.environ, **env.app_environ})
        recorder.add(CLIENT, client.pid)
        if client.wait():
            raise subprocess.CalledProcessError(client.returncode, client.args)
        names = [pair["job"]["metadata"]["name"] for pair in objects]
        env.jobs.wait_added(names, 60)
        wait_for(lambda: all(name in env.pods.since for name in names), 600, f"{len(names)} raw pods running")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / plan.backlog
    launch = Launch.of_jobs(env, names, recorder)
    env.clear_raw_jobs()
    return launch.jobs_rate, cpu, launch


def cluster_processes(env: Environment) -> dict[str, int]:
    """The processes that share the machine with the client that launches Jobs, by name."""
    processes = {name: env.cluster.processes[name].process.pid
                 for name in ("kube-apiserver", "etcd", "kube-controller-manager")}
    return {**processes, "Redis": env.redis.process.process.pid, BENCH: os.getpid()}


@dataclass
class Launch:
    """A backlog's launch: its pace, and the machine's CPU while Jobs were created at a steady
    rate and from the first Job to the last pod running."""

    jobs_rate: float  # Jobs created a second, between the 5th and 95th percentile of their creation
    pods_rate: float  # pods running a second, likewise
    steady: CpuShare  # between the 5th and 95th percentile of the Jobs' creation, per Job
    whole: CpuShare  # from the first Job created to the last pod running, per task

    @classmethod
    def of(cls, created: list[float], running: list[float], recorder: CpuRecorder) -> Launch:
        start, end, jobs = steady_window(created)
        rate = jobs / (end - start)
        first, last = min(created), max(running)
        return cls(rate, steady_rate(running), recorder.share(start, end, rate),
                   recorder.share(first, last, len(created) / (last - first)))

    @classmethod
    def of_jobs(cls, env: Environment, names: list[str], recorder: CpuRecorder) -> Launch:
        """The launch of the Jobs ``names``, from when the bench saw each created and its pod running."""
        return cls.of([env.jobs.added[name] for name in names], [env.pods.since[name] for name in names], recorder)


def backlog_run(env: Environment, backlog: int, profile: bool = False) -> BacklogRun:
    """A fresh shim: idle usage, a backlog released at once, usage with all of it running, then done.
    With ``profile``, the shim's Python work from the release until all pods run, by part."""
    with Shim(env, max_jobs=backlog, settings=RAISED) as shim, CpuRecorder(cluster_processes(env)) as recorder:
        recorder.add(CLIENT, shim.process.pid)
        run_through(env)
        time.sleep(2.0)
        idle = shim.usage()
        shim.consume(False)
        env.pods.hold = None
        ids = publish(env, backlog)
        sampler = Sampler(shim.process.pid, env.workdir / "backlog-profile.txt").start() if profile else None
        shim.consume(True)
        names = env.jobs.names_of(ids, 600)
        wait_for(lambda: env.pods.held(NAMESPACE) >= backlog, 600, f"{backlog} pods running")
        sampled = sampler.stop() if sampler else None
        time.sleep(2.0)  # the shim takes in the last pod events
        full = shim.usage()
        launch = Launch.of_jobs(env, names, recorder)
        env.pods.finish_all()
        env.events.wait(ids, 600)
        env.jobs.wait_deleted(names, 600)
        done = shim.usage()
    wait_for(lambda: not env.cluster.api.list(collection_path("pods", NAMESPACE))[0], 300,
             "the shim's pods to be gone", interval=1.0)
    return BacklogRun(launch.jobs_rate, idle, full, done, launch, sampled)


def footprint_rows(runs: list[BacklogRun], backlog: int, raw_cpu: Spread) -> list[Row]:
    rss = Spread.of((r.full.rss_kb - r.idle.rss_kb) / backlog for r in runs)
    cpu = Spread.of((r.done.cpu_seconds - r.idle.cpu_seconds) / backlog * MS for r in runs)
    launch = Spread.of((r.full.cpu_seconds - r.idle.cpu_seconds) / backlog * MS for r in runs)
    consumer = Spread.of((r.full.main_thread_cpu_seconds - r.idle.main_thread_cpu_seconds) / backlog * MS
                         for r in runs)
    idle_mb = Spread.of(r.idle.rss_kb / 1024 for r in runs)
    conns = [(r.idle.api_connections, r.full.api_connections, r.done.api_connections) for r in runs]
    bound = LAUNCH_THREADS + 3  # a connection per launch thread, both watches and the sweep
    return [
        Row(f"5. shim memory per in-flight task, {backlog} in flight (KB RSS)", rss.format(),
            f"idle shim {idle_mb.format()} MB", "–", "≤ 20 KB", verdict(rss.median <= 20)),
        Row(f"5. shim CPU per task, launch to clean-up of {backlog} (ms)",
            f"{cpu.format()}, of which launch to running {launch.format()} (Celery's consumer thread "
            f"{consumer.format()})",
            f"the raw-create client: {raw_cpu.format(2)} per Job + Secret", "–", "–", "–"),
        Row(f"5. shim connections to the API server: idle / {backlog} in flight / all done",
            "; ".join(f"{i} / {f} / {d}" for i, f, d in conns),
            f"at most one per launch thread ({LAUNCH_THREADS}), watch (2) and the sweep", "–",
            "no growth with in-flight tasks", verdict(all(full <= bound for _, full, _ in conns))),
    ]


#: The names of the launching process and of the bench's own in :class:`CpuShare`.
CLIENT = "the client"
BENCH = "the bench (process kubelet, watches)"


def cpu_rows(shim: list[Launch], raw: list[Launch], ceiling: float, backlog: int) -> list[Row]:
    """The machine's CPU in the shim's launches and the ceiling's (Job + Secret): a Job while Jobs
    are created at a steady rate, with what the cores leave the shim at 0.9× the ceiling once the
    rest of its runs has had its share; and a task from the first Job to the last pod running."""
    cores = os.cpu_count()
    target_rate = 0.9 * ceiling
    rest = Spread.of(launch.steady.without(CLIENT) for launch in shim)
    budget = budget_per_job(cores, target_rate, rest.median)
    spends = Spread.of(launch.steady.ms_per_job[CLIENT] for launch in shim)
    raw_spends = Spread.of(launch.steady.ms_per_job[CLIENT] for launch in raw)
    pods = Spread.of(launch.pods_rate for launch in shim)
    raw_pods = Spread.of(launch.pods_rate for launch in raw)
    return [
        Row(f"4. the machine's CPU while a backlog of {backlog} launches, between the 5th and 95th "
            f"percentile of the Jobs' creation ({cores} cores; ms a Job, by process)",
            describe_shares([launch.steady for launch in shim], "the shim"),
            f"raw creates of Job + Secret: {describe_shares([launch.steady for launch in raw], 'the raw client')}",
            f"at 0.9× the ceiling ({target_rate:.0f} Jobs/s) {cores} cores give {cores * MS / target_rate:.1f} "
            f"ms a Job; the rest of the shim's runs took {rest.format()}, which leaves the shim {budget:.1f} "
            f"(it spent {spends.format()}, the raw client {raw_spends.format()})",
            "–", "–"),
        Row("4. the same from the first Job created to the last pod running (ms a task, by process; "
            "pods running a second between the 5th and 95th percentile)",
            f"{describe_shares([launch.whole for launch in shim], 'the shim')}; pods running {pods.format()}/s",
            f"raw creates of Job + Secret: {describe_shares([launch.whole for launch in raw], 'the raw client')}; "
            f"pods running {raw_pods.format()}/s",
            f"{ratios([launch.pods_rate for launch in shim], [launch.pods_rate for launch in raw]).format(2)}× "
            "(pods running a second)", "–", "–"),
    ]


def describe_shares(shares: list[CpuShare], client: str) -> str:
    """``the shim 7.9 (7.5–8.1); kube-apiserver 3.2 …; in all 14.5 …, 1.9 … cores busy``."""
    names = sorted(shares[0].ms_per_job, key=lambda name: (name != CLIENT, name == OTHER,
                                                           -shares[0].ms_per_job[name]))
    parts = [f"{client if name == CLIENT else name} "
             f"{Spread.of(share.ms_per_job.get(name, 0.0) for share in shares).format()}" for name in names]
    total = Spread.of(share.total_ms_per_job for share in shares)
    busy = Spread.of(share.cores_busy for share in shares)
    return "; ".join(parts) + f"; in all {total.format()}, {busy.format(2)} cores busy"


# -- 6: pod-side overhead --------------------------------------------------------------------


#: What a pod's process imports before its task can run, cumulatively: Celery and the app (the
#: floor of issue 23), then the app's result backend built (its client library imported).
IMPORT_APP = "import celery, bench.benchapp"
BUILD_BACKEND = IMPORT_APP + "; bench.benchapp.app.backend"


def pod_side(env: Environment, plan: Plan) -> list[Row]:
    """The price of isolation: a no-op in its own pod, against a bare interpreter and prefork."""
    import_celery = [wall([sys.executable, "-c", "import celery"], env)[0] for _ in range(plan.pod_runs + 1)][1:]
    import_app, build_backend, run_task = [], [], []
    for _ in range(plan.pod_runs + 1):  # interleaved; the first of each is not counted
        import_app.append(wall([sys.executable, "-c", IMPORT_APP], env)[0])
        build_backend.append(wall([sys.executable, "-c", BUILD_BACKEND], env)[0])
        run_task.append(run_task_once(env)[0])
    import_app, build_backend, run_task = import_app[1:], build_backend[1:], run_task[1:]
    with prefork_worker(env):
        prefork, prefork_delivery = dispatch_to_result(env, plan.pod_runs, queue="prefork")
    with Shim(env, max_jobs=2):
        shim, shim_delivery = dispatch_to_result(env, plan.pod_runs)
    return [
        Row("6. `k8s-celery run-task`, no-op, payload → result stored (ms, wall)",
            Spread.of(ms(run_task)).format(0),
            f"`python -c '{IMPORT_APP}'` {Spread.of(ms(import_app)).format(0)}; "
            f"`import celery` alone {Spread.of(ms(import_celery)).format(0)}",
            f"{ratios(run_task, import_app).format(2)}×", "–", "–"),
        Row("6. no-op `apply_async` → result (ms)",
            f"k8s-celery, process kubelet: {Spread.of(ms(shim)).format(0)}, of which apply_async → "
            f"task-received {Spread.of(ms(shim_delivery)).format(1)}",
            f"prefork worker (-c 1): {Spread.of(ms(prefork)).format(1)}, of which apply_async → "
            f"task-received {Spread.of(ms(prefork_delivery)).format(1)}",
            f"{ratios(shim, prefork).format(0)}×", "–", "–"),
        process_kubelet_row(shim, import_app, run_task),
        pod_time_row(shim, import_app, build_backend, run_task),
    ]


def process_kubelet_row(shim: list[float], import_app: list[float], run_task: list[float]) -> Row:
    """The no-op through the shim and the process kubelet against its pod's imports run as a
    process (issue 23's floor), by the ratio of the medians (the runs are not interleaved)."""
    shim_ms, floor_ms, runner_ms = (Spread.of(ms(values)) for values in (shim, import_app, run_task))
    ratio = shim_ms.median / floor_ms.median
    return Row("6. no-op `apply_async` → result on the process kubelet, against its pod's command as a process "
               "(ms, p50)", f"{shim_ms.median:.0f}",
               f"`python -c '{IMPORT_APP}'` {floor_ms.median:.0f}; the whole `k8s-celery "
               f"run-task` {runner_ms.median:.0f} ({shim_ms.median / runner_ms.median:.2f}×)",
               f"{ratio:.2f}×", "p50 ≤ 1.3× the imports", verdict(ratio <= 1.3))


def pod_time_row(shim: list[float], import_app: list[float], build_backend: list[float],
                 run_task: list[float]) -> Row:
    """Where the no-op's time on the process kubelet goes beyond its pod's imports, by the
    differences of the medians: building the app's result backend (importing its client
    library), the rest of ``run-task`` (payload, signals, logging, the tracer, the result),
    then the shim and the kubelet around the process. The ratio is against the imports
    with the result backend built, a floor no pod that stores a result goes under."""
    shim_ms, floor_ms, backend_ms, runner_ms = (Spread.of(ms(values)).median
                                                for values in (shim, import_app, build_backend, run_task))
    return Row("6. where the no-op's time on the process kubelet goes (ms, p50)",
               f"imports {floor_ms:.0f}; the result backend built +{backend_ms - floor_ms:.0f}; the rest of "
               f"`run-task` +{runner_ms - backend_ms:.0f}; the shim and the kubelet +{shim_ms - runner_ms:.0f}",
               f"`python -c '{BUILD_BACKEND}'` {backend_ms:.0f}",
               f"{shim_ms / backend_ms:.2f}×", "–", "–")


def wall(argv: list[str], env: Environment, capture: bool = False) -> tuple[float, bytes]:
    """Wall seconds of one run of ``argv`` with the bench app's environment, and its
    output (stdout and stderr, as a container's log has them) if ``capture``."""
    environ = {**env.app_environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    started = time.perf_counter()
    done = subprocess.run(argv, env=environ, check=True, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                          stderr=subprocess.STDOUT)
    return time.perf_counter() - started, done.stdout or b""


def run_task_once(env: Environment, capture: bool = False) -> tuple[float, bytes]:
    """Wall seconds of ``k8s-celery run-task`` of a new no-op task, as a pod runs it (without
    the pod), and its output if ``capture``."""
    spec = no_op_spec(env.app)
    with tempfile.TemporaryDirectory() as directory:
        payload, log = Path(directory) / "payload.json", Path(directory) / "termination-log"
        payload.write_bytes(payload_bytes(spec))
        seconds, output = wall([str(Path(sys.executable).parent / "k8s-celery"), "run-task", "-A",
                                "bench.benchapp", "--payload", str(payload), "--termination-log", str(log)],
                               env, capture)
        result = outcome.decode(log.read_text())
    if result is None or result.state != outcome.SUCCESS:
        raise RuntimeError(f"run-task did not succeed: {result}")
    return seconds, output


def dispatch_to_result(env: Environment, runs: int, **options) -> tuple[list[float], list[float]]:
    """Seconds of ``noop.apply_async(...).get()`` and of apply_async → ``task-received``, one
    task at a time (after one untimed)."""
    noop = env.app.tasks["bench.noop"]
    walls, sent = [], {}
    for _ in range(runs + 1):
        task_id = str(uuid.uuid4())
        sent[task_id], started = time.time(), time.perf_counter()
        noop.apply_async(task_id=task_id, **options).get(timeout=120)
        walls.append(time.perf_counter() - started)
    del sent[next(iter(sent))]
    env.events.wait_received(list(sent), 10)
    return walls[1:], [env.events.received[task_id] - at for task_id, at in sent.items()]


@contextmanager
def prefork_worker(env: Environment) -> Iterator[None]:
    """A stock ``celery worker -P prefork -c 1 -E`` consuming the ``prefork`` queue, logging at
    the shim's level (INFO: Celery logs each task it receives before it sends ``task-received``)."""
    hostname = f"prefork-{uuid.uuid4().hex[:6]}@bench"
    argv = [sys.executable, "-m", "celery", "-A", "bench.benchapp", "worker", "-P", "prefork", "-c", "1", "-E",
            "-Q", "prefork", "-n", hostname, "--without-mingle", "--without-gossip", "-l", "INFO"]
    with open(env.workdir / f"{hostname}.log", "ab") as log:
        environ = {**env.app_environ, "PATH": "/usr/bin:/bin", "C_FORCE_ROOT": "1"}
        process = subprocess.Popen(argv, env=environ, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: env.app.control.ping(destination=[hostname], timeout=0.5), 60, hostname, 0.3)
        yield
    finally:
        process.terminate()
        process.wait(30)
