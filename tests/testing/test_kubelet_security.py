"""Security contexts as the process kubelet applies and refuses them."""

from __future__ import annotations

from k8s_celery.testing.kubelet.security import security_context, security_error, volume_owner


def test_the_container_overrides_the_pod_and_root_is_the_default():
    assert security_context({}, {}) == {"uid": 0, "gid": 0, "groups": [], "runAsNonRoot": False,
                                        "readOnlyRootFilesystem": False, "noNewPrivileges": False}
    pod_spec = {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000,
                                    "supplementalGroups": [3000, 4000], "runAsNonRoot": True}}
    container = {"securityContext": {"runAsUser": 1001, "readOnlyRootFilesystem": True,
                                     "allowPrivilegeEscalation": False}}
    assert security_context(pod_spec, container) == {
        "uid": 1001, "gid": 1000, "groups": [2000, 3000, 4000], "runAsNonRoot": True,
        "readOnlyRootFilesystem": True, "noNewPrivileges": True}


def test_only_an_explicit_false_forbids_privilege_escalation():
    assert not security_context({}, {"securityContext": {"allowPrivilegeEscalation": True}})["noNewPrivileges"]
    assert security_context({}, {"securityContext": {"allowPrivilegeEscalation": False}})["noNewPrivileges"]


def test_run_as_non_root_refuses_root_with_the_kubelets_words():
    assert security_error({"securityContext": {"runAsNonRoot": True}}, {}) == \
        "container has runAsNonRoot and image will run as root"
    assert security_error({}, {"securityContext": {"runAsNonRoot": True, "runAsUser": 0}}) == \
        "container's runAsUser breaks non-root policy"
    assert security_error({"securityContext": {"runAsUser": 0}},
                          {"securityContext": {"runAsNonRoot": True}}) == \
        "container's runAsUser breaks non-root policy"
    assert security_error({"securityContext": {"runAsNonRoot": True, "runAsUser": 1000}}, {}) is None
    assert security_error({}, {}) is None


def test_volume_owner_is_the_pods_user_and_fs_group():
    assert volume_owner({}) == (-1, -1)
    assert volume_owner({"securityContext": {"runAsUser": 1000, "fsGroup": 2000}}) == (1000, 2000)
    assert volume_owner({"securityContext": {"fsGroup": 2000}}) == (-1, 2000)
