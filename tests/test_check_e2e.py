"""``k8s-celery check`` against the real API server with RBAC on."""

from __future__ import annotations

import subprocess

import pytest

from conftest import RESTRICTED, label_namespace, run_check, write_manifest
from k8s_celery.check import REQUIRED_ACCESS
from k8s_celery.cluster import collection_path, object_path

pytestmark = pytest.mark.cluster


def grant(cluster, namespace: str, name: str, skip: tuple[str, str] | None = None) -> None:
    rules = {}
    for group, resource, verb, _ in REQUIRED_ACCESS:
        if (verb, resource) != skip:
            rules.setdefault((group, resource), []).append(verb)
    api = cluster.api
    api.create(collection_path("serviceaccounts", namespace), {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
    api.create(collection_path("roles", namespace), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
        "rules": [{"apiGroups": [group], "resources": [resource], "verbs": verbs}
                  for (group, resource), verbs in rules.items()]})
    api.create(collection_path("rolebindings", namespace), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})


def check(cluster, namespace, tmp_path, account: str) -> subprocess.CompletedProcess:
    write_manifest(tmp_path / "manifests", "kubernetes", "redis://broker:6379/0")
    return run_check(cluster, namespace, account, tmp_path / "manifests", tmp_path)


def test_check_passes_with_every_verb(k8s_cluster, k8s_namespace, tmp_path):
    grant(k8s_cluster, k8s_namespace, "shim")
    done = check(k8s_cluster, k8s_namespace, tmp_path, "shim")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASS") == 3 + len(REQUIRED_ACCESS) and "FAIL" not in done.stdout
    # The chart's Role is namespaced: it cannot read its Namespace's labels, and check says so.
    assert f"WARN  Pod Security of namespace {k8s_namespace}: cannot read the namespace's labels (403 Forbidden): " \
           "whether the API server enforces a Pod Security level on task pods is unknown" in done.stdout.splitlines()


def test_check_names_the_missing_verb(k8s_cluster, k8s_namespace, tmp_path):
    grant(k8s_cluster, k8s_namespace, "partial", skip=("delete", "jobs"))
    done = check(k8s_cluster, k8s_namespace, tmp_path, "partial")
    assert done.returncode == 1
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert failures == [f"FAIL  may delete jobs in namespace {k8s_namespace}: missing; needed to "
                        "remove finished Jobs, terminate revoked tasks"]


def test_kueue_access_is_not_needed_where_kueue_does_not_run_but_a_local_queue_label_fails(
        k8s_cluster, k8s_namespace, tmp_path):
    grant(k8s_cluster, k8s_namespace, "no-kueue", skip=("watch", "workloads"))
    done = check(k8s_cluster, k8s_namespace, tmp_path, "no-kueue")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (f"PASS  may not watch workloads in namespace {k8s_namespace}: needed only under Kueue, "
            "which this cluster does not run") in done.stdout.splitlines()
    labelled = write_manifest(tmp_path / "labelled", "kubernetes", "redis://broker:6379/0",
                              job_labels={"kueue.x-k8s.io/queue-name": "tasks"})
    done = run_check(k8s_cluster, k8s_namespace, "no-kueue", labelled.parent.parent, tmp_path)
    assert done.returncode == 1
    assert [line for line in done.stdout.splitlines() if line.startswith("FAIL")] == [
        "FAIL  LocalQueue tasks of queue kubernetes: the Jobs name LocalQueue tasks, but this cluster does "
        "not run Kueue: they would run unqueued"]


def test_check_warns_of_a_namespace_without_pod_security(k8s_cluster, k8s_namespace, tmp_path):
    grant(k8s_cluster, k8s_namespace, "reader")
    api = k8s_cluster.api
    name = f"read-{k8s_namespace}"
    api.create(collection_path("clusterroles"), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
        "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"],
                   "resourceNames": [k8s_namespace]}]})
    api.create(collection_path("clusterrolebindings"), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": k8s_namespace}]})
    try:
        done = check(k8s_cluster, k8s_namespace, tmp_path, "reader")
        assert done.returncode == 0, done.stdout + done.stderr  # a warning does not fail the check
        assert (f"WARN  Pod Security of namespace {k8s_namespace}: no pod-security.kubernetes.io/enforce label: "
                "task pods get the cluster's default level (privileged unless configured); label the namespace "
                "pod-security.kubernetes.io/enforce=restricted, which the chart's pods meet"
                ) in done.stdout.splitlines()

        label_namespace(k8s_cluster, k8s_namespace, RESTRICTED)
        done = check(k8s_cluster, k8s_namespace, tmp_path, "reader")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "WARN" not in done.stdout
        assert (f"PASS  Pod Security of namespace {k8s_namespace}: pod-security.kubernetes.io/enforce=restricted"
                in done.stdout.splitlines())
    finally:
        api.delete(object_path("clusterrolebindings", None, name))
        api.delete(object_path("clusterroles", None, name))
