"""The tail cut and the decoding of a pod's log (pure); the relay itself runs in
tests/test_task_output_e2e.py against the local cluster's kubelet."""

from k8s_celery import outcome as outcomes
from k8s_celery.podlogs import RELAYED_STATES, cut_tail, describe


def test_a_short_log_is_kept_whole():
    log = cut_tail(b"one\ntwo\n", limit=1024, lines_asked=100)
    assert log.lines == ["one", "two"] and not log.truncated


def test_one_line_more_than_asked_means_there_was_more():
    data = b"".join(b"line %d\n" % i for i in range(11))
    log = cut_tail(data, limit=1024, lines_asked=10)
    assert log.lines == [f"line {i}" for i in range(1, 11)] and log.truncated


def test_the_tail_is_cut_to_the_byte_limit_on_a_line_boundary():
    data = b"".join(b"%04d\n" % i for i in range(100))  # 5 bytes a line
    log = cut_tail(data, limit=22, lines_asked=1000)
    assert log.lines == ["0096", "0097", "0098", "0099"] and log.truncated


def test_one_huge_line_is_cut_to_its_last_bytes():
    log = cut_tail(b"x" * 1000, limit=10, lines_asked=1, capped=True)
    assert log.lines == ["x" * 10] and log.truncated


def test_non_utf8_and_control_bytes_become_visible_escapes():
    log = cut_tail(b"caf\xe9 \xff\xfe ok\r\n\x1b[31mred\x1b[0m\tand tab\n\x00", limit=1024, lines_asked=10)
    assert log.lines == ["caf\\xe9 \\xff\\xfe ok", "\\x1b[31mred\\x1b[0m\tand tab", "\\x00"]


def test_utf8_survives():
    assert cut_tail("données ✓\n".encode(), 1024, 10).lines == ["données ✓"]


def test_an_empty_log_has_no_lines():
    assert cut_tail(b"", 1024, 10).lines == []


def test_modes():
    assert outcomes.SUCCESS not in RELAYED_STATES["failed"]
    assert {outcomes.FAILURE, outcomes.RETRY, outcomes.LOST, outcomes.TIME_LIMIT} <= RELAYED_STATES["failed"]
    assert outcomes.SUCCESS in RELAYED_STATES["all"] and not RELAYED_STATES["none"]


def test_describe_names_the_exception_or_the_reason():
    failed = outcomes.Outcome(outcomes.FAILURE, exc_type="ValueError", exc_args=["bad input"])
    assert describe(failed) == "failed (ValueError: bad input)"
    lost = outcomes.Outcome(outcomes.LOST, reason="pod Evicted: low on memory")
    assert describe(lost) == "was lost (pod Evicted: low on memory)"
    assert describe(outcomes.Outcome(outcomes.SUCCESS)) == "succeeded"
