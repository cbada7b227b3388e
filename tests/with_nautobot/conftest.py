"""Fixtures of the Nautobot end-to-end tests (``tox -e nautobot``: Nautobot from PyPI)."""

from __future__ import annotations

import pytest

from conftest import call_failed
from .nautobot_setup import NautobotSetup, migrated_template

pytestmark = [pytest.mark.cluster, pytest.mark.nautobot]


@pytest.fixture(scope="session")
def nautobot_template(postgres_server, redis_server, tmp_path_factory):
    """A database with Nautobot's migrations applied and the test Jobs enabled, which each
    test's database is copied from (the migrated schema is cached per Nautobot version)."""
    return migrated_template(postgres_server, redis_server, tmp_path_factory.mktemp("nautobot-template"))


@pytest.fixture
def nautobot_site(nautobot_template, postgres_server, redis_server, k8s_cluster, k8s_namespace, tmp_path, request):
    """Nautobot for one test: its own database (a copy of the template), Redis flushed, and the
    processes a Nautobot deployment runs."""
    site = NautobotSetup(nautobot_template, postgres_server, redis_server, k8s_cluster, k8s_namespace, tmp_path)
    yield site
    site.close(failed=call_failed(request))
