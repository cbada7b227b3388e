"""The pod side: run one task through Celery's own tracer and report the outcome.

``k8s-celery run-task`` reads the payload the shim mounted from the task's Secret,
loads the Celery app, runs the task with :func:`celery.app.trace.trace_task_ret`
(so results, exceptions, retries, chains and chords reach the result backend
exactly as with a normal worker), raises ``SoftTimeLimitExceeded`` inside the task
at the soft limit, and writes the outcome to the termination-message file.

Exit code: 0 when the task succeeded, retried or was ignored; 1 when it failed or
was rejected (so ``kubectl get pods`` shows failed tasks as errors); 2 when the
runner could not run the task at all. Signals are handled as in a prefork pool
process (the runner is PID 1 of its container): SIGTERM ends the task with
``SystemExit`` and no outcome, SIGUSR1 raises ``SoftTimeLimitExceeded``.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from typing import Any

from kombu.utils.json import loads as json_loads

from . import outcome as outcomes
from .manifest import ANNOTATION_PAYLOAD, PAYLOAD_ENV

log = logging.getLogger("k8s_celery.runner")

DEFAULT_PAYLOAD = "/var/run/k8s-celery/payload.json"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"


def read_payload(path: str | None = None) -> dict:
    """The task's payload: from the file ``path`` if given, else from the environment
    variable the kubelet filled from the payload Secret, else from the mounted Secret."""
    if path is None:
        # Out of the environment, so that the task's own subprocesses do not inherit it.
        text = os.environ.pop(PAYLOAD_ENV, None)
        if text == "":
            raise ValueError(f"${PAYLOAD_ENV} is empty: this pod was given no payload (its pod template "
                             f"lacks the annotation {ANNOTATION_PAYLOAD}?)")
        if text is not None:
            return parse_payload(text.encode(), f"${PAYLOAD_ENV}")
        path = os.environ.get("K8S_CELERY_PAYLOAD", DEFAULT_PAYLOAD)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except PermissionError as exc:
        raise PermissionError(f"cannot read the payload {path} as uid {os.getuid()}: it is mounted "
                              "with mode 0440; give the pod securityContext.fsGroup (the Helm chart "
                              "sets 1000) or run it as root") from exc
    return parse_payload(data, path)


def parse_payload(data: bytes, source: str) -> dict:
    payload = json_loads(data)
    if not isinstance(payload, dict) or payload.get("version") != 1:
        raise ValueError(f"{source} is not a k8s-celery payload (version 1)")
    payload["body"] = base64.b64decode(payload["body"])
    return payload


def load_app(name: str):
    """Import the Celery app like ``celery -A`` does and finalize its task registry."""
    from celery.app.utils import find_app

    sys.path.insert(0, os.getcwd())
    app = find_app(name)
    app.set_current()
    app.set_default()
    app.conf.task_acks_late = True
    app.loader.import_default_modules()
    app.finalize(auto=True)
    # A redelivered message of a task that already succeeded is not run again (Celery's
    # tracer asks the result backend; without one it cannot, and would fail the task).
    app.conf.worker_deduplicate_successful_tasks = _has_result_backend(app)
    return app


class PodWorker:
    """Stands in for the worker in the start-up signals a pod sends (``instance``/``sender``).

    A prefork pool process inherits what the worker's parent set up on those signals; the
    pod is a fresh process, so it sends them itself, with the worker's hostname, log level
    and queues (from the payload). It has the attributes handlers commonly read; it is no
    ``WorkController``: it has no consumer, pool or blueprint.
    """

    pool_cls = "celery.concurrency.prefork:TaskPool"

    def __init__(self, app, hostname: str, loglevel: int = logging.INFO, queues: tuple[str, ...] = ()):
        self.app = app
        self.hostname = hostname
        self.loglevel = loglevel
        self.logfile = None
        self.queues = list(queues)
        self.concurrency = 1


#: Where run-task logs until the app's logging is set up (then Celery's handlers take over).
_bootstrap_handler = logging.StreamHandler(sys.stderr)
_bootstrap_handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"))


def bootstrap_logging() -> None:
    """Log to stderr at INFO until :func:`start_worker_process` sets up the app's logging."""
    root = logging.getLogger()
    if _bootstrap_handler not in root.handlers:
        root.addHandler(_bootstrap_handler)
    root.setLevel(logging.INFO)


def start_worker_process(app, worker: dict | None = None) -> PodWorker:
    """Start up as a prefork pool process finds itself when its first task comes.

    What the worker's parent runs, in its order (``import_modules`` already ran when the
    app was loaded): ``celeryd_init``, ``worker_init``, Celery's logging set-up with the
    worker's level and formats (``setup_logging``, or ``after_setup_logger`` and
    ``after_setup_task_logger``), ``celeryd_after_setup``, the stdout redirect
    (``worker_redirect_stdouts``); then what the child runs: ``worker_process_init``.
    ``worker`` is what the worker put in the payload: its hostname, log level and queues.
    """
    from celery import signals

    worker = worker or {}
    hostname = worker.get("hostname") or socket.gethostname()
    loglevel = worker.get("loglevel") or logging.INFO
    instance = PodWorker(app, hostname, loglevel, tuple(worker.get("queues") or ()))
    signals.celeryd_init.send(sender=hostname, instance=instance, conf=app.conf,
                              options={"hostname": hostname, "loglevel": loglevel, "queues": instance.queues})
    signals.worker_init.send(sender=instance)
    logging.getLogger().removeHandler(_bootstrap_handler)
    custom_logging = app.log.setup(loglevel, None, redirect_stdouts=False, hostname=hostname)
    signals.celeryd_after_setup.send(sender=hostname, instance=instance, conf=app.conf)
    if not custom_logging and app.conf.worker_redirect_stdouts:
        app.log.redirect_stdouts(app.conf.worker_redirect_stdouts_level)
    signals.worker_process_init.send(sender=None)
    return instance


def stop_worker_process(exitcode: int) -> None:
    """``worker_process_shutdown``, as a prefork pool process sends it when it exits."""
    from celery import signals

    try:
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=exitcode)
    except Exception:  # the outcome is written already; a failing hook changes nothing
        log.exception("a worker_process_shutdown handler failed")


def _has_result_backend(app) -> bool:
    from celery.backends.base import DisabledBackend

    try:
        return not isinstance(app.backend, DisabledBackend)
    except Exception:  # a backend that cannot even be built fails the task later, as in a worker
        return False


def install_signal_handlers() -> None:
    """Handle signals as a prefork pool process does; needed as PID 1 of a container.

    A container's first process gets no default signal actions (pid_namespaces(7)):
    SIGTERM from a Job deletion would do nothing until the grace period's SIGKILL.
    Like billiard's pool processes: the terminating signals raise ``SystemExit`` in
    the task (its ``finally`` blocks run, no result is stored), SIGUSR1 raises
    ``SoftTimeLimitExceeded`` and SIGINT is ignored.
    """
    from billiard.common import reset_signals
    from billiard.pool import soft_timeout_sighandler

    reset_signals(full=True)
    signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class SoftTimeLimit:
    """Raises ``SoftTimeLimitExceeded`` in the task after ``seconds``, as prefork's parent
    does: by sending this process SIGUSR1 (so the task's own SIGALRM stays its own)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.hit = False
        self._timer: threading.Timer | None = None

    def __enter__(self) -> SoftTimeLimit:
        if self.seconds:
            self._timer = threading.Timer(self.seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _fire(self) -> None:
        self.hit = True
        os.kill(os.getpid(), signal.SIGUSR1)

    def __exit__(self, *exc_info) -> None:
        if self._timer is not None:
            self._timer.cancel()


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


def ended_since(app, task_id: str, launched_at: str | None) -> outcomes.Outcome | None:
    """How this attempt already ended, if the result backend says so since its Job was created.

    * A success: Kubernetes may run a Job's pod twice ("the same program may sometimes be
      started twice", say the Job docs; seen here when the API server restarts during a
      pod's creation). Report the other pod's success instead of running the task again.
    * A revoke: the worker revoked the task while its Job was being created or its pod
      started (the pod may start before the Job's deletion reaches it). Like a prefork
      worker discarding a revoked task, do not run it; ``REVOKED`` stays.

    A state stored before the Job was created belongs to an earlier message that reused
    the task id, and the task runs, as in any Celery worker.
    """
    if not launched_at or not _has_result_backend(app):
        return None
    meta = outcomes.stored_meta(app, task_id, log)  # unreachable: run, as a worker would
    done = meta.get("date_done")
    if meta.get("status") not in ("SUCCESS", "REVOKED") or not done:
        return None
    done = done if isinstance(done, datetime) else datetime.fromisoformat(str(done))
    if done.tzinfo is None:
        done = done.replace(tzinfo=timezone.utc)
    if done < datetime.fromisoformat(launched_at):
        return None
    if meta["status"] == "REVOKED":
        return outcomes.Outcome(outcomes.IGNORED, result="revoked before it started")
    return outcomes.stored_success(meta)


def write_outcome(outcome: outcomes.Outcome, path: str) -> None:
    text = outcomes.encode(outcome)
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError as exc:  # the shim then sees a pod without an outcome
        log.error("cannot write the termination message to %s: %s", path, exc)


def decode_body(app, payload: dict) -> tuple:
    """The task's ``(args, kwargs, embed)`` from the message body, decoded as Celery's tracer
    would in a pool process: kombu's ``DecodeError`` or ``ContentDisallowed`` if it cannot be,
    ``TypeError`` or ``ValueError`` if it is not those three."""
    from kombu.serialization import loads, prepare_accept_content

    args, kwargs, embed = loads(payload["body"], payload["content_type"], payload["content_encoding"],
                                accept=prepare_accept_content(app.conf.accept_content))
    return args, kwargs, embed


def run(payload_path: str | None = None, app_name: str | None = None,
        termination_log: str | None = None) -> int:
    """Run the task described by the payload; return the process exit code."""
    install_signal_handlers()
    bootstrap_logging()
    # A prefork worker logs a task's prints as they come (worker_redirect_stdouts); here
    # stdout is the container's log, block-buffered by default: a print would land after
    # every log line of the task, or be lost with a killed pod.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    termination_log = termination_log or os.environ.get("K8S_CELERY_TERMINATION_LOG",
                                                        DEFAULT_TERMINATION_LOG)
    app_name = app_name or os.environ.get("K8S_CELERY_APP")
    started = time.monotonic()
    try:
        if not app_name:
            raise RuntimeError("no Celery app: pass -A or set K8S_CELERY_APP")
        payload = read_payload(payload_path)
        app = load_app(app_name)
        start_worker_process(app, payload.get("worker"))
        if payload["task"] not in app.tasks:
            from celery.exceptions import NotRegistered

            raise NotRegistered(f"{payload['task']!r} is not registered in the app {app_name!r} this pod "
                                "loads (is the pod's image older than the worker's?)")
        arguments = decode_body(app, payload)
    except Exception as exc:
        # Nothing reached the result backend: the worker stores this failure, as Celery
        # does for a pool process that could not run the task.
        log.error("cannot run the task: %s", exc)
        failure = outcomes.Outcome(outcomes.FAILURE, runtime=time.monotonic() - started,
                                   traceback=traceback.format_exc(), not_run=True)
        _set_exception(failure, exc)
        write_outcome(failure, termination_log)
        return 2

    from celery.app.trace import trace_task_ret

    done = ended_since(app, payload["id"], payload.get("launched_at"))
    if done is not None:
        log.info("%s[%s] %s; not running it", payload["task"], payload["id"],
                 "was revoked" if done.state == outcomes.IGNORED else "succeeded in another pod of this Job")
        write_outcome(done, termination_log)
        stop_worker_process(0)
        return 0
    log.info("running %s[%s]", payload["task"], payload["id"])
    with SoftTimeLimit(payload.get("soft_time_limit")) as soft_limit:
        failed, retval, runtime = trace_task_ret(  # no content type: the arguments are decoded
            payload["task"], payload["id"], payload["request"], arguments, None, None, app=app)
    result = describe(failed, retval, runtime or (time.monotonic() - started))
    result.soft_limit_hit = soft_limit.hit
    write_outcome(result, termination_log)
    # The tracer gives no runtime for a failure: the outcome's is measured here then.
    log.info("%s[%s] %s in %.3fs", payload["task"], payload["id"], result.state, result.runtime)
    exitcode = 1 if result.state in (outcomes.FAILURE, outcomes.REJECTED) else 0
    stop_worker_process(exitcode)
    return exitcode
