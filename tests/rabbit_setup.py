"""RabbitMQ as broker for one end-to-end test: a fresh virtual host, the ``rabbitapp`` test
app loaded for it (results in Redis), the Job manifest and the shim processes."""

from __future__ import annotations

import importlib
import os
import secrets
import sys
from pathlib import Path
from types import ModuleType


from conftest import APPS, Shim, deployment_manifest, stop_all

REPO = Path(__file__).parent.parent


class RabbitSetup:
    """One test's RabbitMQ set-up; :meth:`close` stops its shims and deletes its vhost.

    ``app_env`` (e.g. ``RABBITAPP_QUEUE_TYPE=quorum``) reaches the test process's app,
    the shims and the pods alike, so that all three declare the queues the same way.
    """

    def __init__(self, rabbit, redis_server, cluster, namespace: str, work_dir: Path,
                 app_env: dict[str, str] | None = None):
        self.rabbit, self.redis_server = rabbit, redis_server
        self.cluster, self.namespace, self.work_dir = cluster, namespace, work_dir
        self.vhost = f"t-{secrets.token_hex(4)}"
        self.broker_url = rabbit.add_vhost(self.vhost)
        self.backend_url = f"{redis_server.url}/1"
        redis_server.client(1).flushdb()
        self.env = {"CELERY_BROKER_URL": self.broker_url, "CELERY_RESULT_BACKEND": self.backend_url,
                    **(app_env or {})}
        # Celery lets CELERY_BROKER_URL/CELERY_RESULT_BACKEND override any app's own settings;
        # the session's Redis fixture sets them, so they must name this set-up's while it runs.
        self._saved_env = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        self.manifests = work_dir / "rabbit-manifests"
        self.write_manifest("kubernetes")
        self.app = self.load_app()
        self.shims: list[Shim] = []

    def load_app(self) -> ModuleType:
        """Import ``rabbitapp`` afresh (it reads this set-up's environment at import)."""
        if str(APPS) not in sys.path:
            sys.path.insert(0, str(APPS))
        sys.modules.pop("rabbitapp", None)
        return importlib.import_module("rabbitapp")

    def write_manifest(self, queue: str) -> Path:
        """The queue's Job manifest: the pods get the same broker, backend and app options."""
        return deployment_manifest(self.manifests, queue, "rabbitapp",
                                   {**self.env, "PYTHONPATH": f"{REPO}{os.pathsep}{APPS}"})

    def start_shim(self, wait: bool = True, env: dict | None = None, **options) -> Shim:
        """Start a ``k8s-celery worker -A rabbitapp`` on this vhost; stopped by :meth:`close`."""
        shim = Shim(self.cluster, self.namespace, self.manifests, self.work_dir, self.broker_url,
                    app_name="rabbitapp", env={**self.env, **(env or {})}, **options)
        self.shims.append(shim)
        return shim.start(self.app.app, wait=wait)

    def queue(self, name: str = "kubernetes") -> dict:
        """The management API's view of a queue of this vhost."""
        return self.rabbit.queue(name, vhost=self.vhost)

    def ready(self, name: str = "kubernetes") -> int:
        """Messages ready in a queue of this vhost, as the broker answers a passive declare."""
        from kombu import Connection

        with Connection(self.broker_url) as connection:
            return connection.default_channel.queue_declare(name, passive=True).message_count

    def settled(self, name: str = "kubernetes") -> bool:
        """No message of the queue ready or unacknowledged."""
        queue = self.queue(name)
        return queue.get("messages_ready") == 0 and queue.get("messages_unacknowledged") == 0

    def runs(self, key: str) -> int:
        """How often ``rabbitapp.count(key)`` ran to its end."""
        return int(self.app.store().get(f"runs:{key}") or 0)

    def starts(self, key: str) -> int:
        """How often ``rabbitapp.count(key)`` started."""
        return int(self.app.store().get(f"starts:{key}") or 0)

    def close(self, failed: bool = False) -> None:
        """Stop the shims (printing their logs if the test failed) and delete the vhost."""
        stop_all(self.shims, [], failed)
        try:
            self.rabbit.delete_vhost(self.vhost)
        except Exception as exc:  # the node may have been stopped by the test
            print(f"cannot delete vhost {self.vhost}: {exc}")
        restore_environment(self._saved_env)


def restore_environment(saved: dict[str, str | None]) -> None:
    """Put environment variables back as they were (``None``: unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
