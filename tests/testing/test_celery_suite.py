"""The Celery-suite harness: selection, the conftest override and the summary (pure logic;
the suite itself runs in scripts/celery-suite.sh)."""

from __future__ import annotations

from k8s_celery.testing.celery_suite import cli, sdist
from k8s_celery.testing.celery_suite.selection import EXCLUDED, KNOWN_FAILURES, matches

TASKS = "t/integration/test_tasks.py"


def test_a_listed_test_matches_itself_its_parameters_and_the_tests_of_a_listed_class():
    listed = {f"{TASKS}::test_tasks::test_retry": "why", f"{TASKS}::test_other": "class"}
    assert matches(f"{TASKS}::test_tasks::test_retry", listed) == "why"
    assert matches(f"{TASKS}::test_tasks::test_retry[redis]", listed) == "why"
    assert matches(f"{TASKS}::test_other::test_one", listed) == "class"
    assert matches(f"{TASKS}::test_tasks::test_retry_switches", listed) is None


def test_every_exclusion_and_known_failure_says_why():
    for nodeid, reason in {**EXCLUDED, **KNOWN_FAILURES}.items():
        assert nodeid.startswith("t/integration/") and len(reason) > 60, nodeid
    assert not set(EXCLUDED) & set(KNOWN_FAILURES)


def test_the_override_is_appended_once_and_refreshed(tmp_path):
    conftest = tmp_path / "t" / "integration" / "conftest.py"
    conftest.parent.mkdir(parents=True)
    conftest.write_text("import pytest\n\n@pytest.fixture\ndef celery_worker_pool():\n    return 'prefork'\n")
    sdist.install_override(tmp_path)
    once = conftest.read_text()
    sdist.install_override(tmp_path)
    assert conftest.read_text() == once and once.count(sdist.OVERRIDE_MARK) == 1
    assert once.index("return 'prefork'") < once.index("celery_worker_pool = ")
    conftest.write_text(once + "\nstale = True\n")  # an older override block is replaced whole
    sdist.install_override(tmp_path)
    assert conftest.read_text() == once


def report(outcomes, excluded=(), known=()):
    return {"selected": list(outcomes), "excluded": list(excluded), "known": list(known), "outcomes": outcomes}


def test_summary_counts_passes_of_tests_that_ran_to_a_verdict():
    line, failed, bad = cli.summarize(report(
        {"a": "passed", "b": "xpassed", "c": "skipped", "d": "xfailed", "e": "failed", "f": "error in teardown"},
        excluded=["x"]))
    assert line.startswith("2 passed of 4 (excluded: 1)") and "skipped 1, xfailed 1" in line
    assert failed == [("e", "failed"), ("f", "error in teardown")] and bad


def test_a_known_failure_counts_as_not_passed_but_does_not_fail_the_run():
    line, failed, bad = cli.summarize(report({"a": "passed", "k": "xfailed"}, known=["k"]))
    assert line == "1 passed of 2 (excluded: 0); known failures 1 of 1"
    assert failed == [("k", "known failure")] and not bad


def test_a_selected_test_without_a_verdict_fails_the_run():
    line, failed, bad = cli.summarize(report({"a": "passed"}) | {"selected": ["a", "never"]})
    assert line.startswith("1 passed of 2") and failed == [("never", "not run")] and bad


def test_ci_runs_a_named_part_and_only_picks_files_or_node_ids():
    args = cli.parse_args(["--ci", "--only", "test_canvas.py::test_group"])
    paths = cli.selection(args)
    assert paths[0] == TASKS and paths[-1] == "t/integration/test_canvas.py::test_group"
    assert cli.selection(cli.parse_args([])) == [TASKS, "t/integration/test_canvas.py"]
