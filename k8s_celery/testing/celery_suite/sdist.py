"""The cached sdist of the installed Celery, and the override block in its conftest."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

OVERRIDE_MARK = "# ---- k8s-celery suite override (k8s_celery.testing.celery_suite) ----"
# The session worker's pool comes from the ``celery_worker_pool`` fixture of
# t/integration/conftest.py; only a fixture defined later in that same file replaces it.
OVERRIDE = f'''
{OVERRIDE_MARK}
# Appended by k8s_celery.testing.celery_suite.sdist.install_override; rewritten on each run.
import pytest as _k8s_pytest

from k8s_celery.testing.celery_suite import plugin as _k8s_suite

celery_worker_pool = _k8s_pytest.fixture(scope="session")(_k8s_suite.worker_pool)
celery_worker_parameters = _k8s_pytest.fixture(scope="session")(_k8s_suite.worker_parameters)
manager = _k8s_pytest.fixture(_k8s_suite.bounded_manager)
pytest_collection_modifyitems = _k8s_pytest.hookimpl(trylast=True)(_k8s_suite.collection_modifyitems)
pytest_runtest_logstart = _k8s_suite.runtest_logstart
pytest_runtest_setup = _k8s_suite.runtest_setup
pytest_runtest_logreport = _k8s_suite.runtest_logreport
pytest_sessionfinish = _k8s_suite.sessionfinish
'''


def celery_version() -> str:
    """The version of the installed Celery."""
    from importlib.metadata import version

    return version("celery")


def cache_dir(version: str) -> Path:
    """Where the sdist of Celery ``version`` and its extracted tests are kept."""
    from ..binaries import cache_root

    return cache_root() / f"celery-sdist-{version}"


def suite_root(version: str | None = None) -> Path:
    """Celery's ``t/`` tree and ``pyproject.toml`` for ``version``, downloaded once.

    Returns the directory holding them (the rootdir pytest runs in). The ``celery``
    package of the sdist is not extracted: it would shadow the installed one.
    """
    version = version or celery_version()
    directory = cache_dir(version)
    root = directory / f"celery-{version}"
    done = root / ".extracted"
    if done.exists():
        return root
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / f"celery-{version}.tar.gz"
    if not archive.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", "-d", str(directory), f"celery=={version}"],
                       check=True)
    prefix = f"celery-{version}/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if m.name == prefix + "pyproject.toml" or m.name.startswith(prefix + "t/")]
        tar.extractall(directory, members=members, filter="data")
    done.write_text(f"{archive.name}\n")
    return root


def install_override(root: Path) -> Path:
    """Append (or refresh) :data:`OVERRIDE` at the end of the cached suite's conftest."""
    conftest = root / "t" / "integration" / "conftest.py"
    text = conftest.read_text()
    original = text.split("\n" + OVERRIDE_MARK, 1)[0].rstrip("\n") + "\n"
    wanted = original + OVERRIDE
    if text != wanted:
        conftest.write_text(wanted)
    return conftest
