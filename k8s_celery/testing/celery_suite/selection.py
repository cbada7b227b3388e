"""Which of Celery's integration tests run, and which are expected to fail and why.

Keys are pytest node ids, or the node id of a class (all its tests) or of a
parametrized test (all its parameters).
"""

from __future__ import annotations

#: Tests left out on the shim, each with why it cannot pass against a pool whose tasks
#: run in other processes: only tests that read the worker process's own state or log
#: records, or write files on the test host, qualify. The prefork baseline runs them.
EXCLUDED: dict[str, str] = {
    "t/integration/test_tasks.py::test_tasks::test_retry":
        "reads state kept in the worker process: t.integration.tasks.retry counts its attempts "
        "in an attribute of the task object (self.attempt), which survives from one retry to the "
        "next only inside one long-lived worker process; each attempt runs in a new pod, so the "
        "count restarts at 0 and the task exhausts max_retries (ExpectedException, not 'bar')",
    "t/integration/test_tasks.py::test_trace_log_arguments":
        "reads log records of the process that runs the task: the celery.app.trace records "
        "(LOG_SUCCESS, LOG_FAILURE) come from Celery's tracer, which runs in the pod and logs to "
        "the pod's output, not to the test process's logging (the worker-side 'received' record "
        "does arrive)",
}

_CAPACITY = ("needs {n} pods within the test's 60 s: with 4 Jobs in flight this 2-core machine ends "
             "about 3.4 pods a second (233 of the 1000 tasks of test_large_group finished within its "
             "60 s, each with its right result), so {n} take about 5 minutes; prefork runs the same "
             "tasks in 4 warm processes")

#: Tests that run, but are expected to fail for a reason that is not the shim's (run as
#: non-strict xfails: reported apart, and an unexpected pass counts as a pass).
KNOWN_FAILURES: dict[str, str] = {
    "t/integration/test_tasks.py::test_tasks::test_revoked_by_headers_complex_canvas":
        "fails on the prefork pool too once Celery's @flaky reruns are off (seen on 5.7.0: "
        "Timeout >20 s on both): a stamped task that a chain or chord sends from the process that "
        "ran the previous step is not discarded by the revoked stamp, runs its 4 s sleep, and the "
        "test's 20 s budget runs out",
    "t/integration/test_canvas.py::test_chord::test_mutable_errback_called_by_chord_from_group_fail_multiple_on_body_failure":
        "expects all 42 errbacks (each a task of its own, queued behind the 42 failing tasks) to "
        "have run within about 1 s of the first one; prefork runs them in milliseconds, the shim "
        "one pod each: 21 of them ran in the 8 s after the first (seen on 5.7.0), every one "
        "called as Celery calls it",
    "t/integration/test_tasks.py::test_task_replacement::test_replaced_task_nesting_level_0":
        "races the session worker on any pool: the test resets its flag (assertion_result = False) "
        "after delay() returns, and the worker's task_received handler, which sets it, runs in the "
        "consumer thread of the same process; when that thread gets there first the reset "
        "overwrites it and the test fails with the right result (seen once in four runs on the "
        "shim under CI load, on 5.7.0: the task was received, ran and returned 6)",
    "t/integration/test_canvas.py::test_group::test_large_group": _CAPACITY.format(n=1000),
    "t/integration/test_canvas.py::test_chord::test_large_header": _CAPACITY.format(n=1001),
    "t/integration/test_canvas.py::test_chord::test_chain_to_a_chord_with_large_header":
        _CAPACITY.format(n=1002),
}

#: What ``--ci`` runs: the largest part measured to fit a CI budget of about 15 minutes
#: on 2 cores (the whole suite takes about 40): test_tasks.py, test_chain and the
#: test_canvas.py classes that do not build large or long canvases. test_group and
#: test_chord hold the 1000-task groups and chords and the minute-long error-callback tests.
CI_SELECTION: tuple[str, ...] = (
    "t/integration/test_tasks.py",
    "t/integration/test_canvas.py::test_chain",
    "t/integration/test_canvas.py::test_link_error",
    "t/integration/test_canvas.py::test_result_set",
    "t/integration/test_canvas.py::test_xmap_xstarmap",
    "t/integration/test_canvas.py::test_signature_serialization",
    "t/integration/test_canvas.py::test_stamping_mechanism",
)


def matches(nodeid: str, listed: dict[str, str]) -> str | None:
    """The reason ``listed`` gives for ``nodeid`` (or for its class or parametrized test)."""
    for prefix, reason in listed.items():
        if nodeid == prefix or nodeid.startswith(prefix + "[") or nodeid.startswith(prefix + "::"):
            return reason
    return None
