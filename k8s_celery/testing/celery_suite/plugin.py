"""What the override block of Celery's ``t/integration/conftest.py`` wires in, and the
app the pods load.

* :func:`worker_pool`: ``prefork``, or ``k8s_celery.pool:KubernetesPool``, in which
  case it first writes the Job manifest of every queue the session app has (Celery's
  ``ZZZZ_set_app_current`` fixture fails any test that adds one: only ``celery``).
  The pods load :data:`app` of this module (``K8S_CELERY_APP``), which rebuilds the
  suite's app from the settings, task modules and class tasks the fixtures gave,
  passed in the Job's environment.
* :func:`worker_parameters`: the pool's concurrency; everything else is Celery's
  default (prefetch multiplier 4, no task events), as for the prefork baseline.
* :func:`bounded_manager`: Celery's ``manager`` fixture, whose teardown
  (``wait_until_idle``) loops until ``inspect active`` is empty with no limit; here it
  gives up after ``--idle-timeout`` seconds, fails that test's teardown naming the
  stuck tasks, and ignores those tasks in later teardowns, so that one stuck entry
  costs one error instead of hanging the run. It asks the session worker by name, so
  that each ``inspect active`` returns with its reply instead of after the 1 s that a
  broadcast to whoever answers waits (165 teardowns in the CI selection).
* :func:`collection_modifyitems`: deselects :data:`~.selection.EXCLUDED` and marks
  :data:`~.selection.KNOWN_FAILURES` as non-strict xfails (on the shim only), and caps
  every test's pytest-timeout at ``--test-timeout``.
* :func:`runtest_setup`: collects garbage before each test (see there).
* :func:`runtest_logstart`, :func:`runtest_logreport`, :func:`sessionfinish`: mark each
  test's start in the log file; keep one verdict per test in ``report.json``, written
  as the run goes.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from pathlib import Path

from . import APP_SPEC_ENV, OPTIONS_ENV, POOLS
from .selection import EXCLUDED, KNOWN_FAILURES, matches

# -- the app the pods load -----------------------------------------------------------------

_pod_app = None
_pod_app_lock = threading.Lock()


def __getattr__(name: str):
    # ``K8S_CELERY_APP=k8s_celery.testing.celery_suite:app``: built on first use, in the pod.
    if name == "app":
        global _pod_app
        with _pod_app_lock:
            if _pod_app is None:
                _pod_app = build_app(json.loads(os.environ[APP_SPEC_ENV]))
        return _pod_app
    raise AttributeError(name)


def build_app(spec: dict):
    """The suite's session app, as ``celery.contrib.pytest`` builds it, from ``spec``:
    ``config`` (the ``celery_config`` fixture), ``includes`` (``celery_includes``) and
    ``class_tasks`` (``celery_class_tasks``, as ``module:qualname``)."""
    from celery.contrib.testing.app import TestApp
    from kombu.utils.imports import symbol_by_name

    app = TestApp(config=spec["config"], enable_logging=True)
    for module in spec["includes"]:
        app.loader.import_task_module(module)
    for name in spec["class_tasks"]:
        app.register_task(symbol_by_name(name))
    return app


# -- what the appended conftest wires in ---------------------------------------------------

def _options() -> dict:
    return json.loads(os.environ.get(OPTIONS_ENV) or "{}")


def worker_pool(celery_session_app, celery_config, celery_includes, celery_class_tasks):
    """The session worker's pool; for the shim, write its queues' Job manifests first."""
    options = _options()
    pool = POOLS[options.get("pool", "prefork")]
    if options.get("pool") == "kubernetes":
        # The pool's own lines (launches, outcomes) go to the run's log file, whatever
        # level the embedded worker sets for Celery's loggers.
        logging.getLogger("k8s_celery").setLevel(logging.INFO)
        spec = {"config": celery_config, "includes": sorted(celery_includes),
                "class_tasks": [f"{cls.__module__}:{cls.__qualname__}" for cls in celery_class_tasks]}
        for queue in sorted(celery_session_app.amqp.queues):
            write_manifest(Path(os.environ["K8S_CELERY_MANIFESTS_DIR"]), queue, spec, options["suite_root"])
    return pool


def worker_parameters():
    """The session worker's options: only the concurrency differs from Celery's defaults
    (and the prefetch multiplier when asked), so that the pool is the one variable."""
    options = _options()
    parameters = {"concurrency": options.get("concurrency", 4)}
    if options.get("prefetch_multiplier"):
        parameters["prefetch_multiplier"] = options["prefetch_multiplier"]
    if options.get("pool") == "kubernetes":
        # start_worker's default of 10 s is shorter than the pool's drain on shutdown.
        parameters["shutdown_timeout"] = float(os.environ.get("K8S_CELERY_DRAIN_TIMEOUT", 20)) + 10
    return parameters


_stuck: set[str] = set()


def bounded_manager(app, celery_session_worker):
    """Celery's ``manager`` fixture with a bounded ``wait_until_idle`` in its teardown."""
    from celery.contrib.testing.manager import Manager

    manager = Manager(app)
    yield manager
    wait_until_idle(manager, float(_options().get("idle_timeout", 90)), celery_session_worker.hostname)


def wait_until_idle(manager, timeout: float, worker: str) -> None:
    """``Manager.wait_until_idle`` that gives up after ``timeout`` seconds.

    Purges the queue, then waits until ``inspect active`` of ``worker`` lists no task
    but those already reported stuck; raises ``AssertionError`` with the tasks still active
    (and remembers them) when the time is up.
    """
    from kombu.exceptions import ContentDisallowed

    control = manager.app.control
    deadline = time.monotonic() + timeout
    with manager.app.connection() as connection:
        while control.purge(connection=connection):
            pass
        inspect = control.inspect(timeout=1.0, destination=[worker])
        inspect.connection = connection
        while True:
            try:
                replies = inspect.active() or {}
            except ContentDisallowed:  # as Celery's own loop: test_security_task_done
                return
            active = {task["id"]: task for tasks in replies.values() for task in tasks
                      if task["id"] not in _stuck}
            if not active:
                return
            if time.monotonic() > deadline:
                _stuck.update(active)
                described = ", ".join(f"{t.get('name')}[{t['id']}] (worker_pid {t.get('worker_pid')})"
                                      for t in active.values())
                raise AssertionError(f"worker still busy {timeout:.0f}s after the test: {described}")
            time.sleep(0.2)


def collection_modifyitems(session, config, items):
    """On the shim, deselect :data:`EXCLUDED` and mark :data:`KNOWN_FAILURES` as
    non-strict xfails (the prefork baseline runs them all as they are); cap every
    test's timeout; record what was selected."""
    import pytest

    options = _options()
    on_shim = options.get("pool") == "kubernetes"
    cap = float(options.get("test_timeout", 0))
    excluded = [item for item in items if on_shim and matches(item.nodeid, EXCLUDED)]
    if excluded:
        config.hook.pytest_deselected(items=excluded)
        items[:] = [item for item in items if item not in excluded]
    for item in items:
        reason = matches(item.nodeid, KNOWN_FAILURES) if on_shim else None
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
        if cap:
            marker = item.get_closest_marker("timeout")
            current = float(marker.args[0] if marker and marker.args else
                            (marker.kwargs.get("timeout", 0) if marker else 0)) or cap
            item.add_marker(pytest.mark.timeout(min(current, cap)), append=False)
    _report["selected"] = [item.nodeid for item in items]
    _report["excluded"] = [item.nodeid for item in excluded]
    _report["known"] = [item.nodeid for item in items if on_shim and matches(item.nodeid, KNOWN_FAILURES)]
    _write_report()


_report: dict = {"selected": [], "excluded": [], "known": [], "outcomes": {}, "durations": {}}


def runtest_logstart(nodeid, location):
    """Mark each test's start in the run's log file, to tell which lines belong to it."""
    logging.getLogger("celery_suite").warning("==== %s", nodeid)


def runtest_setup(item):
    """Collect garbage before each test (both pools alike): an ``AsyncResult`` an earlier
    test left in a reference cycle unsubscribes from its Redis channel when collected, and
    the ``*_cancels_subscription`` tests compare the channels before and during the test,
    so a collection in between fails them (Celery's CI absorbs that with its reruns)."""
    gc.collect()


def runtest_logreport(report):
    """Keep one verdict per test: a failure in any phase wins; xfail and skip are kept apart."""
    if not getattr(report, "context", None):  # a subtest's time is part of its test's call
        _report["durations"][report.nodeid] = _report["durations"].get(report.nodeid, 0.0) + report.duration
    verdict = _verdict(report)
    outcomes = _report["outcomes"]
    if verdict and outcomes.get(report.nodeid, "passed") in ("passed", "skipped", "xfailed", "xpassed"):
        outcomes[report.nodeid] = verdict
    if report.when == "teardown":
        _write_report()  # as it goes: a run stopped midway still tells what it did


def _verdict(report) -> str | None:
    if hasattr(report, "wasxfail"):
        return "xpassed" if report.passed else "xfailed"
    if report.failed:
        return "failed" if report.when == "call" else f"error in {report.when}"
    if report.skipped:
        return "skipped"
    return "passed" if report.when == "call" else None


def sessionfinish(session, exitstatus):
    _write_report()


def _write_report() -> None:
    path = _options().get("report")
    if path:
        Path(path + ".tmp").write_text(json.dumps(_report, indent=1))
        os.replace(path + ".tmp", path)


# -- the Job manifest ----------------------------------------------------------------------

def write_manifest(directory: Path, queue: str, spec: dict, root: str) -> Path:
    """The Job manifest of ``queue``: the pods run on this machine's filesystem (process
    kubelet), so they need the suite's tree on ``PYTHONPATH`` (before the test process's
    own, which may point at another checkout of k8s-celery) and its app spec, Redis and
    broker settings in their environment."""
    import yaml

    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {APP_SPEC_ENV: json.dumps(spec), "PYTHONPATH": path}
    for name in ("TEST_BROKER", "TEST_BACKEND", "REDIS_HOST", "REDIS_PORT"):
        if name in os.environ:
            env[name] = os.environ[name]
    manifest = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"labels": {"app": "celery-suite"}},
        "spec": {"template": {"spec": {"containers": [{
            "name": "task", "image": "celery-suite:local",
            "env": [{"name": key, "value": value} for key, value in env.items()],
        }]}}},
    }
    path = directory / queue / "manifest.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest))
    return path
