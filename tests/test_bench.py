"""The benchmark's pure helpers (the benchmark itself runs with ``python -m bench``)."""

from __future__ import annotations

import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import OTHER as OTHER_PROCESSES  # noqa: E402
from bench.cpu import CpuRecorder, CpuShare, budget_per_job, machine_busy_seconds  # noqa: E402
from bench.cpu import Sample as CpuSample  # noqa: E402
from bench.harness import AuditLog  # noqa: E402
from bench.measure import CLIENT, Launch, Plan, cpu_rows, describe_shares, no_op_spec, split  # noqa: E402
from bench.output import RELAYED, requests_row  # noqa: E402
from bench.profile import OTHER, parse_collapsed  # noqa: E402
from bench.realnode import (COMMANDS, FLOOR, GAP_PARTS, IMPORT, MOUNTED, RUNNER, SECRET, SHIM, START,  # noqa: E402
                            Sample,
                            bare_job, containers_terminated, difference, epoch, gap_parts, p50s, printed_time,
                            rotation, spread, terminal_condition)
from bench.realnode import rows as node_rows  # noqa: E402
from k8s_celery.manifest import PAYLOAD_ENV  # noqa: E402
from bench.stats import (Spread, markdown_table, percentile, ratios, spread_of_percentile,  # noqa: E402
                         steady_rate, steady_window)


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


def test_printed_time_reads_the_last_stdout_line_of_a_cri_log():
    log = ("2025-01-02T03:04:05.000000001Z stderr F warming up\n"
           "2025-01-02T03:04:05.100000000Z stdout F 1735787045.0987\n"
           "2025-01-02T03:04:05.200000000Z stderr F bye\n")
    assert printed_time(log) == pytest.approx(1735787045.0987)
    assert printed_time("") is None
    assert printed_time("2025-01-02T03:04:05Z stdout F not a number\n") is None


def test_terminal_condition_of_a_job():
    assert terminal_condition([("SuccessCriteriaMet", "True"), ("Complete", "True")]) == "Complete"
    assert terminal_condition([("Failed", "True")]) == "Failed"
    assert terminal_condition([("Complete", "False"), ("Suspended", "True")]) is None
    assert terminal_condition([]) is None


def test_rotation_starts_each_round_one_later():
    assert rotation(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotation(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotation(["a", "b", "c"], 5) == ["c", "a", "b"]


def test_epoch_of_a_date_done():
    assert epoch("2025-01-02T03:04:05.250000+00:00") == pytest.approx(1735787045.25)
    assert epoch(datetime(2025, 1, 2, 3, 4, 5, 250000, tzinfo=timezone.utc)) == pytest.approx(1735787045.25)


def node_run(offset: float = 0.0) -> list[Sample]:
    """One made-up run: each variant's figures, in seconds from the start, two samples each."""
    def sample(variant, total, to_end, pod_end=None, acked=None):
        return Sample(variant, started=100.0, done=100.0 + total + offset, ended=100.0 + to_end + offset,
                      stored=100.01, terminated=100.0 + (pod_end or total - 1.0) - 0.5,
                      pod_ended=100.0 + (pod_end or total - 1.0), acked=acked)

    return [sample(SHIM, 1.20, 1.19, 1.9, acked=102.5), sample(SHIM, 1.30, 1.29, 2.0, acked=102.6),
            sample(FLOOR, 1.50, 0.60), sample(FLOOR, 1.70, 0.60),
            sample(START, 1.00, 0.55), sample(START, 1.00, 0.55),
            sample(IMPORT, 2.00, 1.00), sample(IMPORT, 2.00, 1.00),
            sample(SECRET, 1.80, 0.70), sample(SECRET, 1.80, 0.70),
            sample(MOUNTED, 2.10, 1.00), sample(MOUNTED, 2.10, 1.00),
            sample(RUNNER, 2.00, 1.20), sample(RUNNER, 2.00, 1.20)]


def test_node_figures_are_per_run_medians_in_ms():
    runs = [node_run(), node_run(0.1)]
    assert p50s(runs, FLOOR, "total") == pytest.approx([1600.0, 1700.0])
    assert p50s(runs, SHIM, "dispatch") == pytest.approx([10.0, 10.0])
    assert p50s(runs, SHIM, "to_ack") == pytest.approx([2550.0, 2550.0])
    tail = spread(runs, FLOOR, "tail")
    assert (tail.median, tail.low, tail.high, tail.runs) == (pytest.approx(1000.0),) * 3 + (2,)
    assert difference(runs, (SECRET, "to_end"), (FLOOR, "to_end")).median == pytest.approx(100.0)
    assert p50s(runs, SHIM, "to_pod_end") == pytest.approx([1950.0, 1950.0])
    assert p50s(runs, SHIM, "to_terminated") == pytest.approx([1450.0, 1450.0])


def test_containers_terminated_needs_every_container():
    done = {"state": {"terminated": {"exitCode": 0}}}
    running = {"state": {"running": {}}}
    assert containers_terminated({"containerStatuses": [done, done]})
    assert not containers_terminated({"containerStatuses": [done, running]})
    assert not containers_terminated({"phase": "Pending"})


def test_node_rows_judge_the_ratio_of_the_medians():
    fast, slow = [node_run(), node_run()], [node_run(), node_run()]
    for run in slow:
        for sample in run:
            if sample.variant == SHIM:
                sample.done += 1.0  # 2.25 s against the floor's 1.0 s
    assert [row.met for row in node_rows(fast, 0.5, 0.7)][0] == "yes"  # 1.25 s
    main = node_rows(slow, 0.5, 0.7)[0]
    assert main.met == "no" and main.ratio.startswith("2.25")
    assert "load average 0.5 → 0.7" in main.measurement and "2 run(s) of 2" in main.measurement


def test_gap_parts_add_up_to_the_difference_between_shim_and_floor():
    runs = [node_run(), node_run(0.1)]
    parts = gap_parts(runs)
    assert [name for name, _ in parts] == [name for name, _, _ in GAP_PARTS]
    for index in range(len(runs)):
        run = [runs[index]]
        whole = difference(run, (SHIM, "total"), (FLOOR, "total")).median
        assert sum(part.median for _, part in gap_parts(run)) == pytest.approx(whole)
    assert dict(parts)["importing Celery and the app"].median == pytest.approx(400.0)


def test_bare_jobs_keep_the_shim_s_pod_spec_and_change_only_command_and_secret():
    from bench.benchapp import app

    template = {"apiVersion": "batch/v1", "kind": "Job", "spec": {"template": {"spec": {
        "securityContext": {"fsGroup": 1000},
        "containers": [{"name": "task", "image": "bench:1", "imagePullPolicy": "Never",
                        "env": [{"name": "CELERY_BROKER_URL", "value": "redis://x"}]}]}}}}
    spec = no_op_spec(app)
    runner = bare_job(template, spec, RUNNER)
    floor = bare_job(template, spec, FLOOR)
    runner_pod, floor_pod = runner["spec"]["template"]["spec"], floor["spec"]["template"]["spec"]
    assert runner_pod["containers"][0]["command"] == ["k8s-celery", "run-task"]
    assert {"name": "K8S_CELERY_APP", "value": "benchapp"} in runner_pod["containers"][0]["env"]
    assert PAYLOAD_ENV in {e["name"] for e in runner_pod["containers"][0]["env"]}
    assert floor_pod["containers"][0]["command"][0] == "python3"
    assert not floor_pod["volumes"] and not floor_pod["containers"][0]["volumeMounts"]
    assert [e["name"] for e in floor_pod["containers"][0]["env"]] == ["CELERY_BROKER_URL"]
    assert floor_pod["securityContext"] == runner_pod["securityContext"] == {"fsGroup": 1000}
    assert floor_pod["containers"][0]["image"] == "bench:1"
    secret_pod = bare_job(template, spec, SECRET)["spec"]["template"]["spec"]
    assert PAYLOAD_ENV in {e["name"] for e in secret_pod["containers"][0]["env"]} and not secret_pod["volumes"]
    assert secret_pod["containers"][0]["command"] == COMMANDS[SECRET]
    mounted_pod = bare_job(template, spec, MOUNTED)["spec"]["template"]["spec"]
    assert [v["secret"]["secretName"] for v in mounted_pod["volumes"]] == [spec.job_name]
    assert PAYLOAD_ENV not in {e["name"] for e in mounted_pod["containers"][0]["env"]}
    assert mounted_pod["containers"][0]["command"] == COMMANDS[MOUNTED]


def test_audit_log_names_a_subresource_with_its_resource(tmp_path):
    path = tmp_path / "audit.log"
    path.write_text('{"stage": "RequestReceived", "user": {"username": "shim"}, "verb": "get", '
                    '"objectRef": {"resource": "pods", "subresource": "log"}}\n')
    assert AuditLog(path).count(0, path.stat().st_size, "shim") == Counter({("get", "pods/log"): 1})


def test_the_output_rows_verdict_is_plus_nothing_for_failed_and_at_most_one_for_all():
    def runs(total_per_mode: dict[str, float]) -> dict[str, list[Counter]]:
        return {mode: [Counter({("create", "jobs"): 1.0, ("delete", "jobs"): 1.0,
                                ("get", "pods/log"): total - 2.0})] for mode, total in total_per_mode.items()}

    row = requests_row(Plan(), 1, runs({"none": 2.0, "failed": 2.0, "all": 3.0}))
    assert row.met == "yes" and row.ratio == "failed +0.00, all +1.00 against none"
    assert "all 3.00: create jobs 1.00, delete jobs 1.00, get pods/log 1.00" in row.shim
    assert requests_row(Plan(), 1, runs({"none": 2.0, "failed": 2.5, "all": 3.0})).met == "no"
    assert requests_row(Plan(), 1, runs({"none": 2.0, "failed": 2.0, "all": 4.0})).met == "no"


def test_the_relay_header_of_a_success_is_what_the_bench_counts():
    from k8s_celery import outcome
    from k8s_celery.podlogs import describe

    header = f"bench.noop[id] pod kc-x-1-abcde attempt 1 {describe(outcome.Outcome(outcome.SUCCESS))}; its output:"
    assert RELAYED.search(header)


def test_burst_row_pairs_the_bursts_run_by_run():
    from bench.burst import Burst, rows as burst_rows

    bursts = [Burst(SHIM, 12.0, 12.1), Burst(IMPORT, 10.0), Burst(IMPORT, 11.0), Burst(SHIM, 11.0, 11.2)]
    [row] = burst_rows(bursts, 50, 4, 0.5, 1.5)
    assert row.ratio.startswith("1.1") and row.met == "yes"  # 12/10 and 11/11: median 1.10
    assert "50 no-op tasks at once" in row.measurement and "2 burst(s) of each" in row.measurement
    assert "4 threads of the official client" in row.reference
    [slow] = burst_rows([Burst(SHIM, 14.0, 14.5), Burst(IMPORT, 10.0)], 50, 4, 0.5, 1.5)
    assert slow.met == "no" and slow.ratio.startswith("1.40")


def test_profile_puts_each_sampled_stack_in_the_first_part_that_matches_it():
    collapsed = "\n".join([
        "thread (0x1): watch;_bootstrap (threading.py:1002);Watcher._run (k8s_celery/watch.py:70);"
        "KubeApi.watch (k8s_celery/cluster.py:280);loads (json/__init__.py:346);"
        "JSONDecoder.decode (json/decoder.py:337) 30",
        "thread (0x1): watch;_bootstrap (threading.py:1002);Watcher._run (k8s_celery/watch.py:70);"
        "KubeApi.stream (k8s_celery/cluster.py:300) 10",
        "thread (0x2): reconcile;WorkQueue._work (k8s_celery/workqueue.py:118);Launcher.launch (k8s_celery/launcher.py:78);"
        "KubeApi.request (k8s_celery/cluster.py:230);loads (json/__init__.py:346);"
        "JSONDecoder.decode (json/decoder.py:337) 20",
        "thread (0x3): MainThread;asynloop (celery/worker/loops.py:97);EventDispatcher.flush (celery/events/dispatcher.py:1) 15",
        "thread (0x3): MainThread;_find_and_load (<frozen importlib._bootstrap>:1176) 5",
    ])
    profile = parse_collapsed(collapsed, rate=100)
    assert profile.samples == {"watch: decoding events (JSON)": 30, "watch: reading the HTTP stream": 10,
                               "launch: API requests (HTTP, JSON)": 20, "Celery consumer: task events": 15,
                               OTHER: 5}
    assert profile.ms_per_task(tasks=10)["watch: decoding events (JSON)"] == pytest.approx(30.0)
    assert profile.describe(tasks=10).startswith("watch: decoding events (JSON) 30.00 (38%); "
                                                 "launch: API requests (HTTP, JSON) 20.00 (25%)")


def test_process_kubelet_row_judges_the_ratio_of_the_medians_against_the_imports():
    from bench.measure import process_kubelet_row

    row = process_kubelet_row(shim=[0.44, 0.40, 0.50], import_app=[0.20, 0.21, 0.19], run_task=[0.33, 0.32, 0.30])
    assert (row.shim, row.ratio, row.met) == ("440", "2.20×", "no")
    assert row.reference == "`python -c 'import celery, bench.benchapp'` 200; the whole `k8s-celery run-task` 320 (1.38×)"
    assert process_kubelet_row([0.25], [0.20], [0.22]).met == "yes"


def test_pod_time_row_splits_the_no_op_by_the_differences_of_the_medians():
    from bench.measure import pod_time_row

    row = pod_time_row(shim=[0.37, 0.38, 0.36], import_app=[0.21, 0.22, 0.20], build_backend=[0.30, 0.31, 0.29],
                       run_task=[0.31, 0.32, 0.33])
    assert row.shim == ("imports 210; the result backend built +90; the rest of `run-task` +20; "
                        "the shim and the kubelet +50")
    assert row.reference == "`python -c 'import celery, bench.benchapp; bench.benchapp.app.backend'` 300"
    assert (row.ratio, row.met) == ("1.23×", "–")


def test_steady_window_is_the_interval_steady_rate_divides_by():
    times = [0.0] + [1.0 + i * 0.01 for i in range(98)] + [50.0]
    start, end, events = steady_window(times, trim=0.05)
    assert (start, events) == (times[5], 89)
    assert end == pytest.approx(times[94])
    assert steady_rate(times, trim=0.05) == pytest.approx(events / (end - start))


def test_machine_busy_seconds_counts_user_nice_system_irq_softirq_steal(tmp_path):
    stat = tmp_path / "stat"
    tick = __import__("os").sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(f"cpu  {tick} {tick} {tick} {50 * tick} {7 * tick} {tick} {tick} {tick} {tick} 0\ncpu0 1 2 3\n")
    assert machine_busy_seconds(stat) == pytest.approx(6.0)


def recorder_with(samples: list[CpuSample]) -> CpuRecorder:
    recorder = CpuRecorder({})
    recorder.samples = samples
    return recorder


def test_cpu_share_is_per_job_between_the_samples_around_the_window_and_the_rest_is_other():
    recorder = recorder_with([
        CpuSample(10.0, 100.0, {"apiserver": 5.0}),
        CpuSample(11.0, 101.0, {"apiserver": 5.5, "client": 1.0}),
        CpuSample(12.0, 102.8, {"apiserver": 6.3, "client": 1.8}),
        CpuSample(13.0, 104.6, {"apiserver": 7.1, "client": 2.6}),
        CpuSample(14.0, 105.0, {"apiserver": 7.2, "client": 2.7}),
    ])
    share = recorder.share(11.2, 12.9, jobs_per_second=100.0)  # samples at 11.0 and 13.0
    assert share.cores_busy == pytest.approx(1.8)
    assert share.ms_per_job["apiserver"] == pytest.approx(8.0)
    assert share.ms_per_job["client"] == pytest.approx(8.0)
    assert share.ms_per_job[OTHER_PROCESSES] == pytest.approx(2.0)
    assert share.total_ms_per_job == pytest.approx(18.0)
    assert share.without("client") == pytest.approx(10.0)
    # a process first sampled inside the window is left to "other processes"
    late = recorder.share(10.0, 12.0, jobs_per_second=100.0)
    assert "client" not in late.ms_per_job
    assert late.ms_per_job[OTHER_PROCESSES] == pytest.approx((1.4 - 0.65) * 10)
    with pytest.raises(ValueError):
        recorder_with([CpuSample(10.0, 1.0, {})]).share(9.0, 11.0, 1.0)


def test_cpu_recorder_sees_a_busy_process_use_about_one_core():
    spin = __import__("subprocess").Popen([sys.executable, "-c", "while True: pass"])
    try:
        with CpuRecorder({"spin": spin.pid}, interval=0.1) as recorder:
            __import__("time").sleep(1.5)
        share = recorder.share(recorder.samples[2].at, recorder.samples[-3].at, jobs_per_second=1.0)
    finally:
        spin.kill()
        spin.wait()
    assert 0.8 <= share.ms_per_job["spin"] / 1000 <= 1.05
    assert share.cores_busy >= share.ms_per_job["spin"] / 1000 - 0.05


def test_budget_per_job_is_what_the_cores_leave_at_the_rate():
    assert budget_per_job(2, 100.0, rest_ms_per_job=12.0) == pytest.approx(8.0)
    assert budget_per_job(2, 200.0, rest_ms_per_job=12.0) == pytest.approx(-2.0)


def test_cpu_rows_take_the_rest_of_the_shim_s_runs_from_the_cores_at_nine_tenths_of_the_ceiling():
    whole = CpuShare(2.0, {CLIENT: 10.0, "kube-apiserver": 8.0})
    shim = [Launch(100.0, 90.0, CpuShare(1.9, {CLIENT: 8.0, "kube-apiserver": 5.0, OTHER_PROCESSES: 1.0}), whole),
            Launch(110.0, 99.0, CpuShare(1.8, {CLIENT: 9.0, "kube-apiserver": 6.0, OTHER_PROCESSES: 1.0}), whole)]
    raw = [Launch(rate, 120.0, CpuShare(1.9, {CLIENT: 2.5, "kube-apiserver": 7.0, OTHER_PROCESSES: 0.5}),
                  CpuShare(2.0, {CLIENT: 2.0, "kube-apiserver": 9.0})) for rate in (160.0, 170.0)]
    steady, launch = cpu_rows(shim, raw, ceiling=160.0, backlog=1000)
    cores = __import__("os").cpu_count()
    budget = cores * 1000 / 144 - 6.5
    assert f"leaves the shim {budget:.1f}" in steady.ratio
    assert "it spent 8.5 (8.0–9.0), the raw client 2.5 (2.5–2.5)" in steady.ratio
    assert steady.reference.startswith("raw creates of Job + Secret: the raw client 2.5 (2.5–2.5); "
                                       "kube-apiserver 7.0 (7.0–7.0); ")
    assert describe_shares([run.steady for run in shim], "the shim") == (
        "the shim 8.5 (8.0–9.0); kube-apiserver 5.5 (5.0–6.0); other processes 1.0 (1.0–1.0); "
        "in all 15.0 (14.0–16.0), 1.85 (1.80–1.90) cores busy")
    assert launch.shim.endswith("pods running 94.5 (90.0–99.0)/s")
    assert launch.ratio == "0.79 (0.75–0.82)× (pods running a second)"


def test_launch_takes_rates_and_cpu_from_the_steady_part_and_the_whole_of_it():
    recorder = recorder_with([CpuSample(float(t), t * 2.0, {"client": t * 0.5}) for t in range(0, 12)])
    created = [1.0 + i * 0.1 for i in range(41)]  # 1.0 .. 5.0
    running = [c + 5.0 for c in created]  # 6.0 .. 10.0
    launch = Launch.of(created, running, recorder)
    assert launch.jobs_rate == pytest.approx(10.0) and launch.pods_rate == pytest.approx(10.0)
    assert launch.steady.cores_busy == pytest.approx(2.0)
    assert launch.steady.ms_per_job["client"] == pytest.approx(50.0)
    assert launch.whole.ms_per_job["client"] == pytest.approx(0.5 * 9.0 / 41 * 1000)
