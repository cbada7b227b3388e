"""The local servers' shared life: start, readiness, errors, stop of the whole group, restart."""

from __future__ import annotations

import os
import time

import pytest

from k8s_celery.testing import wait_until
from k8s_celery.testing.redis import RedisServer
from k8s_celery.testing.server import LocalServer, ServerError


class ShellServer(LocalServer):
    """A "server" made of a shell script; ready once it wrote its ``ready`` file."""

    name = "shell"
    stop_timeout = 2.0

    def __init__(self, script: str):
        super().__init__(startup_timeout=10.0)
        self.script = script

    def command(self) -> list[str]:
        return ["sh", "-c", self.script]

    def ready(self) -> bool:
        return (self.dir / "ready").exists()


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                members.append(int(entry))
    return members


def test_a_server_that_exits_at_start_fails_with_its_log():
    server = ShellServer("echo 'bad configuration line 3'; exit 3")
    with pytest.raises(ServerError) as raised:
        server.__enter__()
    assert "shell exited with 3" in str(raised.value)
    assert "bad configuration line 3" in str(raised.value)
    assert not server.dir.exists()


def test_stop_ends_the_processes_the_server_started_too():
    # The helper ignores SIGTERM, as epmd's and postgres' helpers may outlive a clean stop.
    with ShellServer("(trap '' TERM; sleep 300) & touch ready; exec sleep 300") as server:
        pgid = server.process.process.pid
        time.sleep(0.2)
        assert len(group_members(pgid)) >= 2
        server.stop()
        # SIGKILL is delivered at once but a process ends a moment later.
        wait_until(lambda: group_members(pgid) == [], timeout=10, message="the server's processes to end")
    assert not server.dir.exists()


def test_redis_restart_keeps_what_it_stored():
    with RedisServer() as redis:
        redis.client().set("key", "value")
        port = redis.port
        redis.restart(downtime=0.1)
        assert redis.port == port and redis.client().get("key") == b"value"
