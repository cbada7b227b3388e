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
import signal
import subprocess
from pathlib import Path

from .requirements import SERVER_PACKAGES, require_package
from .server import LocalServer, ServerError, free_port

SUPERUSER = "postgres"
INITDB = SERVER_PACKAGES["postgresql"]


class PostgresError(ServerError):
    """The server failed to initialise or to start."""


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` and ``postgres``."""
    require_package("postgresql", INITDB)
    newest = max(glob.glob(INITDB), key=lambda path: int(Path(path).parent.parent.name))
    return Path(newest).parent


class PostgresServer(LocalServer):
    """``initdb`` + ``postgres`` in a temporary directory on a free loopback port.

    Trust authentication on loopback (it is a throw-away test server); the
    superuser is ``postgres``. ``settings`` are extra ``postgres -c`` options.
    """

    name = "postgres"
    error = PostgresError
    stop_signal = signal.SIGINT  # a fast shutdown

    def __init__(self, bin_dir: str | Path | None = None, port: int | None = None,
                 user: str | None = None, settings: dict[str, str] | None = None,
                 startup_timeout: float = 60.0):
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        super().__init__(startup_timeout)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                         "max_connections": "200", **(settings or {})}
        self.data = self.dir / "data"
        self.run_as = user or (SUPERUSER if os.geteuid() == 0 else None)

    def popen_options(self) -> dict:
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

    def prepare(self) -> None:
        """Initialise the data directory, once."""
        self._chown()
        if not (self.data / "PG_VERSION").exists():
            done = subprocess.run([str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                                   "--auth=trust", "--encoding=UTF8", "--no-sync", "-N"],
                                  capture_output=True, text=True, cwd=self.dir, **self.popen_options())
            if done.returncode:
                raise PostgresError(f"initdb failed: {done.stderr or done.stdout}")
        self.log_path.touch()
        self._chown()

    def command(self) -> list[str]:
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-h", self.host, "-k", str(self.dir)]
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def ready(self) -> bool:
        self.execute("SELECT 1", dbname="postgres")
        return True

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

        self.drop_database(name)
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, closing its connections."""
        from psycopg import sql

        self.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def django_settings(self, dbname: str) -> dict:
        """A Django ``DATABASES`` entry for ``dbname``."""
        return {"ENGINE": "django.db.backends.postgresql", "NAME": dbname, "USER": SUPERUSER,
                "HOST": self.host, "PORT": str(self.port)}

    def log(self) -> str:
        """The server's log."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
