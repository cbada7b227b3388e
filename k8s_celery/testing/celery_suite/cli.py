"""The command line: ``python -m k8s_celery.testing.celery_suite`` (``scripts/celery-suite.sh``).

pytest runs with ``-p celery.contrib.pytest`` (the fixtures Celery's CI gets from the
pytest-celery plugin) and the environment Celery's ``tox.ini`` sets for its integration
runs (``WORKER_LOGLEVEL=INFO``: the trace-log tests need it). The pods get the test
process's ``PYTHONPATH`` after the suite's tree, so ``PYTHONPATH=<other checkout>``
runs the suite against another version of k8s-celery.

The summary line is ``N passed of M (excluded: K)``: M counts the selected tests that
ran to a verdict (not skipped, not xfailed by Celery's own marks; a known failure of
:data:`~.selection.KNOWN_FAILURES` counts as run and not passed), N those that passed
(an xpass of a non-strict xfail counts as passed). ``report.json`` in the work directory
has every test's verdict and duration; ``suite.log`` the worker's log. The exit status is
1 when a test that is not a known failure failed (or errored in set-up or teardown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import NAMESPACE, OPTIONS_ENV, POD_APP, POOLS, SUITE_FILES
from .sdist import celery_version, install_override, suite_root
from .selection import CI_SELECTION, EXCLUDED, KNOWN_FAILURES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="celery-suite", description="Celery's own t/integration suite against k8s-celery or the prefork pool.",
        epilog="Arguments after -- go to pytest.")
    parser.add_argument("--pool", choices=sorted(POOLS), default="kubernetes",
                        help="kubernetes: the shim on LocalCluster (default); prefork: the baseline")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="prefork processes, or the shim's Jobs in flight (default 4)")
    parser.add_argument("--prefetch-multiplier", type=int,
                        help="the worker's prefetch multiplier (default: Celery's, 4)")
    parser.add_argument("--only", action="append", default=[], metavar="FILE_OR_NODEID",
                        help="run only these files (test_tasks.py, test_canvas.py) or node ids; repeatable")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--ci", action="store_true",
                        help="run the part that fits the CI budget (about 15 minutes on 2 cores): "
                             + ", ".join(CI_SELECTION))
    parser.add_argument("--test-timeout", type=float, default=300,
                        help="most seconds per test, set-up and teardown included (default 300, "
                             "as Celery's @flaky; its error-callback chord tests need about 200 s)")
    parser.add_argument("--idle-timeout", type=float, default=90,
                        help="most seconds a test's teardown waits for the worker to be idle (default 90)")
    parser.add_argument("--max-minutes", type=float, default=240,
                        help="stop the whole run after this long (default 240)")
    parser.add_argument("--work-dir", type=Path,
                        help="where the logs and the report go (default: a new temporary directory)")
    parser.add_argument("--list-excluded", action="store_true",
                        help="print the exclusions and the known failures with their reasons, and exit")
    parser.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def selection(args: argparse.Namespace) -> list[str]:
    """The pytest paths (or node ids) to run."""
    chosen = list(CI_SELECTION) if args.ci else []
    for item in args.only:
        chosen.append(item if item.startswith("t/") else f"t/integration/{item}")
    return chosen or [f"t/integration/{name}" for name in SUITE_FILES]


def pytest_command(args: argparse.Namespace, paths: list[str], work_dir: Path) -> list[str]:
    # celery.contrib.pytest: the fixtures Celery's CI gets from the pytest-celery plugin.
    command = [sys.executable, "-m", "pytest", *paths, "-p", "celery.contrib.pytest",
               "-p", "no:rerunfailures", "-p", "no:cacheprovider",
               "-rfE", "--tb=short", "-v",
               f"--junitxml={work_dir / 'junit.xml'}",
               f"--log-file={work_dir / 'suite.log'}", "--log-file-level=INFO",
               "--log-file-format=%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"]
    if args.keyword:
        command += ["-k", args.keyword]
    return command + list(args.pytest_args)


def summarize(report: dict) -> tuple[str, list[tuple[str, str]], bool]:
    """The summary line, the tests that did not pass with their verdicts, and whether
    the run failed. A known failure counts as run and not passed, but does not fail the run."""
    outcomes, known = report["outcomes"], set(report.get("known", ()))
    counted = {nodeid: outcomes.get(nodeid, "not run") for nodeid in report["selected"]}
    ran = {n: v for n, v in counted.items() if v != "skipped" and (v != "xfailed" or n in known)}
    passed = sum(1 for v in ran.values() if v in ("passed", "xpassed"))
    failed = [(n, v) for n, v in ran.items() if v not in ("passed", "xpassed", "xfailed")]
    known_failed = sorted((n, "known failure") for n, v in ran.items() if v == "xfailed")
    skipped = sum(1 for v in counted.values() if v == "skipped")
    xfailed = sum(1 for n, v in counted.items() if v == "xfailed" and n not in known)
    line = f"{passed} passed of {len(ran)} (excluded: {len(report['excluded'])})"
    if known:
        line += f"; known failures {len(known_failed)} of {len(known)}"
    if skipped or xfailed:
        line += f"; skipped {skipped}, xfailed {xfailed} by Celery's own marks"
    return line, failed + known_failed, bool(failed)


def run(args: argparse.Namespace) -> int:
    from ..redis import RedisServer

    version = celery_version()
    root = suite_root(version)
    install_override(root)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix=f"celery-suite-{args.pool}-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = selection(args)
    report_path = work_dir / "report.json"
    report_path.unlink(missing_ok=True)
    print(f"celery-suite: Celery {version} t/integration from {root}; pool {args.pool}, "
          f"concurrency {args.concurrency}; logs in {work_dir}", flush=True)
    options = {"pool": args.pool, "concurrency": args.concurrency,
               "prefetch_multiplier": args.prefetch_multiplier, "test_timeout": args.test_timeout,
               "idle_timeout": args.idle_timeout, "report": str(report_path), "suite_root": str(root)}
    started = time.monotonic()
    with RedisServer(persistence=False) as redis:
        # As Celery's tox.ini sets for its integration runs (the trace-log tests need INFO).
        env = {**os.environ, "WORKER_LOGLEVEL": "INFO", "PYTHONIOENCODING": "UTF-8", "PYTHONUNBUFFERED": "1",
               "TEST_BROKER": redis.url, "TEST_BACKEND": redis.url,
               "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis.port), "C_FORCE_ROOT": "1"}
        if args.pool == "kubernetes":
            status = _run_on_cluster(args, paths, work_dir, root, env, options)
        else:
            status = _run_pytest(args, paths, work_dir, root, env, options)
    minutes = (time.monotonic() - started) / 60
    if not report_path.exists():
        print(f"celery-suite: pytest ended with status {status} and no report; see {work_dir}/pytest.log")
        return 1
    line, failed, bad = summarize(json.loads(report_path.read_text()))
    for nodeid, verdict in failed:
        print(f"  {verdict.upper()}: {nodeid}")
    print(f"celery-suite ({args.pool}, {minutes:.1f} min): {line}", flush=True)
    return 1 if bad or status not in (0, 1, 5) else 0


def _run_on_cluster(args, paths, work_dir: Path, root: Path, env: dict, options: dict) -> int:
    from ..cluster import LocalCluster

    with LocalCluster() as cluster:
        cluster.create_namespace(NAMESPACE)
        manifests = work_dir / "manifests"
        env.update({"K8S_CELERY_APP": POD_APP, "K8S_CELERY_MANIFESTS_DIR": str(manifests),
                    "K8S_CELERY_NAMESPACE": NAMESPACE, "K8S_CELERY_KUBECONFIG": str(cluster.kubeconfig),
                    "K8S_CELERY_PENDING_TIMEOUT": env.get("K8S_CELERY_PENDING_TIMEOUT", "60")})
        return _run_pytest(args, paths, work_dir, root, env, options)


def _run_pytest(args, paths, work_dir: Path, root: Path, env: dict, options: dict) -> int:
    env[OPTIONS_ENV] = json.dumps(options)
    command = pytest_command(args, paths, work_dir)
    with open(work_dir / "pytest.log", "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        tee = threading.Thread(target=_tee, args=(process.stdout, log), daemon=True)
        tee.start()
        try:
            status = process.wait(timeout=args.max_minutes * 60)
        except subprocess.TimeoutExpired:
            print(f"celery-suite: stopping pytest after {args.max_minutes:.0f} minutes", flush=True)
            os.killpg(process.pid, 15)
            status = process.wait()
        tee.join(10)
    return status


def _tee(stream, log) -> None:
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()
        sys.stdout.buffer.write(line)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the suite; print the summary; return the exit status."""
    args = parse_args(argv)
    if args.list_excluded:
        for title, listed in (("Excluded on the shim", EXCLUDED), ("Known failures", KNOWN_FAILURES)):
            print(f"{title}:")
            for nodeid, reason in listed.items():
                print(f"  {nodeid}\n      {reason}")
        return 0
    return run(args)
