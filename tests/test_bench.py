"""The benchmark's pure helpers (the benchmark itself runs with ``python -m bench``)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import AuditLog  # noqa: E402
from bench.measure import split  # noqa: E402
from bench.stats import (Spread, markdown_table, percentile, ratios, spread_of_percentile,  # noqa: E402
                         steady_rate)


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_spread_formats_median_and_range():
    spread = Spread.of([12.0, 10.0, 15.5])
    assert (spread.median, spread.low, spread.high, spread.runs) == (12.0, 10.0, 15.5, 3)
    assert spread.format() == "12.0 (10.0–15.5)"
    assert spread.format(2, " ms") == "12.00 ms (10.00–15.50)"
    assert Spread.of([3.0]).format() == "3.0"
    assert spread.scaled(2).format(0) == "24 (20–31)"


def test_spread_of_a_percentile_over_runs_and_ratios():
    runs = [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 6.0, 9.0]]
    assert spread_of_percentile(runs, 50) == Spread(4.0, 2.0, 6.0, 3)
    assert ratios([2.0, 3.0, 8.0], [1.0, 2.0, 4.0]) == Spread(2.0, 1.5, 2.0, 3)
    with pytest.raises(ValueError):
        ratios([1.0], [1.0, 2.0])


def test_steady_rate_leaves_out_ramp_and_tail():
    times = [0.0] + [10.0 + i / 100 for i in range(101)] + [60.0]  # 100/s between a slow start and end
    assert steady_rate(times, trim=0.05) == pytest.approx(100.0, rel=0.01)
    with pytest.raises(ValueError):
        steady_rate([1.0, 2.0])


def test_markdown_table():
    table = markdown_table(["a", "b"], [(1, "x"), (2, "y")])
    assert table == "| a | b |\n| --- | --- |\n| 1 | x |\n| 2 | y |"


def test_audit_log_counts_one_stage_per_request_of_one_user(tmp_path):
    def line(stage: str, user: str, verb: str, resource: str) -> str:
        return ('{"stage": "%s", "user": {"username": "%s"}, "verb": "%s", "objectRef": {"resource": "%s"}}\n'
                % (stage, user, verb, resource))

    path = tmp_path / "audit.log"
    path.write_text(line("RequestReceived", "shim", "create", "jobs"))
    log = AuditLog(path)
    start = log.mark()
    with open(path, "a") as handle:
        handle.write(line("ResponseComplete", "shim", "create", "jobs"))
        handle.write(line("RequestReceived", "shim", "create", "secrets"))
        handle.write(line("RequestReceived", "kubelet", "patch", "pods"))
        handle.write(line("RequestReceived", "shim", "delete", "jobs"))
        handle.write('{"stage": "RequestRec')  # cut by the end mark
    assert log.count(start, log.mark(), "shim") == Counter({("create", "secrets"): 1, ("delete", "jobs"): 1})


def test_split_gives_the_median_per_verb_and_resource():
    runs = [Counter({("create", "jobs"): 1.0, ("list", "jobs"): 0.1}), Counter({("create", "jobs"): 1.0}),
            Counter({("create", "jobs"): 1.0, ("list", "jobs"): 0.2})]
    assert split(runs) == "create jobs 1.00, list jobs 0.10"
