"""A task's output in the worker's log, its failed Job kept, ``k8s-celery logs``: real
Redis, the local cluster (the API server proxies ``pods/log`` to the process kubelet,
which serves the containers' real output), the real worker."""

from __future__ import annotations

import re

import pytest
from billiard.exceptions import TimeLimitExceeded

from conftest import jobs_in, logs_command, only_kept_jobs, relay_done, relayed, running_pod_of
from k8s_celery.cluster import collection_path
from k8s_celery.manifest import ANNOTATION_TASK_ID
from k8s_celery.testing import wait_until

pytestmark = pytest.mark.cluster


def test_all_mode_relays_a_success_at_info_and_deletes_its_job(start_shim, taskapp, k8s_cluster, k8s_namespace):
    shim = start_shim(env={"K8S_CELERY_POD_LOGS": "all"})
    result = taskapp.chatty.delay("hello")
    assert result.get(timeout=60) == "hello"
    lines = relay_done(shim, result.id, "SUCCESS in")  # the pod's last line, the runner's
    assert re.search(rf"INFO/MainProcess\] taskapp\.chatty\[{result.id}\] pod \S+ attempt 1 succeeded; "
                     "its output:", lines[0]), lines[0]
    body = [line.split("| ", 1)[1] for line in lines[1:]]
    # The pod's whole output in order: the runner's lines around the task's prints and logging.
    # Prints go through Celery's stdout redirect at WARNING, as in a prefork worker.
    printed = [next(i for i, line in enumerate(body) if line.endswith(text))
               for text in ("WARNING/MainProcess] printed hello", "] logged hello", "] last line of hello")]
    assert printed == sorted(printed) and "running taskapp.chatty" in body[0]
    assert re.search(r"SUCCESS in [\d.]+s$", body[-1]), body[-1]
    assert all("INFO/" in line for line in lines)
    wait_until(lambda: not jobs_in(k8s_cluster, k8s_namespace), message="the Job deleted after the ack")


def test_a_failure_is_relayed_its_job_kept_and_logs_reads_it(start_shim, taskapp, k8s_cluster, k8s_namespace,
                                                             redis_server):
    shim = start_shim()  # the defaults: failures relayed, their Jobs kept an hour
    ok = taskapp.chatty.delay("fine")
    failed = taskapp.chatty.delay("broken", fail=True)
    with pytest.raises(ValueError, match="chatty broken failed"):
        failed.get(timeout=60)
    assert ok.get(timeout=60) == "fine"
    lines = relay_done(shim, failed.id, "FAILURE in")  # the pod's last line, the runner's
    assert "WARNING/MainProcess" in lines[0] and "failed (ValueError: chatty broken failed)" in lines[0]
    assert all("WARNING/" in line for line in lines)
    assert any("raise ValueError" in line for line in lines)  # the runner's traceback, from the pod
    assert any(re.search(r"FAILURE in [\d.]+s$", line) for line in lines)
    assert not any("Logging error" in line for line in lines), lines  # runtime=None once broke that line
    wait_until(lambda: redis_server.client().hlen("unacked") == 0, message="both messages acked")
    [job] = only_kept_jobs(k8s_cluster, k8s_namespace)
    assert job["metadata"]["annotations"][ANNOTATION_TASK_ID] == failed.id
    assert job["spec"]["ttlSecondsAfterFinished"] >= 3600, job["metadata"]
    assert not relayed(shim, ok.id)  # mode "failed": a success's output stays in its pod

    done = logs_command(k8s_cluster, k8s_namespace, failed.id)
    assert done.returncode == 0, done.stderr
    header, *output = done.stdout.splitlines()
    assert re.fullmatch(r"==> attempt 1: pod \S+, node local-node, phase \w+, exit code \d+ \(\w+\).* <==",
                        header), header
    assert any(line.endswith("] printed broken") for line in output)
    assert any(line.endswith("] last line of broken") for line in output)
    assert any("chatty broken failed" in line for line in output)  # the traceback, as the pod printed it

    gone = logs_command(k8s_cluster, k8s_namespace, ok.id)
    assert gone.returncode == 1 and f"no Job of task {ok.id} is left" in gone.stdout
    assert "K8S_CELERY_POD_LOGS" in gone.stdout


def test_logs_follows_a_running_task(start_shim, taskapp, k8s_cluster, k8s_namespace):
    start_shim()
    result = taskapp.chatty.delay("followed", sleep=4)
    running_pod_of(k8s_cluster, k8s_namespace, result.id)
    done = logs_command(k8s_cluster, k8s_namespace, result.id, "--follow")
    assert done.returncode == 0, done.stderr
    assert "phase Running" in done.stdout.splitlines()[0]
    assert "printed followed" in done.stdout and "last line of followed" in done.stdout
    # the follow ended with the container, after the runner's last lines
    assert re.search(r"SUCCESS in [\d.]+s", done.stdout), done.stdout
    assert result.get(timeout=30) == "followed"


def test_every_lost_attempt_is_relayed_with_its_reason_and_logs_shows_all(start_shim, taskapp, k8s_cluster,
                                                                           k8s_namespace):
    shim = start_shim()
    result = taskapp.count.delay("relayed-eviction", 3)
    pod = running_pod_of(k8s_cluster, k8s_namespace, result.id)
    k8s_cluster.kubelet.evict(k8s_namespace, pod["metadata"]["name"])
    assert result.get(timeout=90) == 1
    lines = relay_done(shim, result.id, "attempt 1 was lost")
    assert "(pod Evicted: The node was low on resource: memory." in lines[0]
    jobs = only_kept_jobs(k8s_cluster, k8s_namespace)  # the lost attempt's; the success's deleted
    assert jobs[0]["metadata"]["labels"]["k8s-celery.io/attempt"] == "1"
    done = logs_command(k8s_cluster, k8s_namespace, result.id, "--all-attempts")
    assert done.returncode == 0, done.stderr
    assert "==> attempt 1: pod" in done.stdout and "Evicted" in done.stdout.splitlines()[0]


def test_binary_and_huge_output_is_cut_and_the_worker_memory_stays_flat(start_shim, taskapp):
    shim = start_shim()
    warm = taskapp.chatty.delay("warm-up", fail=True)
    with pytest.raises(ValueError):
        warm.get(timeout=60)
    relay_done(shim, warm.id, "last line of warm-up")
    before = rss_kib(shim.process.pid)
    result = taskapp.chatty.delay("huge", fail=True, megabytes=50, binary=True)
    with pytest.raises(ValueError):
        result.get(timeout=120)
    lines = relay_done(shim, result.id, "last line of huge")
    grown = rss_kib(shim.process.pid) - before
    assert "its output (the last 65536 bytes only):" in lines[0]
    assert sum(len(line.split("| ", 1)[1]) + 1 for line in lines[1:]) <= 65536
    assert any(line.endswith("| raw \\xff\\xfe \\x1b[31mred\\x1b[0m end") for line in lines)
    assert not any("printed huge" in line for line in lines)  # cut from the head
    assert grown < 20 * 1024, f"the worker grew {grown} KiB relaying 50 MB"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_a_refused_log_read_warns_once_and_tasks_still_succeed(start_shim, taskapp, k8s_cluster, k8s_namespace,
                                                                tmp_path):
    account = "no-pod-logs"
    role_rules = [{"apiGroups": ["batch"], "resources": ["jobs"],
                   "verbs": ["create", "get", "list", "watch", "delete", "patch"]},
                  {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
                  {"apiGroups": [""], "resources": ["secrets", "events"], "verbs": ["create", "list"]}]
    api = k8s_cluster.api
    api.create(collection_path("serviceaccounts", k8s_namespace),
               {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}})
    api.create(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{k8s_namespace}/roles",
               {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": account},
                "rules": role_rules})
    api.create(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{k8s_namespace}/rolebindings",
               {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": account},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": k8s_namespace}]})
    kubeconfig = k8s_cluster.kubeconfig_for_token(k8s_cluster.service_account_token(k8s_namespace, account),
                                                  tmp_path / f"{account}.kubeconfig", namespace=k8s_namespace)
    shim = start_shim(kubeconfig=kubeconfig)
    results = [taskapp.chatty.delay(f"refused-{i}", fail=True) for i in range(2)]
    for result in results:
        with pytest.raises(ValueError, match="failed"):
            result.get(timeout=60)
    warnings = [line for line in shim.log().splitlines() if "task output is not relayed" in line]
    assert len(warnings) == 1 and "may not get pods/log" in warnings[0], warnings
    assert not any(relayed(shim, result.id) for result in results)


def test_a_rejection_that_requeues_is_not_kept_so_the_redelivery_runs(start_shim, taskapp, k8s_cluster,
                                                                       k8s_namespace):
    start_shim()
    # A kept Job of the same delivery would be taken for its outcome by the redelivery.
    assert taskapp.reject_once.delay("requeued").get(timeout=90) == 2
    wait_until(lambda: not jobs_in(k8s_cluster, k8s_namespace), message=lambda: "both attempts' Jobs deleted: "
               + str([(j["metadata"]["name"], j["metadata"].get("annotations"), j.get("status", {}).get("conditions"))
                      for j in jobs_in(k8s_cluster, k8s_namespace)]))


def test_a_time_limit_celery_requeues_runs_again_though_its_job_is_kept(start_shim, taskapp, k8s_cluster,
                                                                         k8s_namespace):
    shim = start_shim()
    result = taskapp.slow_once.delay("requeued")
    # As under prefork: Celery stores the TimeLimitExceeded, requeues the message, and the
    # second run's success replaces it.
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=120)
    wait_until(lambda: taskapp.app.AsyncResult(result.id).state == "SUCCESS", timeout=60,
               message="the requeued run's success")
    assert taskapp.app.AsyncResult(result.id).result == 2
    # The first attempt's Job is kept for a post-mortem; the second's went with its success.
    [job] = only_kept_jobs(k8s_cluster, k8s_namespace)  # the timed-out attempt's
    assert job["metadata"]["labels"]["k8s-celery.io/attempt"] == "1"
    assert shim.log().count("already ran in Job") <= 1, shim.log()
