"""Settings precedence and manifest validation."""

from __future__ import annotations

import json

import pytest

from k8s_celery.config import ManifestStore, Settings
from k8s_celery.errors import ConfigError, ManifestError

JOB = {"apiVersion": "batch/v1", "kind": "Job",
       "spec": {"template": {"spec": {"containers": [{"name": "t", "image": "i"}]}}}}


def test_environment_beats_celery_config_and_options_beat_both():
    conf = {"k8s_celery_pending_timeout": 10, "k8s_celery_namespace": "from-conf"}
    env = {"K8S_CELERY_PENDING_TIMEOUT": "20"}
    settings = Settings.load(conf, environ=env)
    assert settings.pending_timeout == 20 and settings.namespace == "from-conf"
    assert Settings.load(conf, environ=env, pending_timeout=30).pending_timeout == 30


def test_bad_values_name_their_source():
    with pytest.raises(ConfigError, match="K8S_CELERY_MAX_LOST_ATTEMPTS"):
        Settings.load({}, environ={"K8S_CELERY_MAX_LOST_ATTEMPTS": "0"})
    with pytest.raises(ConfigError, match="k8s_celery_pending_timeout"):
        Settings.load({"k8s_celery_pending_timeout": "soon"}, environ={})


def test_runner_command_accepts_json_or_words():
    assert Settings.load({}, environ={"K8S_CELERY_RUNNER_COMMAND": '["a", "b c"]'}).runner_command == ["a", "b c"]
    assert Settings.load({}, environ={"K8S_CELERY_RUNNER_COMMAND": "a b"}).runner_command == ["a", "b"]


def store(tmp_path, **settings) -> ManifestStore:
    return ManifestStore(Settings(manifests_dir=str(tmp_path), **settings))


def test_per_queue_manifest_in_json_or_yaml(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(JOB))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.yaml").write_text("apiVersion: batch/v1\nkind: Job\nspec:\n  template:\n"
                                                  "    spec:\n      containers: [{name: t, image: i}]\n")
    assert store(tmp_path).load("a") == JOB
    assert store(tmp_path).load("b")["spec"]["template"]["spec"]["containers"][0]["image"] == "i"


def test_flat_file_per_queue_as_a_mounted_configmap_has_them(tmp_path):
    (tmp_path / "celery.yaml").write_text(json.dumps(JOB))
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "manifest.json").write_text(json.dumps(JOB))
    (tmp_path / "nested.yaml").write_text("not: [a job")
    assert store(tmp_path).load("celery") == JOB
    assert store(tmp_path).path_for("nested") == tmp_path / "nested" / "manifest.json"


def test_edits_apply_to_the_next_load(tmp_path):
    (tmp_path / "q").mkdir()
    path = tmp_path / "q" / "manifest.json"
    path.write_text(json.dumps(JOB))
    manifests = store(tmp_path)
    manifests.load("q")
    changed = json.loads(json.dumps(JOB))
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = "new"
    path.write_text(json.dumps(changed))
    assert manifests.load("q")["spec"]["template"]["spec"]["containers"][0]["image"] == "new"


def test_fallback_manifest_from_environment(tmp_path):
    manifests = store(tmp_path, job_manifest=json.dumps(JOB))
    assert manifests.has_manifest("anything") and manifests.load("anything") == JOB


def test_missing_manifest_names_the_expected_path(tmp_path):
    with pytest.raises(ManifestError, match="no manifest for queue 'nope'"):
        store(tmp_path).load("nope")


@pytest.mark.parametrize("text, field, reason", [
    ("a: [", None, "not valid JSON or YAML"),
    ("apiVersion: v1\nkind: Pod\n", "kind", "must be apiVersion batch/v1"),
    (json.dumps({**JOB, "spec": {"template": {"spec": {"containers": [{"name": "t", "image": "i",
                                                                        "bogus": 1}]}}}}),
     "spec.template.spec.containers.0", "bogus"),
    (json.dumps({**JOB, "spec": {"template": {"spec": {"containers": [{"name": "t", "image": "i",
                                                                        "resources": {"limits": {"cpu": []}}}]}}}}),
     "spec.template.spec.containers.0.resources.limits.cpu", "[]"),
    (json.dumps({**JOB, "spec": {"suspend": True, "template": {"spec": {"containers": [{"name": "t", "image": "i"}]}}}}),
     "spec.suspend", "a suspended Job would never run its task: under Kueue, label the Job kueue.x-k8s.io/queue-name"),
    (json.dumps({**JOB, "metadata": {"annotations": {"k8s-celery.io/payload": "plain"}},
                 "spec": {"template": {"spec": {"containers": [{"name": "t", "image": "i"}]}}}}),
     "metadata.annotations.k8s-celery.io/payload", "'plain' is not a payload mode: secret or inline"),
])
def test_invalid_manifests_say_file_field_and_reason(tmp_path, text, field, reason):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "manifest.yaml").write_text(text)
    with pytest.raises(ManifestError) as raised:
        store(tmp_path).load("q")
    assert str(tmp_path / "q" / "manifest.yaml") in str(raised.value)
    assert reason in str(raised.value)
    if field:
        assert raised.value.field == field
