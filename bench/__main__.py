"""``python -m bench``: run the benchmark of issue 7 and print its table.

Starts its own Redis and local control plane (the process kubelet in simulation
mode for measurements 1-5, running real pods for 6, a real node for 7 and 9 when
this machine can run one, Kueue's manager for 8) and prints one markdown table: each
figure as the median over the runs with the range in brackets (8: one run).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from k8s_celery.testing.redis import RedisServer
from k8s_celery.testing.requirements import real_node_unavailable

from . import burst, realnode
from .harness import ROOT, environment
from .measure import RAISED, Plan, Row, api_requests, latency, pod_side, throughput
from .output import pod_output
from .queued import queued
from .stats import markdown_table

MEASUREMENTS = {"latency": latency, "requests": api_requests, "throughput": throughput, "output": pod_output}
#: Measurements with an environment of their own: the process kubelet's real pods, a real node
#: (one task at a time, then bursts), a cluster running Kueue.
OWN_ENVIRONMENT = ("pod", "realnode", "burst", "kueue")
ON_THE_REAL_NODE = ("realnode", "burst")


def machine() -> str:
    """``nproc``, CPU model, memory and kernel of this machine."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    memory_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemTotal:")))
    return (f"{os.cpu_count()} CPUs ({model}), {memory_kb / 2**20:.0f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def revision() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(rows: list[Row], plan: Plan, load: float, seconds: float, notes: Sequence[str] = ()) -> str:
    table = markdown_table(["measurement", "k8s-celery", "reference", "ratio", "target", "met"],
                           [(r.measurement, r.shim, r.reference, r.ratio, r.target, r.met) for r in rows])
    return "\n".join([
        f"k8s-celery benchmark, {datetime.date.today()}, commit {revision()}, {seconds / 60:.0f} min",
        f"machine: {machine()}",
        f"load average (1 min) before the run: {load:.2f}, after it: {os.getloadavg()[0]:.2f}",
        f"runs: {plan.repeats} (latency, short-task requests, throughput), {plan.pod_runs} (pod side), "
        f"{plan.node_runs} of {plan.node_samples} rounds (real node); figures are median (min–max) over the runs",
        *notes,
        f"shim settings: defaults, except {', '.join(f'{k}={v}' for k, v in RAISED.items())} "
        "for latency and throughput",
        "", table, ""])


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short run of each (a smoke test)")
    parser.add_argument("--repeats", type=int, help="runs of each measurement (default 3, 1 with --quick)")
    parser.add_argument("--only", action="append", choices=[*MEASUREMENTS, *OWN_ENVIRONMENT],
                        help="run only these measurements (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, audit log)")
    parser.add_argument("--profile", action="store_true",
                        help="throughput: sample the shim with py-spy while it launches the first backlog, "
                             "and add a row of where its CPU goes (needs py-spy)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = Plan.quick() if args.quick else Plan()
    if args.repeats:
        plan.repeats = args.repeats
    plan.profile = args.profile
    chosen = args.only or [*MEASUREMENTS, *OWN_ENVIRONMENT]
    notes: list[str] = []
    if set(ON_THE_REAL_NODE) & set(chosen) and (reason := real_node_unavailable()):
        if args.only:
            print(f"cannot measure on a real node: {reason}", file=sys.stderr)
            return 2
        chosen = [name for name in chosen if name not in ON_THE_REAL_NODE]
        notes.append(f"not measured on a real node (7, 9): {reason}")
    workdir = Path(tempfile.mkdtemp(prefix="k8s-celery-bench-"))
    started, load, rows = time.monotonic(), os.getloadavg()[0], []
    try:
        with RedisServer(persistence=False) as redis:
            if set(chosen) & set(MEASUREMENTS):
                with environment(workdir / "simulated", redis, simulate=True) as env:
                    for name, measure in MEASUREMENTS.items():
                        if name in chosen:
                            print(f"measuring {name} …", file=sys.stderr, flush=True)
                            rows += measure(env, plan)
            if "pod" in chosen:
                print("measuring pod side …", file=sys.stderr, flush=True)
                with environment(workdir / "pods", redis, simulate=False) as env:
                    rows += pod_side(env, plan)
            if "kueue" in chosen:
                print("measuring tasks queued in Kueue …", file=sys.stderr, flush=True)
                with environment(workdir / "kueue", redis, simulate=True, kueue=True) as env:
                    rows += queued(env, plan)
            if set(ON_THE_REAL_NODE) & set(chosen):
                print("measuring on a real node (waits while another real node runs) …", file=sys.stderr,
                      flush=True)
                with realnode.node_environment(workdir / "realnode", redis) as env:
                    if "realnode" in chosen:
                        rows += realnode.measure(env, plan)
                    if "burst" in chosen:
                        rows += burst.measure(env, plan)
    finally:
        if args.keep:
            print(f"work directory: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report(rows, plan, load, time.monotonic() - started, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
