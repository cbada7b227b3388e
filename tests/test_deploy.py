"""deploy/: the Helm chart and the kustomize base render, validate, and run on the local cluster.

helm is built from its Go module (``python -m k8s_celery.testing.binaries``); the
ServiceMonitor is checked against the Prometheus Operator's own CRD, read from that
project's Go module.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import urllib3
import yaml

from conftest import APPS, RESTRICTED, dump_json, label_namespace, payload_secret_of, run_check, scrape_settled
from k8s_celery.check import REQUIRED_ACCESS
from k8s_celery.cluster import collection_path, object_path
from k8s_celery.config import validate_job_manifest, validate_object
from k8s_celery.testing import wait_for_condition, wait_until
from k8s_celery.testing.binaries import go_module_dir, helm_binary
from k8s_celery.testing.server import free_port

ROOT = Path(__file__).parent.parent
CHART = ROOT / "deploy" / "helm" / "k8s-celery"
KUSTOMIZE_BASE = ROOT / "deploy" / "kustomize" / "base"
KUBERNETES_VERSION = "1.33.13"
PROMETHEUS_OPERATOR = ("github.com/prometheus-operator/prometheus-operator", "v0.85.0")
REQUIRED_VALUES = {"image": {"repository": "registry.local/taskapp", "tag": "dev"},
                   "celery": {"app": "taskapp"}}


def helm_template(values: dict, namespace: str = "apps", release: str = "tasks") -> list[dict]:
    done = subprocess.run(
        [str(helm_binary()), "template", release, str(CHART), "--namespace", namespace,
         "--kube-version", KUBERNETES_VERSION, "--values", "-"],
        input=yaml.safe_dump(values), capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def kustomize(kubectl: Path) -> list[dict]:
    done = subprocess.run([str(kubectl), "kustomize", str(KUSTOMIZE_BASE)],
                          capture_output=True, text=True, timeout=60, check=True)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def queue_manifests(objects: list[dict]) -> dict[str, dict]:
    [config_map] = of_kind(objects, "ConfigMap")
    return {key.removesuffix(".yaml"): yaml.safe_load(text) for key, text in config_map["data"].items()}


def assert_schema_valid(objects: list[dict]) -> None:
    for obj in objects:
        validate_object(obj, f"{obj['kind']} {obj['metadata']['name']}", KUBERNETES_VERSION)
    for queue, manifest in queue_manifests(objects).items():
        validate_job_manifest(manifest, f"queue {queue}", KUBERNETES_VERSION)


def kubectl_run(cluster, *args: str, stdin: str | None = None, kubeconfig: Path | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
    argv = [str(cluster.bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig or cluster.kubeconfig), *args]
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done


def to_yaml(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


# -- rendering and validation --------------------------------------------------------


def test_chart_renders_schema_valid_objects():
    objects = helm_template({**REQUIRED_VALUES, "metrics": {"serviceMonitor": {"enabled": True}},
                             "queues": {"celery": {}, "reports": {"resources": {"limits": {"memory": "4Gi"}}}}})
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == ["ConfigMap", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount",
                     "ServiceAccount", "ServiceMonitor"]
    assert_schema_valid([obj for obj in objects if obj["kind"] != "ServiceMonitor"])
    assert sorted(queue_manifests(objects)) == ["celery", "reports"]
    [deployment] = of_kind(objects, "Deployment")
    [worker] = deployment["spec"]["template"]["spec"]["containers"]
    assert worker["args"][:3] == ["worker", "--app=taskapp", "--queues=celery,reports"]
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_chart_passes_helm_lint_strict():
    done = subprocess.run([str(helm_binary()), "lint", "--strict", str(CHART), "--kube-version", KUBERNETES_VERSION,
                           "--set", "image.repository=registry.local/taskapp", "--set", "celery.app=taskapp"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "0 chart(s) failed" in done.stdout, done.stdout + done.stderr


def test_kustomize_base_renders_schema_valid_objects(k8s_cluster):
    objects = kustomize(k8s_cluster.bin_dir / "kubectl")
    assert sorted(obj["kind"] for obj in objects) == ["ConfigMap", "Deployment", "Role", "RoleBinding",
                                                       "Service", "ServiceAccount", "ServiceAccount"]
    assert_schema_valid(objects)
    [config_map] = of_kind(objects, "ConfigMap")
    [deployment] = of_kind(objects, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["manifests"]["configMap"]["name"] == config_map["metadata"]["name"]  # hashed name
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/my-app:latest"


def test_chart_and_base_grant_the_same_rules_which_are_exactly_the_required_access(k8s_cluster):
    required = sorted((group, resource, verb) for group, resource, verb, _ in REQUIRED_ACCESS)
    for objects in (helm_template(REQUIRED_VALUES), kustomize(k8s_cluster.bin_dir / "kubectl")):
        [role] = of_kind(objects, "Role")
        granted = sorted((group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
                         for resource in rule["resources"] for verb in rule["verbs"])
        assert granted == required


def test_everything_passes_a_server_side_dry_run(k8s_cluster, k8s_namespace):
    crd_dir = go_module_dir(*PROMETHEUS_OPERATOR) / "example" / "prometheus-operator-crd"
    kubectl_run(k8s_cluster, "apply", "--server-side", "-f",
                str(crd_dir / "monitoring.coreos.com_servicemonitors.yaml"))
    wait_for_condition(k8s_cluster.api, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                       "servicemonitors.monitoring.coreos.com", "Established")
    chart = helm_template({**REQUIRED_VALUES, "metrics": {"serviceMonitor": {"enabled": True}}},
                          namespace=k8s_namespace)
    base = kustomize(k8s_cluster.bin_dir / "kubectl")
    for objects in (chart, base):
        done = kubectl_run(k8s_cluster, "apply", "-n", k8s_namespace, "--dry-run=server",
                           "--validate=strict", "-f", "-", stdin=to_yaml(objects))
        assert done.stdout.count("(server dry run)") == len(objects), done.stdout


def test_queue_entries_override_the_job_defaults():
    objects = helm_template({**REQUIRED_VALUES,
                             "kubernetesJobs": {"nodeSelector": {"pool": "general", "zone": "a"},
                                                "tolerations": [{"key": "general", "operator": "Exists"}],
                                                "env": [{"name": "DEFAULT", "value": "1"}]},
                             "queues": {"celery": {},
                                        "reports": {"image": {"repository": "registry.local/reports"},
                                                    "nodeSelector": {"pool": "batch"},
                                                    "tolerations": [],
                                                    "env": [{"name": "ONLY", "value": "2"}],
                                                    "resources": {"limits": {"memory": "4Gi"}},
                                                    "ttlSecondsAfterFinished": 0,
                                                    "securityContext": {"readOnlyRootFilesystem": False}}}})
    manifests = queue_manifests(objects)
    default_pod = manifests["celery"]["spec"]["template"]["spec"]
    pod = manifests["reports"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert default_pod["nodeSelector"] == {"pool": "general", "zone": "a"}
    assert pod["nodeSelector"] == {"pool": "batch", "zone": "a"}                      # maps merge
    assert "tolerations" not in pod and default_pod["tolerations"]                     # [] replaces
    assert container["env"] == [{"name": "ONLY", "value": "2"}]                        # lists replace
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"},
                                      "limits": {"memory": "4Gi"}}
    assert manifests["reports"]["spec"]["ttlSecondsAfterFinished"] == 0                 # 0 overrides
    assert container["securityContext"]["readOnlyRootFilesystem"] is False              # false overrides
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["image"] == "registry.local/reports:dev"
    assert default_pod["containers"][0]["image"] == "registry.local/taskapp:dev"


def test_task_pods_default_to_a_restricted_identity():
    objects = helm_template(REQUIRED_VALUES)
    pod = queue_manifests(objects)["celery"]["spec"]["template"]["spec"]
    task_account = next(sa for sa in of_kind(objects, "ServiceAccount") if sa["metadata"]["name"].endswith("-tasks"))
    assert pod["serviceAccountName"] == task_account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False and task_account["automountServiceAccountToken"] is False
    [binding] = of_kind(objects, "RoleBinding")
    assert [s["name"] for s in binding["subjects"]] == ["tasks-k8s-celery"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


@pytest.mark.parametrize("values, message", [
    ({"image": {"repository": "r"}}, "celery.app is required"),
    ({"celery": {"app": "a"}}, "image.repository is required"),
    ({**REQUIRED_VALUES, "queues": {"bad queue": {}}}, "must be a valid ConfigMap key"),
    ({**REQUIRED_VALUES, "queues": {"celery": {"resource": {}}}}, "additional properties 'resource' not allowed"),
    ({**REQUIRED_VALUES, "worker": {"maxJobs": 0}}, "maxJobs"),
])
def test_bad_values_fail_with_a_clear_message(values, message):
    with pytest.raises(RuntimeError, match=message):
        helm_template(values)


# -- the chart on the local control plane --------------------------------------------


def test_check_passes_with_the_chart_role_and_names_a_removed_verb(k8s_cluster, k8s_namespace, tmp_path):
    objects = helm_template({**REQUIRED_VALUES, "queues": {"kubernetes": {}}}, namespace=k8s_namespace)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for queue, manifest in queue_manifests(objects).items():
        (manifests / f"{queue}.yaml").write_text(yaml.safe_dump(manifest))
    kubectl_run(k8s_cluster, "apply", "-n", k8s_namespace, "-f", "-",
                stdin=to_yaml([o for o in objects if o["kind"] in ("ServiceAccount", "Role", "RoleBinding")]))
    done = run_check(k8s_cluster, k8s_namespace, "tasks-k8s-celery", manifests, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASS") == 3 + len(REQUIRED_ACCESS) and "FAIL" not in done.stdout

    [role] = of_kind(objects, "Role")
    for rule in role["rules"]:
        if rule["resources"] == ["pods"]:
            rule["verbs"].remove("watch")
    kubectl_run(k8s_cluster, "apply", "-n", k8s_namespace, "-f", "-", stdin=to_yaml([role]))
    done = wait_until(lambda: (lambda d: d if d.returncode else None)(
        run_check(k8s_cluster, k8s_namespace, "tasks-k8s-celery", manifests, tmp_path)),
        timeout=30, interval=1, message="check to see the narrowed Role")
    assert [line for line in done.stdout.splitlines() if line.startswith("FAIL")] == [
        f"FAIL  may watch pods in namespace {k8s_namespace}: missing; needed to follow every task pod "
        "with one watch"]


def installed_values(broker_url: str, metrics_port: int) -> dict:
    """The chart's defaults, but for what a process kubelet on this machine needs."""
    env = [{"name": "CELERY_BROKER_URL", "value": broker_url},
           {"name": "CELERY_RESULT_BACKEND", "value": broker_url},
           {"name": "PYTHONPATH", "value": str(APPS)}]
    # The "image" is this machine's filesystem, where /tmp may hold this checkout: the
    # scratch emptyDirs go elsewhere so that they do not hide it.
    scratch = [{"name": "tmp", "mountPath": "/var/tmp/k8s-celery-scratch"}]
    return {**REQUIRED_VALUES, "env": env, "queues": {"kubernetes": {}},
            "worker": {"extraArgs": ["--without-mingle", "--without-gossip"], "volumeMounts": scratch,
                       "extraEnv": [{"name": "K8S_CELERY_PENDING_TIMEOUT", "value": "60"}]},
            "kubernetesJobs": {"volumeMounts": scratch},
            # Mount the task account's token, to show that it is refused anyway.
            "taskServiceAccount": {"automountToken": True},
            "metrics": {"port": metrics_port}}


def test_installed_chart_runs_tasks_with_least_privilege(k8s_cluster, k8s_namespace, taskapp, broker_url):
    """The chart in a namespace that enforces Pod Security "restricted": the API server admits
    its worker pod and its task pods; a task's token reads no other task's payload."""
    port = free_port()
    api = k8s_cluster.api
    label_namespace(k8s_cluster, k8s_namespace, RESTRICTED)
    objects = helm_template(installed_values(broker_url, port), namespace=k8s_namespace)
    kubectl_run(k8s_cluster, "apply", "-n", k8s_namespace, "-f", "-", stdin=to_yaml(objects))

    def worker_pod() -> dict | None:
        pods, _ = api.list(collection_path("pods", k8s_namespace),
                           label_selector="app.kubernetes.io/component=worker")
        return next((p for p in pods if p["status"].get("phase") == "Running"), None)
    pod = wait_until(worker_pod, timeout=60, message="the worker pod running")
    try:
        # The worker is a pod of the Deployment, with its ServiceAccount's token and nothing else.
        assert pod["spec"]["serviceAccountName"] == "tasks-k8s-celery"
        assert taskapp.add.delay(2, 3).get(timeout=120) == 5
        assert taskapp.add.delay(4, 5).get(timeout=60) == 9
        other = taskapp.sleep.delay(10)  # another task, its payload Secret there while it runs
        other_secret = payload_secret_of(k8s_cluster, k8s_namespace, other.id)
        answers = taskapp.api_access.delay(other_secret).get(timeout=60)
        assert answers == {"list pods": 403, "create jobs": 403, "get the other task's secret": 403,
                           "list secrets": 403, "create a pod mounting it": 403}

        task_pods, _ = api.list(collection_path("pods", k8s_namespace),
                                label_selector="app.kubernetes.io/managed-by=k8s-celery")
        for task_pod in task_pods:  # those not yet deleted after their ack
            assert task_pod["spec"]["serviceAccountName"] == "tasks-k8s-celery-tasks"
            assert task_pod["spec"]["securityContext"]["runAsUser"] == 1000

        # Waiting for the acks alone raced the clean-up: one slot was still held (in flight 1).
        assert other.get(timeout=60) == 10
        samples = scrape_settled(port, acks=4)
        add = (("queue", "kubernetes"), ("task", "taskapp.add"))
        assert samples[("k8s_celery_jobs_launched_total", add)] == 2
        assert samples[("k8s_celery_task_outcomes_total", tuple(sorted(add + (("outcome", "succeeded"),))))] == 2
        assert samples[("k8s_celery_launch_seconds_count", ())] == 4
        assert samples[("k8s_celery_jobs_in_flight", ())] == 0
        health = urllib3.PoolManager().request("GET", f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status == 200
    except BaseException:
        print(f"---- worker pod log ----\n{k8s_cluster.kubelet.pod_log(k8s_namespace, pod['metadata']['name'])}")
        print(dump_json(api.list(collection_path("pods", k8s_namespace))[0]))
        raise
    finally:
        api.delete(object_path("deployments", k8s_namespace, "tasks-k8s-celery"))


# -- the image -------------------------------------------------------------------------

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    joined = " ".join(line for line in lines if line and not line.startswith("#")).replace("\\ ", "")
    parts = [part.strip() for part in
             re.split(r"\s(?=(?:FROM|COPY|RUN|ENV|USER|WORKDIR|ARG|ENTRYPOINT|CMD)\s)", joined)]
    return [tuple(part.split(None, 1)) for part in parts]


def test_image_wheel_builds_from_the_dockerfile_context_and_runs(tmp_path):
    """The Dockerfile's first stage builds a wheel from the files it copies; that wheel
    alone provides the package and the `k8s-celery` command."""
    context = tmp_path / "context"
    for instruction, argument in dockerfile_instructions():
        if instruction == "COPY" and not argument.startswith("--from"):
            *sources, _ = argument.split()
            for source in sources:
                target = context / source
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / source, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"),
                    str(context)], check=True, timeout=300, capture_output=True)
    [wheel] = (tmp_path / "wheels").glob("k8s_celery-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    probe = subprocess.run([sys.executable, "-c", "import k8s_celery, k8s_celery.pool, k8s_celery.runner; "
                            "print(k8s_celery.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(str(tmp_path / "site"))
    command = subprocess.run([str(tmp_path / "site" / "bin" / "k8s-celery"), "--help"], cwd=tmp_path,
                             env={**env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                             capture_output=True, text=True)
    assert command.returncode == 0 and "run-task" in command.stdout


def test_image_runs_as_the_chart_user_with_the_k8s_celery_entrypoint():
    instructions = dockerfile_instructions()
    users = [argument for instruction, argument in instructions if instruction == "USER"]
    chart_user = yaml.safe_load((CHART / "values.yaml").read_text())["worker"]["podSecurityContext"]["runAsUser"]
    assert users[-1] == str(chart_user)
    assert ("ENTRYPOINT", '["k8s-celery"]') in instructions
