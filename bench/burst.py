"""Measurement 9: a burst of no-op tasks at once on the real node, against as many bare pods.

On the node and with the image of measurement 7 (:mod:`.realnode`), in turns:

* ``shim``: ``noop.apply_async()`` :attr:`Plan.burst_size` times in a row through
  ``k8s-celery worker --max-jobs`` that many (default settings otherwise); from the first
  ``apply_async`` to the last result stored (the latest ``date_done``), and to the last
  ``.get()`` returned;
* ``floor``: as many bare Jobs of the same image and pod spec, without payload, whose container
  runs ``python3 -c 'import celery, benchapp'`` and prints its end time, created by as many
  threads of the official client as the worker has launch threads; from the first create to
  the last printed end.

Each burst starts once the previous one's pods are gone; the order rotates between runs.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from k8s_celery.config import Settings

from .harness import RAW_NAMESPACE, ROOT, Environment, Shim, wait_for
from .measure import Plan, Row, no_op_spec, verdict
from .realnode import (IMPORT, JOB_TIMEOUT, POD_APP, SHIM, PodWatch, Runner, bare_job, epoch, printed_time,
                       rotation)
from .stats import Spread, ratios


@dataclass
class Burst:
    """One burst, in seconds from its start: when the last pod's work ended (result stored, or
    the bare process's printed end) and, for the shim, when the last ``.get()`` returned."""

    variant: str
    last_end: float
    last_get: float | None = None


def shim_burst(env: Environment, pods: PodWatch, count: int) -> Burst:
    noop = env.app.tasks["bench.noop"]
    started = time.time()
    results = [noop.apply_async() for _ in range(count)]
    for result in results:
        result.get(timeout=JOB_TIMEOUT)
    last_get = time.time() - started
    last_end = max(epoch(env.app.backend.get_task_meta(r.id)["date_done"]) for r in results) - started
    names = env.jobs.names_of([r.id for r in results], 60)
    env.jobs.wait_deleted(names, 120)
    for name in names:
        pods.wait_gone(name)
    return Burst(SHIM, last_end, last_get)


def bare_burst(runner: Runner, count: int, threads: int) -> Burst:
    jobs = [bare_job(runner.template, no_op_spec(runner.env.app), IMPORT) for _ in range(count)]
    names = [job["metadata"]["name"] for job in jobs]
    started = time.time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda job: runner.batch.create_namespaced_job(RAW_NAMESPACE, job), jobs))
    ends = []
    for name in names:
        namespace, pod = runner.pods.pod_of(name, JOB_TIMEOUT)
        wait_for(lambda: printed_time(runner.node.pod_log(namespace, pod)) is not None, JOB_TIMEOUT,
                 f"the end time printed by {pod}", interval=0.2)
        ends.append(printed_time(runner.node.pod_log(namespace, pod)))
    for name in names:
        runner.batch.delete_namespaced_job(name, RAW_NAMESPACE, propagation_policy="Background")
    for name in names:
        runner.pods.wait_gone(name)
    return Burst(IMPORT, max(ends) - started)


def measure(env: Environment, plan: Plan) -> list[Row]:
    """``plan.burst_runs`` bursts of each kind, interleaved."""
    load_before = os.getloadavg()[0]
    threads = Settings().launch_threads
    path = os.pathsep.join([str(ROOT / "bench"), env.app_environ["PYTHONPATH"]])
    bursts: list[Burst] = []
    with PodWatch(env.cluster.api) as pods, Shim(env, max_jobs=plan.burst_size, app=POD_APP,
                                                 settings={"PYTHONPATH": path}):
        runner = Runner(env, pods)
        for index in range(plan.burst_runs):
            for variant in rotation((SHIM, IMPORT), index):
                bursts.append(shim_burst(env, pods, plan.burst_size) if variant == SHIM
                              else bare_burst(runner, plan.burst_size, threads))
                time.sleep(1.0)  # the node settles after the deletions
    return rows(bursts, plan.burst_size, threads, load_before, os.getloadavg()[0])


def rows(bursts: Sequence[Burst], size: int, threads: int, load_before: float, load_after: float) -> list[Row]:
    """The table's row of measurement 9 (seconds; the ratio pairs the bursts run by run)."""
    shim = [b for b in bursts if b.variant == SHIM]
    floor = [b for b in bursts if b.variant == IMPORT]
    ratio = ratios([b.last_end for b in shim], [b.last_end for b in floor])
    return [Row(
        f"9. {size} no-op tasks at once, real node ({len(shim)} burst(s) of each, interleaved; load average "
        f"{load_before:.1f} → {load_after:.1f}) (s)",
        f"all results stored {Spread.of(b.last_end for b in shim).format(2)}; last `.get()` returned "
        f"{Spread.of(b.last_get for b in shim).format(2)} (`--max-jobs {size}`, defaults otherwise)",
        f"{size} bare Jobs of the same image and pod spec running `python3 -c 'import celery, benchapp'`, "
        f"created by {threads} threads of the official client: the last process end "
        f"{Spread.of(b.last_end for b in floor).format(2)}",
        f"{ratio.format(2)}×", "all results ≤ 1.3× the floor", verdict(ratio.median <= 1.3))]
