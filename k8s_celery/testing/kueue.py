"""Kueue's manager on a :class:`~k8s_celery.testing.cluster.LocalCluster`, for real.

The manager is built from its Go module (``sigs.k8s.io/kueue``, cached like the
control plane) and runs as a process of the cluster: its CRDs are applied from the
module's ``config/components/crd/bases``, and its webhooks from
``config/components/webhook/manifests.yaml`` with a URL client configuration (the
local API server has no Service network) and a serving certificate of the cluster's
own CA. So the real webhook suspends a queue-labelled Job and the real controllers
admit, preempt and resume it. Only the ``batch/job`` integration is enabled, and
only the webhooks of what the manager serves are registered (Kueue's own kinds and
``batch/v1`` Jobs): one for a kind it does not serve would refuse every such object.

Kueue's manager reads the certificate of its metrics endpoint from the fixed
``/etc/kueue/metrics/certs`` unless it manages its certificates itself (which needs
its Service); a certificate of the cluster's CA is written there when missing.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..cluster import ApiError
from . import binaries, pki, wait_for_condition
from .server import free_port

KUEUE_VERSION = "v0.17.0"
MODULE = "sigs.k8s.io/kueue"
METRICS_CERTS = Path("/etc/kueue/metrics/certs")
NAMESPACE = "kueue-system"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
API = "/apis/kueue.x-k8s.io/v1beta2"
WEBHOOK_PATHS = {"MutatingWebhookConfiguration": "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                 "ValidatingWebhookConfiguration":
                     "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"}


def kueue_binary(build: bool = False) -> Path:
    """The Kueue manager (``$K8S_CELERY_KUEUE``, else the cached build), built if asked to
    (``go install``, about 3 minutes on 2 cores)."""
    configured = os.environ.get("K8S_CELERY_KUEUE")
    binary = Path(configured) if configured else binaries.cache_root() / f"kueue-{KUEUE_VERSION}" / "kueue"
    if os.access(binary, os.X_OK):
        return binary
    if configured or not build:
        raise binaries.BinariesMissing(f"the Kueue manager is not at {binary}; run "
                                       "`python -m k8s_celery.testing.kueue`")
    started = time.monotonic()
    partial = binary.parent.with_name(binary.parent.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    env = dict(os.environ, GOBIN=str(partial), GOTOOLCHAIN="local")
    subprocess.run([binaries._go(), "install", f"{MODULE}/cmd/kueue@{KUEUE_VERSION}"], env=env, check=True)
    shutil.rmtree(binary.parent, ignore_errors=True)
    partial.rename(binary.parent)
    print(f"built Kueue {KUEUE_VERSION} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return binary


def served_webhooks(configuration: dict) -> list[dict]:
    """The webhooks of one configuration that the manager serves (Kueue's kinds, batch/v1 Jobs)."""
    def served(webhook: dict) -> bool:
        return all(set(rule.get("apiGroups", [])) <= {"kueue.x-k8s.io"} or
                   (rule.get("apiGroups") == ["batch"] and rule.get("resources") == ["jobs"])
                   for rule in webhook.get("rules", []))
    return [webhook for webhook in configuration.get("webhooks", []) if served(webhook)]


class Kueue:
    """Kueue's manager as a process of a started LocalCluster (stopped with it)."""

    def __init__(self, cluster, build: bool = True, settings: dict | None = None):
        self.cluster = cluster
        self.settings = settings or {}
        self.binary = kueue_binary(build=build)
        self.source = binaries.go_module_dir(MODULE, KUEUE_VERSION)
        self.dir = cluster.workdir / "kueue"
        self.webhook_port, self.health_port, self.metrics_port = free_port(), free_port(), free_port()

    def start(self, timeout: float = 90) -> Kueue:
        api = self.cluster.api
        for path in sorted((self.source / "config/components/crd/bases").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            api.create(CRDS, crd)
        for path in sorted((self.source / "config/components/crd/bases").glob("*.yaml")):
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            wait_for_condition(api, f"{CRDS}/{name}", ("Established",), timeout=timeout)
        try:
            self.cluster.create_namespace(NAMESPACE, wait_service_account=False)
        except ApiError as exc:
            if exc.status != 409:
                raise
        certs = self.dir / "certs"
        cert, key = pki.issue_serving(self.cluster.pki, "kueue-webhook", ("127.0.0.1",), self.dir / "pki")
        certs.mkdir(parents=True, exist_ok=True)
        shutil.copy(cert, certs / "tls.crt")
        shutil.copy(key, certs / "tls.key")
        if not (METRICS_CERTS / "tls.crt").exists():
            METRICS_CERTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(cert, METRICS_CERTS / "tls.crt")
            shutil.copy(key, METRICS_CERTS / "tls.key")
        config = self.dir / "configuration.yaml"
        config.write_text(yaml.safe_dump(self.configuration(certs)))
        process = self.cluster._spawn("kueue", [str(self.binary), f"--config={config}",
                                                "--feature-gates=VisibilityOnDemand=false"],
                                      env={**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)})
        deadline = time.monotonic() + timeout
        while not _listening(self.webhook_port):
            if not process.alive or time.monotonic() > deadline:
                raise RuntimeError(f"Kueue's webhook server did not start:\n{process.log_tail()}")
            time.sleep(0.2)
        self.register_webhooks()
        return self

    def configuration(self, certs: Path) -> dict:
        """Kueue's Configuration for a manager outside the cluster, with :attr:`settings`
        (fields of the Configuration, such as ``waitForPodsReady``) added."""
        return {**self.settings,
                "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": NAMESPACE,
                "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
                "metrics": {"bindAddress": f"127.0.0.1:{self.metrics_port}"},
                "webhook": {"host": "127.0.0.1", "port": self.webhook_port, "certDir": str(certs)},
                "leaderElection": {"leaderElect": False},
                "internalCertManagement": {"enable": False},
                "integrations": {"frameworks": ["batch/job"]}}

    def register_webhooks(self) -> None:
        """The module's webhook configurations, each webhook pointed at the manager by URL."""
        ca_bundle = base64.b64encode(self.cluster.pki.ca_cert.read_bytes()).decode()
        manifests = self.source / "config/components/webhook/manifests.yaml"
        for configuration in yaml.safe_load_all(manifests.read_text()):
            if not configuration or configuration.get("kind") not in WEBHOOK_PATHS:
                continue
            webhooks = served_webhooks(configuration)
            for webhook in webhooks:
                path = webhook["clientConfig"]["service"]["path"]
                webhook["clientConfig"] = {"url": f"https://127.0.0.1:{self.webhook_port}{path}",
                                           "caBundle": ca_bundle}
            name = f"kueue-{configuration['metadata']['name']}"
            self.cluster.api.create(WEBHOOK_PATHS[configuration["kind"]],
                                    {**configuration, "metadata": {"name": name}, "webhooks": webhooks})

    def workloads(self, namespace: str) -> list[dict]:
        """The Workloads Kueue made in ``namespace``."""
        return self.cluster.api.list(f"{API}/namespaces/{namespace}/workloads")[0]

    def create(self, kind: str, obj: dict, namespace: str | None = None, exist_ok: bool = False) -> dict | None:
        """Create one of Kueue's objects (``clusterqueues``, ``localqueues``, ``resourceflavors``…);
        with ``exist_ok``, one that is there already (a cluster-wide flavor, say) is left as it is."""
        scope = f"/namespaces/{namespace}" if namespace else ""
        try:
            return self.cluster.api.create(f"{API}{scope}/{kind}", {"apiVersion": "kueue.x-k8s.io/v1beta2", **obj})
        except ApiError as exc:
            if exist_ok and exc.status == 409:
                return None
            raise


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> int:
    """``[--check]``: build (or only look for) the Kueue manager; print its path."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        print(kueue_binary(build="--check" not in argv))
    except (binaries.BinariesMissing, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
