"""What relaying a task's output (``K8S_CELERY_POD_LOGS``, issue 19) costs the worker.

Every simulated pod writes what a real ``k8s-celery run-task`` of the no-op wrote
(captured once, before the runs), and the process kubelet serves it through
``pods/log`` as it serves a real container's output; so the relay reads, through the
API server, what it would read in production.
"""

from __future__ import annotations

import re
import uuid

from .harness import Environment, Shim, pace
from .measure import MS, RAISED, Plan, Row, count_requests, run_task_once, run_through, split, verdict
from .stats import Spread

#: Every mode, in the order the rows give them.
MODES = ("none", "failed", "all")
#: The relay's header line for a success (``… attempt 1 succeeded; its output:``).
RELAYED = re.compile(r"attempt \d+ succeeded; its output:")


def pod_output(env: Environment, plan: Plan) -> list[Row]:
    """API requests per successful task in each mode, and the shim's CPU per task at the
    highest rate of the plan with every success relayed (``all``) against none."""
    _, env.pods.output = run_task_once(env, capture=True)
    short = plan.task_seconds[0]
    rate, count = plan.rates[-1]
    requests: dict[str, list] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {"none": [], "all": []}
    relayed: list[tuple[int, int]] = []
    for _ in range(plan.repeats):
        for mode in MODES:  # defaults (rate limits included), as row 3
            with Shim(env, max_jobs=plan.request_tasks, settings={"K8S_CELERY_POD_LOGS": mode}):
                run_through(env)
                env.pods.hold = short
                requests[mode].append(count_requests(env, plan.request_tasks, short).per_task)
        for mode in cpu:  # the shim's own speed, as rows 1-2: rate limits lifted
            with Shim(env, max_jobs=200, settings={**RAISED, "K8S_CELERY_POD_LOGS": mode}) as shim:
                env.pods.hold = 0.0
                run_through(env)
                lines_before = relayed_lines(shim)
                cpu[mode].append(cpu_per_task(env, shim, rate, count) * MS)
                if mode == "all":
                    relayed.append((relayed_lines(shim) - lines_before, count))
    return [requests_row(plan, short, requests), cpu_row(rate, count, cpu, relayed, env.pods.output)]


def cpu_per_task(env: Environment, shim: Shim, rate: float, count: int) -> float:
    """CPU seconds of the shim per task, for ``count`` no-ops published at ``rate``, from
    before the first until the last one's Job is deleted (after its log was read)."""
    noop = env.app.tasks["bench.noop"]
    before = shim.usage().cpu_seconds
    ids = []
    for _ in pace(rate, count):
        task_id = str(uuid.uuid4())
        ids.append(task_id)
        noop.apply_async(task_id=task_id)
    env.events.wait(ids, 120)
    env.jobs.wait_deleted(env.jobs.names_of(ids, 60), 120)
    return (shim.usage().cpu_seconds - before) / count


def relayed_lines(shim: Shim) -> int:
    """Successes whose output the shim has written into its log so far."""
    return len(RELAYED.findall(shim.log_path.read_text(errors="replace")))


def requests_row(plan: Plan, seconds: float, runs: dict[str, list]) -> Row:
    totals = {mode: Spread.of(sum(run.values()) for run in per_task) for mode, per_task in runs.items()}
    added = {mode: totals[mode].median - totals["none"].median for mode in MODES}
    return Row(f"3. API requests per successful task by `K8S_CELERY_POD_LOGS`, tasks of {seconds:g} s "
               f"({len(runs['none'])} run(s) of {plan.request_tasks} tasks each)",
               "; ".join(f"{mode} {totals[mode].format(2)}: {split(runs[mode])}" for mode in MODES),
               "–", f"failed {added['failed']:+.2f}, all {added['all']:+.2f} against none",
               "failed (the default): +0 for successes; all: at most +1",
               verdict(abs(added["failed"]) <= 0.01 and added["all"] <= 1.01))


def cpu_row(rate: float, count: int, cpu: dict[str, list[float]], relayed: list[tuple[int, int]],
            output: bytes) -> Row:
    every, none = Spread.of(cpu["all"]), Spread.of(cpu["none"])
    extra = Spread.of(a - n for a, n in zip(cpu["all"], cpu["none"]))
    lines = output.count(b"\n")
    return Row(f"5. shim CPU per task at {rate:g} tasks/s ({count} no-ops a run), each pod's output "
               f"relayed (`all`) against none (ms)",
               f"all {every.format(2)}; successes relayed: "
               f"{', '.join(f'{done} of {total}' for done, total in relayed)}; "
               f"each pod wrote {lines} lines, {len(output)} bytes (a real `run-task` of the no-op)",
               f"none {none.format(2)}",
               f"{extra.median:+.2f} ({extra.low:+.2f}–{extra.high:+.2f}) ms a task "
               f"({extra.median / none.median:+.0%})",
               "–", "–")
