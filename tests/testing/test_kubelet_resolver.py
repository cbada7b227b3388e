"""What the process kubelet resolves from the pod itself: $(VAR), downward API, projections."""

from __future__ import annotations

import os

import pytest

from k8s_celery.testing.kubelet.resolver import (downward_files, expand, field_value, project,
                                                  required_objects, resource_value)

POD = {"metadata": {"namespace": "ns", "name": "web-1", "uid": "u-1",
                    "labels": {"app": "web", "tier": "front"}, "annotations": {"note": "hi"}},
       "spec": {"nodeName": "local-node", "serviceAccountName": "robot",
                "containers": [{"name": "main", "resources": {"limits": {"memory": "64Mi"}}}]}}


@pytest.mark.parametrize("value, expected", [
    ("$(A)-$(B)", "1-two"),
    ("$$(A)", "$(A)"),                     # $$ escapes
    ("$(UNKNOWN) stays", "$(UNKNOWN) stays"),
    ("$A and $(A", "$A and $(A"),          # not references
    ("$$$(A)", "$1"),
    ("$(dotted.name-1)", "ok"),
])
def test_expand(value, expected):
    assert expand(value, {"A": "1", "B": "two", "dotted.name-1": "ok"}) == expected


def test_field_value_reads_metadata_spec_and_addresses():
    assert field_value(POD, "metadata.name") == "web-1"
    assert field_value(POD, "metadata.namespace") == "ns"
    assert field_value(POD, "metadata.uid") == "u-1"
    assert field_value(POD, "spec.nodeName") == "local-node"
    assert field_value(POD, "spec.serviceAccountName") == "robot"
    assert field_value(POD, "status.podIP") == field_value(POD, "status.hostIP") == "127.0.0.1"


def test_field_value_of_labels_and_annotations():
    assert field_value(POD, "metadata.labels['app']") == "web"
    assert field_value(POD, "metadata.labels['absent']") == ""
    assert field_value(POD, "metadata.annotations['note']") == "hi"
    assert field_value(POD, "metadata.labels") == 'app="web"\ntier="front"'


def test_field_value_refuses_unsupported_paths():
    with pytest.raises(ValueError, match="unsupported fieldRef 'spec.hostname'"):
        field_value(POD, "spec.hostname")


def test_resource_value_is_the_declared_value_or_the_node_size():
    container = POD["spec"]["containers"][0]
    assert resource_value(container, {"resource": "limits.memory"}) == "64Mi"
    assert resource_value(container, {"resource": "requests.cpu"}) == str(os.cpu_count() or 1)
    assert resource_value(container, {"resource": "limits.memory-absent"}) == str(16 * 2**30)


def test_project_every_key_or_the_listed_items():
    data = {"a": b"A", "b": b"B"}
    assert project(data, None, 0o644) == {"a": (b"A", 0o644), "b": (b"B", 0o644)}
    items = [{"key": "a", "path": "dir/a", "mode": 0o400}, {"key": "b", "path": "b"}, {"key": "c", "path": "c"}]
    assert project(data, items, 0o440) == {"dir/a": (b"A", 0o400), "b": (b"B", 0o440)}


def test_downward_files():
    items = [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
             {"path": "mem", "resourceFieldRef": {"containerName": "main", "resource": "limits.memory"},
              "mode": 0o600}]
    assert downward_files(POD, items, 0o644) == {"labels": (b'app="web"\ntier="front"', 0o644),
                                                 "mem": (b"64Mi", 0o600)}


def test_required_objects_are_the_non_optional_references():
    pod = {"metadata": {"namespace": "ns"}, "spec": {
        "volumes": [{"name": "v1", "secret": {"secretName": "s-vol"}},
                    {"name": "v2", "configMap": {"name": "c-opt", "optional": True}},
                    {"name": "v3", "projected": {"sources": [{"secret": {"name": "s-proj"}},
                                                             {"configMap": {"name": "c-proj"}}]}},
                    {"name": "v4", "emptyDir": {}}],
        "initContainers": [{"name": "init", "envFrom": [{"secretRef": {"name": "s-init"}}]}],
        "containers": [{"name": "main",
                        "env": [{"name": "A", "value": "a"},
                                {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "c-env", "key": "k"}}},
                                {"name": "C", "valueFrom": {"secretKeyRef": {"name": "s-opt", "key": "k",
                                                                             "optional": True}}}],
                        "envFrom": [{"configMapRef": {"name": "c-from"}}]}]}}
    assert required_objects(pod) == {
        ("secrets", "ns", "s-vol"), ("secrets", "ns", "s-proj"), ("configmaps", "ns", "c-proj"),
        ("secrets", "ns", "s-init"), ("configmaps", "ns", "c-env"), ("configmaps", "ns", "c-from")}
