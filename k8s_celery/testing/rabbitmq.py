"""A real RabbitMQ node on free loopback ports, for tests and demos.

:class:`RabbitMQServer` runs Debian's ``rabbitmq-server`` (``apt-get install
rabbitmq-server``) as its own, isolated Erlang node: its own node name, data
(Mnesia) directory, configuration files, log directory, Erlang cookie, AMQP
port, distribution port, management port and its own ``epmd`` on a private port,
all under a temporary directory and bound to 127.0.0.1. Nothing of a system
RabbitMQ (``/etc/rabbitmq``, ``/var/lib/rabbitmq``, port 5672, epmd on 4369) is
read or touched, and :meth:`~RabbitMQServer.stop` ends every process it started::

    with RabbitMQServer(consumer_timeout=10_000, channel_tick_interval=1_000) as rabbit:
        app.conf.broker_url = rabbit.url
        rabbit.ctl("list_queues", "name", "arguments")

``consumer_timeout`` (ms) goes to ``rabbitmq.conf``; ``channel_tick_interval`` (ms;
RabbitMQ's default is 60000) is how often each channel compares its oldest
unacknowledged delivery with that timeout, so it bounds how late the timeout fires.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import urllib3

from .requirements import require_package
from .server import LocalServer, ManagedProcess, ServerError, free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
USER, PASSWORD = "guest", "guest"


class RabbitMQError(ServerError):
    """The RabbitMQ node failed to start, or a ``rabbitmqctl`` call failed."""


class RabbitMQServer(LocalServer):
    """An isolated ``rabbitmq-server`` node in a temporary directory.

    ``management=True`` enables the management plugin (HTTP API on
    :attr:`management_url`, user ``guest``/``guest``); ``advanced`` is a list of
    extra ``{rabbit, [...]}`` entries in Erlang term syntax for ``advanced.config``.
    """

    name = "rabbitmq"
    error = RabbitMQError

    def __init__(self, consumer_timeout: int | None = None, channel_tick_interval: int | None = None,
                 management: bool = True, advanced: list[str] | None = None,
                 startup_timeout: float = 90.0, bin_dir: Path | str = RABBITMQ_BIN):
        self.bin_dir = Path(bin_dir)
        self.server = Path(require_package("rabbitmq-server", str(self.bin_dir / "rabbitmq-server")))
        self.epmd_executable = shutil.which("epmd") or "/usr/bin/epmd"
        super().__init__(startup_timeout)
        self.log_path = self.dir / "log" / "stdout.log"
        self.consumer_timeout = consumer_timeout
        self.channel_tick_interval = channel_tick_interval
        self.management = management
        self.advanced = list(advanced or [])
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.management_port = free_port() if management else None
        self.nodename = f"kc{secrets.token_hex(4)}@localhost"
        self.url = f"amqp://{USER}:{PASSWORD}@127.0.0.1:{self.port}//"
        self.management_url = f"http://127.0.0.1:{self.management_port}" if management else None
        self.epmd: ManagedProcess | None = None
        self._write_files()

    # -- files and environment -----------------------------------------------------------

    def _write_files(self) -> None:
        for sub in ("mnesia", "log", "home"):
            (self.dir / sub).mkdir()
        cookie = self.dir / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        conf = [f"listeners.tcp.default = 127.0.0.1:{self.port}",
                "loopback_users = none",
                "log.console = false", "log.file.level = info",
                # queue counters in the management API refresh every second (default 5 s)
                "collect_statistics_interval = 1000"]
        if self.consumer_timeout is not None:
            conf.append(f"consumer_timeout = {int(self.consumer_timeout)}")
        if self.management:
            conf += [f"management.tcp.port = {self.management_port}", "management.tcp.ip = 127.0.0.1"]
        (self.dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        rabbit = list(self.advanced)
        if self.channel_tick_interval is not None:
            rabbit.append(f"{{channel_tick_interval, {int(self.channel_tick_interval)}}}")
        # The distribution port listens on loopback only.
        (self.dir / "advanced.config").write_text(
            f"[{{kernel, [{{inet_dist_use_interface, {{127,0,0,1}}}}]}},\n"
            f" {{rabbit, [{', '.join(rabbit)}]}}].\n")
        plugins = "[rabbitmq_management]." if self.management else "[]."
        (self.dir / "enabled_plugins").write_text(plugins + "\n")
        (self.dir / "rabbitmq-env.conf").write_text("")  # instead of /etc/rabbitmq/rabbitmq-env.conf

    @property
    def env(self) -> dict[str, str]:
        """The environment of the node and of ``rabbitmqctl`` calls to it."""
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(self.dir / "home"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            # The node must use our epmd, never start its own (which would outlive it).
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-start_epmd false",
            "RABBITMQ_CTL_ERL_ARGS": "-start_epmd false",
        }

    # -- lifecycle -------------------------------------------------------------------------

    def prepare(self) -> None:
        """The node's own epmd, on its private port (kept across restarts)."""
        if self.epmd is None or not self.epmd.alive:
            self.epmd = ManagedProcess("epmd", [self.epmd_executable, "-port", str(self.epmd_port),
                                                "-address", "127.0.0.1"], self.dir / "log" / "epmd.log")
            self.epmd.start()

    def command(self) -> list[str]:
        return [str(self.server)]

    def popen_options(self) -> dict:
        return {"env": self.env}

    def ready(self) -> bool:
        return self._amqp_ready() and (not self.management or self._management_ready())

    def _amqp_ready(self) -> bool:
        import amqp

        connection = amqp.Connection(f"127.0.0.1:{self.port}", userid=USER, password=PASSWORD,
                                     connect_timeout=1)
        connection.connect()
        connection.close()
        return True

    def _management_ready(self) -> bool:
        return self.api("GET", "/api/overview", timeout=2) is not None

    def close(self) -> None:
        """Stop the node and the epmd this server started; remove the directory."""
        self.stop()
        if self.epmd is not None and self.epmd.alive:
            self.epmd.stop_group(timeout=5)
        super().close()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the node's log file (and its stdout, for start-up errors)."""
        texts = []
        for path in sorted((self.dir / "log").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            texts.append(f"== {path.name}\n" + "\n".join(text))
        return "\n".join(texts)

    def log(self) -> str:
        """The node's whole log file."""
        path = self.dir / "log" / f"{self.nodename}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- inspection --------------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl`` against this node; its standard output."""
        done = subprocess.run([str(self.bin_dir / "rabbitmqctl"), "-n", self.nodename, *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RabbitMQError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    def eval(self, expression: str) -> str:
        """Evaluate an Erlang expression in the node (``rabbitmqctl eval``)."""
        return self.ctl("eval", expression).strip()

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 10):
        """Call the management HTTP API; the decoded JSON answer (``None`` for no content)."""
        if not self.management:
            raise RabbitMQError("the management plugin is not enabled")
        headers = urllib3.make_headers(basic_auth=f"{USER}:{PASSWORD}")
        headers["content-type"] = "application/json"
        response = urllib3.PoolManager().request(
            method, f"{self.management_url}{path}", headers=headers, timeout=timeout,
            body=json.dumps(body).encode() if body is not None else None)
        if response.status >= 400:
            raise RabbitMQError(f"{method} {path}: {response.status} {response.data[:500]!r}")
        return json.loads(response.data) if response.data else None

    def queue(self, name: str, vhost: str = "/") -> dict:
        """The management API's view of a queue (messages ready/unacked, consumers, arguments)."""
        from urllib.parse import quote

        return self.api("GET", f"/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}")

    def add_vhost(self, name: str) -> str:
        """Create virtual host ``name`` with full rights for ``guest``; its AMQP URL."""
        from urllib.parse import quote

        vhost = quote(name, safe="")
        self.api("PUT", f"/api/vhosts/{vhost}", {})
        self.api("PUT", f"/api/permissions/{vhost}/{USER}", {"configure": ".*", "write": ".*", "read": ".*"})
        return f"amqp://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{vhost}"

    def delete_vhost(self, name: str) -> None:
        """Delete virtual host ``name`` with its queues and exchanges."""
        from urllib.parse import quote

        self.api("DELETE", f"/api/vhosts/{quote(name, safe='')}")

    def connections(self) -> list[dict]:
        """The client connections the node has open."""
        return self.api("GET", "/api/connections") or []
