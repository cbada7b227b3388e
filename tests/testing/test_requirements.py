"""What a test does when this machine lacks a part: it fails with one line, never skips."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from k8s_celery.testing.requirements import PACKAGE_SETS, install_hint, missing_packages


def run_pytest(directory, source: str, *, as_non_root: bool = False) -> subprocess.CompletedProcess:
    """pytest (with this package's plugin) on one test file; ``as_non_root``: in a user
    namespace of its own, where this process's uid is not 0 (its files stay readable)."""
    (directory / "test_case.py").write_text(textwrap.dedent(source))
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(directory / "test_case.py")]
    if as_non_root:
        argv = ["unshare", "--user", *argv]
    return subprocess.run(argv, cwd=directory, capture_output=True, text=True, timeout=120)


def test_a_missing_requirement_fails_in_one_line_without_a_traceback(tmp_path):
    done = run_pytest(tmp_path, """
        import pytest
        from k8s_celery.testing.requirements import MissingRequirement

        @pytest.fixture(scope="session")
        def server():
            raise MissingRequirement("redis-server is not installed: apt-get install redis-server")

        def test_one(server):
            pass

        def test_two(server):
            pass

        def test_in_the_body():
            raise MissingRequirement("no real node on this machine: it needs root")
    """)
    assert done.returncode == 1, done.stdout
    assert "1 failed, 2 errors" in done.stdout and "skipped" not in done.stdout
    assert "Traceback" not in done.stdout and "raise MissingRequirement" not in done.stdout
    assert done.stdout.count("\nredis-server is not installed: apt-get install redis-server\n") == 2
    assert "\nno real node on this machine: it needs root\n" in done.stdout


def test_real_node_tests_fail_with_what_is_missing_when_not_root(tmp_path):
    done = run_pytest(tmp_path, """
        def test_needs_a_real_node(k8s_real_cluster):
            pass
    """, as_non_root=True)
    assert done.returncode == 1, done.stdout
    assert "1 error" in done.stdout and "skipped" not in done.stdout, done.stdout
    assert "\nno real node on this machine: it needs root (containerd, the kubelet and the image builds run " \
           "as root)" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout


def test_the_requirements_command_says_why_a_real_node_cannot_run(tmp_path):
    argv = [sys.executable, "-m", "k8s_celery.testing.requirements", "--real-node"]
    refused = subprocess.run(["unshare", "--user", *argv], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert refused.stdout.startswith("no real node on this machine: it needs root")
    assert subprocess.run(argv, capture_output=True, text=True, timeout=60).returncode == 0


def test_the_requirements_command_lists_missing_packages_by_use():
    """What scripts/setup.sh installs: on this machine, set up by it, nothing is missing."""
    command = [sys.executable, "-m", "k8s_celery.testing.requirements", "--missing-packages"]
    for sets in (["tests"], ["demo"], ["demo", "real-node"]):
        listed = subprocess.run([*command, *sets], capture_output=True, text=True, timeout=60)
        assert (listed.returncode, listed.stdout) == (0, "\n")
    refused = subprocess.run([*command, "everything"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "usage:" in refused.stderr


def test_missing_packages_are_those_whose_file_is_absent(tmp_path):
    (tmp_path / "lib" / "15" / "bin").mkdir(parents=True)
    (tmp_path / "lib" / "15" / "bin" / "initdb").touch()
    files = {"postgresql": str(tmp_path / "lib" / "*" / "bin" / "initdb"), "buildah": str(tmp_path / "buildah")}
    assert missing_packages(files) == ["buildah"]
    assert install_hint(["buildah"]).endswith("installs it (as root: apt-get install buildah)")
    assert "installs them (as root: apt-get install runc iptables)" in install_hint(["runc", "iptables"])


def test_the_tests_need_the_servers_and_the_real_node_and_the_demo_only_redis():
    assert set(PACKAGE_SETS["tests"]) == {"redis-server", "rabbitmq-server", "postgresql", *PACKAGE_SETS["real-node"]}
    assert set(PACKAGE_SETS["demo"]) == {"redis-server"}
