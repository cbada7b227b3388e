"""A real Redis server on a free loopback port, for tests and demos."""

from __future__ import annotations

import redis

from .requirements import require_executable
from .server import LocalServer, free_port


class RedisServer(LocalServer):
    """``redis-server`` in a temporary directory; ``persistence=True`` keeps an AOF
    so that :meth:`restart` loses nothing, as a production broker would."""

    name = "redis"
    stop_timeout = 5.0

    def __init__(self, persistence: bool = True, port: int | None = None,
                 executable: str | None = None, bind: tuple[str, ...] = ("127.0.0.1",)):
        self.executable = executable or require_executable("redis-server", "redis-server")
        super().__init__(startup_timeout=20.0)
        self.port = port or free_port()
        self.persistence = persistence
        #: Addresses it listens on, after restarts too (pods of a real node reach its address).
        self.bind = bind
        self.url = f"redis://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        argv = [self.executable, "--port", str(self.port), "--bind", " ".join(self.bind),
                "--dir", str(self.dir), "--save", "", "--protected-mode", "no"]
        if self.persistence:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        return argv

    def ready(self) -> bool:
        return bool(self.client().ping())

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db)
