"""A real Redis server on a free loopback port, for tests and demos."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import redis

from .cluster import ManagedProcess, free_port


class RedisServer:
    """``redis-server`` in a temporary directory; ``persistence=True`` keeps an AOF
    so that :meth:`restart` loses nothing, as a production broker would."""

    def __init__(self, persistence: bool = True, port: int | None = None,
                 executable: str | None = None):
        self.port = port or free_port()
        self.persistence = persistence
        self.executable = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.dir = Path(tempfile.mkdtemp(prefix="k8s-celery-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}"
        self.process: ManagedProcess | None = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self) -> RedisServer:
        argv = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--protected-mode", "no"]
        if self.persistence:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        self.process = ManagedProcess("redis", argv, self.dir / "redis.log")
        self.process.start()
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or not self.process.alive:
                    raise RuntimeError(f"redis-server did not start:\n{self.process.log_tail()}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process:
            self.process.stop(timeout=5)

    def restart(self, downtime: float = 0.0) -> None:
        self.stop()
        time.sleep(downtime)
        self.start()

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db)
