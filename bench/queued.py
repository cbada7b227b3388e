"""8: what tasks waiting in Kueue's queue cost the worker (issue 22).

A ClusterQueue with no quota holds every Job of the bench queue suspended: the worker, its
``--max-jobs`` far above the quota, takes in a backlog whose Jobs all wait in Kueue. Measured:
its memory per queued task, its CPU and its API requests while they wait (it should send
none: it learns of admissions from its watches, it polls nothing), then, with the quota
opened, how long the backlog takes to drain, every task succeeding.
"""

from __future__ import annotations

import time

from k8s_celery.testing.kueue import API

from .harness import LOCAL_QUEUE, NAMESPACE, SHIM_USER, Environment, Shim, wait_for
from .measure import MS, RAISED, Plan, Row, publish, split, verdict

CLUSTER_QUEUE = "bench"
#: Who Kueue's manager is to the API server: the local cluster's admin kubeconfig.
KUEUE_USER = "admin"
IDLE_WINDOW = 10.0  # seconds of the idle worker's CPU, the reference for the waiting one's


def cluster_queue(env: Environment, cpus: int) -> None:
    """The bench's ClusterQueue with ``cpus`` CPUs (created at 0) and its LocalQueue."""
    kueue = env.cluster.kueue
    quota = {"coveredResources": ["cpu"], "flavors": [
        {"name": "default", "resources": [{"name": "cpu", "nominalQuota": str(cpus)}]}]}
    kueue.create("resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": "default"}}, exist_ok=True)
    if kueue.create("clusterqueues", {"kind": "ClusterQueue", "metadata": {"name": CLUSTER_QUEUE}, "spec": {
            "namespaceSelector": {}, "resourceGroups": [quota]}}, exist_ok=True) is None:
        env.cluster.api.patch(f"{API}/clusterqueues/{CLUSTER_QUEUE}",
                              {"spec": {"resourceGroups": [quota]}}, strategy="merge-patch")
    kueue.create("localqueues", {"kind": "LocalQueue", "metadata": {"name": LOCAL_QUEUE},
                                 "spec": {"clusterQueue": CLUSTER_QUEUE}}, namespace=NAMESPACE, exist_ok=True)


def suspended_in_pool(env: Environment, shim: Shim) -> int:
    """The Jobs the worker counts as waiting in Kueue (``inspect stats``: ``pool.suspended``)."""
    stats = env.app.control.inspect(destination=[shim.hostname], timeout=5).stats() or {}
    return int(((stats.get(shim.hostname) or {}).get("pool") or {}).get("suspended") or 0)


def queued(env: Environment, plan: Plan) -> list[Row]:
    backlog, window = plan.queued, plan.queued_window
    cluster_queue(env, cpus=0)
    with Shim(env, max_jobs=backlog, settings=RAISED) as shim:
        time.sleep(2.0)
        idle = shim.usage()
        time.sleep(IDLE_WINDOW)
        idle_cpu = (shim.usage().cpu_seconds - idle.cpu_seconds) / IDLE_WINDOW * MS
        start = env.audit.mark()
        ids = publish(env, backlog)
        names = env.jobs.names_of(ids, 600)
        wait_for(lambda: suspended_in_pool(env, shim) >= backlog, 600,
                 f"the worker counting {backlog} Jobs suspended", interval=1.0)
        time.sleep(2.0)  # the last Workload events
        launch = env.audit.count(start, env.audit.mark(), SHIM_USER)
        waiting, quiet_start = shim.usage(), env.audit.mark()
        time.sleep(window)
        quiet = env.audit.count(quiet_start, env.audit.mark(), SHIM_USER)
        waited = shim.usage()

        env.pods.hold = 0.0
        opened, drain_start = time.time(), env.audit.mark()
        cluster_queue(env, cpus=backlog)
        env.events.wait(ids, 900)
        drained = time.time() - opened
        kueue_requests = sum(env.audit.count(drain_start, env.audit.mark(), KUEUE_USER).values())
        succeeded = sum(1 for task_id in ids if task_id in env.events.succeeded)
        env.jobs.wait_deleted(names, 600)
    rss = (waiting.rss_kb - idle.rss_kb) / backlog
    cpu = (waited.cpu_seconds - waiting.cpu_seconds) / window * MS
    requests = sum(quiet.values())
    per_task = {key: n / backlog for key, n in launch.items()}
    title = f"8. {backlog} tasks queued in Kueue (ClusterQueue without quota)"
    return [
        Row(f"{title}: shim memory per queued task (KB RSS)", f"{rss:.1f}",
            f"idle shim {idle.rss_kb / 1024:.0f} MB; a running task: row 5", "–", "≤ 20 KB", verdict(rss <= 20)),
        Row(f"{title}: shim CPU and API requests while they wait {window:g} s",
            f"{cpu:.1f} ms/s; {requests} requests ({split([quiet], 0) or 'none'})",
            f"the idle worker: {idle_cpu:.1f} ms/s; to queue them: {sum(per_task.values()):.2f} requests "
            f"per task ({split([per_task])})", "–",
            "no polling: no request per queued task", verdict(requests <= 0.01 * backlog)),
        Row(f"{title}: the quota opened, all drained (s)",
            f"{drained:.0f} s ({backlog / drained:.1f} tasks/s), {succeeded} of {backlog} succeeded",
            f"the pace of Kueue's admissions; its manager sent {kueue_requests / drained:.1f} requests/s "
            "meanwhile", "–", "every task succeeds, none timed out", verdict(succeeded == backlog)),
    ]
