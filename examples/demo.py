"""Run k8s-celery end to end on this machine.

Starts Redis and the local Kubernetes control plane (with the process kubelet),
starts `k8s-celery worker` on the `kubernetes` queue, publishes tasks with
apply_async from this process, and prints what came back and what ran where.

``--real-node``: the tasks run in containers of a real node instead (kubelet,
containerd, runc), from an image of the demo app built here from
deploy/docker/Dockerfile (needs root; see k8s_celery.testing.realnode).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "app"))


def on_real_node(cluster, redis_server, manifest: dict) -> str:
    """Build and import the demo app's image; point the manifest at it; Redis for pods."""
    from k8s_celery.testing.realnode.images import ImageBuilder

    started = time.monotonic()
    image = ImageBuilder().demo_app()
    cluster.real_node.import_image(image)
    print(f"image {image.name} ready in {time.monotonic() - started:.0f}s")
    address = cluster.real_node.node_address  # pods reach this machine there, not on loopback
    redis_server.client().config_set("bind", f"127.0.0.1 {address}")
    manifest["spec"]["template"]["spec"]["containers"][0].update(image=image.name, imagePullPolicy="Never")
    return f"redis://{address}:{redis_server.port}/0"


def main(argv: list[str]) -> int:
    from k8s_celery.cluster import collection_path
    from k8s_celery.tasklogs import print_logs
    from k8s_celery.testing import LocalCluster, RedisServer, wait_until

    real_node = "--real-node" in argv
    work = Path(tempfile.mkdtemp(prefix="k8s-celery-demo-"))
    with RedisServer() as redis_server, LocalCluster(node="real" if real_node else "process") as cluster:
        broker = f"{redis_server.url}/0"
        os.environ.update(CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND=broker)
        print(f"redis at {broker}; Kubernetes API at {cluster.server}")
        print(f"  (kubectl --kubeconfig {cluster.kubeconfig} get jobs,pods -w  to watch)")

        manifest = yaml.safe_load((HERE / "manifests" / "kubernetes" / "manifest.yaml").read_text())
        container = manifest["spec"]["template"]["spec"]["containers"][0]
        pod_broker = on_real_node(cluster, redis_server, manifest) if real_node else broker
        container["env"] = [{"name": "CELERY_BROKER_URL", "value": pod_broker},
                            {"name": "CELERY_RESULT_BACKEND", "value": pod_broker}]
        if not real_node:  # the process kubelet runs the app from this checkout
            container["env"].append({"name": "PYTHONPATH", "value": str(HERE / "app")})
            # Its "image" is this machine's filesystem, whose /tmp holds the cluster: the
            # scratch emptyDir goes elsewhere so that it does not hide it.
            for mount in container.get("volumeMounts", []):
                if mount["mountPath"] == "/tmp":
                    mount["mountPath"] = "/var/tmp/k8s-celery-scratch"
        (work / "manifests" / "kubernetes").mkdir(parents=True)
        (work / "manifests" / "kubernetes" / "manifest.yaml").write_text(yaml.safe_dump(manifest))

        log_path = work / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "k8s_celery", "worker", "-A", "demo_app", "-Q", "kubernetes",
             "--manifests", str(work / "manifests"), "--namespace", "default",
             "--kubeconfig", str(cluster.kubeconfig), "--max-jobs", "4", "-l", "INFO",
             "-n", "demo-shim@local"],
            env={**os.environ, "PYTHONPATH": str(HERE / "app"), "C_FORCE_ROOT": "1"},
            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            from demo_app import app, crunch, report

            wait_until(lambda: app.control.ping(destination=["demo-shim@local"], timeout=0.5),
                       timeout=60, message="the worker")
            print("worker up; publishing tasks with apply_async")
            started = time.monotonic()
            calls = {
                "crunch(200000)": crunch.apply_async((200000,)),
                "crunch(10)": crunch.apply_async((10,), countdown=1),
                "report('weekly')": report.apply_async(("weekly",)),
                "report('flaky')": report.apply_async(("flaky",)),
                "report('broken')": report.apply_async(("broken",)),
            }
            for call, result in calls.items():
                try:
                    value = result.get(timeout=120)
                    print(f"  {call:20} -> {result.state}: {value}")
                except Exception as exc:
                    print(f"  {call:20} -> {result.state}: {type(exc).__name__}: {exc}")
            print(f"all results in {time.monotonic() - started:.1f}s")
            broken = calls["report('broken')"].id
            calls.clear()  # let the result consumers go before Redis stops

            def relayed() -> list[str]:  # the failed task's pod output, in the worker's log
                lines = log_path.read_text(errors="replace").splitlines()
                return [line for line in lines if f"[{broken}] pod " in line]
            try:
                wait_until(lambda: any("FAILURE in" in line for line in relayed()), timeout=15)
            except TimeoutError:
                pass
            print("the failed task's output, relayed into the worker's log:")
            for line in relayed()[:14]:  # the header, then each line of the pod's output
                message = line.split("] ", 1)[-1]
                print("  " + (message.split("| ", 1)[1] if "| " in message else message)[:150])

            def jobs_left() -> int:
                return len(cluster.api.list(collection_path("jobs", "default"))[0])
            try:
                wait_until(lambda: jobs_left() == 1, timeout=10)
            except TimeoutError:
                pass
            print(f"Jobs left in the namespace: {jobs_left()} (a success's Job is deleted once its message is acked;"
                  " a failed task's is kept an hour: K8S_CELERY_KEEP_FAILED_JOBS)")
            answer = io.BytesIO()
            print_logs(cluster.api, "default", broken, out=answer)
            print(f"k8s-celery logs {broken} (the kept Job's pod, while the cluster runs):")
            print("  " + answer.getvalue().decode(errors="replace").splitlines()[0])
            return 0
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
            print(f"worker log: {log_path}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
