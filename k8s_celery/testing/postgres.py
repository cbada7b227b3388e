"""A real PostgreSQL server on a free loopback port, for tests and demos.

:class:`PostgresServer` runs its own ``initdb`` and ``postgres`` (Debian's
``postgresql`` package, ``/usr/lib/postgresql/<version>/bin``) with a temporary data
directory, listening on 127.0.0.1 only, with its Unix socket in that directory.
PostgreSQL refuses to run as root ("initdb: cannot be run as root"), so when this
process is root the server runs as the ``postgres`` system user (or ``user=``)::

    with PostgresServer() as pg:
        pg.create_database("app")
        DATABASES = {"default": pg.django_settings("app")}
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .cluster import ManagedProcess, free_port

SUPERUSER = "postgres"


class PostgresError(RuntimeError):
    """The server failed to initialise or to start."""


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` and ``postgres``."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda path: int(Path(path).parent.parent.name or 0))
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresError("no initdb found: apt-get install postgresql")


class PostgresServer:
    """``initdb`` + ``postgres`` in a temporary directory on a free loopback port.

    Trust authentication on loopback (it is a throw-away test server); the
    superuser is ``postgres``. ``settings`` are extra ``postgres -c`` options.
    """

    def __init__(self, bin_dir: str | Path | None = None, port: int | None = None,
                 user: str | None = None, settings: dict[str, str] | None = None,
                 startup_timeout: float = 60.0):
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                         "max_connections": "200", **(settings or {})}
        self.startup_timeout = startup_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="k8s-celery-postgres-"))
        self.data = self.dir / "data"
        self.run_as = user or (SUPERUSER if os.geteuid() == 0 else None)
        self.process: ManagedProcess | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _popen_options(self) -> dict:
        if self.run_as is None:
            return {}
        account = pwd.getpwnam(self.run_as)
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [],
                "env": {**os.environ, "HOME": str(self.dir), "USER": self.run_as}}

    def _chown(self) -> None:
        if self.run_as is None:
            return
        account = pwd.getpwnam(self.run_as)
        os.chown(self.dir, account.pw_uid, account.pw_gid)
        for root, dirs, files in os.walk(self.dir):
            for name in dirs + files:
                os.chown(os.path.join(root, name), account.pw_uid, account.pw_gid)

    def start(self) -> PostgresServer:
        """Initialise the data directory (once), start the server, wait until it answers."""
        self._chown()
        if not (self.data / "PG_VERSION").exists():
            done = subprocess.run([str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                                   "--auth=trust", "--encoding=UTF8", "--no-sync", "-N"],
                                  capture_output=True, text=True, cwd=self.dir, **self._popen_options())
            if done.returncode:
                raise PostgresError(f"initdb failed: {done.stderr or done.stdout}")
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-h", self.host, "-k", str(self.dir)]
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        log_path = self.dir / "postgres.log"
        log_path.touch()
        self._chown()
        self.process = ManagedProcess("postgres", argv, log_path)
        with open(log_path, "ab") as log_file:
            self.process.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.dir, **self._popen_options())
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                self.execute("SELECT 1", dbname="postgres")
                return
            except Exception as exc:
                if not self.process.alive:
                    raise PostgresError(f"postgres exited:\n{self.process.log_tail()}") from exc
                if time.monotonic() > deadline:
                    raise PostgresError(f"postgres not ready after {self.startup_timeout:.0f}s: {exc}\n"
                                        f"{self.process.log_tail()}") from exc
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (a fast shutdown: SIGINT), SIGKILL if it does not exit."""
        if self.process and self.process.alive:
            import signal

            self.process.process.send_signal(signal.SIGINT)
            try:
                self.process.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.process.pid, signal.SIGKILL)
                self.process.process.wait()

    def restart(self, downtime: float = 0.0) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        time.sleep(downtime)
        self.start()

    # -- use -------------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string for ``dbname``."""
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname={dbname}"

    def url(self, dbname: str = "postgres") -> str:
        """A ``postgresql://`` URL for ``dbname``."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def execute(self, sql: str, params: tuple = (), dbname: str = "postgres") -> list[tuple]:
        """Run one statement in autocommit mode; the rows it returns (if any)."""
        import psycopg

        with psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=3) as connection:
            cursor = connection.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, name: str) -> str:
        """Create database ``name`` (dropped first if it exists); returns ``name``."""
        from psycopg import sql

        self.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def django_settings(self, dbname: str) -> dict:
        """A Django ``DATABASES`` entry for ``dbname``."""
        return {"ENGINE": "django.db.backends.postgresql", "NAME": dbname, "USER": SUPERUSER,
                "HOST": self.host, "PORT": str(self.port)}

    def log(self) -> str:
        """The server's log."""
        path = self.dir / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""
