"""Nautobot (from PyPI) for one end-to-end test: its own PostgreSQL database copied from a
migrated template, Redis as broker and cache, the test Jobs in ``NAUTOBOT_ROOT/jobs``, and
the workers a Nautobot deployment runs. The test process never imports Nautobot: it asks
``nautobot_actions.py`` to enqueue Jobs as Nautobot's UI does and reads what Nautobot
wrote with SQL."""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path


from conftest import Shim, deployment_manifest
from django_setup import close_deployment
from k8s_celery.testing import wait_until
from k8s_celery.testing.binaries import cache_root
from k8s_celery.testing.postgres import SUPERUSER

HERE = Path(__file__).parent
VERSION = importlib.metadata.version("nautobot")
TEMPLATE = "nautobot_template"
#: The Celery queue of the tests' Celery-type JobQueue, consumed by k8s-celery.
QUEUE = "k8s-jobs"
BIN = Path(sys.executable).parent
FINAL = ("SUCCESS", "FAILURE", "REVOKED")


def environment(postgres, redis_server, database: str, root: Path) -> dict[str, str]:
    """The variables Nautobot's processes (web, workers, pods) read their settings from."""
    host, port = redis_server.url.rsplit("//", 1)[1].rsplit(":", 1)
    return {"NAUTOBOT_CONFIG": str(HERE / "nautobot_config.py"), "NAUTOBOT_ROOT": str(root),
            "NAUTOBOT_DB_HOST": postgres.host, "NAUTOBOT_DB_PORT": str(postgres.port),
            "NAUTOBOT_DB_USER": SUPERUSER, "NAUTOBOT_DB_NAME": database,
            "NAUTOBOT_REDIS_HOST": host, "NAUTOBOT_REDIS_PORT": port,
            "NAUTOBOT_SECRET_KEY": "k8s-celery-tests-" + "x" * 40,
            # Celery lets these variables override any app's settings; other fixtures set them.
            "CELERY_BROKER_URL": f"{redis_server.url}/0",
            "CELERY_RESULT_BACKEND": "nautobot.core.celery.backends.NautobotDatabaseBackend"}


def nautobot_root(directory: Path) -> Path:
    """A NAUTOBOT_ROOT whose ``jobs`` are the tests' Jobs."""
    directory.mkdir(parents=True, exist_ok=True)
    jobs = directory / "jobs"
    if not jobs.exists():
        jobs.symlink_to(HERE / "jobs")
    return directory


def run(argv: list, env: dict[str, str], timeout: float = 900) -> str:
    done = subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed:\n{done.stdout[-5000:]}\n{done.stderr[-5000:]}")
    return done.stdout


def migrated_template(postgres, redis_server, work_dir: Path) -> str:
    """Create the template database: Nautobot's schema from the cached dump of this Nautobot
    version (made by ``nautobot-server migrate`` the first time, about 3 minutes), then
    ``migrate`` again (it registers the test Jobs), a superuser and the test Jobs enabled."""
    postgres.create_database(TEMPLATE)
    env = environment(postgres, redis_server, TEMPLATE, nautobot_root(work_dir / "root"))
    dump = cache_root() / f"nautobot-{VERSION}" / "migrated.dump"
    dsn = postgres.dsn(TEMPLATE)
    if dump.exists():
        run([postgres.bin_dir / "pg_restore", "--no-owner", "--exit-on-error", "-d", dsn, dump], env)
    run([BIN / "nautobot-server", "migrate", "--noinput"], env)
    if not dump.exists():
        dump.parent.mkdir(parents=True, exist_ok=True)
        partial = dump.with_suffix(".partial")
        run([postgres.bin_dir / "pg_dump", "-Fc", "-f", partial, dsn], env)
        partial.rename(dump)
    enabled = json.loads(run([sys.executable, HERE / "nautobot_actions.py", "prepare"], env).splitlines()[-1])
    assert enabled == ["Broken", "LogAndReturn", "Sleeper"], enabled
    return TEMPLATE


class NautobotSetup:
    """One test's Nautobot; :meth:`close` stops its processes and drops its database."""

    def __init__(self, template: str, postgres, redis_server, cluster, namespace: str, work_dir: Path):
        self.postgres, self.cluster, self.namespace, self.work_dir = postgres, cluster, namespace, work_dir
        self.db = f"nautobot_{secrets.token_hex(4)}"
        postgres.execute(f'CREATE DATABASE "{self.db}" TEMPLATE "{template}"')
        for db in (0, 1):  # broker, cache
            redis_server.client(db).flushdb()
        self.env = environment(postgres, redis_server, self.db, nautobot_root(work_dir / "root"))
        self._saved_env = {key: os.environ.get(key) for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")}
        os.environ.update({key: self.env[key] for key in self._saved_env})
        self.manifests = work_dir / "nautobot-manifests"
        self.write_manifest(QUEUE)
        self.shims: list[Shim] = []
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []

    # -- Nautobot ----------------------------------------------------------------------

    def enqueue(self, job: str, queue: str = QUEUE, **kwargs) -> str:
        """``JobResult.enqueue_job`` of a test Job on the Celery JobQueue ``queue``; its JobResult id."""
        out = run([sys.executable, HERE / "nautobot_actions.py", "enqueue", job, queue, json.dumps(kwargs)],
                  self.env, timeout=120)
        return out.strip().splitlines()[-1]

    def schedule(self, job: str, seconds: int, queue: str = QUEUE, **kwargs) -> str:
        """Schedule a test Job to run once, ``seconds`` from now, as Nautobot's UI does; the
        ScheduledJob's id (Nautobot's Beat sends it: :meth:`start_beat`)."""
        out = run([sys.executable, HERE / "nautobot_actions.py", "schedule", job, queue, str(seconds),
                   json.dumps(kwargs)], self.env, timeout=120)
        return out.strip().splitlines()[-1]

    def cancel(self, result_id: str) -> dict:
        """Cancel a JobResult as Nautobot's UI and API do; what Nautobot answered."""
        out = run([sys.executable, HERE / "nautobot_actions.py", "cancel", result_id], self.env, timeout=120)
        return json.loads(out.strip().splitlines()[-1])

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        return self.postgres.execute(query, params, dbname=self.db)

    def job_result(self, result_id: str, states=FINAL, timeout: float = 120) -> dict:
        """The JobResult once its status is one of ``states``."""
        columns = ("status", "result", "traceback", "worker", "date_started", "date_done")

        def read():
            rows = self.sql(f"SELECT {', '.join(columns)} FROM extras_jobresult WHERE id = %s", (result_id,))
            found = dict(zip(columns, rows[0])) if rows else None
            return found if found and found["status"] in states else None
        return wait_until(read, timeout=timeout, interval=0.3,
                          message=lambda: f"JobResult {result_id} in {states}: {self._status(result_id)}")

    def _status(self, result_id: str) -> str:
        rows = self.sql("SELECT status FROM extras_jobresult WHERE id = %s", (result_id,))
        return rows[0][0] if rows else "no row"

    def log_entries(self, result_id: str) -> list[tuple[str, str, str]]:
        """``(level, message, log_object)`` of the JobResult's JobLogEntry rows, oldest first."""
        return [tuple(row) for row in self.sql(
            "SELECT log_level, message, log_object FROM extras_joblogentry WHERE job_result_id = %s "
            "ORDER BY created, id", (result_id,))]

    # -- workers -----------------------------------------------------------------------

    def write_manifest(self, queue: str) -> Path:
        """The queue's Job manifest: the pods run Nautobot with the workers' settings."""
        return deployment_manifest(self.manifests, queue, "nautobot", self.env)

    def start_shim(self, nautobot_server: bool = False) -> Shim:
        """``k8s-celery worker -A k8s_celery.contrib.nautobot`` on the tests' queue or, with
        ``nautobot_server``, ``nautobot-server celery worker -P custom`` as Nautobot users
        start their workers (the pool named by CELERY_CUSTOM_WORKER_POOL)."""
        shim = Shim(self.cluster, self.namespace, self.manifests, self.work_dir, self.env["CELERY_BROKER_URL"],
                    queues=QUEUE, app_name="k8s_celery.contrib.nautobot", env=dict(self.env))
        if nautobot_server:
            shim.argv = [str(BIN / "nautobot-server"), "celery", "worker", "-P", "custom", "-Q", QUEUE,
                         "-c", "5", "--prefetch-multiplier", "1", "-E", "-l", "INFO", "-n", shim.hostname,
                         "--without-mingle", "--without-gossip"]
            shim.env.update({"CELERY_CUSTOM_WORKER_POOL": "k8s_celery.pool:KubernetesPool",
                             "K8S_CELERY_MANIFESTS_DIR": str(self.manifests),
                             "K8S_CELERY_NAMESPACE": self.namespace,
                             "KUBECONFIG": str(self.cluster.kubeconfig)})
        self.shims.append(shim)
        return shim.start()  # ready once it logs so: Nautobot's workers accept nautobot_json only, no ping

    def start_prefork_worker(self, queue: str) -> str:
        """Nautobot's own ``nautobot-server celery worker`` (prefork) on ``queue``; its node name."""
        hostname = f"prefork-{secrets.token_hex(3)}@local"
        log_path = self._spawn(hostname, ["worker", "-P", "prefork", "-c", "1", "-Q", queue, "-n", hostname,
                                          "-l", "INFO", "--without-mingle", "--without-gossip"])
        wait_until(lambda: f"{hostname} ready." in log_path.read_text(errors="replace"), timeout=90,
                   message=lambda: f"{hostname} ready:\n{log_path.read_text(errors='replace')[-3000:]}")
        return hostname

    def start_beat(self) -> Path:
        """Nautobot's ``nautobot-server celery beat`` (its database scheduler); its log."""
        return self._spawn("beat", ["beat", "-l", "INFO", "--max-interval", "1", "--pidfile="])

    def _spawn(self, name: str, celery_args: list[str]) -> Path:
        """``nautobot-server celery <celery_args>``, stopped by :meth:`close`; its log file."""
        log_path = self.work_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen([str(BIN / "nautobot-server"), "celery", *celery_args],
                                       env={**os.environ, **self.env, "C_FORCE_ROOT": "1"}, cwd=self.work_dir,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process, log_path))
        return log_path

    def close(self, failed: bool = False) -> None:
        """Stop every process, print their logs if the test failed, drop the database."""
        close_deployment(self, failed)
