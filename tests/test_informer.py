"""The informer's cache of Jobs and pods (pure logic; the watches are tested in test_cluster)."""

from __future__ import annotations

from k8s_celery.informer import ObjectCache, slim_pod


def job(name: str, uid: str, **status) -> dict:
    return {"metadata": {"name": name, "uid": uid, "labels": {"x": "y"}, "managedFields": [{}]},
            "spec": {"template": {}}, "status": status}


def pod(name: str, uid: str, job_uid: str, created: str = "2026-01-01T00:00:00Z", phase: str = "Running") -> dict:
    return {"metadata": {"name": name, "uid": uid, "creationTimestamp": created,
                         "labels": {"batch.kubernetes.io/job-name": "j"},
                         "ownerReferences": [{"kind": "Job", "uid": job_uid, "controller": True}]},
            "spec": {"containers": [{"name": "task", "image": "i"}, {"name": "aaa", "image": "s"}]},
            "status": {"phase": phase, "containerStatuses": [{"name": "aaa", "state": {}, "image": "s"}]}}


def test_a_relist_only_deletes_what_the_cache_had_seen():
    cache = ObjectCache()
    cache.put_job(job("a", "uid-a"))
    changed = cache.replace_jobs([job("b", "uid-b")])  # "a" went while no watch was open
    assert changed == {"a", "b"}
    assert cache.job("uid-a") == (cache.job("uid-a")[0], True)
    assert cache.job("uid-b")[1] is False
    assert cache.job("uid-never-seen") == (None, False), "created after the list: not deleted"


def test_a_job_of_the_same_name_is_another_job():
    cache = ObjectCache()
    cache.put_job(job("a", "uid-1"))
    cache.delete_job(job("a", "uid-1"))
    cache.put_job(job("a", "uid-2"))
    assert cache.job("uid-1")[1] is True and cache.job("uid-2")[1] is False


def test_pods_are_found_by_their_job_and_the_newest_wins():
    cache = ObjectCache()
    cache.put_pod(pod("old", "p1", "uid-a", "2026-01-01T00:00:00Z"))
    cache.put_pod(pod("new", "p2", "uid-a", "2026-01-01T00:00:05Z"))
    cache.put_pod(pod("other", "p3", "uid-b"))
    assert cache.latest_pod("uid-a")["metadata"]["name"] == "new"
    cache.put_pod(pod("new", "p2", "uid-a", "2026-01-01T00:00:05Z", phase="Failed"), deleted=True)
    assert cache.latest_pod("uid-a")["status"]["phase"] == "Failed", "a deleted pod keeps its last state"
    assert cache.pod_deleted("p2")


def test_slim_objects_keep_what_outcomes_read():
    slim = slim_pod(pod("p", "p1", "uid-a"))
    assert slim["spec"] == {"containers": [{"name": "task"}]}
    assert slim["metadata"]["ownerUid"] == "uid-a" and "managedFields" not in slim["metadata"]
    assert slim["status"]["containerStatuses"] == [{"name": "aaa", "state": {}}]


def test_tombstones_are_pruned():
    now = [0.0]
    cache = ObjectCache(clock=lambda: now[0])
    cache.delete_job(job("a", "uid-a"))
    cache.put_pod(pod("p", "p1", "uid-a"), deleted=True)
    now[0] = 1000.0
    cache.prune(older_than=600)
    assert cache.job("uid-a") == (None, False) and cache.latest_pod("uid-a") is None


def test_the_cache_keeps_whether_a_job_is_suspended_and_nothing_else_of_its_spec():
    from k8s_celery.informer import slim_job

    suspended = job("a", "uid-a")
    suspended["spec"]["suspend"] = True
    assert slim_job(suspended)["spec"] == {"suspend": True}
    assert "spec" not in slim_job(job("b", "uid-b"))


def test_kueue_workloads_are_kept_under_their_jobs_uid_and_a_relist_replaces_them():
    from test_kueue_admission import workload

    cache = ObjectCache()
    assert cache.put_workload(workload()) == "kc-1"
    assert cache.workload("j-1")["name"] == "job-kc-1-abcde"
    orphan = {"metadata": {"name": "w", "uid": "w-2"}, "spec": {}}  # a Workload of no Job (a bare pod group)
    assert cache.put_workload(orphan) is None
    assert cache.replace_workloads([]) == set() and cache.workload("j-1") is None
    assert cache.replace_workloads([workload(active=False)]) == {"kc-1"}
    assert cache.workload("j-1")["active"] is False
    cache.put_workload(workload(), deleted=True)
    assert cache.workload("j-1") is None


def test_a_delivery_s_jobs_are_found_in_the_cache_with_what_clean_up_and_the_sweep_read():
    from k8s_celery.informer import slim_job
    from k8s_celery.manifest import ANNOTATION_KEEP_UNTIL, ANNOTATION_TASK_ID, LABEL_DELIVERY

    cache = ObjectCache()
    first = job("kc-1", "uid-1")
    first["metadata"].update(labels={LABEL_DELIVERY: "d-1", "team": "x"},
                             annotations={ANNOTATION_KEEP_UNTIL: "2030-01-01T00:00:00Z", "other": "y",
                                          ANNOTATION_TASK_ID: "t-1"})
    first["spec"]["ttlSecondsAfterFinished"] = 600
    second = job("kc-2", "uid-2")
    second["metadata"]["labels"] = {LABEL_DELIVERY: "d-1"}
    other = job("kc-3", "uid-3")
    other["metadata"]["labels"] = {LABEL_DELIVERY: "d-2"}
    for each in (first, second, other):
        cache.put_job(each)
    assert sorted(j["metadata"]["name"] for j in cache.jobs_of_delivery("d-1")) == ["kc-1", "kc-2"]
    assert slim_job(first)["metadata"]["annotations"] == {ANNOTATION_KEEP_UNTIL: "2030-01-01T00:00:00Z",
                                                          ANNOTATION_TASK_ID: "t-1"}
    assert slim_job(first)["spec"] == {"ttlSecondsAfterFinished": 600}
    cache.delete_job(second)
    assert [j["metadata"]["name"] for j in cache.jobs_of_delivery("d-1")] == ["kc-1"]
    assert sorted(j["metadata"]["name"] for j in cache.jobs()) == ["kc-1", "kc-3"]


def test_jobs_of_a_delivery_follow_relists_and_are_forgotten_with_their_last_job():
    from k8s_celery.manifest import LABEL_DELIVERY

    cache = ObjectCache()
    attempts = [job(f"kc-{n}", f"uid-{n}") for n in (1, 2)]
    for each in attempts:
        each["metadata"]["labels"] = {LABEL_DELIVERY: "d-1"}
        cache.put_job(each)
    cache.put_job(attempts[0])  # a later event of the same Job
    assert [j["metadata"]["name"] for j in cache.jobs_of_delivery("d-1")] == ["kc-1", "kc-2"]
    cache.replace_jobs([attempts[1]])  # a relist without the first attempt
    assert [j["metadata"]["name"] for j in cache.jobs_of_delivery("d-1")] == ["kc-2"]
    cache.delete_job(attempts[1])
    assert cache.jobs_of_delivery("d-1") == []
    assert cache._jobs_by_delivery == {}
