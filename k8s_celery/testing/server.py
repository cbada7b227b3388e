"""What the local servers share: a process with its log, and a server's life in a
temporary directory of its own.

:class:`LocalServer` is the base of :class:`~k8s_celery.testing.RedisServer`,
:class:`~k8s_celery.testing.RabbitMQServer` and :class:`~k8s_celery.testing.PostgresServer`:
each says how its process is started (:meth:`LocalServer.command`) and when it answers
(:meth:`LocalServer.ready`); starting, waiting, stopping (its whole process group),
restarting on the same ports with the same data, and removing the directory are here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ManagedProcess:
    """A process in a session of its own, its output appended to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, **popen_options) -> None:
        """Start it; ``popen_options`` (``env``, ``cwd``, ``user``…) go to :class:`subprocess.Popen`."""
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, start_new_session=True, **popen_options)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process; SIGKILL it after ``timeout`` seconds."""
        if not self.alive:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def stop_group(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Send ``signum`` to the process's whole session; SIGKILL what is left after
        ``timeout`` seconds (helpers it started, which would outlive it)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ServerError(RuntimeError):
    """A local server failed to start or to become ready."""


class LocalServer:
    """A server for tests and demos in a temporary directory of its own (:attr:`dir`).

    A context manager: on exit the server is stopped and its directory removed.
    Subclasses set :attr:`name` and :attr:`error`, give :meth:`command` and
    :meth:`ready`, and may give :meth:`prepare` (before each start) and
    :meth:`popen_options`.
    """

    name = "server"
    error: type[Exception] = ServerError
    #: The signal that stops the server cleanly, and how long it gets before SIGKILL.
    stop_signal = signal.SIGTERM
    stop_timeout = 20.0

    def __init__(self, startup_timeout: float = 60.0):
        self.startup_timeout = startup_timeout
        self.dir = Path(tempfile.mkdtemp(prefix=f"k8s-celery-{self.name}-"))
        self.log_path = self.dir / f"{self.name}.log"
        self.process: ManagedProcess | None = None

    # -- what each server says -----------------------------------------------------------

    def command(self) -> list[str]:
        """The server's argv."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the server answers (an exception counts as not yet)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Before each start (data directories, helper processes)."""

    def popen_options(self) -> dict:
        """More :class:`subprocess.Popen` options for the server's process."""
        return {}

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self):
        """Start the server and return once it answers."""
        self.prepare()
        self.process = ManagedProcess(self.name, self.command(), self.log_path)
        self.process.start(cwd=self.dir, **self.popen_options())
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        problem = ""
        while True:
            try:
                if self.ready():
                    return
            except Exception as exc:
                problem = f": {exc}"
            if not self.process.alive:
                raise self.error(f"{self.name} exited with {self.process.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise self.error(f"{self.name} not ready after {self.startup_timeout:.0f}s{problem}\n"
                                 f"{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (and whatever it started)."""
        if self.process is not None and self.process.alive:
            self.process.stop_group(self.stop_signal, self.stop_timeout)

    def restart(self, downtime: float = 0.0) -> None:
        """Stop the server and start it again on the same ports with the same data."""
        self.stop()
        time.sleep(downtime)
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log."""
        return self.process.log_tail(lines) if self.process else ""
