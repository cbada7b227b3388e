"""A real, local Kubernetes control plane for tests and demos, with no Docker.

:class:`LocalCluster` runs etcd, kube-apiserver (RBAC on, TLS, service-account
token signing) and kube-controller-manager (Job, TTL, garbage-collector, pod-GC,
namespace and service-account controllers) on loopback, plus a
:class:`~k8s_celery.testing.kubelet.ProcessKubelet`::

    with LocalCluster() as cluster:
        api = cluster.api                      # admin KubeApi
        print(cluster.kubeconfig)              # for the kubernetes client or kubectl
        cluster.kubelet.evict("default", "my-pod")

``LocalCluster(node="real")`` runs a real node instead: kube-scheduler, kubelet and
kube-proxy of the same release with containerd and runc (see
:mod:`k8s_celery.testing.realnode`); it needs root and takes the machine-wide lock.
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import secrets
import shutil
import signal
import tempfile
import time
from pathlib import Path

import urllib3

from ..cluster import ApiError, KubeApi, RetryPolicy, load_configuration, object_path
from . import binaries, pki
from .kubelet import ProcessKubelet
from .requirements import require_real_node
from .server import ManagedProcess, free_port

log = logging.getLogger(__name__)

CONTROLLERS = (
    "job-controller", "ttl-after-finished-controller", "garbage-collector-controller",
    "pod-garbage-collector-controller", "namespace-controller", "serviceaccount-controller",
    "serviceaccount-token-controller", "root-ca-certificate-publisher-controller",
    "deployment-controller", "replicaset-controller", "resourcequota-controller",
)
#: With a real node, its not-ready taint must go once it is Ready (the scheduler obeys it), and
#: the pods of a node that stops reporting are deleted as their tolerations say.
REAL_NODE_CONTROLLERS = ("node-lifecycle-controller", "taint-eviction-controller")
NODES = ("process", "real")


def with_flags(argv: list[str], flags: dict[str, str]) -> list[str]:
    """``argv`` with each ``--name=value`` of ``flags`` replacing (or appended to) its own."""
    kept = [arg for arg in argv if arg.split("=", 1)[0] not in flags]
    return kept + [f"{name}={value}" for name, value in flags.items()]


class ControlPlaneError(RuntimeError):
    """A control-plane process failed to start or to become ready."""


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + process kubelet on loopback.

    Use as a context manager; on exit every process it started is stopped and its
    temporary directory removed. ``kubelet=False`` starts no kubelet (pods stay
    Pending); ``kubelet_options`` go to :class:`ProcessKubelet`. ``node="real"`` runs a
    :class:`~k8s_celery.testing.realnode.RealNode` (``node_options`` go to it) instead,
    with the real kube-scheduler; the API server then listens on the node's address,
    which :attr:`server` and every kubeconfig name. ``watch_cache=False``
    (the default) serves watches straight from etcd, so that etcd compaction makes
    an old resourceVersion answer 410 Gone as it would on a busy cluster.
    ``audit_log=True`` records every request in :attr:`audit_log_path`. ``kueue=True``
    runs Kueue's manager with its webhooks (:attr:`kueue`, :mod:`.kueue`); a dict instead
    adds its fields to Kueue's Configuration (``{"waitForPodsReady": {...}}``).
    """

    def __init__(self, *, kubelet: bool = True, kubelet_options: dict | None = None,
                 bin_dir: str | Path | None = None, workdir: str | Path | None = None,
                 watch_cache: bool = False, audit_log: bool = False,
                 startup_timeout: float = 90.0, build: bool = True,
                 node: str = "process", node_options: dict | None = None, kueue: bool | dict = False):
        if node not in NODES:
            raise ValueError(f"node must be one of {NODES}, not {node!r}")
        if node == "real" and kubelet:
            require_real_node()
        self.bin_dir = Path(bin_dir) if bin_dir else binaries.binary_dir(build=build)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="k8s-celery-cluster-"))
        self.with_kubelet = kubelet
        self.kubelet_options = kubelet_options or {}
        self.watch_cache = watch_cache
        self.audit_log_path = self.workdir / "audit.log" if audit_log else None
        self.startup_timeout = startup_timeout
        self.admin_token = secrets.token_hex(16)
        self.controller_token = secrets.token_hex(16)
        self.etcd_port, self.etcd_peer_port, self.port = free_port(), free_port(), free_port()
        self.kubeconfig = self.workdir / "kubeconfig"
        self.server = f"https://127.0.0.1:{self.port}"
        self.processes: dict[str, ManagedProcess] = {}
        self.kubelet: ProcessKubelet | None = None
        self.real_node = None
        if kubelet and node == "real":
            from .realnode import RealNode

            self.real_node = RealNode(self.workdir / "node", **{"build": build, **(node_options or {})})
            self.server = f"https://{self.real_node.node_address}:{self.port}"
        self.api: KubeApi | None = None
        self.with_kueue, self.kueue, self._build = kueue, None, build
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.real_node:
            self.real_node.prepare_host()
        self.pki = pki.generate(self.workdir / "pki")
        node_tokens = self.real_node.token_lines() if self.real_node else []
        (self.workdir / "tokens.csv").write_text("".join(line + "\n" for line in [
            f"{self.admin_token},admin,admin-uid,system:masters",
            f"{self.controller_token},system:kube-controller-manager,kcm-uid,system:masters", *node_tokens]))
        self._write_kubeconfig(self.kubeconfig, self.admin_token, "admin")
        self._write_kubeconfig(self.workdir / "controller-manager.kubeconfig", self.controller_token,
                               "system:kube-controller-manager")
        started = time.monotonic()
        self._spawn("etcd", self._etcd_argv())
        apiserver_argv = self._apiserver_argv()
        if self.real_node:
            apiserver_argv = with_flags(apiserver_argv, self.real_node.apiserver_flags(self.pki))
        self._spawn("kube-apiserver", apiserver_argv)
        self.api = KubeApi(load_configuration(str(self.kubeconfig), in_cluster=False),
                           retry=RetryPolicy(attempts=3, initial_wait=0.1, max_wait=1.0))
        self.wait_ready()
        self._spawn("kube-controller-manager", self._controller_manager_argv())
        self._wait_for(lambda: self._exists("serviceaccounts", "default", "default"),
                       "the service-account controller to create default/default")
        if self.real_node:
            scheduler_kubeconfig = self.kubeconfig_for_token(
                self.real_node.tokens["kube-scheduler"], self.workdir / "scheduler.kubeconfig", "kube-scheduler")
            self._spawn("kube-scheduler", self.real_node.scheduler_argv(scheduler_kubeconfig))
            self.real_node.start(self)
        elif self.with_kubelet:
            options = dict(self.kubelet_options)
            options.setdefault("api_server_port", self.port)
            options.setdefault("log_tls", (self.pki.ca_cert, *pki.issue_serving(
                self.pki, options.get("node_name", "local-node"), ("127.0.0.1",), self.workdir / "pki")))
            # The kubelet rides out API-server restarts, as a real one does.
            kubelet_api = KubeApi(load_configuration(str(self.kubeconfig), in_cluster=False),
                                  retry=RetryPolicy(attempts=60, initial_wait=0.1, max_wait=1.0))
            self.kubelet = ProcessKubelet(kubelet_api, self.workdir / "kubelet", **options).start()
        if self.with_kueue:
            from .kueue import Kueue

            settings = self.with_kueue if isinstance(self.with_kueue, dict) else {}
            self.kueue = Kueue(self, build=self._build, settings=settings).start()
        self._started = True
        log.info("local cluster ready at %s in %.1fs", self.server, time.monotonic() - started)

    def stop(self) -> None:
        """Stop the kubelet's pods and every control-plane process; remove the data."""
        atexit.unregister(self.stop)
        if self.kubelet:
            self.kubelet.stop()
            self.kubelet = None
        if self.real_node:
            apiserver = self.processes.get("kube-apiserver")
            self.real_node.stop(self.api if apiserver and apiserver.alive else None)
        for name in ("kueue", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.processes:
                self.processes[name].stop(timeout=3.0)
        if self.real_node:
            self.real_node.release_host()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._started = False

    # -- fault hooks -------------------------------------------------------------------

    def restart_apiserver(self, downtime: float = 0.0) -> None:
        """Stop kube-apiserver, stay down ``downtime`` seconds, start it again, wait ready."""
        self.processes["kube-apiserver"].stop(timeout=3.0)
        time.sleep(downtime)
        self.processes["kube-apiserver"].start()
        self.wait_ready()

    def compact_etcd(self) -> int:
        """Compact etcd at its current revision; watches from older versions get 410."""
        http = urllib3.PoolManager()
        base = f"http://127.0.0.1:{self.etcd_port}/v3/kv"
        answer = http.request("POST", f"{base}/range", body=json.dumps(
            {"key": base64.b64encode(b"/").decode(), "limit": 1}).encode())
        revision = int(json.loads(answer.data)["header"]["revision"])
        result = http.request("POST", f"{base}/compaction",
                              body=json.dumps({"revision": revision, "physical": True}).encode())
        if result.status != 200 and b"has been compacted" not in result.data:  # nothing new: fine
            raise ControlPlaneError(f"etcd compaction failed: {result.data!r}")
        return revision

    # -- helpers for tests -------------------------------------------------------------

    def create_namespace(self, name: str, wait_service_account: bool = True) -> str:
        self.api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                               "metadata": {"name": name}})
        if wait_service_account:
            self._wait_for(lambda: self._exists("serviceaccounts", name, "default"),
                           f"service account {name}/default")
        return name

    def delete_namespace(self, name: str) -> None:
        self.api.delete(object_path("namespaces", None, name))

    def service_account_token(self, namespace: str, name: str, expiration: int = 3600) -> str:
        """A token for a ServiceAccount, from the TokenRequest API."""
        answer = self.api.create(object_path("serviceaccounts", namespace, name, "token"), {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration}})
        return answer["status"]["token"]

    def kubeconfig_for_token(self, token: str, path: str | Path, user: str = "user",
                             namespace: str = "default") -> Path:
        """Write a kubeconfig that authenticates with ``token``."""
        return self._write_kubeconfig(Path(path), token, user, namespace)

    def api_for_token(self, token: str) -> KubeApi:
        path = self.workdir / f"kubeconfig-{secrets.token_hex(4)}"
        return KubeApi(load_configuration(str(self.kubeconfig_for_token(token, path)), in_cluster=False),
                       retry=RetryPolicy(attempts=1))

    def wait_ready(self) -> None:
        def ready() -> bool:
            try:
                self.api.request_once("GET", "/readyz", timeout=5)
                return True
            except ApiError:
                return False
        self._wait_for(ready, "kube-apiserver /readyz")

    # -- internals ---------------------------------------------------------------------

    def _exists(self, kind: str, namespace: str | None, name: str) -> bool:
        try:
            self.api.request_once("GET", object_path(kind, namespace, name))
            return True
        except ApiError:
            return False

    def _wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            for process in self.processes.values():
                if not process.alive:
                    raise ControlPlaneError(
                        f"{process.name} exited while waiting for {what}:\n{process.log_tail()}")
            if condition():
                return
            time.sleep(0.1)
        raise ControlPlaneError(f"timed out after {self.startup_timeout}s waiting for {what}")

    def _spawn(self, name: str, argv: list[str], **popen_options) -> ManagedProcess:
        process = ManagedProcess(name, argv, self.workdir / f"{name}.log")
        self.processes[name] = process
        process.start(**popen_options)
        return process

    def _write_kubeconfig(self, path: Path, token: str, user: str, namespace: str = "default") -> Path:
        ca = base64.b64encode(self.pki.ca_cert.read_bytes()).decode()
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "local",
            "clusters": [{"name": "local", "cluster": {"server": self.server,
                                                      "certificate-authority-data": ca}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": user,
                                                      "namespace": namespace}}],
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def _etcd_argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        return [str(self.bin_dir / "etcd"), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}", "--unsafe-no-fsync=true", "--log-level=warn"]

    def _apiserver_argv(self) -> list[str]:
        argv = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--secure-port={self.port}", "--bind-address=127.0.0.1",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={self.pki.serving_cert}", f"--tls-private-key-file={self.pki.serving_key}",
            f"--client-ca-file={self.pki.ca_cert}",
            "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
            "--authorization-mode=RBAC", f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.pki.service_account_public_key}",
            f"--service-account-signing-key-file={self.pki.service_account_key}",
            f"--watch-cache={'true' if self.watch_cache else 'false'}",
            "--profiling=false", "--endpoint-reconciler-type=none",
            "--max-requests-inflight=800", "--max-mutating-requests-inflight=400",
            # pods/log and exec: the API server calls the node's kubelet at its InternalIP.
            f"--kubelet-client-certificate={self.pki.kubelet_client_cert}",
            f"--kubelet-client-key={self.pki.kubelet_client_key}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
        if self.audit_log_path:
            policy = self.workdir / "audit-policy.json"
            policy.write_text(json.dumps({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
                                          "rules": [{"level": "Metadata"}]}))
            argv += [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log_path}",
                     "--audit-log-mode=blocking", "--audit-log-format=json"]
        return argv

    def _controller_manager_argv(self) -> list[str]:
        controllers = CONTROLLERS + (REAL_NODE_CONTROLLERS if self.real_node else ())
        argv = [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.workdir / 'controller-manager.kubeconfig'}",
            f"--controllers={','.join(controllers)}",
            f"--service-account-private-key-file={self.pki.service_account_key}",
            f"--root-ca-file={self.pki.ca_cert}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--kube-api-qps=200", "--kube-api-burst=400", "--concurrent-job-syncs=10",
            "--profiling=false",
        ]
        return with_flags(argv, self.real_node.controller_manager_flags()) if self.real_node else argv


def main() -> None:  # pragma: no cover - manual use: keep a cluster up until Ctrl-C
    logging.basicConfig(level=logging.INFO)
    with LocalCluster() as cluster:
        print(f"export KUBECONFIG={cluster.kubeconfig}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    main()
