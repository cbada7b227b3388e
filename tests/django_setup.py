"""A Django project (tests/django_project) for one end-to-end test: its own PostgreSQL
database with the migrations applied, Redis as broker, django-celery-results as result
backend, and the processes a Django deployment runs (the shim, Beat, Flower, a stock
worker). The test process never imports Django: it sends tasks by name and reads what
the ORM wrote with SQL, so no Django state leaks into other tests."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from celery import Celery

from conftest import Shim, deployment_manifest, stop_all
from k8s_celery.testing import wait_until
from rabbit_setup import restore_environment

REPO = Path(__file__).parent.parent
PROJECT = Path(__file__).parent / "django_project"
READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")


class DjangoSetup:
    """One test's Django deployment; :meth:`close` stops its processes and drops its database."""

    def __init__(self, postgres, redis_server, cluster, namespace: str, work_dir: Path):
        self.postgres, self.cluster, self.namespace, self.work_dir = postgres, cluster, namespace, work_dir
        self.db = postgres.create_database(f"proj_{secrets.token_hex(4)}")
        redis_server.client(2).flushdb()
        self.broker_url = f"{redis_server.url}/2"
        self.env = {"DJANGO_SETTINGS_MODULE": "proj.settings", "DJANGO_DB_NAME": self.db,
                    "DJANGO_DB_HOST": postgres.host, "DJANGO_DB_PORT": str(postgres.port),
                    "CELERY_BROKER_URL": self.broker_url,
                    # Celery lets this variable override the settings; the worker helper sets it.
                    "CELERY_RESULT_BACKEND": "django-db",
                    "PYTHONPATH": os.pathsep.join([str(REPO), str(PROJECT)])}
        # Celery lets CELERY_BROKER_URL/CELERY_RESULT_BACKEND override any app's own settings;
        # the session's Redis fixture sets them: name this broker, and no backend, while it runs.
        self._saved_env = {key: os.environ.get(key) for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")}
        os.environ["CELERY_BROKER_URL"] = self.broker_url
        os.environ.pop("CELERY_RESULT_BACKEND", None)
        # Producer and remote control only: no result backend, no Django in this process.
        self.client = Celery("probe", broker=self.broker_url, set_as_current=False)
        self.client.conf.broker_connection_retry_on_startup = True
        self.manifests = work_dir / "django-manifests"
        self.write_manifest("kubernetes")
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []
        self.shims: list[Shim] = []

    # -- Django -------------------------------------------------------------------------

    def manage(self, *args: str, timeout: float = 120) -> str:
        """Run ``manage.py`` in the project; its output (raises on failure)."""
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=PROJECT, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **self.env})
        if done.returncode:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def migrate(self) -> str:
        """Apply every migration (the project's, django-celery-results', django-celery-beat's)."""
        return self.manage("migrate", "--noinput")

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        """Rows of a query on the project's database."""
        return self.postgres.execute(query, params, dbname=self.db)

    def task_result(self, task_id: str, timeout: float = 90) -> dict:
        """django-celery-results' row of a task once it is final (SUCCESS, FAILURE, REVOKED)."""
        columns = ("status", "result", "traceback", "task_name", "worker", "periodic_task_name",
                   "date_done")

        def row():
            rows = self.sql(f"SELECT {', '.join(columns)} FROM django_celery_results_taskresult "
                            "WHERE task_id = %s", (task_id,))
            found = dict(zip(columns, rows[0])) if rows else None
            return found if found and found["status"] in READY_STATES else None
        result = wait_until(row, timeout=timeout, interval=0.3,
                            message=lambda: f"a final TaskResult row of {task_id}")
        result["result"] = json.loads(result["result"]) if result["result"] else None
        return result

    # -- Kubernetes and Celery processes ---------------------------------------------------

    def write_manifest(self, queue: str) -> Path:
        """The queue's Job manifest: the pods run the project with the same settings."""
        return deployment_manifest(self.manifests, queue, "proj", self.env, workingDir=str(PROJECT))

    def start_shim(self, wait: bool = True, **options) -> Shim:
        """``k8s-celery worker -A proj`` on the ``kubernetes`` queue."""
        shim = Shim(self.cluster, self.namespace, self.manifests, self.work_dir, self.broker_url,
                    app_name="proj", env=dict(self.env), **options)
        self.shims.append(shim)
        return shim.start(self.client, wait=wait)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_path = self.work_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(argv, cwd=PROJECT, env={**os.environ, **self.env, "C_FORCE_ROOT": "1"},
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process, log_path))
        return process

    def start_beat(self) -> subprocess.Popen:
        """``celery -A proj beat`` with django-celery-beat's DatabaseScheduler."""
        return self._spawn("beat", [sys.executable, "-m", "celery", "-A", "proj", "beat", "-l", "INFO",
                                    "-S", "django_celery_beat.schedulers:DatabaseScheduler",
                                    "--max-interval", "1", "--pidfile="])

    def start_stock_worker(self, queue: str, pool: str = "prefork") -> str:
        """A stock ``celery -A proj worker`` on ``queue``; its node name once it answers ping."""
        hostname = f"stock-{secrets.token_hex(3)}@local"
        self._spawn(f"worker-{hostname}", [sys.executable, "-m", "celery", "-A", "proj", "worker", "-P", pool,
                                          "-c", "1", "-Q", queue, "-n", hostname, "-l", "INFO",
                                          "--without-mingle", "--without-gossip"])
        wait_until(lambda: self.client.control.ping(destination=[hostname], timeout=0.5), timeout=60,
                   message=f"{hostname} to answer ping:\n{self.log(f'worker-{hostname}')[-3000:]}")
        return hostname

    def log(self, name: str) -> str:
        """The output of a process started here."""
        path = self.work_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def send(self, task: str, *args, queue: str = "kubernetes", **options) -> str:
        """Send a task by name (as any producer would); its id."""
        return self.client.send_task(task, args=args, queue=queue, **options).id

    def close(self, failed: bool = False) -> None:
        """Stop every process, print their logs if the test failed, drop the database."""
        close_deployment(self, failed)


def close_deployment(setup, failed: bool) -> None:
    """End a test deployment on its own PostgreSQL database (Django's, Nautobot's): stop its
    shims and processes (their logs printed if the test failed), drop the database, and put
    the environment variables it set back."""
    stop_all(setup.shims, setup.processes, failed)
    try:
        setup.postgres.drop_database(setup.db)
    except Exception as exc:
        print(f"cannot drop database {setup.db}: {exc}")
    restore_environment(setup._saved_env)
