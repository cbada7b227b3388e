"""The pod side: run one task through Celery's own tracer and report the outcome.

``k8s-celery run-task`` reads the payload the shim mounted from the task's Secret,
loads the Celery app, runs the task with :func:`celery.app.trace.trace_task_ret`
(so results, exceptions, retries, chains and chords reach the result backend
exactly as with a normal worker), raises ``SoftTimeLimitExceeded`` inside the task
at the soft limit, and writes the outcome to the termination-message file.

Exit code: 0 when the task succeeded, retried or was ignored; 1 when it failed or
was rejected (so ``kubectl get pods`` shows failed tasks as errors); 2 when the
runner could not run the task at all.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any

from kombu.utils.json import loads as json_loads

from . import outcome as outcomes

log = logging.getLogger("k8s_celery.runner")

DEFAULT_PAYLOAD = "/var/run/k8s-celery/payload.json"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"


def read_payload(path: str) -> dict:
    with open(path, "rb") as handle:
        payload = json_loads(handle.read())
    if not isinstance(payload, dict) or payload.get("version") != 1:
        raise ValueError(f"{path} is not a k8s-celery payload (version 1)")
    payload["body"] = base64.b64decode(payload["body"])
    return payload


def load_app(name: str):
    """Import the Celery app like ``celery -A`` does and finalize its task registry."""
    from celery import signals
    from celery.app.utils import find_app

    sys.path.insert(0, os.getcwd())
    app = find_app(name)
    app.set_current()
    app.set_default()
    # A redelivered message of a task that already succeeded is not run again.
    app.conf.worker_deduplicate_successful_tasks = True
    app.conf.task_acks_late = True
    app.loader.import_default_modules()
    app.finalize(auto=True)
    # Per-process set-up hooks (database connections, ...) expect this signal.
    signals.worker_process_init.send(sender=None)
    return app


def _soft_limit_handler(signum, frame):
    from celery.exceptions import SoftTimeLimitExceeded

    raise SoftTimeLimitExceeded()


def arm_soft_time_limit(seconds: float | None) -> None:
    if seconds:
        signal.signal(signal.SIGALRM, _soft_limit_handler)
        signal.setitimer(signal.ITIMER_REAL, seconds)


def describe(failed: int, retval: Any, runtime: float) -> outcomes.Outcome:
    """Turn the tracer's ``(failed, retval, runtime)`` into an :class:`Outcome`."""
    from celery.exceptions import Ignore, Reject, Retry

    if not failed:
        return outcomes.Outcome(outcomes.SUCCESS, runtime=runtime, result=str(retval))
    exc = retval.exception
    exc = getattr(exc, "exc", exc) if type(exc).__name__ == "ExceptionWithTraceback" else exc
    tb = getattr(retval, "traceback", "") or ""
    if isinstance(exc, Retry):
        original = exc.exc if isinstance(exc.exc, BaseException) else None
        result = outcomes.Outcome(outcomes.RETRY, runtime=runtime, traceback=tb,
                                  result=str(exc.message or ""), when=_when(exc.when))
        if original is not None:
            _set_exception(result, original)
        return result
    if isinstance(exc, Reject):
        result = outcomes.Outcome(outcomes.REJECTED, runtime=runtime, requeue=bool(exc.requeue),
                                  traceback=tb)
        _set_exception(result, exc)
        return result
    if isinstance(exc, Ignore):
        return outcomes.Outcome(outcomes.IGNORED, runtime=runtime)
    result = outcomes.Outcome(outcomes.FAILURE, runtime=runtime, traceback=tb)
    _set_exception(result, exc)
    return result


def _when(when: Any) -> str | None:
    if when is None:
        return None
    return when.isoformat() if hasattr(when, "isoformat") else str(when)


def _set_exception(result: outcomes.Outcome, exc: BaseException) -> None:
    cls = type(exc)
    result.exc_type = cls.__qualname__
    result.exc_module = cls.__module__
    result.exc_args = [a if isinstance(a, (str, int, float, bool, type(None))) else repr(a)
                       for a in exc.args]


def already_succeeded(app, task_id: str) -> outcomes.Outcome | None:
    """The stored success of this task, if the result backend has one.

    Kubernetes may start a second pod for one Job ("the same program may sometimes
    be started twice", say the Job docs), and a message may be redelivered after
    its task succeeded; neither should run the task again.
    """
    backend = app.backend
    if not getattr(backend, "persistent", False):
        return None
    try:
        meta = backend.get_task_meta(task_id)
    except Exception as exc:  # the backend is unreachable: run, as a worker would
        log.warning("cannot read the state of %s from the result backend: %s", task_id, exc)
        return None
    if meta.get("status") != "SUCCESS":
        return None
    from celery.utils.saferepr import saferepr

    return outcomes.Outcome(outcomes.SUCCESS, result=saferepr(meta.get("result")))


def write_outcome(outcome: outcomes.Outcome, path: str) -> None:
    text = outcomes.encode(outcome)
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError as exc:  # the shim then sees a pod without an outcome
        log.error("cannot write the termination message to %s: %s", path, exc)


def run(payload_path: str | None = None, app_name: str | None = None,
        termination_log: str | None = None) -> int:
    """Run the task described by the payload; return the process exit code."""
    payload_path = payload_path or os.environ.get("K8S_CELERY_PAYLOAD", DEFAULT_PAYLOAD)
    termination_log = termination_log or os.environ.get("K8S_CELERY_TERMINATION_LOG",
                                                        DEFAULT_TERMINATION_LOG)
    app_name = app_name or os.environ.get("K8S_CELERY_APP")
    started = time.monotonic()
    try:
        if not app_name:
            raise RuntimeError("no Celery app: pass -A or set K8S_CELERY_APP")
        payload = read_payload(payload_path)
        app = load_app(app_name)
        if payload["task"] not in app.tasks:
            from celery.exceptions import NotRegistered

            raise NotRegistered(payload["task"])
    except Exception as exc:
        log.error("cannot run the task: %s", exc)
        failure = outcomes.Outcome(outcomes.FAILURE, runtime=time.monotonic() - started,
                                   traceback=traceback.format_exc())
        _set_exception(failure, exc)
        write_outcome(failure, termination_log)
        return 2

    from celery.app.trace import trace_task_ret

    done = already_succeeded(app, payload["id"])
    if done is not None:
        log.info("%s[%s] already succeeded; not running it again", payload["task"], payload["id"])
        write_outcome(done, termination_log)
        return 0
    log.info("running %s[%s]", payload["task"], payload["id"])
    arm_soft_time_limit(payload.get("soft_time_limit"))
    try:
        failed, retval, runtime = trace_task_ret(
            payload["task"], payload["id"], payload["request"], payload["body"],
            payload["content_type"], payload["content_encoding"], app=app)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    result = describe(failed, retval, runtime or (time.monotonic() - started))
    write_outcome(result, termination_log)
    log.info("%s[%s] %s in %.3fs", payload["task"], payload["id"], result.state, runtime)
    return 1 if result.state in (outcomes.FAILURE, outcomes.REJECTED) else 0
